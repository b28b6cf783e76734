"""Datasets of focal_det2: the embedded demo dataset and COCO-format datasets named on the
command line, registered in Detectron2's catalogs; the checks of a COCO-format dataset; and the
validation of the datasets a config uses."""

from .coco_checks import (
    DatasetReport,
    Problem,
    check_coco_dataset,
    cleaned_coco_dict,
    read_and_check_coco_dataset,
    validate_coco_dataset,
)
from .demo import ensure_demo_data, generate_demo_data, register_demo_datasets
from .grouping import SizeGroupedDataset
from .user_coco import add_register_coco_argument, register_coco_datasets
from .validation import PREPARE_FILES_KEY, DatasetValidationError, validate_datasets

__all__ = [
    "DatasetReport",
    "DatasetValidationError",
    "PREPARE_FILES_KEY",
    "Problem",
    "SizeGroupedDataset",
    "check_coco_dataset",
    "cleaned_coco_dict",
    "ensure_demo_data",
    "generate_demo_data",
    "add_register_coco_argument",
    "read_and_check_coco_dataset",
    "register_coco_datasets",
    "register_demo_datasets",
    "validate_coco_dataset",
    "validate_datasets",
]
