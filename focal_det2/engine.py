"""Trainer glue: Detectron2's DefaultTrainer with COCO evaluation, CPU multi-process and
crash-safe checkpoints."""

import contextlib
import functools
import os
import weakref
from typing import Any, Dict
from unittest import mock

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from torch.nn.parallel import DistributedDataParallel

from .file_io import atomic_write

__all__ = ["AtomicCheckpointer", "FocalTrainer"]


class AtomicCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` whose checkpoints are complete or absent: each ``.pth`` is written
    to a temporary file and renamed into place, and ``last_checkpoint`` names it only after
    that, so a process killed at any moment leaves every ``.pth`` loadable. Writes to the local
    file system.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, functools.partial(torch.save, data), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            "w",
        )


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
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP with pycocotools (Detectron2's fast evaluator needs its ``_C``)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
