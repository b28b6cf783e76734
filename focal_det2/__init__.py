"""
focal_det2: RetinaNet with the focal loss (Lin et al., ICCV 2017) as a Detectron2 plugin.

Importing the package registers the ``FocalRetinaNet`` meta-architecture, its heads and
classification losses, and the embedded demo datasets (``focal_demo_train``/``focal_demo_val``).
"""

from .config import add_focal_config
from .data import register_demo_datasets
from .lint import check_config
from .modeling import (
    FOCAL_CLS_LOSS_REGISTRY,
    FOCAL_HEAD_REGISTRY,
    FocalRetinaNet,
    build_cls_loss,
    build_focal_head,
)

register_demo_datasets()

__all__ = [
    "FOCAL_CLS_LOSS_REGISTRY",
    "FOCAL_HEAD_REGISTRY",
    "FocalRetinaNet",
    "add_focal_config",
    "build_cls_loss",
    "check_config",
    "build_focal_head",
]
