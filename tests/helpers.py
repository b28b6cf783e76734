"""Running train_net.py from the tests, the demo config, counting operators, comparing tensors."""

import collections
import os
import subprocess
import sys
from pathlib import Path

from detectron2.config import get_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from focal_det2 import add_focal_config

REPO = Path(__file__).resolve().parents[1]


DEMO_CONFIG = REPO / "configs" / "demo.yaml"
# The tests' expectations (loss trajectories, Figure 4, comparisons with Detectron2) are of the
# paper's sigmoid focal loss; the demo config trains the softmax one (tested on its own).
PAPER_LOSS = ("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SigmoidFocalLoss")


def demo_cfg(*opts):
    """
    The demo config (unfrozen) with the plugin's keys, the paper's loss and the ``KEY VALUE``
    overrides.
    """
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(str(DEMO_CONFIG))
    cfg.merge_from_list([*PAPER_LOSS, *opts])
    return cfg


def demo_cfg_without_fpn_norm(*opts):
    """:func:`demo_cfg` without the FPN's batch norm (the demo's until 2026-12-03)."""
    return demo_cfg("MODEL.FPN.NORM", "", *opts)


def tiny_args(tiny_coco, output_dir, *opts):
    """train_net.py arguments training the demo model briefly on the tiny dataset."""
    return [
        "--config-file",
        str(DEMO_CONFIG),
        *tiny_register_args(tiny_coco),
        "DATASETS.TRAIN",
        "('tiny_train',)",
        "DATASETS.TEST",
        "('tiny_val',)",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.WARMUP_ITERS",
        "5",
        "DATALOADER.NUM_WORKERS",
        "0",
        # Uniform sampling, as the loss trajectories the tests compare were taken with; the
        # demo's repeat-factor sampling is for its rare classes, which the tiny data lacks.
        "DATALOADER.SAMPLER_TRAIN",
        "TrainingSampler",
        *PAPER_LOSS,
        "OUTPUT_DIR",
        str(output_dir),
        *opts,
    ]


def run_train_net(*args, timeout=600, env=None):
    """Run train_net.py in a subprocess; returns the CompletedProcess (stdout+stderr merged)."""
    return subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def tiny_register_args(tiny_coco):
    """``--register-coco`` arguments of the tiny dataset as ``tiny_train`` and ``tiny_val``."""
    return [
        "--register-coco",
        "tiny_train",
        *tiny_coco["train"],
        "--register-coco",
        "tiny_val",
        *tiny_coco["val"],
    ]


# Images resized to 128 px for training and testing: runs a few seconds shorter than at 256 px.
SIZE_128 = (
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "128",
)

# One training size, 256 px: for tests whose expectations need every image at one known size
# (the demo config jitters the training size, each process drawing its own).
TRAIN_AT_256 = ("INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256")

# A trained tiny checkpoint: 20 iterations of the demo model on 128 px images, evaluated at
# iteration 10 and at the end.
TINY_CHECKPOINT_OPTS = (
    "SOLVER.MAX_ITER",
    "20",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "TEST.EVAL_PERIOD",
    "10",
    *SIZE_128,
)


class OpCounter(TorchDispatchMode):
    """Counts the operators run, by name (e.g. "aten.relu_.default")."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def assert_close_to_largest(ours, reference, rtol):
    """``ours`` within ``rtol`` times the largest magnitude of ``reference``, everywhere."""
    error = (ours - reference).abs().max().item()
    assert error <= rtol * reference.abs().max().item(), error
