"""Trainer glue: Detectron2's DefaultTrainer with COCO evaluation, CPU multi-process,
crash-safe checkpoints, and clean stops: on SIGTERM/SIGINT (with a checkpoint), on a failed
checkpoint write, on an image that cannot be decoded, and at a non-finite loss (with a
post-mortem file)."""

import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
import signal
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_train_loader
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

from .data import SizeGroupedDataset
from .data.mapper import DECODE_FAILURES_KEY, FocalDatasetMapper
from .evaluation import FocalCOCOEvaluator, check_coco_eval_backend
from .file_io import atomic_open, atomic_write
from .report import TrainingReportHook
from .weights import WeightsError, load_initial_weights

__all__ = [
    "AtomicCheckpointer",
    "CheckpointWriteError",
    "FocalTrainer",
    "TrainingStopped",
    "clip_each_grad_norm_",
    "forward_stop_signals",
]

logger = logging.getLogger(__name__)

# The signals that stop training after the current iteration, with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Post-mortem of a non-finite loss, in OUTPUT_DIR; {} is the iteration.
NONFINITE_FILE = "nonfinite_iter_{}.json"
# metrics.json key: samples replaced so far because their image could not be decoded.
SKIPPED_SAMPLES_KEY = "data/skipped_samples"


class TrainingStopped(BaseException):
    """
    Training stopped on purpose: a stop signal, a failed checkpoint write, an undecodable image
    under ``DATASETS.INVALID_POLICY "error"``. A BaseException, so that Detectron2's
    ``TrainerBase.train``, which logs every Exception with its traceback, lets it through; the
    hooks' ``after_train`` still run.

    Attributes:
        message: what happened and what is on disk, meant to be printed as is.
        exit_code: the process's exit status (128 + the signal number after a signal).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, quota, ...); the earlier ones are intact."""


class _WriteErrorKeepingFile:
    """
    A file whose ``write`` keeps the OSError it raises: ``torch.save`` turns it into a
    RuntimeError of its zip writer ("unexpected pos ..."), which does not say what went wrong.
    """

    def __init__(self, file: Any):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class _AtomicWrites:
    """
    A path manager whose file writes are atomic (:func:`~focal_det2.file_io.atomic_open`); every
    other call goes to the wrapped one.
    """

    def __init__(self, path_manager: Any):
        self._path_manager = path_manager
        # The OSError of the last failed write, if any.
        self.write_error: Optional[OSError] = None

    def open(self, path: str, mode: str = "r", **kwargs: Any):
        if mode in ("w", "wb"):
            return self._atomic_open(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    @contextlib.contextmanager
    def _atomic_open(self, path: str, mode: str) -> Iterator[_WriteErrorKeepingFile]:
        self.write_error = None
        with atomic_open(path, mode) as f:
            file = _WriteErrorKeepingFile(f)
            try:
                yield file
            finally:
                self.write_error = file.error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._path_manager, name)


class AtomicCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` whose checkpoints are complete or absent: fvcore's ``save`` writes
    each ``.pth``, then ``last_checkpoint``, through a path manager that writes to a temporary
    file and renames it into place, so a process killed at any moment leaves every ``.pth``
    loadable and ``last_checkpoint`` naming a complete one. Writes to the local file system. A
    write that fails (no space, quota) raises :class:`CheckpointWriteError` with the cause,
    after removing its temporary file.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)

    def save(self, name: str, **kwargs: Any) -> None:
        try:
            super().save(name, **kwargs)
        except Exception as e:
            cause = self.path_manager.write_error or e
            raise CheckpointWriteError(
                f"could not write the checkpoint {os.path.join(self.save_dir, name)}.pth "
                f"({type(cause).__name__}: {cause}); the earlier checkpoints and "
                "last_checkpoint are unchanged"
            ) from e


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class _LossNormalizerState:
    """
    Checkpointable view of the model's loss-normaliser EMA (a plain attribute, as in
    Detectron2), so that a resumed run continues it instead of restarting from its initial
    value, while the model's state dict keeps Detectron2's keys.
    """

    name = "loss_normalizer"

    def __init__(self, model: torch.nn.Module):
        self.model = _unwrap(model)

    def state_dict(self) -> Dict[str, float]:
        value = getattr(self.model, self.name, None)
        return {} if value is None else {self.name: value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        if self.name in state:
            setattr(self.model, self.name, state[self.name])


@contextlib.contextmanager
def _detectron2_parts_for_device(device: str):
    """
    Detectron2's ``DefaultTrainer.__init__`` wraps the model with ``create_ddp_model(model,
    broadcast_buffers=False)``, whose default ``device_ids=[local_rank]`` PyTorch refuses for a
    CPU model, and steps with ``AMPTrainer`` when ``SOLVER.AMP.ENABLED``, which needs CUDA; it
    offers no hook for either. For a CPU model, the names in Detectron2's module are bound while
    the trainer is built to ``create_ddp_model`` passing ``device_ids=None`` and to
    ``SimpleTrainer`` (the model autocasts its own forward, see ``FocalRetinaNet``), and
    restored after.
    """
    if device.startswith("cuda"):
        yield
        return
    originals = d2_defaults.create_ddp_model, d2_defaults.AMPTrainer
    d2_defaults.create_ddp_model = functools.partial(originals[0], device_ids=None)
    d2_defaults.AMPTrainer = SimpleTrainer
    try:
        yield
    finally:
        d2_defaults.create_ddp_model, d2_defaults.AMPTrainer = originals


def _reduce(values: List[float], op: dist.ReduceOp, device: str) -> List[float]:
    """``values`` reduced over all processes with ``op``; as they are in a single process."""
    if comm.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


class _StopSignals:
    """
    The stop signal received while installed, if any. The handler only records it: the
    iteration in progress, and a checkpoint being written, finish before training stops.
    """

    def __init__(self):
        self.received = 0

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopSignals"]:
        previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """The stop signals held back from this thread, and from the processes it forks, until
    the block ends (they arrive then) or, in a forked process, until it ignores them (they are
    dropped)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_stop_signals(worker_init_fn: Optional[Callable[[int], Any]], worker_id: int) -> None:
    """A data-loader worker's init: the trainer alone decides when to stop."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


@contextlib.contextmanager
def forward_stop_signals() -> Iterator[None]:
    """
    In the process that ``launch`` starts the training processes from: pass SIGTERM and SIGINT
    on to them, so that they stop after their current iteration with a checkpoint, instead of
    this process dying and leaving them running (a scheduler may signal only this one).
    """

    def forward(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _CheckedBatches:
    """
    The training batches: keeps the last one (for the post-mortem of a non-finite loss) and
    applies ``DATASETS.INVALID_POLICY`` to the images that :class:`FocalDatasetMapper` could not
    decode ("error": stop naming the file; "skip": a warning naming it, and the count of
    replaced samples in ``metrics.json``). The processes add up their failures for each batch
    (one all-reduce of one number), so that they stop at the same iteration and the count covers
    all of them.
    """

    def __init__(self, loader: Any, policy: str, device: str):
        self.loader = loader
        self.policy = policy
        self.device = device
        self.last_batch: Optional[List[Dict[str, Any]]] = None
        self.skipped = 0
        self._batches: Optional[Iterator] = None

    def __iter__(self) -> "_CheckedBatches":
        self._batches = iter(self.loader)
        return self

    def close(self) -> None:
        """
        Shut the data-loader workers down (dropping the loader's iterator does): they ignore
        SIGTERM, with which Python's exit would otherwise end them.
        """
        self._batches = None

    def __next__(self) -> List[Dict[str, Any]]:
        if self._batches is None:
            raise StopIteration
        # The workers start at the first batch. Between a worker's fork and its init, which
        # ignores the stop signals, PyTorch's handler lets a stop signal kill it (and the
        # trainer with it): blocked, the signal waits for the init, which drops it.
        with _stop_signals_blocked():
            batch = next(self._batches)
        failures = [f for d in batch for f in d.pop(DECODE_FAILURES_KEY, [])]
        (total,) = _reduce([len(failures)], dist.ReduceOp.SUM, self.device)
        storage = get_event_storage()
        if total and self.policy != "skip":
            cause = failures[0] if failures else "an image of another process (see its log)"
            raise TrainingStopped(
                f"training stopped at iteration {storage.iter}: {cause}. DATASETS."
                f"INVALID_POLICY is {self.policy!r}: fix or remove the file, or set it to "
                '"skip" to train on without it; DATASETS.VALIDATE_FULL_DECODE True finds '
                "such files before training"
            )
        for failure in failures:
            logger.warning(
                "%s: sample replaced by another (DATASETS.INVALID_POLICY 'skip')", failure
            )
        self.skipped += int(total)
        storage.put_scalar(SKIPPED_SAMPLES_KEY, self.skipped, smoothing_hint=False)
        self.last_batch = batch
        return batch


def _number(value: Any) -> Any:
    """A float for JSON: non-finite values as the strings "nan", "inf", "-inf"."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def clip_each_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, norm_type: float
) -> None:
    """
    Detectron2's ``CLIP_TYPE "norm"``: each parameter's gradient scaled to at most ``max_norm``
    by its own norm, as ``torch.nn.utils.clip_grad_norm_`` on every parameter alone (the same
    bits), in a few ops for all parameters instead of about ten per parameter.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, norm_type))
    # clip_grad_norm_ takes the norm of the one parameter's norm: the same rounding here.
    totals = torch.linalg.vector_norm(norms.unsqueeze(1), norm_type, dim=1)
    scales = torch.clamp(max_norm / (totals + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


class FocalTrainer(DefaultTrainer):
    """
    ``DefaultTrainer`` that evaluates with ``COCOEvaluator``, trains multi-process on CPU (gloo)
    as well as on GPUs, writes crash-safe checkpoints and saves the loss normaliser with them.

    It stops with :class:`TrainingStopped`, every process at the same iteration:

    - on SIGTERM or SIGINT, after the current iteration, having written its checkpoint;
    - when a checkpoint cannot be written (the earlier ones stay intact);
    - at an image that cannot be decoded, with ``DATASETS.INVALID_POLICY "error"``.

    At the first non-finite loss (Detectron2's check, before the optimizer step, so the
    checkpoints on disk stay those of finite weights) it writes
    ``OUTPUT_DIR/nonfinite_iter_<N>.json`` and raises Detectron2's ``FloatingPointError``
    naming the file.
    """

    def __init__(self, cfg):
        with _detectron2_parts_for_device(cfg.MODEL.DEVICE):
            super().__init__(cfg)
        self._signals = _StopSignals()
        # The data loader the trainer iterates: build_train_loader's _CheckedBatches.
        self._batches = self._trainer.data_loader

    @classmethod
    def build_optimizer(cls, cfg, model):
        """
        Detectron2's optimizer; its per-parameter ``"norm"`` gradient clipping done by
        :func:`clip_each_grad_norm_` (the demo's 96 parameters: ~0.04 s less per iteration on a
        2-core CPU).
        """
        clipping = cfg.SOLVER.CLIP_GRADIENTS
        if not (clipping.ENABLED and clipping.CLIP_TYPE == "norm"):
            return super().build_optimizer(cfg, model)
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(unclipped, model)
        optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(
            type(optimizer),
            global_clipper=functools.partial(
                clip_each_grad_norm_,
                max_norm=clipping.CLIP_VALUE,
                norm_type=clipping.NORM_TYPE,
            ),
        )
        return optimizer

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader with :class:`FocalDatasetMapper`, its workers ignoring the stop
        signals, its batches grouped by size with ``DATALOADER.SIZE_GROUPING`` and checked by
        :class:`_CheckedBatches`."""
        mapper = FocalDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SIZE_GROUPING:
            # Detectron2's grouping yields the batches of its loader of single samples.
            grouped = build_detection_train_loader(cfg, mapper=mapper, aspect_ratio_grouping=True)
            loader = SizeGroupedDataset(grouped.dataset, grouped.batch_size)
        else:
            loader = build_detection_train_loader(cfg, mapper=mapper)
        # A scheduler signals every process of a job (SLURM at preemption, a terminal's Ctrl-C):
        # a worker would die of SIGTERM, and its death end the trainer at once.
        torch_loader = loader.dataset if isinstance(loader, AspectRatioGroupedDataset) else loader
        torch_loader.worker_init_fn = functools.partial(
            _ignore_stop_signals, torch_loader.worker_init_fn
        )
        return _CheckedBatches(loader, cfg.DATASETS.INVALID_POLICY, cfg.MODEL.DEVICE)

    def resume_or_load(self, resume: bool = True) -> None:
        """
        Detectron2's: resume from ``last_checkpoint`` when asked and present, else load
        ``MODEL.WEIGHTS`` (nothing when empty), here with
        :func:`~focal_det2.weights.load_initial_weights`.

        Raises:
            WeightsError: naming the file and what is wrong with it.
        """
        if resume and self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            try:
                super().resume_or_load(resume=True)
            except Exception as e:
                raise WeightsError(
                    f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e}); "
                    "point last_checkpoint at another one"
                ) from e
            return
        load_initial_weights(
            _unwrap(self.model),
            self.cfg.MODEL.WEIGHTS,
            drop_classifier=self.cfg.MODEL.FOCAL_RETINANET.WEIGHTS_DROP_CLASSIFIER,
        )

    def train(self):
        with self._signals.installed():
            try:
                return super().train()
            finally:
                self._batches.close()

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            path = self._write_nonfinite_report()
            raise FloatingPointError(f"{e}\npost-mortem: {path}") from e

    def after_step(self):
        write_error = None
        try:
            super().after_step()
        except CheckpointWriteError as e:
            write_error = e
        self._stop_if_requested(write_error)

    def _stop_if_requested(self, write_error: Optional[CheckpointWriteError]) -> None:
        """
        Stop every process at this iteration when one of them received a stop signal (after
        writing this iteration's checkpoint) or could not write a checkpoint: one all-reduce of
        two numbers per iteration.
        """
        device = self.cfg.MODEL.DEVICE
        signum, failed = _reduce(
            [self._signals.received, write_error is not None], dist.ReduceOp.MAX, device
        )
        where = f"training stopped at iteration {self.iter}"
        if failed:
            raise TrainingStopped(
                f"{where}: {write_error or 'process 0 could not write a checkpoint (see its log)'}"
            )
        if not signum:
            return
        name = signal.Signals(int(signum)).name
        checkpoint = f"model_{self.iter:07d}"
        try:
            self.checkpointer.save(checkpoint, iteration=self.iter)
        except CheckpointWriteError as e:
            write_error = e
        (failed,) = _reduce([write_error is not None], dist.ReduceOp.MAX, device)
        if failed:
            cause = write_error or "process 0 could not write its checkpoint (see its log)"
            raise TrainingStopped(f"{name} received, {where}: {cause}", 128 + int(signum))
        raise TrainingStopped(
            f"{name} received, {where}: checkpoint "
            f"{os.path.join(self.cfg.OUTPUT_DIR, checkpoint)}.pth written; run again with "
            f"--resume to continue from iteration {self.iter + 1}",
            128 + int(signum),
        )

    def _write_nonfinite_report(self) -> str:
        """Write ``OUTPUT_DIR/nonfinite_iter_<N>.json`` and return its path."""
        model = _unwrap(self.model)
        stats = dict(getattr(model, "last_loss_stats", {}))
        losses = stats.pop("losses", {})
        groups = self.optimizer.param_groups
        report = {
            "iteration": self.iter,
            "losses": {k: _number(v) for k, v in losses.items()},
            # The LR of the largest parameter group, as Detectron2's LRScheduler hook logs it.
            "lr": max(groups, key=lambda g: len(g["params"]))["lr"],
            **{k: _number(v) for k, v in stats.items()},
            "images": [
                {
                    "file_name": d.get("file_name"),
                    "image_id": d.get("image_id"),
                    "boxes": d["instances"].gt_boxes.tensor.tolist() if "instances" in d else [],
                    "classes": d["instances"].gt_classes.tolist() if "instances" in d else [],
                }
                for d in self._batches.last_batch or []
            ],
            # The backward of the non-finite loss ran before Detectron2's check.
            "nonfinite_gradients_this_step": [
                n
                for n, p in model.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ],
            # A non-finite gradient at the previous step shows as non-finite weights now.
            "nonfinite_parameters": [
                n for n, p in model.named_parameters() if not torch.isfinite(p).all()
            ],
        }
        path = os.path.join(self.cfg.OUTPUT_DIR, NONFINITE_FILE.format(self.iter))
        atomic_write(path, lambda f: json.dump(report, f, indent=1), "w")
        return path

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
