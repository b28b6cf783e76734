#!/usr/bin/env python
"""
Train and evaluate FocalRetinaNet with Detectron2's trainer.

    python train_net.py --config-file configs/retinanet_R50_FPN.yaml --num-gpus 8
    python train_net.py --config-file configs/demo.yaml --eval-only MODEL.WEIGHTS model.pth
"""

import contextlib
import logging
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from focal_det2.anchor_coverage import log_anchor_coverage
from focal_det2.config import load_config
from focal_det2.data import (
    DatasetValidationError,
    add_register_coco_argument,
    register_coco_datasets,
    validate_datasets,
)
from focal_det2.engine import FocalTrainer as Trainer
from focal_det2.engine import TrainingStopped, forward_stop_signals
from focal_det2.lint import ConfigLintError, check_config
from focal_det2.weights import WeightsError, load_weights

logger = logging.getLogger("focal_det2")


def setup(args):
    """
    Register the command line's datasets, build the frozen config and validate the datasets it
    uses (``DATASETS.INVALID_POLICY``); exit with a message naming the file, dataset or key
    when one is bad.
    """
    try:
        register_coco_datasets(args.register_coco)
    except ValueError as e:
        sys.exit(f"train_net.py: {e}")
    try:
        cfg = load_config(args.config_file, args.opts)
    except ValueError as e:
        sys.exit(f"train_net.py: {e}")
    if cfg.SOLVER.AMP.ENABLED and not (
        cfg.MODEL.DEVICE.startswith("cuda")
        or (cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.META_ARCHITECTURE == "FocalRetinaNet")
    ):
        sys.exit(
            "train_net.py: SOLVER.AMP.ENABLED needs CUDA (Detectron2's AMPTrainer, float16) or "
            "MODEL.DEVICE cpu with MODEL.META_ARCHITECTURE FocalRetinaNet (bfloat16), not "
            f"MODEL.DEVICE {cfg.MODEL.DEVICE} with {cfg.MODEL.META_ARCHITECTURE}"
        )
    # Before default_setup creates OUTPUT_DIR: with the "error" policy, a bad dataset leaves
    # nothing behind.
    try:
        validate_datasets(cfg)
    except DatasetValidationError as e:
        sys.exit(f"train_net.py: {e}")
    # NUM_CLASSES against the data, keys RetinaNet ignores (warnings).
    try:
        check_config(cfg)
    except ConfigLintError as e:
        sys.exit(f"train_net.py: invalid config: {e}")
    return cfg


def main(args):
    """Train, or with ``--eval-only`` evaluate, in one process of the job."""
    result = train_or_evaluate(args)
    if comm.get_world_size() > 1:
        # Leave together: a process that exits while its peer's gloo threads still talk to it
        # can abort the peer ("terminate called without an active exception").
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return result


def train_or_evaluate(args):
    cfg = setup(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="focal_det2")
    logger.info("Running on %s", cfg.MODEL.DEVICE)
    try:
        if args.eval_only:
            model = Trainer.build_model(cfg)
            checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
            resume = args.resume and checkpointer.has_checkpoint()
            load_weights(model, checkpointer.get_checkpoint_file() if resume else cfg.MODEL.WEIGHTS)
            return Trainer.test(cfg, model)
        if comm.is_main_process():
            log_anchor_coverage(cfg)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    except WeightsError as e:
        sys.exit(f"train_net.py: {e}")
    except FloatingPointError as e:  # a non-finite loss, found before the optimizer step
        sys.exit(f"train_net.py: training stopped, the last checkpoint is intact: {e}")
    except TrainingStopped as e:
        print(f"train_net.py: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)


def argument_parser():
    """Detectron2's arguments and ``--register-coco``."""
    parser = default_argument_parser()
    add_register_coco_argument(parser)
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    # Fail here, once, before any worker process starts. One process needs no such check:
    # launch() runs main() in this process, and a second setup() in it would register the
    # command line's datasets again over those that the "skip" policy re-registered.
    multi_process = args.num_gpus * args.num_machines > 1
    if multi_process:
        setup(args)
    try:
        with forward_stop_signals() if multi_process else contextlib.nullcontext():
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    except ProcessExitedException as e:  # the process printed why; its status is passed on
        print(f"train_net.py: training process {e.error_index} exited", file=sys.stderr)
        sys.exit(e.exit_code if e.exit_code > 0 else 1)
