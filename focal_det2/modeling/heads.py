"""RetinaNet heads, selectable by ``MODEL.FOCAL_RETINANET.HEAD_NAME``."""

from typing import List

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.registry import Registry
from torch import nn

from .cls_losses import FOCAL_CLS_LOSS_REGISTRY

FOCAL_HEAD_REGISTRY = Registry("FOCAL_HEAD")
FOCAL_HEAD_REGISTRY.__doc__ = """
Registry for RetinaNet heads. A registered object is called as ``obj(cfg, input_shape)`` with
``input_shape`` the list of ShapeSpec of the head's input features, and returns an
``nn.Module`` whose ``forward(features: List[Tensor])`` returns ``(logits, deltas)``: two lists
with one tensor per level, of shapes (N, A*L, Hi, Wi) and (N, A*4, Hi, Wi), where L is the
number of classification logits per anchor of the configured classification loss.
"""


def build_focal_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    """Build the head named by ``cfg.MODEL.FOCAL_RETINANET.HEAD_NAME``."""
    return FOCAL_HEAD_REGISTRY.get(cfg.MODEL.FOCAL_RETINANET.HEAD_NAME)(cfg, input_shape)


@FOCAL_HEAD_REGISTRY.register()
class FocalRetinaNetHead(RetinaNetHead):
    """
    The paper's head: a classification and a box subnet of ``MODEL.RETINANET.NUM_CONVS`` 3x3
    convs each, shared across levels. It is Detectron2's ``RetinaNetHead`` (same parameters, same
    state-dict keys, ``MODEL.RETINANET.NORM`` honoured), with one logit per anchor and class
    plus a background logit when the classification loss needs one (softmax).
    """

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        loss_cls = FOCAL_CLS_LOSS_REGISTRY.get(cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME)
        ret["num_classes"] = loss_cls.num_logits(cfg.MODEL.RETINANET.NUM_CLASSES)
        return ret


@FOCAL_HEAD_REGISTRY.register()
class FocalRetinaNetGNHead(FocalRetinaNetHead):
    """
    The head with GroupNorm (32 groups) after every subnet conv, whatever
    ``MODEL.RETINANET.NORM`` says: normalised heads train from random initialisation and with
    small per-GPU batches, where BatchNorm statistics are noisy.
    """

    @configurable
    def __init__(self, **kwargs):
        kwargs["norm"] = "GN"
        super().__init__(**kwargs)
