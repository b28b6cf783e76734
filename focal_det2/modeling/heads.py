"""RetinaNet heads, selectable by ``MODEL.FOCAL_RETINANET.HEAD_NAME``."""

from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from .losses import build_cls_loss

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
    convs each, shared across levels. It is Detectron2's ``RetinaNetHead`` (same parameters,
    same state-dict keys; ``MODEL.RETINANET.NORM`` "GN" or "BN" adds a norm after every subnet
    conv), with one logit per anchor and class plus a background logit when the classification
    loss needs one (softmax), and the classifier bias of ``MODEL.RETINANET.PRIOR_PROB`` as that
    loss turns logits into scores.
    """

    @configurable
    def __init__(self, *, cls_logit_bias: Optional[Tensor] = None, **kwargs):
        """
        Args:
            cls_logit_bias: (L,) initial bias of the L logits of each anchor; None keeps
                Detectron2's constant -log((1 - prior_prob) / prior_prob).
            kwargs: the arguments of Detectron2's :class:`RetinaNetHead`.
        """
        super().__init__(**kwargs)
        if cls_logit_bias is not None:
            num_anchors = self.cls_score.out_channels // len(cls_logit_bias)
            with torch.no_grad():
                self.cls_score.bias.copy_(cls_logit_bias.repeat(num_anchors))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        cls_loss = build_cls_loss(cfg)
        num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
        ret["num_classes"] = cls_loss.num_logits(num_classes)
        ret["cls_logit_bias"] = cls_loss.initial_logit_bias(num_classes, ret["prior_prob"])
        return ret
