"""
FocalRetinaNet vs Detectron2's RetinaNet, same weights, same images, side by side in one run,
for each CPU instruction set asked for.

    .venv/bin/python benchmarks/bench_model.py [--device cpu|cuda] [--size 512] [--reps 5]
        [--isa native,AVX2]

The models are built from Detectron2's ``COCO-Detection/retinanet_R_50_FPN_1x.yaml`` (R50-FPN,
80 classes): FocalRetinaNet with the plugin's defaults (``MODEL.FOCAL_RETINANET.CHANNELS_LAST
"auto"``: the row names the formats it picked for training and inference, and
``MODEL.FOCAL_RETINANET.WINOGRAD "auto"``: ", Winograd" where it picked it), with each memory
format forced, compiled (``MODEL.FOCAL_RETINANET.COMPILE True``, default memory format), and on
CPU with ``SOLVER.AMP.ENABLED`` (training forward in bfloat16 autocast, where oneDNN runs it in
hardware; its inference is the default's, not timed again); the weights are copied so that all
compute the same function. Timed: a training step (forward + backward on 2 images of size x size
with a few boxes each) and inference (forward in eval mode, post-processing included), one phase
after the other. The repetitions rotate the order of the models; medians are reported, after
untimed warm-up steps of the phase (the first call is reported apart: it includes the
compilations, and the default model's change of memory format). The speed-up is the median over
repetitions of the ratio of Detectron2's time to the model's in the same repetition, which
cancels the slow drifts of a shared machine. Peak memory: the growth of PyTorch's allocations
during one extra step (on CPU, a training step after one more, that lets the profiler see the
previous step's gradients freed: before 2026-12-03 the CPU peaks counted them as never freed,
+144 MiB for R50-FPN in every row).

On CPU, each entry of ``--isa`` runs in a child process with ``ONEDNN_MAX_CPU_ISA`` set to it
("native": unset), so one invocation measures e.g. an AVX-512 machine as it is and as an
AVX2-only one.
"""

import argparse
import datetime
import json
import statistics
import time
from typing import Callable, Dict, List

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from focal_det2 import add_focal_config
from focal_det2.modeling.acceleration import (
    choose_channels_last,
    choose_winograd,
    cpu_bfloat16_support,
)

from common import add_isa_argument, load, machine, peak_bytes, run_isa_child, sync

REFERENCE = "Detectron2 RetinaNet"
# Timed in training only: its inference is the default model's (float32).
AMP = "FocalRetinaNet, SOLVER.AMP.ENABLED (bfloat16 autocast)"


def build_models(device: str) -> Dict[str, torch.nn.Module]:
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    models = {REFERENCE: build_model(cfg)}
    cfg = cfg.clone()
    add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    auto = {
        mode: (
            "NHWC"
            if choose_channels_last("auto", device, training=mode == "training")[0]
            else "NCHW"
        )
        for mode in ("training", "inference")
    }
    winograd = ", Winograd" if choose_winograd("auto", device)[0] else ""
    default = f"{auto['training']} training, {auto['inference']} inference{winograd}"
    variants = {
        f"FocalRetinaNet (default: {default})": [],
        "FocalRetinaNet, NHWC": ["MODEL.FOCAL_RETINANET.CHANNELS_LAST", "on"],
        "FocalRetinaNet, NCHW": ["MODEL.FOCAL_RETINANET.CHANNELS_LAST", "off"],
        "FocalRetinaNet, compiled": ["MODEL.FOCAL_RETINANET.COMPILE", True],
    }
    if device == "cpu" and cpu_bfloat16_support()[0]:
        # Without AMX or AVX512-BF16 in oneDNN, bfloat16 is slower than float32 (the log says
        # so): minutes of a known loss, not timed.
        variants[AMP] = ["SOLVER.AMP.ENABLED", True]
    for name, opts in variants.items():
        variant = cfg.clone()
        variant.merge_from_list(opts)
        models[name] = build_model(variant)
        models[name].load_state_dict(models[REFERENCE].state_dict())
    return models


def make_batch(size: int, device: str) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        xy = torch.rand(6, 2, generator=g) * size * 0.6
        wh = 24 + torch.rand(6, 2, generator=g) * size * 0.35
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1).clamp(max=size - 1))
        instances.gt_classes = torch.randint(0, 80, (6,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        batch.append({"image": image.to(device), "instances": instances, "height": size})
        batch[-1]["width"] = size
    return batch


def train_step(model: torch.nn.Module, batch: List[dict]) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage(1):
        sum(model(batch).values()).backward()


def inference(model: torch.nn.Module, batch: List[dict]) -> None:
    if model.training:  # once per phase, as an evaluation loop does
        model.eval()
    with torch.no_grad():
        model([{k: v for k, v in x.items() if k != "instances"} for x in batch])


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(args) -> dict:
    """Times and peaks of every model in this process, as a JSON-able dict."""
    load_before = load()
    models = build_models(args.device)
    batch = make_batch(args.size, args.device)
    phases = {"training step": train_step, "inference": inference}
    timed_models = {p: [m for m in models if p == "training step" or m != AMP] for p in phases}
    first = {
        (p, m): timed(lambda: fn(models[m], batch), args.device)
        for p, fn in phases.items()
        for m in timed_models[p]
    }
    times: Dict[tuple, List[float]] = {(p, m): [] for p in phases for m in timed_models[p]}
    rows = []
    # One phase after the other, as a model trains for many steps between evaluations: a
    # model whose memory format differs by mode converts its parameters once per phase
    # change (in its first call), not in the timed calls or in the peak.
    for phase, fn in phases.items():
        names = timed_models[phase]
        for _ in range(max(1, args.warmup - 1)):  # the first calls were the first warm-up
            for name in names:
                fn(models[name], batch)
        for rep in range(args.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                times[phase, name].append(timed(lambda: fn(models[name], batch), args.device))
        reference = times[phase, REFERENCE]
        for name in names:
            values = times[phase, name]
            rows.append(
                {
                    "phase": phase,
                    "model": name,
                    "first": first[phase, name],
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "speed_up": statistics.median(r / v for r, v in zip(reference, values)),
                    "peak_mib": peak_bytes(
                        lambda: fn(models[name], batch),
                        args.device,
                        repeated=phase == "training step",
                    )
                    / 2**20,
                }
            )
    return {
        "machine": machine(args.device),
        "load": f"{load_before} before, {load()} after",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    add_isa_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    isas = args.isa.split(",") if args.device == "cpu" else ["native"]
    print("# FocalRetinaNet vs Detectron2's RetinaNet (R50-FPN, 80 classes)")
    print()
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- 2 images of {args.size}x{args.size}, 6 boxes each; {args.reps} reps, order rotated")
    print(f"  after {args.warmup} warm-up steps; times in s; peak: allocation growth in MiB")
    arguments = ["--device", args.device, "--size", str(args.size), "--reps", str(args.reps)]
    arguments += ["--warmup", str(args.warmup)]
    results = {isa: run_isa_child(__file__, arguments, isa) for isa in isas}
    for isa, result in results.items():
        print(f"- ISA {isa}: {result['machine']}; load average {result['load']}")
    print()
    print("| ISA | phase | model | first call (s) | median (s) | min-max (s) | speed-up | peak |")
    print("|---|---|---|---|---|---|---|---|")
    for isa, result in results.items():
        for row in result["rows"]:
            print(
                f"| {isa} | {row['phase']} | {row['model']} | {row['first']:.2f} | "
                f"{row['median']:.3f} | {row['min']:.3f}-{row['max']:.3f} | "
                f"{row['speed_up']:.2f}x | {row['peak_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
