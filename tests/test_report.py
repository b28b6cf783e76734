"""The training report in OUTPUT_DIR/report/, written by TrainingReportHook."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from PIL import Image

from focal_det2 import add_focal_config
from focal_det2.data import register_coco_datasets
from focal_det2.evaluation import coco_eval_file, load_coco_eval
from focal_det2.report import (
    REPORT_FILES,
    TrainingReportHook,
    draw_boxes,
    per_class_ap,
    plot_curves,
    read_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 200, (path, image.size)


def test_training_writes_the_report(tiny_checkpoint):
    log = (tiny_checkpoint / "train.log").read_text()
    assert "not written" not in log, "a figure failed: " + log[-3000:]
    for name in REPORT_FILES:
        _assert_png(tiny_checkpoint / "report" / name)


def test_per_class_ap_is_the_evaluations(tiny_checkpoint):
    """The bars show the AP per class that COCOEvaluator reported at the last evaluation."""
    arrays = load_coco_eval(coco_eval_file(str(tiny_checkpoint / "inference"), "tiny_val"))
    records = read_metrics(str(tiny_checkpoint / "metrics.json"))
    last_eval = [r for r in records if "bbox/AP" in r][-1]
    ap = per_class_ap(arrays["precision"])
    assert len(ap) == len(arrays["class_names"]) == 10
    for name, value in zip(arrays["class_names"], ap):
        reported = last_eval[f"bbox/AP-{name}"]
        assert (np.isnan(value) and np.isnan(reported)) or abs(value - reported) < 1e-6, name


@pytest.fixture
def hook_parts(tiny_checkpoint, tiny_coco):
    register_coco_datasets([("tiny_train", *tiny_coco["train"]), ("tiny_val", *tiny_coco["val"])])
    DatasetCatalog.get("tiny_train")
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(str(tiny_checkpoint / "config.yaml"))
    return {
        "metrics_file": str(tiny_checkpoint / "metrics.json"),
        "eval_dir": str(tiny_checkpoint / "inference"),
        "train_datasets": ("tiny_train",),
        "mapper": DatasetMapper(cfg, is_train=False),
    }, build_model(cfg)


def test_hook_writes_every_figure(hook_parts, tmp_path, caplog):
    parts, model = hook_parts
    hook = TrainingReportHook(report_dir=str(tmp_path), val_dataset="tiny_val", **parts)
    hook.trainer = SimpleNamespace(model=model)
    with caplog.at_level(logging.WARNING, logger="focal_det2.report"):
        hook.write()
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    for name in REPORT_FILES:
        _assert_png(tmp_path / name)
    assert model.training, "the model is back in training mode"


def test_hook_without_evaluation_writes_the_curves(hook_parts, tmp_path, caplog):
    parts, _ = hook_parts
    parts["eval_dir"] = str(tmp_path / "no_evaluation_yet")
    hook = TrainingReportHook(report_dir=str(tmp_path / "report"), val_dataset=None, **parts)
    with caplog.at_level(logging.WARNING, logger="focal_det2.report"):
        hook.write()
    assert not caplog.records
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["curves.png"]


def test_a_failing_figure_is_named_and_the_others_written(hook_parts, tmp_path, caplog):
    parts, _ = hook_parts
    parts["metrics_file"] = str(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n{broken')
    hook = TrainingReportHook(report_dir=str(tmp_path / "report"), val_dataset="tiny_val", **parts)
    # No trainer: the validation figure cannot run the model either.
    with caplog.at_level(logging.WARNING, logger="focal_det2.report"):
        hook.write()
    failed = sorted(r.getMessage() for r in caplog.records)
    assert failed == [
        "Training report: curves.png not written",
        "Training report: val_detections.png not written",
    ]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "per_class_ap.png",
        "pr_curves.png",
    ]


def test_hook_writes_after_each_new_evaluation(hook_parts, tmp_path):
    parts, _ = hook_parts
    hook = TrainingReportHook(report_dir=str(tmp_path), val_dataset=None, **parts)
    calls = []
    hook.write = lambda: calls.append(True)
    latest = {"total_loss": (1.0, 5)}
    hook.trainer = SimpleNamespace(
        storage=SimpleNamespace(latest=lambda: latest), iter=20, max_iter=20
    )
    hook.after_step()
    assert not calls
    latest["bbox/AP"] = (1.0, 9)
    hook.after_step()
    hook.after_step()
    assert len(calls) == 1
    latest["bbox/AP"] = (2.0, 19)
    hook.after_step()
    hook.after_train()
    assert len(calls) == 3
    # Stopped before the end (preemption): no report, the run must exit within its grace time.
    hook.trainer.iter = 7
    hook.after_train()
    assert len(calls) == 3


def test_curves_with_no_records(tmp_path):
    plot_curves([], str(tmp_path / "curves.png"))
    _assert_png(tmp_path / "curves.png")


def test_draw_boxes_draws_each_box_in_its_class_colour():
    from detectron2.utils.colormap import colormap

    image = np.zeros((60, 80, 3), dtype=np.uint8)
    drawn = draw_boxes(image, np.array([[10.2, 20.0, 50.0, 40.0]]), [3], ["three 90%"])
    palette = colormap(rgb=True, maximum=255)
    np.testing.assert_array_equal(drawn[30, 10], palette[3].astype(np.uint8))  # left edge
    np.testing.assert_array_equal(drawn[40, 30], palette[3].astype(np.uint8))  # bottom edge
    np.testing.assert_array_equal(drawn[30, 30], 0)  # inside stays
    assert not image.any(), "the input image was drawn on"
    assert drawn[20 - 8 : 20, 10:40].any(), "no caption above the box"
