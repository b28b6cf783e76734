"""python -m focal_det2.predict and the strict weights loading it relies on."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from focal_det2 import add_focal_config
from focal_det2.data import register_coco_datasets
from focal_det2.predict import main
from focal_det2.weights import WeightsError, load_weights

from helpers import REPO, tiny_register_args

THRESHOLD = 0.05


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_coco):
    """The tiny run's config (as predict builds it) and the registered tiny datasets."""
    register_coco_datasets([("tiny_train", *tiny_coco["train"]), ("tiny_val", *tiny_coco["val"])])
    DatasetCatalog.get("tiny_train")  # sets the metadata's category id map
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(str(tiny_checkpoint / "config.yaml"))
    cfg.MODEL.WEIGHTS = str(tiny_checkpoint / "model_final.pth")
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = THRESHOLD
    return cfg


def _args(tiny_checkpoint, tiny_coco, inputs, output, weights=None):
    return [
        "--config-file",
        str(tiny_checkpoint / "config.yaml"),
        "--input",
        *[str(p) for p in inputs],
        "--output",
        str(output),
        "--confidence-threshold",
        str(THRESHOLD),
        *tiny_register_args(tiny_coco),
        "MODEL.WEIGHTS",
        str(weights or tiny_checkpoint / "model_final.pth"),
    ]


def test_predict_draws_every_image_and_matches_default_predictor(
    setup, tiny_checkpoint, tiny_coco, tmp_path
):
    val_dir = tiny_coco["val"][1]
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "focal_det2.predict",
            *_args(tiny_checkpoint, tiny_coco, [val_dir], out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    images = sorted(Path(val_dir).iterdir())
    assert len(images) == 6
    for image in images:
        drawn = Image.open(out / image.name)
        assert drawn.size == Image.open(image).size
        # The detections are drawn: the picture differs from the input.
        assert not np.array_equal(np.asarray(drawn), np.asarray(Image.open(image)))

    detections = json.loads((out / "detections.json").read_text())
    assert detections, "the tiny model detects something above the threshold"
    assert set(detections[0]) == {"file_name", "category_id", "bbox", "score"}
    predictor = DefaultPredictor(setup)
    id_map = MetadataCatalog.get("tiny_train").thing_dataset_id_to_contiguous_id
    to_dataset_id = {v: k for k, v in id_map.items()}
    for image in images:
        ours = [d for d in detections if d["file_name"] == str(image)]
        instances = predictor(cv2.imread(str(image)))["instances"]
        boxes = instances.pred_boxes.tensor.numpy()
        expected_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        assert len(ours) == len(instances)
        ours_xywh = np.array([d["bbox"] for d in ours]).reshape(-1, 4)
        np.testing.assert_allclose(ours_xywh, expected_xywh, atol=1e-3)
        ours_scores = np.array([d["score"] for d in ours])
        np.testing.assert_allclose(ours_scores, instances.scores.numpy(), atol=1e-5)
        assert [d["category_id"] for d in ours] == [
            to_dataset_id[c] for c in instances.pred_classes.tolist()
        ]


def test_broken_and_missing_inputs_are_named_and_skipped(
    setup, tiny_checkpoint, tiny_coco, tmp_path, capsys
):
    val_images = sorted(Path(tiny_coco["val"][1]).iterdir())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in val_images[:2]:
        shutil.copy(image, inputs / image.name)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = tmp_path / "nowhere.png"
    out = tmp_path / "out"

    status = main(_args(tiny_checkpoint, tiny_coco, [inputs, missing], out))

    assert status != 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "nowhere.png" in err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([val_images[0].name, val_images[1].name, "detections.json"])
    detections = json.loads((out / "detections.json").read_text())
    assert {d["file_name"] for d in detections} <= {str(inputs / p.name) for p in val_images[:2]}


def test_video_gets_its_detections_drawn(setup, tiny_checkpoint, tiny_coco, tmp_path):
    frames = [cv2.imread(str(p)) for p in sorted(Path(tiny_coco["val"][1]).iterdir())[:3]]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 320))
    for frame in frames:
        writer.write(cv2.resize(frame, (320, 320)))
    writer.release()
    out = tmp_path / "out"

    assert main(_args(tiny_checkpoint, tiny_coco, [video], out)) == 0

    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 3
    detections = json.loads((out / "detections.json").read_text())
    assert {d["frame"] for d in detections} <= {0, 1, 2} and detections


def test_weights_of_another_class_count_stop_with_the_message(
    setup, tiny_checkpoint, tiny_coco, tmp_path
):
    checkpoint = torch.load(tiny_checkpoint / "model_final.pth", weights_only=False)
    state = checkpoint["model"]
    # 9 anchors x 5 classes instead of 9 x 10.
    state["head.cls_score.weight"] = state["head.cls_score.weight"][:45]
    state["head.cls_score.bias"] = state["head.cls_score.bias"][:45]
    five = tmp_path / "five_classes.pth"
    torch.save({"model": state}, five)
    out = tmp_path / "out"

    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_checkpoint, tiny_coco, [tiny_coco["val"][1]], out, weights=five))

    message = str(exit_info.value.code)
    assert "five_classes.pth" in message
    assert (
        "head.cls_score.weight (45, 64, 3, 3) in the file, (90, 64, 3, 3) in the model" in message
    )
    assert "number of classes" in message
    assert not (out / "detections.json").exists()


@pytest.fixture
def model(setup):
    return build_model(setup)


def test_load_weights_sets_every_weight(model, tiny_checkpoint):
    load_weights(model, str(tiny_checkpoint / "model_final.pth"))
    saved = torch.load(tiny_checkpoint / "model_final.pth", weights_only=False)["model"]
    assert set(model.state_dict()) <= set(saved)
    for key, value in model.state_dict().items():
        assert torch.equal(value, torch.as_tensor(saved[key])), key


def test_load_weights_refuses_missing_truncated_and_foreign_files(model, tiny_checkpoint, tmp_path):
    data = (tiny_checkpoint / "model_final.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    not_checkpoint = tmp_path / "numbers.pth"
    torch.save([1, 2, 3], not_checkpoint)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    other_model = tmp_path / "other_model.pth"
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, other_model)
    cases = {
        tmp_path / "absent.pth": "not found",
        truncated: "not a readable checkpoint",
        not_checkpoint: "not a checkpoint",
        text: "not a readable checkpoint",
        other_model: "missing from the file",
    }
    for path, reason in cases.items():
        with pytest.raises(WeightsError, match=reason) as error:
            load_weights(model, str(path))
        assert str(path) in str(error.value)
    with pytest.raises(WeightsError, match="MODEL.WEIGHTS is empty"):
        load_weights(model, "")
