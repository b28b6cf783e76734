"""COCO-format datasets named on the command line (``train_net.py --register-coco``)."""

import argparse
import os
from typing import Iterable, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["add_register_coco_argument", "register_coco_datasets"]


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> None:
    """
    Register COCO-format datasets with Detectron2's ``register_coco_instances``.

    Args:
        specs: (name, json_file, image_root) triples.

    Raises:
        ValueError: naming the dataset and the path when a file or folder does not exist, or
            when the name is already registered with other files (registering the same files
            again is a no-op).
    """
    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise ValueError(f"--register-coco {name}: json file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise ValueError(f"--register-coco {name}: image folder not found: {image_root}")
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name)
            if (registered.get("json_file"), registered.get("image_root")) == (
                json_file,
                image_root,
            ):
                continue  # registered by an earlier call in this process
            raise ValueError(f"--register-coco {name}: a dataset of this name already exists")
        register_coco_instances(name, {}, json_file, image_root)


def add_register_coco_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) to a command's arguments."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME for DATASETS.TRAIN/TEST (repeatable)",
    )
