"""
A visual report of a training run, written by the trainer into ``OUTPUT_DIR/report/`` after each
evaluation and at the end of training:

- ``curves.png``: each loss term, the learning rate and the imbalance diagnostics
  (``num_pos_anchors``, ``focal/*``) against iteration, from ``metrics.json``; AP and AP50 at
  each evaluation;
- ``per_class_ap.png``: box AP per class, sorted, with each class's training instances;
- ``pr_curves.png``: precision against recall at IoU 0.5, per class, from the COCO evaluation;
- ``val_detections.png``: predictions beside ground truth on fixed validation images.

Figures are drawn with matplotlib's ``Figure`` (Agg), never pyplot, so no display is needed and
no global backend is changed.
"""

import copy
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import HookBase
from detectron2.structures import BoxMode, Instances
from detectron2.utils import comm
from detectron2.utils.colormap import colormap
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel

from .evaluation import coco_eval_file, load_coco_eval
from .file_io import atomic_write
from .modeling.class_alpha import count_instances

__all__ = [
    "TrainingReportHook",
    "draw_boxes",
    "per_class_ap",
    "plot_curves",
    "plot_per_class_ap",
    "plot_pr_curves",
    "plot_val_detections",
    "read_metrics",
]

logger = logging.getLogger(__name__)

REPORT_FILES = ("curves.png", "per_class_ap.png", "pr_curves.png", "val_detections.png")


def read_metrics(path: str) -> List[Dict]:
    """The records of Detectron2's ``metrics.json`` (one json object per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _save(fig: Figure, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"), "wb")


def _series(records: Sequence[Dict], key: str) -> Tuple[List[int], List[float]]:
    points = [(r["iteration"], r[key]) for r in records if key in r and "iteration" in r]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_curves(records: Sequence[Dict], path: str) -> None:
    """
    Draw the training curves of ``metrics.json`` records into the PNG ``path``: the loss terms
    (``total_loss``, ``loss_*``), ``lr``, ``num_pos_anchors``, the ``focal/*`` diagnostics, and
    ``bbox/AP`` and ``bbox/AP50`` at each evaluation. Panels without data say so.
    """
    keys = sorted({k for r in records for k in r})
    panels: List[Tuple[str, List[str], bool]] = [
        ("losses", ["total_loss"] + [k for k in keys if k.startswith("loss_")], True),
        ("learning rate", ["lr"], False),
        ("positive anchors per image", ["num_pos_anchors"], False),
        ("imbalance diagnostics", [k for k in keys if k.startswith("focal/")], False),
        ("box AP at each evaluation", ["bbox/AP", "bbox/AP50"], False),
    ]
    fig = Figure(figsize=(12, 7), dpi=64)
    # Fixed margins: the panels' labels are numbers and known titles, and matplotlib's
    # constrained layout would take more than half of the time to draw this figure.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, wspace=0.3, hspace=0.32)
    axes = fig.subplots(2, 3).ravel()
    for ax, (title, panel_keys, log_scale) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        drawn = False
        for key in panel_keys:
            x, y = _series(records, key)
            if x:
                # Few points (evaluations, short runs) would not show as a line alone.
                marker = "o" if key.startswith("bbox/") or len(x) < 30 else None
                ax.plot(x, y, label=key, marker=marker)
                drawn = True
        if drawn:
            if log_scale and all(v > 0 for k in panel_keys for v in _series(records, k)[1]):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_visible(False)
    _save(fig, path)


def per_class_ap(precision: np.ndarray) -> np.ndarray:
    """
    AP per class, as Detectron2's ``COCOEvaluator`` computes it.

    Args:
        precision: (T, R, K, A, M) COCOeval ``eval["precision"]``, -1 where undefined.

    Returns:
        (K,) AP in [0, 100], NaN for a class without ground truth.
    """
    values = precision[:, :, :, 0, -1]
    result = np.full(values.shape[2], np.nan)
    for k in range(values.shape[2]):
        defined = values[:, :, k][values[:, :, k] > -1]
        if defined.size:
            result[k] = 100.0 * defined.mean()
    return result


def plot_per_class_ap(
    class_names: Sequence[str], ap: np.ndarray, train_counts: Sequence[int], path: str
) -> None:
    """
    Draw AP per class as horizontal bars, highest first, each labelled with its AP and its
    number of training instances, into the PNG ``path``.

    Args:
        class_names: (K,) names.
        ap: (K,) AP in [0, 100] (NaN: not evaluated).
        train_counts: (K,) training instances per class.
    """
    order = sorted(range(len(class_names)), key=lambda k: -np.nan_to_num(ap[k], nan=-1.0))
    fig = Figure(figsize=(8, 1.5 + 0.3 * len(order)), dpi=80, layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(order))
    values = [0.0 if np.isnan(ap[k]) else ap[k] for k in order]
    ax.barh(positions, values, color="tab:blue")
    ax.set_yticks(positions, [str(class_names[k]) for k in order])
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("box AP (IoU 0.50:0.95)")
    ax.set_title("AP per class (n = training instances)")
    for y, k in zip(positions, order):
        label = "n/a" if np.isnan(ap[k]) else f"{ap[k]:.1f}"
        ax.text(values[y] + 1, y, f"{label}   n = {train_counts[k]}", va="center", fontsize=8)
    _save(fig, path)


def plot_pr_curves(
    precision: np.ndarray,
    rec_thrs: np.ndarray,
    iou_thrs: np.ndarray,
    class_names: Sequence[str],
    path: str,
) -> None:
    """
    Draw precision against recall at IoU 0.5 per class (all areas, the last maxDets) into the
    PNG ``path``.

    Args:
        precision: (T, R, K, A, M) COCOeval ``eval["precision"]``.
        rec_thrs: (R,) recall thresholds.
        iou_thrs: (T,) IoU thresholds; one of them must be 0.5.
        class_names: (K,) names.
    """
    matches = np.flatnonzero(np.isclose(iou_thrs, 0.5))
    if not matches.size:
        raise ValueError(f"the evaluation has no IoU threshold 0.5 (thresholds: {iou_thrs})")
    curves = precision[matches[0], :, :, 0, -1]
    ap50 = per_class_ap(precision[matches[0] : matches[0] + 1])
    fig = Figure(figsize=(8, 6), dpi=80)
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.09, top=0.94)  # numeric labels only
    ax = fig.subplots()
    for k, name in enumerate(class_names):
        defined = curves[:, k] > -1
        if defined.any():
            ax.plot(rec_thrs[defined], curves[defined, k], label=f"{name} (AP50 {ap50[k]:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    if 0 < len(class_names) <= 20:
        ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def draw_boxes(
    image: np.ndarray, boxes: np.ndarray, classes: Sequence[int], labels: Sequence[str]
) -> np.ndarray:
    """
    A copy of the (H, W, 3) uint8 RGB ``image`` with the (B, 4) XYXY ``boxes`` drawn, in one
    colour per class (Detectron2's colormap) and captioned with ``labels``. OpenCV rather than
    Detectron2's ``Visualizer``, which renders each image through a matplotlib canvas: ten
    times slower for the report's thumbnails.
    """
    canvas = np.ascontiguousarray(image).copy()
    palette = colormap(rgb=True, maximum=255)
    for box, k, label in zip(np.asarray(boxes).round().astype(int), classes, labels):
        color = tuple(int(c) for c in palette[k % len(palette)])
        x0, y0, x1, y1 = box.tolist()
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, 2)
        cv2.putText(canvas, label, (x0, max(y0 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color)
    return canvas


def plot_val_detections(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]], path: str, tile: int = 192
) -> None:
    """
    Write (prediction, ground truth) image pairs as a PNG mosaic, two pairs per row, each image
    scaled to ``tile`` pixels on its longer side and captioned. A plain image mosaic, not a
    matplotlib figure: drawing thousands of image pixels through Agg is needlessly slow.

    Args:
        pairs: (H, W, 3) uint8 RGB images, predictions drawn and ground truth drawn.
        path: the PNG file.
        tile: side of each image's square cell in pixels.
    """
    if not pairs:
        raise ValueError("no validation images to draw")
    caption = 20
    rows = (len(pairs) + 1) // 2
    mosaic = np.full((rows * (tile + caption), 4 * tile, 3), 255, dtype=np.uint8)
    for i, images in enumerate(pairs):
        for j, (image, title) in enumerate(zip(images, ("prediction", "ground truth"))):
            scale = tile / max(image.shape[:2])
            height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
            y, x = (i // 2) * (tile + caption), (2 * (i % 2) + j) * tile
            mosaic[y + caption : y + caption + height, x : x + width] = cv2.resize(
                image, (width, height), interpolation=cv2.INTER_AREA
            )
            cv2.putText(mosaic, title, (x + 4, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0))
    ok, encoded = cv2.imencode(".png", mosaic[:, :, ::-1])
    if not ok:
        raise ValueError(f"cannot encode {path} as PNG")
    atomic_write(path, lambda f: f.write(encoded.tobytes()), "wb")


class TrainingReportHook(HookBase):
    """
    Writes the report (see the module) into ``report_dir`` after each evaluation and at the end
    of training, in the main process only. A figure that fails is logged as a warning naming it
    and does not stop training; the others are still written.
    """

    @configurable
    def __init__(
        self,
        *,
        report_dir: str,
        metrics_file: str,
        eval_dir: str,
        train_datasets: Sequence[str],
        val_dataset: Optional[str],
        mapper: Callable[[Dict], Dict],
        num_val_images: int = 8,
        score_thresh: float = 0.5,
        max_drawn: int = 20,
        num_classes: Optional[int] = None,
    ):
        """
        Args:
            report_dir: folder of the report.
            metrics_file: Detectron2's ``metrics.json`` of the run.
            eval_dir: folder where the COCO evaluator saves its arrays (``coco_eval_file``).
            train_datasets: names of the training datasets (instances per class).
            val_dataset: name of the evaluated dataset; None: no evaluation figures.
            mapper: test-time mapper of a dataset dict to the model's input.
            num_val_images: validation images in ``val_detections.png``, evenly spaced.
            score_thresh: minimum score of a drawn prediction.
            max_drawn: most predictions drawn per image, highest scores first.
            num_classes: the model's classes: with it, the training instances per class are
                counted when training starts rather than in the first report.
        """
        self.report_dir = report_dir
        self.metrics_file = metrics_file
        self.eval_dir = eval_dir
        self.train_datasets = tuple(train_datasets)
        self.val_dataset = val_dataset
        self.mapper = mapper
        self.num_val_images = num_val_images
        self.score_thresh = score_thresh
        self.max_drawn = max_drawn
        self.num_classes = num_classes
        self._last_eval_iter: Optional[int] = None
        self._val_dicts: Optional[List[Dict]] = None

    @classmethod
    def from_config(cls, cfg):
        return {
            "report_dir": os.path.join(cfg.OUTPUT_DIR, "report"),
            "metrics_file": os.path.join(cfg.OUTPUT_DIR, "metrics.json"),
            "eval_dir": os.path.join(cfg.OUTPUT_DIR, "inference"),
            "train_datasets": cfg.DATASETS.TRAIN,
            "val_dataset": cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None,
            "mapper": DatasetMapper(cfg, is_train=False),
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
        }

    def before_train(self):
        # Training-set facts, counted while training starts (which reads the records anyway)
        # and cached: the reports after evaluations only draw.
        if comm.is_main_process() and self.num_classes:
            try:
                count_instances(self.train_datasets, self.num_classes)
            except Exception:
                logger.warning("Training report: training instances not counted", exc_info=True)

    def after_step(self):
        latest = self.trainer.storage.latest()
        if "bbox/AP" in latest and latest["bbox/AP"][1] != self._last_eval_iter:
            self._last_eval_iter = latest["bbox/AP"][1]
            self.write()

    def after_train(self):
        # As Detectron2's EvalHook: nothing at a stop before the end (a preempted run must exit
        # within its grace period; the report comes with the run that finishes).
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.write()

    def write(self) -> None:
        """Write every figure that has its data; log a warning for each that fails."""
        if not comm.is_main_process():
            return
        start = time.perf_counter()
        os.makedirs(self.report_dir, exist_ok=True)
        written = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The model runs on the validation images while matplotlib draws the other figures
            # (its operators release the GIL): the report's largest part overlaps the rest.
            predictions = pool.submit(self._val_predictions) if self.val_dataset else None
            for name, draw in (
                ("curves.png", self._curves),
                ("per_class_ap.png", self._per_class_ap),
                ("pr_curves.png", self._pr_curves),
                ("val_detections.png", partial(self._val_detections, predictions=predictions)),
            ):
                try:
                    if draw(os.path.join(self.report_dir, name)):
                        written.append(name)
                except Exception:
                    logger.warning("Training report: %s not written", name, exc_info=True)
        logger.info(
            "Training report (%s) written to %s in %.2f s",
            ", ".join(written) or "nothing yet",
            self.report_dir,
            time.perf_counter() - start,
        )

    def _curves(self, path: str) -> bool:
        if not os.path.isfile(self.metrics_file):
            return False
        plot_curves(read_metrics(self.metrics_file), path)
        return True

    def _eval_arrays(self) -> Optional[Dict[str, np.ndarray]]:
        if self.val_dataset is None:
            return None
        path = coco_eval_file(self.eval_dir, self.val_dataset)
        return load_coco_eval(path) if os.path.isfile(path) else None

    def _per_class_ap(self, path: str) -> bool:
        arrays = self._eval_arrays()
        if arrays is None:
            return False
        names = [str(n) for n in arrays["class_names"]]
        counts = count_instances(self.train_datasets, len(names))
        plot_per_class_ap(names, per_class_ap(arrays["precision"]), counts, path)
        return True

    def _pr_curves(self, path: str) -> bool:
        arrays = self._eval_arrays()
        if arrays is None:
            return False
        plot_pr_curves(
            arrays["precision"],
            arrays["rec_thrs"],
            arrays["iou_thrs"],
            [str(n) for n in arrays["class_names"]],
            path,
        )
        return True

    def _val_predictions(self) -> List[Tuple[Dict, Instances]]:
        """The model's detections on the fixed validation images: (record, Instances on CPU)."""
        if self._val_dicts is None:
            dicts = DatasetCatalog.get(self.val_dataset)
            count = min(self.num_val_images, len(dicts))
            indices = np.linspace(0, len(dicts) - 1, count).round().astype(int)
            self._val_dicts = [dicts[i] for i in indices]
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                # One batch: the post-processing runs for all images at once.
                inputs = [self.mapper(copy.deepcopy(record)) for record in self._val_dicts]
                outputs = model(inputs)
        finally:
            model.train(was_training)
        results = []
        for record, output in zip(self._val_dicts, outputs):
            instances = output["instances"]
            instances = instances[instances.scores >= self.score_thresh]
            top = instances.scores.argsort(descending=True)[: self.max_drawn]
            results.append((record, instances[top].to("cpu")))
        return results

    def _val_detections(self, path: str, predictions: Optional[Future] = None) -> bool:
        """``predictions``: a future of :meth:`_val_predictions`, else they are computed here."""
        if self.val_dataset is None:
            return False
        results = predictions.result() if predictions is not None else self._val_predictions()
        names = MetadataCatalog.get(self.val_dataset).thing_classes
        pairs = []
        for record, instances in results:
            image = read_image(record["file_name"], format="RGB")
            classes, scores = instances.pred_classes.tolist(), instances.scores.tolist()
            predicted = draw_boxes(
                image,
                instances.pred_boxes.tensor.numpy(),
                classes,
                [f"{names[k]} {score:.0%}" for k, score in zip(classes, scores)],
            )
            annotations = record.get("annotations", [])
            truth = draw_boxes(
                image,
                np.array(
                    [
                        BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                        for a in annotations
                    ]
                ).reshape(-1, 4),
                [a["category_id"] for a in annotations],
                [names[a["category_id"]] for a in annotations],
            )
            pairs.append((predicted, truth))
        plot_val_detections(pairs, path)
        return True
