"""
Benchmark of RetinaNet's classification loss, forward + backward, side by side in one run.

    .venv/bin/python benchmarks/bench_focal_loss.py [--device cpu|cuda] [--sizes 60000x80 ...]

Compares ``focal_det2.modeling.losses.sigmoid_focal_loss_with_labels`` (compiled, and its
eager fallback; and compiled with a per-class alpha, a (K,) tensor of values from 0.1 to 0.4)
with Detectron2's path (valid mask, one-hot targets, fvcore's
``sigmoid_focal_loss_jit``), fvcore's eager function, ``torchvision.ops.sigmoid_focal_loss``
and ``torch.compile`` of fvcore's function, the last three on the same one-hot targets. Every
method gets the same (N, K) logits and (N,) labels (~1% positives, ~1% ignored, the rest
background, like a RetinaNet batch) and is timed from the labels to the gradient of the logits
(``reduction="sum"``). The repetitions of the methods are interleaved (rotating their order) so
that a change of the machine's load hits all of them; medians are reported. The first call of
each method (compilation included, on a fresh inductor cache unless ``--warm-cache``) is timed
and reported apart, then ``--warmup`` untimed calls precede the timed ones.
"""

import argparse
import contextlib
import datetime
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from fvcore.nn import sigmoid_focal_loss, sigmoid_focal_loss_jit
from torch._inductor.utils import fresh_cache
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss as torchvision_sigmoid_focal_loss

from focal_det2.modeling._fused_focal_loss import DISABLE_COMPILE_ENV
from focal_det2.modeling.losses import sigmoid_focal_loss_with_labels

from common import load, machine, peak_bytes, sync

ALPHA, GAMMA = 0.25, 2.0
DETECTRON2 = "Detectron2 (one-hot + fvcore jit)"
FUSED = "ours: fused, torch.compile"
PER_CLASS = "ours: fused, torch.compile, per-class alpha"

MEMORY_NOTE = {
    "cpu": (
        "Peak memory (CPU): PyTorch's CPU allocator reports every allocation and free to the "
        "profiler (`torch.profiler.profile(profile_memory=True)`); in one extra, untimed "
        "forward + backward per method the allocation events are replayed in time order and the "
        "peak of the bytes live above the start is reported. It counts every tensor the method "
        "allocates (one-hot targets, masked copies, saved tensors, compiled kernels' buffers, "
        "the gradient left in `.grad`), not the inputs, nor memory outside PyTorch's allocator "
        "(Python objects, OpenMP, compiler)."
    ),
    "cuda": (
        "Peak memory (CUDA): `torch.cuda.max_memory_allocated()` over one extra, untimed "
        "forward + backward per method, minus the memory allocated before it (inputs)."
    ),
}


def make_batch(n: int, k: int, device: str, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float32 logits around RetinaNet's prior (-log 99) and (n,) labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2.0 - 4.6
    u = torch.rand(n, generator=g)
    labels = torch.full((n,), k, dtype=torch.int64)
    positive = u < 0.01
    labels[positive] = torch.randint(0, k, (int(positive.sum()),), generator=g)
    labels[u > 0.99] = -1
    return logits.to(device), labels.to(device)


def one_hot_path(loss_fn: Callable) -> Callable:
    """Detectron2's RetinaNet recipe around a loss of (inputs, targets): mask, one-hot, sum."""

    def run(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid = labels >= 0
        targets = F.one_hot(labels[valid], logits.shape[1] + 1)[:, :-1].to(logits.dtype)
        return loss_fn(logits[valid], targets)

    return run


def per_class_alpha(num_classes: int, device: torch.device) -> torch.Tensor:
    """(K,) alphas from 0.1 to 0.4: another value for each class."""
    return torch.linspace(0.1, 0.4, num_classes, device=device)


def fused(eager: bool, per_class: bool = False) -> Callable:
    alphas: Dict[Tuple[int, torch.device], torch.Tensor] = {}

    def run(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        alpha = ALPHA
        if per_class:
            key = (logits.shape[1], logits.device)
            alpha = alphas.setdefault(key, per_class_alpha(*key))
        if eager:
            os.environ[DISABLE_COMPILE_ENV] = "1"
        try:
            return sigmoid_focal_loss_with_labels(logits, labels, alpha, GAMMA, "sum")
        finally:
            if eager:
                del os.environ[DISABLE_COMPILE_ENV]

    return run


def methods() -> Dict[str, Callable]:
    compiled_fvcore = torch.compile(sigmoid_focal_loss)
    return {
        FUSED: fused(eager=False),
        PER_CLASS: fused(eager=False, per_class=True),
        "ours: fused, eager fallback": fused(eager=True),
        DETECTRON2: one_hot_path(lambda x, t: sigmoid_focal_loss_jit(x, t, ALPHA, GAMMA, "sum")),
        "fvcore eager (one-hot)": one_hot_path(
            lambda x, t: sigmoid_focal_loss(x, t, ALPHA, GAMMA, "sum")
        ),
        "torchvision.ops (one-hot)": one_hot_path(
            lambda x, t: torchvision_sigmoid_focal_loss(x, t, ALPHA, GAMMA, "sum")
        ),
        "torch.compile(fvcore) (one-hot)": one_hot_path(
            lambda x, t: compiled_fvcore(x, t, ALPHA, GAMMA, "sum")
        ),
    }


def step(
    fn: Callable, logits: torch.Tensor, labels: torch.Tensor, device: str
) -> Tuple[float, float]:
    """Seconds of one forward + backward, and the loss."""
    logits.grad = None
    sync(device)
    start = time.perf_counter()
    loss = fn(logits, labels)
    loss.backward()
    sync(device)
    return time.perf_counter() - start, loss.item()


def copy_bandwidth(nbytes: int, device: str) -> float:
    """Bytes per second of a device-to-device copy of nbytes: the reachable memory bound."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def fused_graph_count() -> str:
    """How many graphs dynamo holds for the fused kernel (1: no size recompiled it)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        from focal_det2.modeling import _fused_focal_loss as fused_focal_loss

        return str(len(_debug_get_cache_entry_list(fused_focal_loss._kernel_rows_and_grad)))
    except (ImportError, AttributeError, TypeError) as exc:
        return f"n/a ({exc})"


def bench_size(n: int, k: int, fns: Dict[str, Callable], args) -> List[dict]:
    logits, labels = make_batch(n, k, args.device)
    logits.requires_grad_()
    rows = {name: {"name": name, "times": []} for name in fns}
    for name, fn in fns.items():
        rows[name]["first"], rows[name]["loss"] = step(fn, logits, labels, args.device)
        for _ in range(args.warmup):
            step(fn, logits, labels, args.device)
    names = list(fns)
    for rep in range(args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            rows[name]["times"].append(step(fns[name], logits, labels, args.device)[0])
    for name, fn in fns.items():
        logits.grad = None
        rows[name]["peak"] = peak_bytes(lambda: fn(logits, labels).backward(), args.device)
    reference = rows[DETECTRON2]
    elem = logits.element_size()
    # The least traffic of any implementation: read the logits and labels, write the gradient.
    min_bytes = n * k * elem * 2 + n * labels.element_size()
    bound = copy_bandwidth(n * k * elem, args.device) if args.device == "cuda" else None
    out = []
    for row in rows.values():
        median = statistics.median(row["times"])
        row.update(
            size=f"{n} x {k}",
            median=median,
            spread=(min(row["times"]), max(row["times"])),
            speedup=statistics.median(reference["times"]) / median,
            mem_ratio=row["peak"] / reference["peak"],
            rel_diff=abs(row["loss"] - reference["loss"]) / abs(reference["loss"]),
            bandwidth=min_bytes / median,
            bound=bound,
        )
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", default=["60000x80", "240000x80"], help="NxK")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument(
        "--warm-cache", action="store_true", help="reuse the inductor cache (default: fresh one)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]

    started = datetime.datetime.now().astimezone()
    load_before = load()
    rows = []
    # One set of methods (and compiled functions) for all sizes, as in a training run.
    fns = methods()
    with contextlib.nullcontext() if args.warm_cache else fresh_cache():
        for n, k in sizes:
            rows += bench_size(n, k, fns, args)

    print(f"# Focal loss, forward + backward (reduction='sum', alpha={ALPHA}, gamma={GAMMA})\n")
    print(f"- date: {started:%Y-%m-%d %H:%M %Z}")
    print(f"- machine: {machine(args.device)}")
    print(f"- load average (1, 5, 15 min) before: {load_before}; after: {load()}")
    print(
        f"- {args.reps} interleaved repetitions per method after {args.warmup} warm-up calls; "
        "median (min-max) in ms. 'first call' is the first forward + backward of the process "
        "at that size: compilation (inductor cache: "
        f"{'warm' if args.warm_cache else 'fresh'}) plus one run."
    )
    print("- float32 logits; labels ~1% positives, ~1% ignored, the rest background.")
    print(f"- graphs compiled for the fused kernel over all sizes: {fused_graph_count()}")
    print(f"- {MEMORY_NOTE[args.device]}")
    if args.device == "cuda":
        print(
            "- bandwidth: the least traffic of any implementation (read logits + labels, write "
            "the gradient) over the median time, against a device-to-device copy of the logits."
        )
    print()
    header = [
        "size (N x K)",
        "method",
        "first call (s)",
        "fwd+bwd median (ms)",
        "min-max (ms)",
        "speed-up vs D2",
        "peak memory (MiB)",
        "memory vs D2",
        "loss rel. diff vs D2",
    ]
    if args.device == "cuda":
        header += ["GB/s (% of copy)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [
            row["size"],
            row["name"],
            f"{row['first']:.2f}",
            f"{row['median'] * 1e3:.1f}",
            f"{row['spread'][0] * 1e3:.1f}-{row['spread'][1] * 1e3:.1f}",
            f"{row['speedup']:.2f}x",
            f"{row['peak'] / 2**20:.0f}",
            f"{row['mem_ratio']:.2f}x",
            "(other alpha)" if row["name"] == PER_CLASS else f"{row['rel_diff']:.1e}",
        ]
        if args.device == "cuda":
            pct = 100 * row["bandwidth"] / row["bound"]
            cells.append(f"{row['bandwidth'] / 1e9:.0f} ({pct:.0f}%)")
        print("| " + " | ".join(cells) + " |")
    print()
    for size in dict.fromkeys(row["size"] for row in rows):
        by_name = {row["name"]: row for row in rows if row["size"] == size}
        ratio = by_name[PER_CLASS]["median"] / by_name[FUSED]["median"]
        print(
            f"- {size}: per-class alpha takes {ratio:.3f}x the time of the scalar alpha (medians)"
        )


if __name__ == "__main__":
    main()
