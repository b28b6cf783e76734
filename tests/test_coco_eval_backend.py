"""TEST.COCO_EVAL_BACKEND: faster-coco-eval behind Detectron2's COCOEvaluator equals pycocotools."""

import json

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, Instances
from faster_coco_eval import COCOeval_faster
from pycocotools.cocoeval import COCOeval

from focal_det2 import add_focal_config
from focal_det2.engine import FocalTrainer
from focal_det2.evaluation import FocalCOCOEvaluator, coco_eval_file, load_coco_eval

# Non-contiguous dataset ids, as COCO's: the evaluator must map them back.
CATEGORY_IDS = [1, 3, 4, 8, 11]
NUM_IMAGES = 24
IMAGE_SIZE = 400


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A registered COCO-format dataset of random boxes of every size, a few crowd boxes."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, NUM_IMAGES + 1):
        images.append(
            {"id": image_id, "file_name": f"{image_id}.jpg", "width": IMAGE_SIZE, "height": 300}
        )
        for _ in range(rng.integers(0, 12)):
            side = float(np.exp(rng.uniform(np.log(8), np.log(200))))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, 300 - min(h, 299))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
    categories = [{"id": i, "name": f"class{i}"} for i in CATEGORY_IDS]
    path = tmp_path_factory.mktemp("coco_eval") / "gt.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = "coco_eval_backend_gt"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(path), str(path.parent))
    DatasetCatalog.get(name)  # sets thing_dataset_id_to_contiguous_id
    return name, images, annotations


def _predictions(images, annotations, seed):
    """Per image: jittered copies of its boxes (right or wrong class) and random boxes, 150 in
    all, more than maxDets keeps."""
    rng = np.random.default_rng(seed)
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    inputs, outputs = [], []
    for image in images:
        boxes, classes = [], []
        for ann in (a for a in annotations if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            for _ in range(3):
                jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
                boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                keep = rng.random() < 0.7
                classes.append(contiguous[ann["category_id"]] if keep else rng.integers(0, 5))
        while len(boxes) < 150:
            x, y = rng.uniform(0, 350), rng.uniform(0, 250)
            boxes.append([x, y, x + rng.uniform(4, 120), y + rng.uniform(4, 120)])
            classes.append(rng.integers(0, 5))
        instances = Instances((300, IMAGE_SIZE))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.tensor(rng.random(len(boxes)), dtype=torch.float32)
        instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inputs.append({"image_id": image["id"]})
        outputs.append({"instances": instances})
    return inputs, outputs


def _evaluate(name, backend, output_dir, predictions, max_dets):
    evaluator = FocalCOCOEvaluator(
        name, backend=backend, output_dir=str(output_dir), max_dets_per_image=max_dets
    )
    evaluator.reset()
    evaluator.process(*predictions)
    results = evaluator.evaluate()["bbox"]
    return results, load_coco_eval(coco_eval_file(str(output_dir), name))


@pytest.mark.parametrize("max_dets", [None, 20, 300])
def test_backends_give_the_same_numbers(dataset, tmp_path, max_dets):
    name, images, annotations = dataset
    predictions = _predictions(images, annotations, seed=1)
    ours, ours_arrays = _evaluate(
        name, "faster_coco_eval", tmp_path / "fast", predictions, max_dets
    )
    reference, reference_arrays = _evaluate(
        name, "pycocotools", tmp_path / "ref", predictions, max_dets
    )
    # AP, AP50, ..., and AP-<class> for each class.
    assert set(ours) == set(reference) and len(reference) == 6 + len(CATEGORY_IDS)
    for key, value in reference.items():
        assert abs(ours[key] - value) < 1e-4, (key, ours[key], value)
    # All 12 COCO numbers (APs and ARs), every entry of the precision array.
    assert reference_arrays["stats"].shape == (12,)
    np.testing.assert_allclose(ours_arrays["stats"], reference_arrays["stats"], atol=1e-6)
    np.testing.assert_allclose(ours_arrays["precision"], reference_arrays["precision"], atol=1e-6)
    assert 0.05 < reference["AP"] < 95, "a case where the numbers mean something"


def test_max_dets_changes_the_numbers(dataset, tmp_path):
    """The non-default limit really is applied (not silently 100)."""
    name, images, annotations = dataset
    predictions = _predictions(images, annotations, seed=2)
    at_100, _ = _evaluate(name, "faster_coco_eval", tmp_path / "a", predictions, None)
    at_5, arrays = _evaluate(name, "faster_coco_eval", tmp_path / "b", predictions, 5)
    assert at_5["AP"] != at_100["AP"]
    reference, reference_arrays = _evaluate(name, "pycocotools", tmp_path / "c", predictions, 5)
    assert abs(at_5["AP"] - reference["AP"]) < 1e-4


class _Recording(FocalCOCOEvaluator):
    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        self.cocoeval_class = type(coco_eval)
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


@pytest.mark.parametrize(
    "backend,max_dets,expected",
    [
        ("faster_coco_eval", None, COCOeval_faster),
        ("faster_coco_eval", 20, COCOeval_faster),
        ("pycocotools", None, COCOeval),
        ("pycocotools", 20, coco_evaluation.COCOevalMaxDets),
    ],
)
def test_backend_runs_its_cocoeval(dataset, backend, max_dets, expected):
    name, images, annotations = dataset
    before = coco_evaluation.COCOeval, coco_evaluation.COCOevalMaxDets
    evaluator = _Recording(name, backend=backend, max_dets_per_image=max_dets)
    evaluator.reset()
    evaluator.process(*_predictions(images, annotations, seed=3))
    evaluator.evaluate()
    assert evaluator.cocoeval_class is expected
    # Detectron2's module is as it was for every other user.
    assert (coco_evaluation.COCOeval, coco_evaluation.COCOevalMaxDets) == before


def test_trainer_evaluator_follows_the_config(dataset, tmp_path):
    name, _, _ = dataset
    cfg = get_cfg()
    add_focal_config(cfg)
    assert cfg.TEST.COCO_EVAL_BACKEND == "faster_coco_eval"
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.DETECTIONS_PER_IMAGE = 50
    evaluator = FocalTrainer.build_evaluator(cfg, name)
    assert isinstance(evaluator, FocalCOCOEvaluator)
    assert evaluator._backend == "faster_coco_eval" and evaluator._max_dets_per_image[-1] == 50
    assert not evaluator._use_fast_impl
    cfg.TEST.COCO_EVAL_BACKEND = "pycocotool"
    with pytest.raises(ValueError, match="TEST.COCO_EVAL_BACKEND.*pycocotool"):
        FocalTrainer.build_evaluator(cfg, name)
