"""
The demo's training time against the demo recipe of issue 11's filing, on this machine, one run.

    .venv/bin/python benchmarks/bench_demo.py [--iters N] [--rounds R] [--isa native,AVX2]

The reference is ``configs/demo.yaml`` as it was when issue 11 was filed (commit c48857b, with the
plugin's default then, channels-last convolutions): 256 px, the paper's sigmoid loss, uniform
sampling, Detectron2's batches, 2,300 iterations of 4 images. It is written here as overrides of
today's ``configs/demo.yaml`` (``REFERENCE``), so both recipes run today's code. Each recipe trains
``--iters`` iterations with ``train_net.py`` in a child process, without evaluation, and
Detectron2's ``IterationTimer`` ("Overall training speed", first iterations excluded) gives its
seconds per iteration; the recipe's training time is its ``SOLVER.MAX_ITER`` times that. The
recipes alternate over ``--rounds``; each entry of ``--isa`` sets ``ONEDNN_MAX_CPU_ISA`` for its
children ("native": unset). Evaluation (about 30 s at the end of both recipes) is not timed.
"""

import argparse
import datetime
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch

from focal_det2.config import load_config

from common import isa_environment, load, machine

REFERENCE = [
    "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SigmoidFocalLoss",
    "MODEL.FOCAL_RETINANET.CHANNELS_LAST", "on",
    "DATALOADER.SAMPLER_TRAIN", "TrainingSampler",
    "DATALOADER.SIZE_GROUPING", "False",
    "INPUT.MIN_SIZE_TRAIN", "(256,)",
    "INPUT.MAX_SIZE_TRAIN", "256",
    "INPUT.MIN_SIZE_TEST", "256",
    "INPUT.MAX_SIZE_TEST", "256",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.BASE_LR", "0.02",
    "SOLVER.WARMUP_ITERS", "100",
    "SOLVER.STEPS", "(1850,2150)",
    "SOLVER.MAX_ITER", "2300",
]  # fmt: skip
SPEED = re.compile(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)")
CONFIG = "configs/demo.yaml"


def seconds_per_iteration(opts: List[str], iters: int, env: Dict[str, str]) -> float:
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as output_dir:
        command = [
            sys.executable, "train_net.py", "--config-file", CONFIG, *opts,
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()", "DATASETS.TEST", "()",
            "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "OUTPUT_DIR", output_dir,
        ]  # fmt: skip
        run = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        found = SPEED.search(run.stdout)
        if run.returncode != 0 or found is None:
            sys.exit(f"bench_demo.py: {' '.join(command)} failed:\n{run.stdout[-3000:]}")
        return float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--iters", type=int, default=100, help="iterations per recipe and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--isa", default="native", help="comma-separated: native,AVX2,...")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs of today's demo")
    args = parser.parse_args()

    today = "configs/demo.yaml" + (" with the overrides" if args.opts else "")
    recipes = {"issue 11's demo (c48857b, channels-last)": REFERENCE, today: args.opts}
    try:  # a wrong override fails here, before any training
        iterations = {name: load_config(CONFIG, o).SOLVER.MAX_ITER for name, o in recipes.items()}
    except ValueError as e:
        sys.exit(f"bench_demo.py: {e}")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"Machine: {machine('cpu')}; load before: {load()}")
    print(
        f"{args.iters} iterations per recipe and round, {args.rounds} round(s), recipes "
        f"alternating; today's demo overrides: {' '.join(args.opts) or 'none'}"
    )
    print()
    print(
        "| ISA | recipe | SOLVER.MAX_ITER | s/it (per round) | training time | vs issue 11's demo |"
    )
    print("|--|--|--|--|--|--|")
    for isa in args.isa.split(","):
        env = isa_environment(isa)
        speeds: Dict[str, List[float]] = {name: [] for name in recipes}
        for _ in range(args.rounds):
            for name, opts in recipes.items():
                speeds[name].append(seconds_per_iteration(opts, args.iters, env))
        totals = {name: iterations[name] * statistics.median(speeds[name]) for name in recipes}
        reference = totals[next(iter(recipes))]
        for name in recipes:
            per_round = ", ".join(f"{s:.3f}" for s in speeds[name])
            print(
                f"| {isa} | {name} | {iterations[name]} | {per_round} | "
                f"{totals[name] / 60:.1f} min | {totals[name] / reference:.2f}x |"
            )
    print(f"load after: {load()}; torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
