"""train_net.py end to end: training, evaluation, checkpoints, multi-process, bad input."""

import json
import re

import pytest
import torch

from helpers import run_train_net, tiny_args

COPYPASTE = re.compile(r"copypaste: ([\d.]+),([\d.]+),([\d.]+),([\d.nan]+),([\d.nan]+),([\d.nan]+)")


@pytest.fixture(scope="module")
def trained(tiny_coco, tmp_path_factory):
    """A short training run on the tiny dataset: its output folder and log."""
    out = tmp_path_factory.mktemp("train")
    result = run_train_net(*tiny_args(tiny_coco, out, "SOLVER.MAX_ITER", "60"))
    assert result.returncode == 0, result.stdout[-3000:]
    return out, result.stdout


def test_training_decreases_loss_and_evaluates(trained):
    out, log = trained
    assert (out / "model_final.pth").is_file()
    assert re.search(r"eta: \S+\s+iter: 19", log), "Detectron2's progress lines with ETA"
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
    assert COPYPASTE.search(log), "COCO AP table"
    for key in ("focal/neg_loss_share", "focal/easy_neg_loss_share", "num_pos_anchors"):
        assert any(key in r for r in records), key


def test_eval_only_on_the_written_checkpoint(trained, tiny_coco, tmp_path):
    out, _ = trained
    result = run_train_net(
        "--eval-only",
        *tiny_args(tiny_coco, tmp_path, "MODEL.WEIGHTS", str(out / "model_final.pth"))
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert COPYPASTE.search(result.stdout)
    assert not (tmp_path / "model_final.pth").exists()


def test_checkpoint_keeps_detectron2_state_dict_keys(trained):
    out, _ = trained
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    keys = set(checkpoint["model"])
    assert "head.cls_score.weight" in keys and "backbone.top_block.p7.weight" in keys
    assert checkpoint["model"]["head.cls_score.weight"].shape[0] == 9 * 10


def test_missing_config_file_exits_with_its_name(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run_train_net("--config-file", str(missing))
    assert result.returncode != 0
    assert "nope.yaml" in result.stdout and "Traceback" not in result.stdout


def test_unknown_config_key_exits_with_its_name(tiny_coco, tmp_path):
    result = run_train_net(*tiny_args(tiny_coco, tmp_path, "MODEL.RETINANET.NO_SUCH_KEY", "1"))
    assert result.returncode != 0
    assert "MODEL.RETINANET.NO_SUCH_KEY" in result.stdout and "Traceback" not in result.stdout
