"""Modeling parts of focal_det2; importing this module registers them."""

from .heads import FOCAL_HEAD_REGISTRY, FocalRetinaNetHead, build_focal_head
from .losses import FOCAL_CLS_LOSS_REGISTRY, ClassificationLoss, build_cls_loss
from .meta_arch import FocalRetinaNet, check_focal_config

__all__ = [
    "FOCAL_CLS_LOSS_REGISTRY",
    "FOCAL_HEAD_REGISTRY",
    "ClassificationLoss",
    "FocalRetinaNet",
    "FocalRetinaNetHead",
    "build_cls_loss",
    "build_focal_head",
    "check_focal_config",
]
