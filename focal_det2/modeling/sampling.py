"""
Sampling of anchors for the classification loss, beside Detectron2's own
(``detectron2.modeling.sampling.subsample_labels``): the online hard example mining of the
paper's OHEM baseline (Table 1d).
"""

from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import nms

__all__ = ["ohem_select"]


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
