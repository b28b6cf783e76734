"""
RetinaNet's post-processing, from the head's dense predictions to detections: one
implementation for eager inference (:meth:`FocalRetinaNet.forward_inference`) and for the
exported graph (:mod:`focal_det2.export`).

It returns Detectron2's ``RetinaNet`` detections (per level: scores above the threshold, the
top-k of them; then per-class NMS and the per-image cap), computed for all images at once and
with less work:

- when the classification loss has a logit threshold for its score function
  (:meth:`ClassificationLoss.score_threshold_logit`), anchors are compared to it in logit
  space and only the candidates above it are scored; their scores are then compared to the
  score threshold itself, so the result equals scoring every anchor;
- per level, in eager mode, when few pairs pass the threshold (a trained model), the top-k
  of those that pass, as Detectron2 does (kept without a selection when no image has more
  than k); when many pass (an untrained model: millions), and in the exported graph, the
  top-k is one selection over the (anchor, class) pairs of all images, before the threshold
  (the same set), so that the number of candidates stays bounded;
- the detection cap is one sort over the candidates of all images and levels;
- only the kept candidates are decoded into boxes.

When exporting, everything is tensor operations without data-dependent Python control flow,
so that ``torch.export`` traces it with dynamic image sizes.
"""

from typing import List, Optional, Tuple

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from torch import Tensor
from torchvision.ops import batched_nms, nms

from .losses import ClassificationLoss

__all__ = ["dense_detections"]


def dense_detections(
    logits: List[Tensor],
    deltas: List[Tensor],
    anchors: List[Tensor],
    *,
    cls_loss: ClassificationLoss,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    max_detections_per_image: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """
    Detections of N images from the head's predictions on #lvl feature levels.

    Args:
        logits: #lvl tensors (N, Ri, L): the classification logits of the Ri anchors of level i.
        deltas: #lvl tensors (N, Ri, 4): the box-regression deltas of the same anchors.
        anchors: #lvl tensors (Ri, 4): the anchors, XYXY, shared by the images.
        cls_loss: turns logits into (N, Ri, K) scores and gives the logit threshold.
        box2box_transform: decodes deltas into boxes.
        score_thresh: a candidate's score must be above this.
        topk_candidates: candidates kept per level and image, the highest scores.
        nms_thresh: IoU of the per-class NMS.
        max_detections_per_image: detections kept per image after NMS, the highest scores.

    Returns:
        (boxes, scores, classes, image_index) of the D detections of all images: (D, 4) XYXY
        in the coordinates of the anchors, (D,), (D,) int64 class ids and (D,) int64 image ids,
        ordered by image and then by descending score.
    """
    num_images, num_levels = logits[0].shape[0], len(logits)
    logit_thresh = cls_loss.score_threshold_logit(score_thresh)
    if logit_thresh is None:
        ranked_levels = [cls_loss.predict_scores(x) for x in logits]
        thresh = score_thresh
    else:
        # An elementwise, increasing score function: logits rank as the scores do.
        ranked_levels, thresh = logits, logit_thresh
    num_classes = ranked_levels[0].shape[-1]
    ranked_levels = [x.flatten(1) for x in ranked_levels]  # (N, Ri * K)
    if torch.compiler.is_exporting():
        passing = [None] * num_levels
    else:
        # Eager: which pairs pass on every level, and how many, in one synchronisation.
        above = [x > thresh for x in ranked_levels]
        passing = zip(above, torch.stack([x.count_nonzero() for x in above]).tolist())
    candidates: List[Tuple[Tensor, ...]] = []
    first_anchor = 0
    for level, (ranked, level_passing) in enumerate(zip(ranked_levels, passing)):
        image, index, top = _level_candidates(ranked, thresh, topk_candidates, level_passing)
        score = top if logit_thresh is None else cls_loss.predict_scores(top)
        # Row-major (anchor, class) order within an image, as Detectron2 enumerates candidates.
        anchor = torch.div(index, num_classes, rounding_mode="floor") + first_anchor
        candidates.append((image, anchor, index % num_classes, score, image * num_levels + level))
        first_anchor += logits[level].shape[1]
    image, anchor, classes, scores, segment = (torch.cat(x) for x in zip(*candidates))

    # The logit threshold lets through a margin of candidates whose score is not above the
    # threshold: they rank last and are dropped.
    passed = scores > score_thresh
    keep = _top_k_per_segment(
        segment, scores, topk_candidates, num_images * num_levels, valid=passed
    )
    image, anchor, classes, scores = image[keep], anchor[keep], classes[keep], scores[keep]
    boxes = box2box_transform.apply_deltas(
        torch.cat(deltas, dim=1)[image, anchor], torch.cat(anchors)[anchor]
    )

    # One per-class NMS for all images: the groups are (image, class) pairs.
    keep = _batched_nms(boxes, scores, image * num_classes + classes, nms_thresh)
    keep = keep[_top_k_per_segment(image[keep], scores[keep], max_detections_per_image, num_images)]
    return boxes[keep], scores[keep], classes[keep], image[keep]


def _level_candidates(
    ranked: Tensor, thresh: float, k: int, passing: Optional[Tuple[Tensor, int]]
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Detectron2's candidates of one level: the top-k of each image's (anchor, class) pairs
    above the threshold, as (image, pair index, value) in no particular order.

    Args:
        ranked: (N, P) values of the P pairs of each image (scores or logits).
        thresh: the threshold on the same scale.
        k: the top-k.
        passing: in eager mode, ``ranked > thresh`` and its number of True values; None when
            exporting.
    """
    num_images = ranked.shape[0]
    # Eager, a data-dependent choice: when few pairs pass (a trained model; up to tens of
    # thousands at 800 px), Detectron2's way, the top-k of the pairs that pass, reads the level
    # once.
    if passing is not None and passing[1] <= _MAX_PASSING_PER_TOPK * k * num_images:
        above, num_passing = passing
        image, index = above.nonzero(as_tuple=True)
        values = ranked[image, index]
        if num_passing <= k:  # no image has more than k
            return image, index, values
        keep = _top_k_per_image(image, values, k, num_images)
        return image[keep], index[keep], values[keep]
    # The top-k of the pairs above the threshold is the top-k of all pairs that are above it:
    # one batched selection, however many pass (an untrained model: millions), traceable.
    top, index = ranked.topk(torch.sym_min(k, ranked.shape[1]), dim=1)
    image = torch.arange(num_images, device=top.device)[:, None].expand_as(index)
    above = top > thresh
    return image[above], index[above], top[above]


# Above this many passing pairs per top-k, selecting among all pairs is cheaper than sorting
# the passing ones.
_MAX_PASSING_PER_TOPK = 64


def _top_k_per_image(image: Tensor, values: Tensor, k: int, num_images: int) -> Tensor:
    """Indices of the k highest ``values`` of each image (eager: data-dependent shapes)."""
    counts = torch.bincount(image, minlength=num_images)
    if int(counts.max()) <= k:  # minlength: never empty
        return torch.arange(len(values), device=values.device)
    if num_images == 1:
        return values.topk(k).indices
    # By image, then by descending value: two stable sorts.
    order = values.sort(descending=True, stable=True).indices
    order = order[image[order].sort(stable=True).indices]
    rank = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[image[order]]
    return order[rank < k]


def _batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float) -> Tensor:
    """
    torchvision's ``batched_nms`` (Detectron2's): NMS within each group, kept indices by
    descending score. It picks its algorithm by the number of boxes, a data-dependent branch
    ``torch.export`` cannot trace; when exporting, its algorithm for up to 1,000 boxes on CPU
    (NMS of boxes shifted apart by group) is traced for any number of boxes.
    """
    if not torch.compiler.is_exporting():
        return batched_nms(boxes, scores, groups, iou_thresh)
    # torchvision's shift, max coordinate + 1 per group id; the zero keeps max() defined
    # without boxes.
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    shifted = boxes + (groups.to(boxes) * (max_coordinate + 1))[:, None]
    return nms(shifted, scores, iou_thresh)


def _top_k_per_segment(
    segment: Tensor, scores: Tensor, k: int, num_segments: int, valid: Optional[Tensor] = None
) -> Tensor:
    """
    Indices of the k highest scores of each segment.

    Args:
        segment: (M,) int64 segment ids in [0, num_segments).
        scores: (M,) scores in [0, 1].
        k: how many to keep per segment.
        num_segments: the number of segments.
        valid: (M,) bool, or None: only valid entries are kept, and they rank first.

    Returns:
        (M',) int64 indices into the M entries, ordered by segment and then by descending
        score.
    """
    # One ascending sort (ONNX has no stable sort to chain two): by segment, then by descending
    # score, invalid entries last. In float64 beside segment ids below 1,000, distinct float32
    # scores above 1e-5 stay distinct.
    sort_scores = scores.to(torch.float64)
    if valid is not None:
        sort_scores = torch.where(valid, sort_scores, torch.full_like(sort_scores, -1.0))
    order = (segment.to(torch.float64) * 4 - sort_scores).sort().indices
    segment = segment[order]
    # Rank within the segment: position minus the segment's first position.
    counts = (segment[:, None] == torch.arange(num_segments, device=segment.device)).sum(0)
    rank = (
        torch.arange(segment.shape[0], device=segment.device) - (counts.cumsum(0) - counts)[segment]
    )
    selected = rank < k
    if valid is not None:
        selected &= valid[order]
    return order[selected]
