"""
Training steps with the batches grouped by size (``DATALOADER.SIZE_GROUPING True``) against
Detectron2's batches (grouped by orientation only), same model, same config, one run.

    .venv/bin/python benchmarks/bench_size_grouping.py [--steps N] [--config-file CFG] [KEY V ...]

Both loaders are the trainer's (``FocalTrainer.build_train_loader``). Per loader: the mean
padded pixels per batch (the images of a batch are padded to its largest one, rounded up to
the backbone's size divisibility) and the mean time of a training step (forward, backward,
SGD step), taken in alternating rounds after a warm-up. The mean, not the median: the grouped
batches are of different sizes by design, and the wall time of a run is the sum of its steps.
"""

import argparse
import datetime
import itertools
import math
import statistics
import time
from typing import Dict, List

import torch
from detectron2.utils.events import EventStorage

from focal_det2.config import load_config
from focal_det2.data import register_demo_datasets
from focal_det2.engine import FocalTrainer

from common import load, machine

ROUNDS = 4
WARMUP_STEPS = 5


def padded_pixels(batch: List[Dict], divisibility: int) -> int:
    def padded(side: int) -> int:
        return math.ceil(side / divisibility) * divisibility

    height = max(sample["image"].shape[-2] for sample in batch)
    width = max(sample["image"].shape[-1] for sample in batch)
    return padded(height) * padded(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--config-file", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per loader")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs of the config")
    args = parser.parse_args()

    register_demo_datasets()
    modes = {"Detectron2 (orientation)": False, "SIZE_GROUPING True": True}
    cfgs = {
        name: load_config(args.config_file, [*args.opts, "DATALOADER.SIZE_GROUPING", str(on)])
        for name, on in modes.items()
    }
    cfg = next(iter(cfgs.values()))
    torch.manual_seed(0)
    model = FocalTrainer.build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    divisibility = max(model.backbone.size_divisibility, 1)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"Machine: {machine('cpu')}; load before: {load()}")
    print(
        f"Config: {args.config_file} {' '.join(args.opts)}; INPUT.MIN_SIZE_TRAIN "
        f"{tuple(cfg.INPUT.MIN_SIZE_TRAIN)}, SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}, "
        f"{args.steps} timed steps per loader in {ROUNDS} alternating rounds after "
        f"{WARMUP_STEPS} warm-up steps each"
    )

    with EventStorage():
        loaders = {name: iter(FocalTrainer.build_train_loader(c)) for name, c in cfgs.items()}
        pixels: Dict[str, List[int]] = {name: [] for name in modes}
        seconds: Dict[str, List[float]] = {name: [] for name in modes}

        def step(name: str, timed: bool) -> None:
            batch = next(loaders[name])
            start = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            if timed:
                seconds[name].append(time.perf_counter() - start)
                pixels[name].append(padded_pixels(batch, divisibility))

        for name in modes:
            for _ in range(WARMUP_STEPS):
                step(name, timed=False)
        per_round = math.ceil(args.steps / ROUNDS)
        for _, name in itertools.product(range(ROUNDS), modes):
            for _ in range(per_round):
                step(name, timed=True)

    reference = next(iter(modes))
    print()
    print("| batches | steps | mean padded px per batch | vs Detectron2 | mean s/step | speed-up |")
    print("|--|--|--|--|--|--|")
    for name in modes:
        px, s = statistics.mean(pixels[name]), statistics.mean(seconds[name])
        px_ratio = px / statistics.mean(pixels[reference])
        speed_up = statistics.mean(seconds[reference]) / s
        print(
            f"| {name} | {len(seconds[name])} | {px:,.0f} | {px_ratio:.2f}x | {s:.3f} | "
            f"{speed_up:.2f}x |"
        )
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
