"""Datasets of focal_det2: the embedded demo dataset, registered in Detectron2's catalogs, and
the validation of the COCO-format datasets a config uses."""

from .demo import ensure_demo_data, generate_demo_data, register_demo_datasets
from .user_coco import register_coco_datasets
from .validation import (
    DatasetReport,
    DatasetValidationError,
    Problem,
    check_coco_dataset,
    cleaned_coco_dict,
    validate_coco_dataset,
    validate_datasets,
)

__all__ = [
    "DatasetReport",
    "DatasetValidationError",
    "Problem",
    "check_coco_dataset",
    "cleaned_coco_dict",
    "ensure_demo_data",
    "generate_demo_data",
    "register_coco_datasets",
    "register_demo_datasets",
    "validate_coco_dataset",
    "validate_datasets",
]
