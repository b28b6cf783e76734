"""Trainer glue: Detectron2's DefaultTrainer with COCO evaluation and CPU multi-process."""

import contextlib
import functools
import os
from unittest import mock

from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator


@contextlib.contextmanager
def _ddp_for_device(device: str):
    """
    Detectron2's trainer wraps the model in DDP with ``device_ids=[local_rank]``, which PyTorch
    refuses for a CPU model; on CPU the wrap must pass ``device_ids=None``.
    """
    if device.startswith("cuda"):
        yield
        return
    cpu_ddp = functools.partial(create_ddp_model, device_ids=None)
    with mock.patch.object(d2_defaults, "create_ddp_model", cpu_ddp):
        yield


class FocalTrainer(DefaultTrainer):
    """
    ``DefaultTrainer`` that evaluates with ``COCOEvaluator`` and trains multi-process on CPU
    (gloo) as well as on GPUs.
    """

    def __init__(self, cfg):
        with _ddp_for_device(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP with pycocotools (Detectron2's fast evaluator needs its ``_C``)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
