"""
FocalRetinaNet vs Detectron2's RetinaNet, same weights, same images, side by side in one run.

    .venv/bin/python benchmarks/bench_model.py [--device cpu|cuda] [--size 512] [--reps 9]

The models are built from Detectron2's ``COCO-Detection/retinanet_R_50_FPN_1x.yaml`` (R50-FPN,
80 classes), FocalRetinaNet with the plugin's defaults and once more with
``MODEL.FOCAL_RETINANET.CHANNELS_LAST False`` (to show the fused loss's share of the gain apart);
the weights are copied so that all compute the same function. Timed: a training step (forward +
backward on 2 images of size x size with a few boxes each) and inference (forward in eval mode,
post-processing included). The repetitions rotate the order of the models; medians are
reported, after untimed warm-up steps (the first one reported apart: it includes the fused
loss's compile). The speed-up is the median over repetitions of the ratio of Detectron2's time
to the model's in the same repetition, which cancels the slow drifts of a shared machine.
Peak memory: the growth of PyTorch's allocations during one extra step.
"""

import argparse
import datetime
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

from common import load, machine, peak_bytes, sync

MODELS = ("Detectron2 RetinaNet", "FocalRetinaNet", "FocalRetinaNet, CHANNELS_LAST False")


def build_models(device: str) -> Dict[str, torch.nn.Module]:
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    reference = build_model(cfg)
    cfg = cfg.clone()
    add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    ours = build_model(cfg)
    cfg.MODEL.FOCAL_RETINANET.CHANNELS_LAST = False
    ours_contiguous = build_model(cfg)
    for model in (ours, ours_contiguous):
        model.load_state_dict(reference.state_dict())
    return dict(zip(MODELS, (reference, ours, ours_contiguous)))


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
    model.eval()
    with torch.no_grad():
        model([{k: v for k, v in x.items() if k != "instances"} for x in batch])


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    load_before = load()
    models = build_models(args.device)
    batch = make_batch(args.size, args.device)
    phases = {"training step": train_step, "inference": inference}
    first = {
        (p, m): timed(lambda: fn(models[m], batch), args.device)
        for p, fn in phases.items()
        for m in MODELS
    }
    for _ in range(args.warmup - 1):
        for phase, fn in phases.items():
            for name in MODELS:
                fn(models[name], batch)
    times: Dict[tuple, List[float]] = {(p, m): [] for p in phases for m in MODELS}
    for rep in range(args.reps):
        for phase, fn in phases.items():
            for name in MODELS[rep % len(MODELS) :] + MODELS[: rep % len(MODELS)]:
                times[phase, name].append(timed(lambda: fn(models[name], batch), args.device))
    peaks = {
        (p, m): peak_bytes(lambda: fn(models[m], batch), args.device)
        for p, fn in phases.items()
        for m in MODELS
    }

    print("# FocalRetinaNet vs Detectron2's RetinaNet (R50-FPN, 80 classes)")
    print()
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- machine: {machine(args.device)}")
    print(f"- load average before: {load_before}; after: {load()}")
    print(f"- 2 images of {args.size}x{args.size}, 6 boxes each; {args.reps} reps, order rotated")
    print(f"  after {args.warmup} warm-up steps; median (min-max) in s; peak = allocation growth")
    print()
    print("| phase | model | first call (s) | median (s) | min-max (s) | speed-up | peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for phase in phases:
        reference = times[phase, MODELS[0]]
        for name in MODELS:
            values = times[phase, name]
            speed_up = statistics.median(r / v for r, v in zip(reference, values))
            median = statistics.median(values)
            print(
                f"| {phase} | {name} | {first[phase, name]:.2f} | {median:.3f} | "
                f"{min(values):.3f}-{max(values):.3f} | {speed_up:.2f}x | "
                f"{peaks[phase, name] / 2**20:.0f} |"
            )


if __name__ == "__main__":
    main()
