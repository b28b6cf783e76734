"""
Classification losses of :paper:`RetinaNet` (Lin et al., "Focal Loss for Dense Object
Detection", ICCV 2017) as pure functions, and the OHEM example selection of its Table 1d.

The losses follow fvcore's ``fvcore.nn.focal_loss``: ``(inputs, targets, ..., reduction)`` in,
the loss tensor out. They are numerically stable for any finite logit: every logarithm of a
probability is taken in log-sigmoid / log-sum-exp form, and float16 / bfloat16 inputs are
computed (and returned) in float32. Normalisation (e.g. by the number of foreground anchors) is
the caller's business. ``sigmoid_focal_loss_with_labels``, the fused loss over class-index
labels that RetinaNet trains with, lives in :mod:`focal_det2.fused_focal_loss`.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import nms

from .fused_focal_loss import sigmoid_focal_loss_with_labels

__all__ = [
    "focal_star_loss",
    "ohem_select",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "softmax_focal_loss",
]

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_alpha(alpha: float) -> None:
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1], or < 0 for no weighting; got {alpha}.")


def _compute_dtype(inputs: Tensor) -> torch.dtype:
    # float16 / bfloat16 would round away the small losses of easy examples; float64 stays.
    return torch.float64 if inputs.dtype == torch.float64 else torch.float32


def _alpha_t(targets: Tensor, alpha: float) -> Tensor:
    return alpha * targets + (1 - alpha) * (1 - targets)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """
    The focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) of the paper (eq. 5), with one
    sigmoid per element: p = sigmoid(x), p_t = p for a positive and 1 - p for a negative.

    A drop-in for ``fvcore.nn.sigmoid_focal_loss`` (the same values and gradients where fvcore's
    are accurate) that stays finite for any finite logit: gamma = 0 with alpha < 0 is exactly
    ``F.binary_cross_entropy_with_logits``.

    Args:
        inputs: (*) float logits of any shape. float16 / bfloat16 are computed in float32,
            float64 in float64.
        targets: (*) the same shape as ``inputs``: 1 for a positive, 0 for a negative (soft
            targets in [0, 1] are accepted, as in fvcore).
        alpha: weight of the positives, 1 - alpha of the negatives, in [0, 1]; < 0 for no
            weighting.
        gamma: focusing parameter >= 0; 0 gives the (alpha-balanced) cross entropy.
        reduction: "none" | "mean" | "sum".

    Returns:
        The loss, of shape (*) for "none" and a scalar otherwise; float32 for float32 and
        half-precision inputs, float64 for float64 inputs.
    """
    _check_reduction(reduction)
    _check_alpha(alpha)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}.")
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
    if alpha >= 0:
        loss = _alpha_t(targets, alpha) * loss
    return _reduce(loss, reduction)


def focal_star_loss(
    inputs: Tensor,
    targets: Tensor,
    gamma: float,
    beta: float,
    reduction: str = "none",
    alpha: float = -1.0,
) -> Tensor:
    """
    FL* of the paper's Appendix A: with y = 2 * targets - 1 in {-1, 1} and x_t = y x,
    p_t* = sigmoid(gamma x_t + beta) and FL* = -log(p_t*) / gamma, times alpha_t when
    alpha >= 0. With beta = 0 this is ``fvcore.nn.sigmoid_focal_loss_star`` (same alpha
    convention). The model's probability of a positive is sigmoid(gamma x + beta).

    Args:
        inputs: (*) float logits x of any shape (half precision is computed in float32).
        targets: (*) the same shape as ``inputs``: 1 for a positive, 0 for a negative.
        gamma: the scale of x_t, > 0.
        beta: the shift of gamma x_t.
        reduction: "none" | "mean" | "sum".
        alpha: weight of the positives, 1 - alpha of the negatives, in [0, 1]; < 0 for none.

    Returns:
        The loss, of shape (*) for "none" and a scalar otherwise (float32 or float64 as for
        :func:`sigmoid_focal_loss`).
    """
    _check_reduction(reduction)
    _check_alpha(alpha)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 for FL*; got {gamma}.")
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
    if alpha >= 0:
        loss = _alpha_t(targets, alpha) * loss
    return _reduce(loss, reduction)


def softmax_focal_loss(
    logits: Tensor,
    labels: Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    reduction: str = "none",
) -> Tensor:
    """
    The focal loss over a softmax of K foreground classes plus background:
    FL = -alpha_t (1 - p_t)^gamma log(p_t), p_t the softmax probability of the true class.

    Ignored examples must be removed by the caller: every label must be in [0, K].

    Args:
        logits: (N, K + 1) float logits, the last column for background (half precision is
            computed in float32).
        labels: (N,) int64 labels in [0, K]; K is background.
        gamma: focusing parameter >= 0; 0 gives the (alpha-balanced) cross entropy.
        alpha: None for no weighting; else the weight of foreground labels (< K), and
            1 - alpha that of background labels, in [0, 1].
        reduction: "none" | "mean" | "sum".

    Returns:
        The loss, of shape (N,) for "none" and a scalar otherwise (float32 or float64 as for
        :func:`sigmoid_focal_loss`).
    """
    _check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}.")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] or None; got {alpha}.")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K + 1) with K >= 1; got {logits.shape}.")
    if labels.shape != logits.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 of shape ({logits.shape[0]},); "
            f"got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    background = logits.shape[1] - 1
    if labels.numel() and not (0 <= labels.min() and labels.max() <= background):
        raise ValueError(
            f"labels must be in [0, {background}] (ignored examples are the caller's to "
            f"remove); got values in [{labels.min().item()}, {labels.max().item()}]."
        )
    logits = logits.to(_compute_dtype(logits))

    # With z = x_label - logsumexp(x_other), p_t = sigmoid(z): log(p_t) = logsigmoid(z) and
    # log(1 - p_t) = logsigmoid(-z), both exact where log_softmax rounds p_t to 1, and
    # (1 - p_t)^gamma = exp(gamma * logsigmoid(-z)) has a finite gradient for any gamma.
    true_class = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    logit_t = logits.gather(1, labels[:, None]).squeeze(1)
    z = logit_t - logits.masked_fill(true_class, float("-inf")).logsumexp(dim=1)
    loss = -F.logsigmoid(z)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-z))
    if alpha is not None:
        alpha_t = torch.where(labels == background, 1 - alpha, alpha)
        loss = alpha_t.to(loss.dtype) * loss
    return _reduce(loss, reduction)


@torch.no_grad()
def ohem_select(
    losses: Tensor,
    boxes: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    batch_size_per_image: int,
    nms_thresh: float,
    fg_fraction: Optional[float] = None,
) -> Tensor:
    """
    Online hard example mining as the paper's OHEM baseline (Table 1d), for one image: drop the
    ignored anchors, apply NMS to the anchors scored by their loss, and keep the
    ``batch_size_per_image`` highest-loss survivors. With ``fg_fraction`` at most
    ``int(fg_fraction * batch_size_per_image)`` of them are foreground and the rest is
    background (more background where foreground runs short, as Detectron2's
    ``subsample_labels``).

    Args:
        losses: (R,) the loss of each anchor, which scores it.
        boxes: (R, 4) the anchor boxes, XYXY.
        labels: (R,) anchor labels: -1 ignored, 0..K-1 foreground class, K background.
        num_classes: K.
        batch_size_per_image: B, the most anchors to select.
        nms_thresh: IoU above which NMS suppresses a lower-loss anchor; >= 1 for no NMS.
        fg_fraction: the most foreground share of B, in [0, 1] (0.25 for the paper's 1:3); None
            for no constraint.

    Returns:
        (M,) int64 indices into R of the selected anchors, by decreasing loss (ties: lower index
        first); M = min(B, #non-ignored anchors left by NMS) without ``fg_fraction``.
    """
    num_anchors = losses.shape[0]
    if losses.dim() != 1 or boxes.shape != (num_anchors, 4) or labels.shape != (num_anchors,):
        raise ValueError(
            "losses, boxes and labels must have shapes (R,), (R, 4), (R,); got "
            f"{tuple(losses.shape)}, {tuple(boxes.shape)}, {tuple(labels.shape)}."
        )
    if batch_size_per_image < 0:
        raise ValueError(f"batch_size_per_image must be >= 0; got {batch_size_per_image}.")
    if fg_fraction is not None and not 0 <= fg_fraction <= 1:
        raise ValueError(f"fg_fraction must be in [0, 1] or None; got {fg_fraction}.")
    if num_anchors and not (-1 <= labels.min() and labels.max() <= num_classes):
        raise ValueError(f"labels must be in [-1, {num_classes}] (num_classes = {num_classes}).")

    # Eligible anchors by decreasing loss; the stable sort breaks ties by index.
    eligible = torch.nonzero(labels >= 0).squeeze(1)
    order = eligible[torch.argsort(losses[eligible], descending=True, stable=True)]
    is_fg = (labels >= 0) & (labels < num_classes)
    # At most max_fg foreground anchors, then background up to B: subsample_labels' quotas.
    max_fg = batch_size_per_image
    if fg_fraction is not None:
        max_fg = int(fg_fraction * batch_size_per_image)

    def take(kept: Tensor) -> Tensor:
        # The selection from `kept`, NMS survivors by decreasing loss.
        if fg_fraction is None:
            return kept[:batch_size_per_image]
        fg = is_fg[kept]
        take_fg = fg & (torch.cumsum(fg, 0) <= max_fg)
        num_bg = batch_size_per_image - int(take_fg.sum())
        return kept[take_fg | (~fg & (torch.cumsum(~fg, 0) <= num_bg))]

    if nms_thresh >= 1 or order.numel() == 0:
        return take(order)

    # Greedy NMS keeps a box iff no higher-scored kept box overlaps it, so NMS over the top-n
    # anchors keeps exactly those of them that NMS over all anchors keeps. Widen the prefix
    # until its survivors settle the selection: NMS over all ~100k anchors of an image is slow.
    fg_positions = torch.nonzero(is_fg[order]).squeeze(1)
    fg_end = int(fg_positions[-1]) + 1 if fg_positions.numel() else 0

    def settled(kept: Tensor, n: int) -> bool:
        if fg_fraction is None:
            return kept.numel() >= batch_size_per_image
        kept_fg = int(is_fg[kept].sum())
        # The foreground count is final once the quota is met or every fg anchor was seen.
        if kept_fg < max_fg and n < fg_end:
            return False
        return kept.numel() - kept_fg >= batch_size_per_image - min(kept_fg, max_fg)

    boxes = boxes.float()
    n = min(order.numel(), 4 * max(batch_size_per_image, 1))
    while True:
        prefix = order[:n]
        # Scores by rank so that NMS visits (and returns) the anchors in our tie-broken order.
        ranks = torch.arange(n, 0, -1, dtype=torch.float32, device=prefix.device)
        kept = prefix[nms(boxes[prefix], ranks, nms_thresh)]
        if n == order.numel() or settled(kept, n):
            return take(kept)
        n = min(order.numel(), 2 * n)
