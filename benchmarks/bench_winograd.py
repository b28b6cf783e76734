"""
One 3x3 convolution of the RetinaNet head, direct (oneDNN, NCHW: the training format where
Winograd applies) vs Winograd (``focal_det2/modeling/winograd.py``), part by part, side by side
in one run, for each CPU instruction set asked for:

    .venv/bin/python benchmarks/bench_winograd.py [--reps 9] [--isa native,AVX2]

Parts: forward, the input's gradient (both NNPACK's F(6x6, 3x3) for Winograd) and the weight's
gradient (F(4x4, 3x3) in PyTorch ops for Winograd), on the head's shapes of R50-FPN at 2 x 512 px
(P3 64 x 64, P4 32 x 32, P5 16 x 16; the subnets' 256 -> 256 and COCO's classifier 256 -> 720)
and of 800 px (batch 1, P3 100 x 136, P4 50 x 68). The ratio is the median over repetitions of
direct / Winograd in the same repetition (the two alternate); "-" where the model keeps the
direct convolution (below 40 x 40 px for NNPACK, 32 x 32 for the weight's gradient).
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.nn import functional as F

from focal_det2.modeling import winograd

from common import add_isa_argument, machine, run_isa_child

SHAPES = [  # (images, input channels, output channels, height, width)
    (2, 256, 256, 64, 64),
    (2, 256, 720, 64, 64),
    (2, 256, 256, 32, 32),
    (2, 256, 720, 32, 32),
    (2, 256, 256, 16, 16),
    (1, 256, 256, 100, 136),
    (1, 256, 256, 50, 68),
]


def parts(shape) -> Dict[str, tuple]:
    """Part -> (direct, Winograd or None where the model keeps the direct convolution)."""
    n, c_in, c_out, height, width = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, height, width, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.05
    grad = torch.randn(n, c_out, height, width, generator=g)
    transposed = weight.flip(2, 3).transpose(0, 1).contiguous()
    nnpack = winograd.winograd_pays(x)
    return {
        "forward": (
            lambda: F.conv2d(x, weight, None, padding=1),
            (lambda: winograd.winograd_conv2d(x, weight, None)) if nnpack else None,
        ),
        "input gradient": (
            lambda: winograd._direct_gradients(grad, x, weight, input=True),
            (lambda: winograd.winograd_conv2d(grad, transposed, None)) if nnpack else None,
        ),
        "weight gradient": (
            lambda: winograd._direct_gradients(grad, x, weight, input=False),
            (
                (lambda: winograd._weight_gradient(x, grad))
                if winograd.weight_gradient_pays(x)
                else None
            ),
        ),
    }


def compare(direct: Callable, fast: Optional[Callable], reps: int) -> dict:
    """Median ms of each (alternating) and of their ratio; direct alone where ``fast`` is None."""
    runs = {"direct": direct, **({"winograd": fast} if fast is not None else {})}
    for fn in runs.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    row = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    if fast is not None:
        row["ratio"] = statistics.median(d / w for d, w in zip(times["direct"], times["winograd"]))
    return row


def measure(reps: int) -> dict:
    rows = []
    with torch.no_grad():
        for shape in SHAPES:
            for part, (direct, fast) in parts(shape).items():
                rows.append({"shape": shape, "part": part, **compare(direct, fast, reps)})
    return {"machine": machine("cpu"), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    add_isa_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.reps)))
        return
    if not torch._nnpack_available():
        sys.exit("bench_winograd: this build of torch has no NNPACK")
    results = {
        isa: run_isa_child(__file__, ["--reps", str(args.reps)], isa) for isa in args.isa.split(",")
    }
    print("# One head convolution: direct (oneDNN, NCHW) vs Winograd")
    print()
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- median of {args.reps} alternating repetitions; times in ms")
    for isa, result in results.items():
        print(f"- ISA {isa}: {result['machine']}")
    print()
    print("| ISA | images x channels in -> out, map | part | direct | Winograd | ratio |")
    print("|---|---|---|---|---|---|")
    for isa, result in results.items():
        for row in result["rows"]:
            n, c_in, c_out, height, width = row["shape"]
            shape = f"{n} x {c_in} -> {c_out}, {height} x {width}"
            fast = f"{row['winograd']:.1f} | {row['ratio']:.2f}x" if "ratio" in row else "- | -"
            print(f"| {isa} | {shape} | {row['part']} | {row['direct']:.1f} | {fast} |")


if __name__ == "__main__":
    main()
