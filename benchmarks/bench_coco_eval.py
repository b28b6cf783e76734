"""
Benchmark of the COCO box evaluation, ``TEST.COCO_EVAL_BACKEND`` "pycocotools" vs
"faster_coco_eval", through Detectron2's ``COCOEvaluator.evaluate()``.

    .venv/bin/python benchmarks/bench_coco_eval.py [--num-images N] [--seed S]

Generates a COCO-sized case: 5,000 images of 640 x 480 (COCO val2017's count), 80 classes
with COCO's category ids, 7.3 ground-truth boxes per image on average (~36k, COCO val2017's
36,781), sizes log-uniform over 4-400 px so that every area range is populated, 1% crowd, and
100 detections per image: jittered copies of the ground truth (70% with the right class) and
random boxes, random scores. The predictions are fed to each evaluator with ``process()``
(not timed); ``evaluate()`` (results json, ``loadRes``, COCOeval evaluate, accumulate,
summarize, per-class AP) is timed, once per backend, in one process. The two results are
checked equal (1e-4).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from focal_det2.evaluation import FocalCOCOEvaluator

from common import load, machine

# COCO's 80 category ids: 1..90 without the 10 ids that the 2014 release left unused.
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
WIDTH, HEIGHT = 640, 480
BOXES_PER_IMAGE = 36_781 / 5_000
DETECTIONS_PER_IMAGE = 100


def generate(num_images: int, seed: int):
    """The ground-truth COCO dict and, per image, (input, output) for ``process()``."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], []
    for image_id in range(1, num_images + 1):
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": WIDTH, "height": HEIGHT}
        )
        gt = []
        for _ in range(rng.poisson(BOXES_PER_IMAGE)):
            side = float(np.exp(rng.uniform(np.log(4), np.log(400))))
            w = min(side * rng.uniform(0.6, 1.5), WIDTH - 1)
            h = min(side * rng.uniform(0.6, 1.5), HEIGHT - 1)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            category = int(rng.integers(0, len(CATEGORY_IDS)))
            gt.append((x, y, w, h, category))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[category],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
        boxes, classes = [], []
        for x, y, w, h, category in gt:
            for _ in range(3):
                dx, dy, dw, dh = rng.normal(0, 0.1, 4) * [w, h, w, h]
                boxes.append([x + dx, y + dy, x + w + dw, y + h + dh])
                classes.append(category if rng.random() < 0.7 else int(rng.integers(0, 80)))
        boxes, classes = boxes[:DETECTIONS_PER_IMAGE], classes[:DETECTIONS_PER_IMAGE]
        extra = DETECTIONS_PER_IMAGE - len(boxes)
        xy = rng.uniform(0, [WIDTH - 8, HEIGHT - 8], (extra, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(300), (extra, 2)))
        boxes.extend(np.concatenate([xy, xy + wh], axis=1).tolist())
        classes.extend(rng.integers(0, 80, extra).tolist())
        instances = Instances((HEIGHT, WIDTH))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.tensor(rng.random(len(boxes)), dtype=torch.float32)
        instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
        predictions.append(({"image_id": image_id}, {"instances": instances}))
    categories = [{"id": i, "name": f"class_{i}"} for i in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(machine("cpu"))
    print(f"load average before: {load()}")
    start = time.perf_counter()
    dataset, predictions = generate(args.num_images, args.seed)
    print(
        f"generated {len(dataset['images'])} images, {len(dataset['annotations'])} ground-truth "
        f"boxes, {len(predictions) * DETECTIONS_PER_IMAGE} detections over "
        f"{len(dataset['categories'])} classes in {time.perf_counter() - start:.1f} s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        json_file = Path(tmp) / "gt.json"
        json_file.write_text(json.dumps(dataset))
        name = "bench_coco_eval_gt"
        register_coco_instances(name, {}, str(json_file), tmp)
        DatasetCatalog.get(name)  # the category id map, as training would have set it
        results, seconds = {}, {}
        for backend in ("pycocotools", "faster_coco_eval"):
            evaluator = FocalCOCOEvaluator(name, backend=backend, distributed=False)
            evaluator.reset()
            for inputs, outputs in predictions:
                evaluator.process([inputs], [outputs])
            start = time.perf_counter()
            results[backend] = evaluator.evaluate()["bbox"]
            seconds[backend] = time.perf_counter() - start
            print(
                f"{backend:<18} evaluate(): {seconds[backend]:8.2f} s   "
                f"AP {results[backend]['AP']:.4f}"
            )
    worst = max(
        abs(results["pycocotools"][k] - results["faster_coco_eval"][k])
        for k in results["pycocotools"]
    )
    print(
        f"speed-up faster_coco_eval vs pycocotools: "
        f"{seconds['pycocotools'] / seconds['faster_coco_eval']:.1f}x; "
        f"largest difference over {len(results['pycocotools'])} numbers: {worst:.2e}"
    )
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
