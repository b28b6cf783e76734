"""Trainer glue: Detectron2's DefaultTrainer with COCO evaluation, CPU multi-process and
crash-safe checkpoints."""

import contextlib
import functools
import os
import weakref
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from torch.nn.parallel import DistributedDataParallel

from .evaluation import FocalCOCOEvaluator, check_coco_eval_backend
from .file_io import atomic_open
from .report import TrainingReportHook

__all__ = ["AtomicCheckpointer", "FocalTrainer"]


class _AtomicWrites:
    """
    A path manager whose file writes are atomic (:func:`~focal_det2.file_io.atomic_open`); every
    other call goes to the wrapped one.
    """

    def __init__(self, path_manager: Any):
        self._path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs: Any):
        if mode in ("w", "wb"):
            return atomic_open(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._path_manager, name)


class AtomicCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` whose checkpoints are complete or absent: fvcore's ``save`` writes
    each ``.pth``, then ``last_checkpoint``, through a path manager that writes to a temporary
    file and renames it into place, so a process killed at any moment leaves every ``.pth``
    loadable and ``last_checkpoint`` naming a complete one. Writes to the local file system.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)


class _LossNormalizerState:
    """
    Checkpointable view of the model's loss-normaliser EMA (a plain attribute, as in
    Detectron2), so that a resumed run continues it instead of restarting from its initial
    value, while the model's state dict keeps Detectron2's keys.
    """

    name = "loss_normalizer"

    def __init__(self, model: torch.nn.Module):
        self.model = model.module if isinstance(model, DistributedDataParallel) else model

    def state_dict(self) -> Dict[str, float]:
        value = getattr(self.model, self.name, None)
        return {} if value is None else {self.name: value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        if self.name in state:
            setattr(self.model, self.name, state[self.name])


@contextlib.contextmanager
def _ddp_for_device(device: str):
    """
    Detectron2's ``DefaultTrainer.__init__`` wraps the model with ``create_ddp_model(model,
    broadcast_buffers=False)``, whose default ``device_ids=[local_rank]`` PyTorch refuses for a
    CPU model, and offers no hook for that call. For a CPU model, the function's name in
    Detectron2's module is bound to one passing ``device_ids=None`` while the trainer is built,
    and restored after.
    """
    if device.startswith("cuda"):
        yield
        return
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class FocalTrainer(DefaultTrainer):
    """
    ``DefaultTrainer`` that evaluates with ``COCOEvaluator``, trains multi-process on CPU (gloo)
    as well as on GPUs, writes crash-safe checkpoints and saves the loss normaliser with them.
    Training stops at the first non-finite loss (Detectron2's check, before the optimizer
    step), so the checkpoints on disk stay those of finite weights.
    """

    def __init__(self, cfg):
        with _ddp_for_device(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    def build_hooks(self):
        # Called by DefaultTrainer.__init__ before the hooks capture the checkpointer.
        model = self._trainer.model
        self.checkpointer = AtomicCheckpointer(
            model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.checkpointer.add_checkpointable(_LossNormalizerState.name, _LossNormalizerState(model))
        # Checked here, not at the first evaluation: a wrong name must not cost a training run.
        check_coco_eval_backend(self.cfg.TEST.COCO_EVAL_BACKEND)
        # Last: the report draws what the hooks before it recorded (evaluation, metrics.json).
        return super().build_hooks() + [TrainingReportHook(self.cfg)]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP, with the COCOeval implementation of ``TEST.COCO_EVAL_BACKEND``."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return FocalCOCOEvaluator(
            dataset_name,
            backend=cfg.TEST.COCO_EVAL_BACKEND,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
