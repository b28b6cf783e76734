"""
The paper's figures and tables:

    python -m focal_det2.paper figure4 --config-file CFG --output DIR MODEL.WEIGHTS model.pth
    python -m focal_det2.paper sweep --config-file CFG --set KEY=v1,v2 --output DIR [KEY VALUE ...]
"""

import argparse
import sys
from typing import List, Optional

from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..data import add_register_coco_argument, register_coco_datasets
from .figure4 import run_figure4
from .sweep import parse_set, run_sweep


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the config")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder of the results")
    add_register_coco_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")


def argument_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m focal_det2.paper``."""
    parser = argparse.ArgumentParser(prog="python -m focal_det2.paper", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    figure4 = commands.add_parser(
        "figure4",
        help="Figure 4: cumulative focal loss of a trained model's positives and negatives",
    )
    _common(figure4)
    figure4.add_argument(
        "--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="focal gammas"
    )
    figure4.add_argument(
        "--max-images", type=int, default=0, help="use the first N test images (0: all)"
    )
    sweep = commands.add_parser(
        "sweep", help="train one run per grid point with train_net.py; table.md and sweep.png"
    )
    _common(sweep)
    sweep.add_argument(
        "--set",
        dest="sets",
        action="append",
        required=True,
        metavar="KEY=v1,v2,...",
        help="values of one config key; the grid is the product of all --set (repeatable)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m focal_det2.paper``: the exit status."""
    args = argument_parser().parse_args(argv)
    prog = f"focal_det2.paper {args.command}"
    if len(args.opts) % 2:
        sys.exit(f"{prog}: config overrides must be KEY VALUE pairs; got {args.opts}")
    try:
        if args.command == "figure4":
            setup_logger(name="detectron2")
            register_coco_datasets(args.register_coco)
            cfg = load_config(args.config_file, args.opts)
            shares = run_figure4(cfg, args.output, gammas=args.gammas, max_images=args.max_images)
            print(f"wrote {args.output}/figure4.png and {args.output}/figure4.csv")
            for gamma in args.gammas:
                print(
                    f"gamma {gamma:g}: the hardest 20% of negatives carry "
                    f"{100 * shares['negatives'][gamma]:.1f}% of the negatives' loss "
                    f"(positives: {100 * shares['positives'][gamma]:.1f}%)"
                )
            return 0
        sets = [parse_set(spec) for spec in args.sets]
        train_args = [x for spec in args.register_coco for x in ("--register-coco", *spec)]
        runs = run_sweep(args.config_file, sets, args.output, opts=args.opts, train_args=train_args)
    except ValueError as e:
        sys.exit(f"{prog}: {e}")
    failed = [name for name, results in runs if results["status"] == "failed"]
    if failed:
        print(f"{prog}: failed runs (re-run to retry): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
