"""
Run a trained FocalRetinaNet on images, folders, globs or videos; draw its detections and write
them in COCO results format.

    python -m focal_det2.predict --config-file configs/demo.yaml --input photos/ clip.mp4 \
        --output predictions/ MODEL.WEIGHTS output/demo/model_final.pth

For each image, ``OUTPUT/<file name>`` shows the detections (Detectron2's ``Visualizer``, class
names of the training dataset, scores); for each video, ``OUTPUT/<file name>`` is the video
with its detections drawn. ``OUTPUT/detections.json`` lists every detection: ``file_name``,
``category_id`` (the dataset's id), ``bbox`` (x, y, w, h in the input's pixels), ``score``, and
``frame`` for videos. An input that cannot be read is named on stderr and skipped; the exit
status is then 1.
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import BoxMode, Instances
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from .config import load_config
from .data import add_register_coco_argument, register_coco_datasets
from .export import OnnxPredictor
from .file_io import atomic_write
from .weights import WeightsError, load_weights

__all__ = ["Detector", "argument_parser", "collect_inputs", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Video containers and the codec each is written with.
VIDEO_CODECS = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
DETECTIONS_FILE = "detections.json"


class Detector:
    """
    Detectron2's ``DefaultPredictor`` with weights loaded strictly (:func:`load_weights`) and
    the training dataset's class names and category ids.

    Attributes:
        metadata: the training dataset's metadata (``thing_classes``, and the dataset's
            category ids in ``thing_dataset_id_to_contiguous_id``).
    """

    def __init__(self, cfg: CfgNode, onnx_path: Optional[str] = None):
        """
        Args:
            cfg: a config with ``MODEL.WEIGHTS`` and one dataset in ``DATASETS.TRAIN``.
            onnx_path: run this file of ``python -m focal_det2.export`` in onnxruntime
                (:class:`OnnxPredictor`) instead of the PyTorch model; ``MODEL.WEIGHTS`` is
                then not read.

        Raises:
            WeightsError: the weights are missing, unreadable or do not fit the config.
            ValueError: the training dataset is unknown or its classes do not fit the config.
        """
        self.metadata = _training_metadata(cfg)
        self.score_thresh = cfg.MODEL.RETINANET.SCORE_THRESH_TEST
        contiguous_to_dataset = {
            v: k for k, v in self.metadata.get("thing_dataset_id_to_contiguous_id", {}).items()
        }
        self.category_ids = [contiguous_to_dataset.get(i, i) for i in range(self.num_classes)]
        if onnx_path:
            self.predictor = OnnxPredictor(cfg, onnx_path)
            return
        random_init = cfg.clone()
        random_init.defrost()
        random_init.MODEL.WEIGHTS = ""
        self.predictor = DefaultPredictor(random_init)
        load_weights(self.predictor.model, cfg.MODEL.WEIGHTS)

    @property
    def num_classes(self) -> int:
        return len(self.metadata.thing_classes)

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """
        Args:
            image_bgr: (H, W, 3) uint8 image in BGR order.

        Returns:
            The detections on CPU, boxes in the image's pixels.
        """
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        # An exported graph thresholds at its export config's score: apply this one's.
        return instances[instances.scores > self.score_thresh]

    def draw(self, image_bgr: np.ndarray, instances: Instances) -> np.ndarray:
        """The (H, W, 3) BGR image with ``instances`` drawn, labelled by class name and score."""
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata)
        return visualizer.draw_instance_predictions(instances).get_image()[:, :, ::-1]

    def to_coco(self, instances: Instances, **fields) -> List[Dict]:
        """COCO results of ``instances`` (bbox x, y, w, h), each with ``fields`` added."""
        boxes = BoxMode.convert(
            instances.pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS
        )
        return [
            {
                **fields,
                "category_id": self.category_ids[label],
                "bbox": [float(v) for v in box],
                "score": float(score),
            }
            for box, label, score in zip(
                boxes, instances.pred_classes.tolist(), instances.scores.tolist()
            )
        ]


def _training_metadata(cfg: CfgNode):
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: the class names come from the training dataset")
    name = cfg.DATASETS.TRAIN[0]
    if name not in DatasetCatalog.list():
        raise ValueError(f"DATASETS.TRAIN: dataset {name!r} is not registered")
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_classes") or not metadata.get("thing_dataset_id_to_contiguous_id"):
        # Detectron2's COCO loader sets the class names and the id map as it reads the json.
        DatasetCatalog.get(name)
        metadata = MetadataCatalog.get(name)
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    if len(metadata.get("thing_classes", [])) != num_classes:
        raise ValueError(
            f"DATASETS.TRAIN {name!r} has {len(metadata.get('thing_classes', []))} classes, "
            f"MODEL.RETINANET.NUM_CLASSES is {num_classes}"
        )
    return metadata


def collect_inputs(paths: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """
    Expand the ``--input`` arguments: a file as it is, a folder into its images (sorted), a
    glob pattern into its matches (sorted).

    Returns:
        (files, problems): the files in order, without repeats, and (path, reason) for each
        argument that names nothing.
    """
    files: List[str] = []
    problems: List[Tuple[str, str]] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                problems.append((path, "folder without images"))
        elif os.path.isfile(path):
            found = [path]
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            if not found:
                problems.append((path, "no file matches this pattern"))
        else:
            found = []
            problems.append((path, "no such file or folder"))
        files.extend(f for f in found if f not in files)
    return files, problems


def _predict_image(detector: Detector, path: str, out_path: str) -> List[Dict]:
    try:
        image = read_image(path, format="BGR")
    except Exception as e:
        raise ValueError(f"cannot read the image: {type(e).__name__}: {e}") from e
    instances = detector(image)
    _write_image(out_path, detector.draw(image, instances))
    return detector.to_coco(instances, file_name=path)


def _write_image(path: str, image_bgr: np.ndarray) -> None:
    ext = os.path.splitext(path)[1].lower()
    ok, encoded = cv2.imencode(ext if ext in IMAGE_EXTENSIONS else ".png", image_bgr)
    if not ok:
        raise ValueError(f"cannot encode the drawn image as {ext}")
    atomic_write(path, lambda f: f.write(encoded.tobytes()), "wb")


def _predict_video(detector: Detector, path: str, out_path: str) -> List[Dict]:
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError("cannot open the video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    ext = os.path.splitext(out_path)[1].lower()
    # Written under a temporary name and renamed when complete, so a half-written video never
    # sits under the final name; the extension stays so that OpenCV picks the container.
    folder, name = os.path.split(out_path)
    partial = os.path.join(folder, f".{name}.partial{ext}")
    writer = None
    results: List[Dict] = []
    try:
        frame_index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            instances = detector(frame)
            drawn = detector.draw(frame, instances)
            if writer is None:
                height, width = drawn.shape[:2]
                codec = cv2.VideoWriter_fourcc(*VIDEO_CODECS[ext])
                writer = cv2.VideoWriter(partial, codec, fps, (width, height))
                if not writer.isOpened():
                    raise ValueError(f"cannot write a {ext} video to {out_path}")
            writer.write(drawn)
            results.extend(detector.to_coco(instances, file_name=path, frame=frame_index))
            frame_index += 1
        if writer is None:
            raise ValueError("no frame could be read from the video")
        writer.release()
        writer = None
        os.replace(partial, out_path)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if os.path.exists(partial):
            os.unlink(partial)
    return results


def argument_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m focal_det2.predict``."""
    parser = argparse.ArgumentParser(
        prog="python -m focal_det2.predict",
        description="Draw and save the detections of a trained model on images and videos.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config")
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image or video files, folders of images, or glob patterns",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the results")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of a detection to keep (MODEL.RETINANET.SCORE_THRESH_TEST)",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="run this model of python -m focal_det2.export in onnxruntime instead (its score "
        "threshold is the export config's: --confidence-threshold can only raise it)",
    )
    add_register_coco_argument(parser)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """The frozen config of ``args``; raises ValueError naming the file or key that is wrong."""
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(
            f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}"
        )
    threshold = ["MODEL.RETINANET.SCORE_THRESH_TEST", args.confidence_threshold]
    return load_config(args.config_file, [*args.opts, *threshold])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run the command line ``argv``.

    Returns:
        0 when every input was written, 1 when some input failed (each named on stderr).
    """
    args = argument_parser().parse_args(argv)
    try:
        register_coco_datasets(args.register_coco)
        cfg = setup_cfg(args)
        detector = Detector(cfg, args.onnx)
    except (ValueError, WeightsError) as e:
        sys.exit(f"predict: {e}")

    files, failed = collect_inputs(args.input)
    num_inputs = len(files) + len(failed)
    os.makedirs(args.output, exist_ok=True)
    detections: List[Dict] = []
    written: Dict[str, str] = {}
    for path in tqdm(files, desc="predict", unit="input"):
        name = os.path.basename(path)
        ext = os.path.splitext(name)[1].lower()
        try:
            if name in written:
                raise ValueError(f"same file name as {written[name]}, whose output is {name}")
            out_path = os.path.join(args.output, name)
            if os.path.exists(out_path) and os.path.samefile(out_path, path):
                raise ValueError("its output would overwrite it: choose another --output")
            if ext in VIDEO_CODECS:
                detections.extend(_predict_video(detector, path, out_path))
            else:
                detections.extend(_predict_image(detector, path, out_path))
            written[name] = path
        except ValueError as e:
            failed.append((path, str(e)))
    atomic_write(
        os.path.join(args.output, DETECTIONS_FILE), lambda f: json.dump(detections, f), "w"
    )
    for path, reason in failed:
        print(f"predict: skipped {path}: {reason}", file=sys.stderr)
    print(
        f"predict: {len(written)} of {num_inputs} inputs "
        f"drawn into {args.output}, {len(detections)} detections in "
        f"{os.path.join(args.output, DETECTIONS_FILE)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
