"""Shared fixtures: a tiny dataset of the demo's kind."""

import pytest

from focal_det2.data import generate_demo_data

from helpers import TINY_CHECKPOINT_OPTS, run_train_net, tiny_args


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A few demo images per split: {"train": (json, image_root), "val": (json, image_root)}."""
    root = tmp_path_factory.mktemp("tiny_coco") / "data"
    generate_demo_data(root, num_images={"train": 16, "val": 6})
    return {split: (str(root / f"{split}.json"), str(root / split)) for split in ("train", "val")}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_coco, tmp_path_factory):
    """
    A trained tiny model (``helpers.TINY_CHECKPOINT_OPTS``): its output folder, holding
    ``config.yaml`` (the full config: DATASETS.TRAIN ``tiny_train``, see
    ``helpers.tiny_register_args``), ``model_final.pth``, ``metrics.json``, ``inference/``,
    ``report/`` and ``train.log`` (the run's stdout and stderr).
    """
    out = tmp_path_factory.mktemp("tiny_checkpoint")
    result = run_train_net(*tiny_args(tiny_coco, out, *TINY_CHECKPOINT_OPTS))
    (out / "train.log").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:]
    return out
