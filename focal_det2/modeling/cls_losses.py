"""Classification losses of RetinaNet, selectable by ``MODEL.FOCAL_RETINANET.CLS_LOSS_NAME``."""

import math
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import Tensor, nn
from torch.nn import functional as F

from ..losses import (
    focal_star_loss,
    ohem_select,
    sigmoid_focal_loss_with_labels,
    softmax_focal_loss,
)

FOCAL_CLS_LOSS_REGISTRY = Registry("FOCAL_CLS_LOSS")
FOCAL_CLS_LOSS_REGISTRY.__doc__ = """
Registry for the classification losses of RetinaNet. A registered object is called as
``obj(cfg)`` and returns a :class:`ClassificationLoss`. Register your own from your code with
``@FOCAL_CLS_LOSS_REGISTRY.register()`` and select it with
``MODEL.FOCAL_RETINANET.CLS_LOSS_NAME``.
"""


def build_cls_loss(cfg) -> "ClassificationLoss":
    """Build the loss named by ``cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME``."""
    return FOCAL_CLS_LOSS_REGISTRY.get(cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME)(cfg)


class ClassificationLoss(nn.Module):
    """
    Base of the classification losses. Labels are per anchor, in {-1: ignored, 0..K-1:
    foreground class, K: background}. ``forward`` returns the loss summed over all anchors of
    the batch; the meta-architecture divides it by the number of foreground anchors unless
    ``normalize_by_num_foreground`` is False (the loss then normalises itself).
    """

    # True when the loss predicts K+1 logits per anchor, the last one for background.
    background_logit: bool = False
    normalize_by_num_foreground: bool = True

    @classmethod
    def num_logits(cls, num_classes: int) -> int:
        """Number of classification logits per anchor for ``num_classes`` object classes."""
        return num_classes + int(cls.background_logit)

    def predict_scores(self, logits: Tensor) -> Tensor:
        """
        Args:
            logits: (..., L) classification logits.
        Returns:
            (..., K) per-class probabilities.
        """
        return logits.sigmoid()

    def initial_logit_bias(self, num_classes: int, prior_prob: float) -> Tensor:
        """
        The classifier bias (L,) of the paper's initialisation (Section 3.3): at the start of
        training every anchor is foreground with probability ``prior_prob``, so that the many
        background anchors do not swamp the first iterations. For one sigmoid per class, each
        class's probability is ``prior_prob``: the bias -log((1 - pi) / pi).
        """
        bias = -math.log((1 - prior_prob) / prior_prob)
        return torch.full((self.num_logits(num_classes),), bias)

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """
        Args:
            logits: (M, L) logits of M anchors; labels: (M,) labels in [0, K] (none ignored).
        Returns:
            (M,) the loss of each anchor, summed over its classes.
        """
        raise NotImplementedError

    def forward(self, logits: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
        """
        Args:
            logits: (N, R, L) logits of R anchors in each of N images.
            labels: (N, R) anchor labels.
            anchors: (R, 4) anchor boxes, XYXY, shared by the images.
        Returns:
            The scalar loss.
        """
        valid = labels >= 0
        return self.per_anchor_loss(logits[valid], labels[valid]).sum()


def _alpha_or_none(alpha: float) -> Optional[float]:
    return None if alpha < 0 else alpha


@FOCAL_CLS_LOSS_REGISTRY.register()
class SigmoidFocalLoss(ClassificationLoss):
    """The paper's focal loss FL = -alpha_t (1 - p_t)^gamma log(p_t), one sigmoid per class."""

    @configurable
    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0):
        """
        Args:
            alpha: weight of the positives (1 - alpha for negatives); < 0 for no weighting.
            gamma: focusing parameter; 0 gives (alpha-balanced) cross entropy.
        """
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        return {
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
        }

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return sigmoid_focal_loss_with_labels(
            logits, labels, self.alpha, self.gamma, reduction="none"
        ).sum(dim=1)

    def forward(self, logits: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
        # The fused loss skips ignored anchors itself: no masked copy of the logits.
        return sigmoid_focal_loss_with_labels(
            logits.flatten(0, 1), labels.flatten(), self.alpha, self.gamma, reduction="sum"
        )


@FOCAL_CLS_LOSS_REGISTRY.register()
class BalancedCrossEntropyLoss(SigmoidFocalLoss):
    """The alpha-balanced cross entropy of Table 1a: the focal loss with gamma = 0."""

    @configurable
    def __init__(self, *, alpha: float = 0.75):
        """
        Args:
            alpha: weight of the positives (1 - alpha for negatives); < 0 for no weighting.
        """
        super().__init__(alpha=alpha, gamma=0.0)

    @classmethod
    def from_config(cls, cfg):
        return {"alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA}


@FOCAL_CLS_LOSS_REGISTRY.register()
class FocalStarLoss(ClassificationLoss):
    """FL* of Appendix A: p_t* = sigmoid(gamma x_t + beta), FL* = -log(p_t*) / gamma."""

    @configurable
    def __init__(self, *, gamma: float = 2.0, beta: float = 1.0, alpha: float = 0.25):
        """
        Args:
            gamma, beta: the parameters of FL*; alpha: as for the focal loss.
        """
        super().__init__()
        self.gamma = gamma
        self.beta = beta
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg):
        return {
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
            "beta": cfg.MODEL.FOCAL_RETINANET.FOCAL_STAR_BETA,
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
        }

    def predict_scores(self, logits: Tensor) -> Tensor:
        # The model's probability of a positive is p* for y = 1.
        return torch.sigmoid(self.gamma * logits + self.beta)

    def initial_logit_bias(self, num_classes: int, prior_prob: float) -> Tensor:
        # p* = sigmoid(gamma x + beta) = pi.
        return (super().initial_logit_bias(num_classes, prior_prob) - self.beta) / self.gamma

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        targets = F.one_hot(labels, logits.shape[1] + 1)[:, :-1].to(logits.dtype)
        return focal_star_loss(logits, targets, self.gamma, self.beta, alpha=self.alpha).sum(1)


@FOCAL_CLS_LOSS_REGISTRY.register()
class SoftmaxFocalLoss(ClassificationLoss):
    """The focal loss over a softmax of K + 1 logits per anchor, the last for background."""

    background_logit = True

    @configurable
    def __init__(self, *, gamma: float = 2.0, alpha: Optional[float] = None):
        """
        Args:
            gamma: focusing parameter.
            alpha: weight of the foreground labels (1 - alpha for background); None for none.
        """
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg):
        return {
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
            "alpha": _alpha_or_none(cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA),
        }

    def predict_scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=-1)[..., :-1]

    def initial_logit_bias(self, num_classes: int, prior_prob: float) -> Tensor:
        # Background 1 - pi, each class pi / K; with K = 1 this is the sigmoid initialisation.
        bias = torch.zeros(self.num_logits(num_classes))
        bias[-1] = math.log((1 - prior_prob) * num_classes / prior_prob)
        return bias

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return softmax_focal_loss(logits, labels, self.gamma, self.alpha)


@FOCAL_CLS_LOSS_REGISTRY.register()
class OhemCrossEntropyLoss(ClassificationLoss):
    """
    The OHEM baseline of Table 1d: cross entropy over, per image, the hardest anchors left after
    NMS over anchors scored by their loss; averaged over the selected anchors.
    """

    normalize_by_num_foreground = False

    @configurable
    def __init__(
        self,
        *,
        batch_size_per_image: int = 128,
        nms_thresh: float = 0.7,
        fg_fraction: Optional[float] = None,
    ):
        """
        Args:
            batch_size_per_image: anchors selected per image.
            nms_thresh: IoU of the NMS over anchors before selection.
            fg_fraction: at most this share of foreground anchors (0.25 for 1:3); None: no cap.
        """
        super().__init__()
        self.batch_size_per_image = batch_size_per_image
        self.nms_thresh = nms_thresh
        self.fg_fraction = fg_fraction

    @classmethod
    def from_config(cls, cfg):
        ohem = cfg.MODEL.FOCAL_RETINANET.OHEM
        return {
            "batch_size_per_image": ohem.BATCH_SIZE_PER_IMAGE,
            "nms_thresh": ohem.NMS_THRESH,
            "fg_fraction": ohem.FG_FRACTION if ohem.FG_FRACTION > 0 else None,
        }

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return sigmoid_focal_loss_with_labels(
            logits, labels, alpha=-1.0, gamma=0.0, reduction="none"
        ).sum(dim=1)

    def forward(self, logits: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
        num_classes = logits.shape[-1]
        selected_losses = []
        for logits_i, labels_i in zip(logits, labels):
            losses_i = self.per_anchor_loss(logits_i, labels_i)
            keep = ohem_select(
                losses_i.detach(),
                anchors,
                labels_i,
                num_classes=num_classes,
                batch_size_per_image=self.batch_size_per_image,
                nms_thresh=self.nms_thresh,
                fg_fraction=self.fg_fraction,
            )
            selected_losses.append(losses_i[keep])
        selected = torch.cat(selected_losses)
        return selected.sum() / max(selected.numel(), 1)
