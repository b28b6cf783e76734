"""
The focal-loss family of :paper:`RetinaNet` (Lin et al., "Focal Loss for Dense Object
Detection", ICCV 2017), in one place:

- the loss functions, pure and sharing one signature, fvcore's
  ``(inputs, targets, alpha, gamma, [beta,] reduction)`` with one "no weighting" sentinel,
  ``alpha < 0``, and alpha either one float for every class (the paper's) or a (K,) tensor of
  per-class alphas:

  - :func:`sigmoid_focal_loss`: eq. 5 on dense (one-hot or soft) targets, the reference;
  - :func:`sigmoid_focal_loss_with_labels`: the same loss from class-index labels, fused with
    its closed-form gradient (Appendix B) by the private backend
    :mod:`focal_det2.modeling._fused_focal_loss`: what RetinaNet trains with;
  - :func:`focal_star_loss` (FL*, Appendix A) and :func:`softmax_focal_loss`;

- the classification-loss modules of ``FOCAL_CLS_LOSS_REGISTRY``
  (``MODEL.FOCAL_RETINANET.CLS_LOSS_NAME``), which apply them to the anchors of a batch and
  turn logits into scores at inference.

Every logarithm of a probability is taken in log-sigmoid / log-sum-exp form, so the losses are
finite for any finite logit; float16 / bfloat16 inputs are computed (and returned) in float32.
Normalisation by the number of foreground anchors is the meta-architecture's business.
"""

import math
from typing import Optional, Union

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import Tensor, nn
from torch.nn import functional as F

from ._fused_focal_loss import fused_sigmoid_focal_loss
from .class_alpha import class_alpha_from_config
from .sampling import ohem_select

__all__ = [
    "ALPHA_RANGE",
    "FOCAL_CLS_LOSS_REGISTRY",
    "BalancedCrossEntropyLoss",
    "ClassificationLoss",
    "FocalStarLoss",
    "OhemCrossEntropyLoss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "build_cls_loss",
    "focal_star_loss",
    "is_valid_alpha",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "softmax_focal_loss",
]

# ----- argument checks, shared by every loss function -----------------------------------------

_REDUCTIONS = ("none", "mean", "sum")
#: The values of alpha a loss function accepts.
ALPHA_RANGE = (
    "[0, 1], or < 0 for no weighting, or a 1-d floating tensor of one alpha in [0, 1] per class"
)

#: alpha: one float for every class, or a (K,) tensor of per-class alphas.
Alpha = Union[float, Tensor]


def is_valid_alpha(alpha: Alpha) -> bool:
    """
    Whether ``alpha`` weights positives by alpha and negatives by 1 - alpha (a float in [0, 1],
    or a 1-d floating tensor of per-class values in [0, 1]), or is a float < 0 (no weighting).
    """
    if isinstance(alpha, Tensor):
        return (
            alpha.dim() == 1
            and alpha.is_floating_point()
            and bool(((alpha >= 0) & (alpha <= 1)).all())
        )
    return alpha <= 1 and not math.isnan(alpha)


def _check_alpha(alpha: Alpha, num_classes: Optional[int] = None) -> None:
    """Raise ValueError unless ``alpha`` is valid and, per class, has ``num_classes`` values."""
    if not is_valid_alpha(alpha):
        shown = alpha.tolist() if isinstance(alpha, Tensor) and alpha.numel() <= 100 else alpha
        raise ValueError(f"alpha must be in {ALPHA_RANGE}; got {shown}.")
    if isinstance(alpha, Tensor) and num_classes is not None and alpha.numel() != num_classes:
        raise ValueError(
            f"a per-class alpha must have one value per class: {num_classes} classes, got "
            f"{alpha.numel()} alphas."
        )


def _check_args(
    alpha: Alpha,
    gamma: float,
    reduction: str,
    min_gamma_exclusive: bool = False,
    num_classes: Optional[int] = None,
):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
    _check_alpha(alpha, num_classes)
    if min_gamma_exclusive and not gamma > 0:
        raise ValueError(f"gamma must be > 0; got {gamma}.")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}.")


def _check_labels(labels: Tensor, num_classes: int) -> None:
    """
    Labels are k in [0, K) for class k, K for background and negative for ignored; a label
    above K (a dataset class id beyond the model's classes) is an error, not background.
    """
    if labels.numel() and int(labels.max()) > num_classes:
        raise ValueError(
            f"label {int(labels.max())} is out of range for {num_classes} classes: labels must "
            f"be in [0, {num_classes - 1}] for a class, {num_classes} for background, or "
            "negative for ignored."
        )


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _compute_dtype(inputs: Tensor) -> torch.dtype:
    # float16 / bfloat16 would round away the small losses of easy examples; float64 stays.
    return torch.float64 if inputs.dtype == torch.float64 else torch.float32


def _is_weighted(alpha: Alpha) -> bool:
    return isinstance(alpha, Tensor) or alpha >= 0


def _alpha_t(targets: Tensor, alpha: Alpha) -> Tensor:
    # A per-class alpha (K,) broadcasts over the last (class) dimension of the targets.
    if isinstance(alpha, Tensor):
        alpha = alpha.to(targets)
    return alpha * targets + (1 - alpha) * (1 - targets)


# ----- the loss functions -----------------------------------------------------------------------


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: Alpha = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """
    The focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) of the paper (eq. 5), with one
    sigmoid per element: p = sigmoid(x), p_t = p for a positive and 1 - p for a negative. The
    reference implementation, on dense targets; RetinaNet trains with
    :func:`sigmoid_focal_loss_with_labels`, the same loss from class indices.

    A drop-in for ``fvcore.nn.sigmoid_focal_loss`` (the same values and gradients where fvcore's
    are accurate) that stays finite for any finite logit: gamma = 0 with alpha < 0 is exactly
    ``F.binary_cross_entropy_with_logits``.

    Args:
        inputs: (*) float logits of any shape. float16 / bfloat16 are computed in float32,
            float64 in float64.
        targets: (*) the same shape as ``inputs``: 1 for a positive, 0 for a negative (soft
            targets in [0, 1] are accepted, as in fvcore).
        alpha: weight of the positives, 1 - alpha of the negatives, in [0, 1]; < 0 for no
            weighting; or a (K,) tensor of per-class alphas in [0, 1], K the size of the last
            dimension (the classes).
        gamma: focusing parameter >= 0; 0 gives the (alpha-balanced) cross entropy.
        reduction: "none" | "mean" | "sum".

    Returns:
        The loss, of shape (*) for "none" and a scalar otherwise; float32 for float32 and
        half-precision inputs, float64 for float64 inputs.
    """
    _check_args(alpha, gamma, reduction, num_classes=inputs.shape[-1] if inputs.dim() else 1)
    dtype = _compute_dtype(inputs)
    inputs = inputs.to(dtype)
    targets = targets.to(dtype)

    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    if gamma != 0:
        # 1 - p_t as a sum of non-negative terms: sigmoid(-x) is exact where 1 - sigmoid(x)
        # rounds to 0. Clamping at the smallest normal float keeps the gradient of
        # (1 - p_t)^gamma finite for gamma < 1 where 1 - p_t underflows (p_t = 1); the loss
        # there is below that float anyway.
        one_minus_p_t = targets * torch.sigmoid(-inputs) + (1 - targets) * torch.sigmoid(inputs)
        tiny = torch.finfo(dtype).tiny
        loss = loss * one_minus_p_t.clamp(min=tiny) ** gamma
    if _is_weighted(alpha):
        loss = _alpha_t(targets, alpha) * loss
    return _reduce(loss, reduction)


def sigmoid_focal_loss_with_labels(
    inputs: Tensor,
    labels: Tensor,
    alpha: Alpha = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> Tensor:
    """
    :func:`sigmoid_focal_loss` of every (anchor, class) pair, from integer labels, fused with
    its gradient. Equals Detectron2's RetinaNet classification loss ::

        valid = labels >= 0
        targets = F.one_hot(labels[valid], K + 1)[:, :-1].to(inputs.dtype)
        fvcore.nn.sigmoid_focal_loss_jit(inputs[valid], targets, alpha, gamma, reduction)

    with the same gradients, without building the one-hot targets: the forward pass computes
    the loss and the closed-form gradient (Appendix B) in one compiled pass and keeps only the
    gradient for backward. Stable for any finite logit. Not twice differentiable.

    Args:
        inputs: (N, K) float16 / bfloat16 / float32 / float64 classification logits.
        labels: (N,) integer labels: k in [0, K) marks a positive of class k, K background (a
            negative of every class), and any negative value an ignored row (0 loss, 0
            gradient). A label above K is an error.
        alpha: weight of the positives, 1 - alpha of the negatives, in [0, 1]; < 0 for no
            weighting; or a (K,) tensor of per-class alphas in [0, 1]: element (i, k) is
            weighted by alpha_k if labels[i] == k, else by 1 - alpha_k.
        gamma: focusing parameter >= 0; 0 gives the (alpha-balanced) cross entropy.
        reduction: "sum" (the default: RetinaNet's, which the caller normalises, e.g. by the
            number of foreground anchors), "mean" (the sum divided by K times the number of
            valid rows, NaN without any, like fvcore's mean over the masked targets) or "none".

    Returns:
        A scalar for "sum" and "mean"; (N, K) for "none", with zero rows where ignored.
        float32 for half-precision and float32 logits (accumulated in float32), float64 for
        float64 logits. The gradient has the dtype of ``inputs``.
    """
    if not inputs.is_floating_point():
        raise TypeError(f"logits must be a floating tensor; got {inputs.dtype}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}.")
    if inputs.dim() != 2 or labels.shape != inputs.shape[:1]:
        raise ValueError(
            "logits must be (N, K) and labels (N,); got logits "
            f"{tuple(inputs.shape)} and labels {tuple(labels.shape)}."
        )
    if labels.device != inputs.device:
        raise ValueError(
            f"logits and labels must be on one device; got {inputs.device} and {labels.device}."
        )
    _check_args(alpha, gamma, reduction, num_classes=inputs.shape[1])
    _check_labels(labels, inputs.shape[1])
    return fused_sigmoid_focal_loss(inputs, labels, alpha, gamma, reduction)


def focal_star_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: Alpha = 0.25,
    gamma: float = 2.0,
    beta: float = 1.0,
    reduction: str = "none",
) -> Tensor:
    """
    FL* of the paper's Appendix A: with y = 2 * targets - 1 in {-1, 1} and x_t = y x,
    p_t* = sigmoid(gamma x_t + beta) and FL* = -log(p_t*) / gamma, times alpha_t when
    alpha >= 0. With beta = 0 this is ``fvcore.nn.sigmoid_focal_loss_star`` (same alpha
    convention). The model's probability of a positive is sigmoid(gamma x + beta).

    Args:
        inputs: (*) float logits x of any shape (half precision is computed in float32).
        targets: (*) the same shape as ``inputs``: 1 for a positive, 0 for a negative.
        alpha: weight of the positives, 1 - alpha of the negatives, in [0, 1]; < 0 for none;
            or a (K,) tensor of per-class alphas, K the size of the last dimension.
        gamma: the scale of x_t, > 0.
        beta: the shift of gamma x_t.
        reduction: "none" | "mean" | "sum".

    Returns:
        The loss, of shape (*) for "none" and a scalar otherwise (float32 or float64 as for
        :func:`sigmoid_focal_loss`).
    """
    _check_args(
        alpha,
        gamma,
        reduction,
        min_gamma_exclusive=True,
        num_classes=inputs.shape[-1] if inputs.dim() else 1,
    )
    if inputs.shape != targets.shape:
        raise ValueError(
            f"targets must have the shape of inputs {tuple(inputs.shape)}; "
            f"got {tuple(targets.shape)}."
        )
    dtype = _compute_dtype(inputs)
    inputs = inputs.to(dtype)
    targets = targets.to(dtype)

    x_t = inputs * (2 * targets - 1)
    # -log(sigmoid(z)) = softplus(-z), exact for any finite z.
    loss = -F.logsigmoid(gamma * x_t + beta) / gamma
    if _is_weighted(alpha):
        loss = _alpha_t(targets, alpha) * loss
    return _reduce(loss, reduction)


def softmax_focal_loss(
    inputs: Tensor,
    labels: Tensor,
    alpha: Alpha = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """
    The focal loss over a softmax of K foreground classes plus background:
    FL = -alpha_t (1 - p_t)^gamma log(p_t), p_t the softmax probability of the true class.

    Ignored examples must be removed by the caller: every label must be in [0, K].

    Args:
        inputs: (N, K + 1) float logits, the last column for background (half precision is
            computed in float32).
        labels: (N,) int64 labels in [0, K]; K is background.
        alpha: weight of foreground labels (< K), 1 - alpha of background labels, in [0, 1];
            < 0 for no weighting; or a (K,) tensor of per-class alphas: alpha_k weights label
            k, and background labels are weighted by 1 - mean(alpha), the mean negative weight
            of a background anchor in the sigmoid losses (1 - alpha when all are equal).
        gamma: focusing parameter >= 0; 0 gives the (alpha-balanced) cross entropy.
        reduction: "none" | "mean" | "sum".

    Returns:
        The loss, of shape (N,) for "none" and a scalar otherwise (float32 or float64 as for
        :func:`sigmoid_focal_loss`).
    """
    if inputs.dim() != 2 or inputs.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K + 1) with K >= 1; got {inputs.shape}.")
    _check_args(alpha, gamma, reduction, num_classes=inputs.shape[1] - 1)
    if labels.shape != inputs.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 of shape ({inputs.shape[0]},); "
            f"got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    background = inputs.shape[1] - 1
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(
            f"labels must be in [0, {background}] (ignored examples are the caller's to "
            f"remove); got {int(labels.min())}."
        )
    _check_labels(labels, background)
    logits = inputs.to(_compute_dtype(inputs))

    # With z = x_label - logsumexp(x_other), p_t = sigmoid(z): log(p_t) = logsigmoid(z) and
    # log(1 - p_t) = logsigmoid(-z), both exact where log_softmax rounds p_t to 1, and
    # (1 - p_t)^gamma = exp(gamma * logsigmoid(-z)) has a finite gradient for any gamma.
    true_class = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    logit_t = logits.gather(1, labels[:, None]).squeeze(1)
    z = logit_t - logits.masked_fill(true_class, float("-inf")).logsumexp(dim=1)
    loss = -F.logsigmoid(z)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-z))
    if isinstance(alpha, Tensor):
        alpha = alpha.to(loss)
        foreground_alpha = alpha[labels.clamp(max=background - 1)]
        loss = torch.where(labels == background, 1 - alpha.mean(), foreground_alpha) * loss
    elif alpha >= 0:
        alpha_t = torch.where(labels == background, 1 - alpha, alpha)
        loss = alpha_t.to(loss.dtype) * loss
    return _reduce(loss, reduction)


_FLOAT32_EPS = torch.finfo(torch.float32).eps


def _sigmoid_threshold_logit(score_thresh: float) -> float:
    """
    A value below logit(t) by more than the rounding of a float32 sigmoid near t (a few ulps
    of t, i.e. a few eps / (1 - t) in logit space) and of the logit itself; -inf for t < 0
    and +inf for t >= 1 (every score passes / none can).
    """
    if score_thresh < 0:
        return -math.inf
    if score_thresh >= 1:
        return math.inf
    if score_thresh == 0:
        # sigmoid(x) > 0 down to x of about -104 in float32, and lower in float64.
        return -math.inf
    exact = math.log(score_thresh) - math.log1p(-score_thresh)
    margin = 1e-4 * (1 + abs(exact)) + 64 * _FLOAT32_EPS / (1 - score_thresh)
    return exact - margin


# ----- the classification losses of RetinaNet, selectable by MODEL.FOCAL_RETINANET.CLS_LOSS_NAME

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

    def _set_alpha(self, alpha: Alpha) -> None:
        """
        Keep ``alpha`` as ``self.alpha``: a float as it is, a per-class (K,) tensor as a
        non-persistent buffer, which follows the module's device and stays out of the state
        dict (whose keys are Detectron2's RetinaNet's).
        """
        _check_alpha(alpha)
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha.detach().clone(), persistent=False)
        else:
            self.alpha = alpha

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

    def predict_candidate_scores(self, logits: Tensor, score_thresh: float) -> Tensor:
        """
        :meth:`predict_scores` where they may exceed ``score_thresh``: (..., K) scores that
        equal those of :meth:`predict_scores` wherever one is above ``score_thresh``, and may
        be 0 elsewhere, for a loss that can skip scoring anchors that cannot pass. The base
        class's scores every anchor.
        """
        return self.predict_scores(logits)

    def score_threshold_logit(self, score_thresh: float) -> Optional[float]:
        """
        A logit threshold for a score threshold, so that inference can skip scoring the many
        anchors that cannot pass: every logit x with ``predict_scores(x) > score_thresh`` has
        x > the returned value, for scores computed in float32 or float64. It lies a margin
        below the exact threshold to absorb the rounding of the score function, so a caller
        re-checks the scores of the logits above it. Only for an elementwise, increasing score
        function: None (score every logit) otherwise.

        The base class's is that of its sigmoid; a subclass that overrides ``predict_scores``
        gets None unless it overrides this method too.
        """
        if type(self).predict_scores is not ClassificationLoss.predict_scores:
            return None
        return _sigmoid_threshold_logit(score_thresh)

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


@FOCAL_CLS_LOSS_REGISTRY.register()
class SigmoidFocalLoss(ClassificationLoss):
    """The paper's focal loss FL = -alpha_t (1 - p_t)^gamma log(p_t), one sigmoid per class."""

    @configurable
    def __init__(self, *, alpha: Alpha = 0.25, gamma: float = 2.0):
        """
        Args:
            alpha: weight of the positives (1 - alpha for negatives); < 0 for no weighting; or a
                (K,) tensor of per-class alphas.
            gamma: focusing parameter; 0 gives (alpha-balanced) cross entropy.
        """
        super().__init__()
        self._set_alpha(alpha)
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        return {
            "alpha": class_alpha_from_config(cfg),
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
    def __init__(self, *, alpha: Alpha = 0.75):
        """
        Args:
            alpha: weight of the positives (1 - alpha for negatives); < 0 for no weighting; or a
                (K,) tensor of per-class alphas.
        """
        super().__init__(alpha=alpha, gamma=0.0)

    @classmethod
    def from_config(cls, cfg):
        return {"alpha": class_alpha_from_config(cfg)}


@FOCAL_CLS_LOSS_REGISTRY.register()
class FocalStarLoss(ClassificationLoss):
    """FL* of Appendix A: p_t* = sigmoid(gamma x_t + beta), FL* = -log(p_t*) / gamma."""

    @configurable
    def __init__(self, *, alpha: Alpha = 0.25, gamma: float = 2.0, beta: float = 1.0):
        """
        Args:
            alpha: as for the focal loss (a float, or a (K,) tensor of per-class alphas);
                gamma, beta: the parameters of FL*.
        """
        super().__init__()
        self._set_alpha(alpha)
        self.gamma = gamma
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        return {
            "alpha": class_alpha_from_config(cfg),
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
            "beta": cfg.MODEL.FOCAL_RETINANET.FOCAL_STAR_BETA,
        }

    def predict_scores(self, logits: Tensor) -> Tensor:
        # The model's probability of a positive is p* for y = 1.
        return torch.sigmoid(self.gamma * logits + self.beta)

    def score_threshold_logit(self, score_thresh: float) -> Optional[float]:
        # sigmoid(gamma x + beta) > t for gamma x + beta > logit(t); gamma x + beta rounds by a
        # few ulps of its terms, hence the extra margin.
        z = _sigmoid_threshold_logit(score_thresh)
        if math.isinf(z):
            return z
        margin = 8 * _FLOAT32_EPS * (abs(z) + abs(self.beta))
        return (z - margin - self.beta) / self.gamma

    def initial_logit_bias(self, num_classes: int, prior_prob: float) -> Tensor:
        # p* = sigmoid(gamma x + beta) = pi.
        return (super().initial_logit_bias(num_classes, prior_prob) - self.beta) / self.gamma

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        _check_labels(labels, logits.shape[1])
        targets = F.one_hot(labels, logits.shape[1] + 1)[:, :-1].to(logits.dtype)
        return focal_star_loss(logits, targets, self.alpha, self.gamma, self.beta).sum(dim=1)


# In log space: 1e-4 relative on the scores, far above the few ulps softmax rounds by.
_SOFTMAX_BOUND_MARGIN = 1e-4


@FOCAL_CLS_LOSS_REGISTRY.register()
class SoftmaxFocalLoss(ClassificationLoss):
    """The focal loss over a softmax of K + 1 logits per anchor, the last for background."""

    background_logit = True

    @configurable
    def __init__(self, *, alpha: Alpha = 0.25, gamma: float = 2.0):
        """
        Args:
            alpha: weight of the foreground labels (1 - alpha for background); < 0 for none;
                or a (K,) tensor of per-class alphas (background: 1 - their mean).
            gamma: focusing parameter.
        """
        super().__init__()
        self._set_alpha(alpha)
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        return {
            "alpha": class_alpha_from_config(cfg),
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
        }

    def predict_scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=-1)[..., :-1]

    def predict_candidate_scores(self, logits: Tensor, score_thresh: float) -> Tensor:
        # A class's softmax is at most exp(its logit - the anchor's largest logit): anchors
        # with every class logit log(score_thresh) below their largest cannot pass, and are
        # not scored (on a CPU, softmax over 11 logits per anchor costs 20x their max). The
        # margin absorbs the rounding of a float32 or float64 softmax (half precision rounds by
        # more: every anchor is scored).
        if score_thresh <= 0 or logits.dtype not in (torch.float32, torch.float64):
            return self.predict_scores(logits)
        headroom = logits[..., :-1] - logits.amax(dim=-1, keepdim=True)
        candidates = (headroom > math.log(score_thresh) - _SOFTMAX_BOUND_MARGIN).any(dim=-1)
        scores = logits.new_zeros(headroom.shape)
        scores[candidates] = self.predict_scores(logits[candidates])
        return scores

    def score_threshold_logit(self, score_thresh: float) -> Optional[float]:
        # A class's softmax score depends on all logits of its anchor: no elementwise threshold.
        return None

    def initial_logit_bias(self, num_classes: int, prior_prob: float) -> Tensor:
        # Background 1 - pi, each class pi / K; with K = 1 this is the sigmoid initialisation.
        bias = torch.zeros(self.num_logits(num_classes))
        bias[-1] = math.log((1 - prior_prob) * num_classes / prior_prob)
        return bias

    def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return softmax_focal_loss(logits, labels, self.alpha, self.gamma)


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
        return sigmoid_focal_loss_with_labels(logits, labels, -1.0, 0.0, reduction="none").sum(
            dim=1
        )

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
