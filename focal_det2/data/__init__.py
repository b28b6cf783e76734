"""Datasets of focal_det2: the embedded demo dataset, registered in Detectron2's catalogs."""

from .demo import ensure_demo_data, generate_demo_data, register_demo_datasets
from .user_coco import register_coco_datasets

__all__ = [
    "ensure_demo_data",
    "generate_demo_data",
    "register_coco_datasets",
    "register_demo_datasets",
]
