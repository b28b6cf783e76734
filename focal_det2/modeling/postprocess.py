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
  score threshold itself, so the result equals scoring every anchor; otherwise, in eager mode,
  the loss may skip anchors that cannot pass
  (:meth:`ClassificationLoss.predict_candidate_scores`: the softmax);
- in eager mode, a level's pairs above the threshold are gathered, and its top-k is taken only
  where more than k of an image pass; when many pass (an untrained model: millions), the
  threshold is first raised to a bound that still leaves at least k above it, estimated from a
  sample of the pairs; in the exported graph, the pairs above the threshold of all levels are
  gathered at once (from the anchors whose largest value passes), and one sort by image, level
  and score takes the top-k of each image and level (k or fewer, a traceable size);
- the detection cap is one sort over the candidates of all images; for one image, in eager
  mode, NMS runs first on the highest-scored candidates, and on the others only when these
  keep fewer detections than the cap;
- only the kept candidates are decoded into boxes; in the exported graph, their anchors are
  computed for them only (:class:`GridAnchors`).

When exporting, everything is tensor operations without data-dependent Python control flow,
so that ``torch.export`` traces it with dynamic image sizes.
"""

from typing import Callable, List, Tuple, Union

import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from torch import Tensor
from torchvision.ops import batched_nms, nms

from .losses import ClassificationLoss

__all__ = ["GridAnchors", "dense_detections"]


def dense_detections(
    logits: List[Tensor],
    deltas: List[Tensor],
    anchors: Union[List[Tensor], "GridAnchors"],
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
        anchors: #lvl tensors (Ri, 4): the anchors, XYXY, shared by the images; or
            :class:`GridAnchors`, which computes those of the candidates only.
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
    num_images = logits[0].shape[0]
    logit_thresh = cls_loss.score_threshold_logit(score_thresh)
    if logit_thresh is None:
        if torch.compiler.is_exporting():
            ranked_levels = [cls_loss.predict_scores(x) for x in logits]
        else:
            ranked_levels = [cls_loss.predict_candidate_scores(x, score_thresh) for x in logits]
        thresh, to_scores = score_thresh, _identity
    else:
        # An elementwise, increasing score function: logits rank as the scores do.
        ranked_levels, thresh, to_scores = logits, logit_thresh, cls_loss.predict_scores
    num_classes = ranked_levels[0].shape[-1]
    if torch.compiler.is_exporting():
        image, anchor, classes, scores = _top_k_pairs(
            ranked_levels, thresh, to_scores, score_thresh, topk_candidates
        )
    else:
        ranked_levels = [x.flatten(1) for x in ranked_levels]  # (N, Ri * K)
        image, index, top = _passing_pairs(ranked_levels, thresh, topk_candidates)
        scores = to_scores(top)
        # Pairs are numbered row-major, (anchor, class), over the levels in order, as
        # Detectron2 enumerates candidates: a pair's anchor indexes the concatenated anchors.
        anchor = torch.div(index, num_classes, rounding_mode="floor")
        classes = index % num_classes
        # The logit threshold lets through a margin of candidates whose score is not above the
        # threshold: they rank below every passing one, so a level's top-k holds them only
        # where fewer than k pass, and dropping them leaves Detectron2's candidates (by level,
        # each level's by descending score or by pair index: NMS sorts them by score, so only
        # the order of tied scores can differ from Detectron2's).
        keep = (scores > score_thresh).nonzero()[:, 0]
        image, anchor, classes, scores = image[keep], anchor[keep], classes[keep], scores[keep]
    anchor_table = anchors if isinstance(anchors, GridAnchors) else torch.cat(anchors)
    boxes = box2box_transform.apply_deltas(
        torch.cat(deltas, dim=1)[image, anchor], anchor_table[anchor]
    )

    # One per-class NMS for all images: the groups are (image, class) pairs.
    groups = image * num_classes + classes
    if num_images == 1:
        keep = _capped_nms(boxes, scores, groups, nms_thresh, max_detections_per_image)
    else:
        keep = _batched_nms(boxes, scores, groups, nms_thresh)
        keep = keep[
            _top_k_per_segment(image[keep], scores[keep], max_detections_per_image, num_images)
        ]
    return boxes[keep], scores[keep], classes[keep], image[keep]


def _identity(x: Tensor) -> Tensor:
    return x


def _passing_pairs(
    ranked_levels: List[Tensor], thresh: float, k: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Eager: Detectron2's candidates, the top-k of each level's and image's pairs above the
    threshold, as (image, pair index, value), the pairs of all levels numbered in order, by
    level. Per level, the pairs above a bound (:func:`_pairs_above_bounds`: the threshold, or a
    higher value with at least k pairs of the image above it) are gathered, and a selection
    runs only where more than k of an image pass: with a trained model few pass, with an
    untrained one about half of the millions, which are not all sorted.
    """
    num_images = ranked_levels[0].shape[0]
    candidates, first_pair = [], 0
    for ranked in ranked_levels:
        image, index = _pairs_above_bounds(ranked, thresh, k)
        values = ranked[image, index]
        if len(values) > k:
            # By image and pair index, the pairs of each image are contiguous.
            parts, start = [], 0
            for count in torch.bincount(image, minlength=num_images).tolist():
                if count > k:
                    parts.append(values[start : start + count].topk(k).indices + start)
                else:
                    parts.append(torch.arange(start, start + count, device=values.device))
                start += count
            keep = torch.cat(parts)
            image, index, values = image[keep], index[keep], values[keep]
        candidates.append((image, index + first_pair, values))
        first_pair += ranked.shape[1]
    return tuple(torch.cat(x) for x in zip(*candidates))


def _pairs_above_bounds(ranked: Tensor, thresh: float, k: int) -> Tuple[Tensor, Tensor]:
    """
    (image, pair index) of a level's (N, P) values above a bound per image above which its
    top-k above ``thresh`` lies: ``thresh`` or, where a strided sample of the values shows many
    more than k above it, the sample's estimate of the 2k-th largest value, used when at least
    k values of each such image are above it (then their top-k are among them).
    """
    num_images, num_pairs = ranked.shape
    if k > 0 and num_pairs >= _SAMPLED_PAIRS_PER_TOPK * k:
        # A prime stride: the sample does not align with the (anchor, class) layout.
        sample = ranked[:, ::_SAMPLE_STRIDE]
        rank = min(sample.shape[1], -(-2 * k // _SAMPLE_STRIDE))
        estimate = sample.topk(rank, dim=1).values[:, -1:]
        raised = estimate > thresh  # False for NaN
        if bool(raised.any()):
            bounds = torch.where(raised, estimate, torch.full_like(estimate, thresh))
            image, index = (ranked > bounds).nonzero(as_tuple=True)
            counts = torch.bincount(image, minlength=num_images)
            if bool(((counts >= k) | ~raised[:, 0]).all()):
                return image, index
    return (ranked > thresh).nonzero(as_tuple=True)


# Levels of at least this many pairs per top-k raise their bound from a sample of their pairs,
# one in _SAMPLE_STRIDE. Smaller ones (the demo's P3: 155k pairs for k = 1000) are compared
# whole: 6 operations less when few pass, a few ms more at most when half of them do.
_SAMPLED_PAIRS_PER_TOPK = 256
_SAMPLE_STRIDE = 61


def _top_k_pairs(
    ranked_levels: List[Tensor],
    thresh: float,
    to_scores: Callable[[Tensor], Tensor],
    score_thresh: float,
    k: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """
    Exported: Detectron2's candidates, the top-k of each level's and image's pairs whose score
    is above the score threshold, as (image, anchor, class, score), the anchors numbered over
    the levels in order; traceable, and in a few operations for all levels (in onnxruntime,
    the count of small operations sets the time: README, Deploy). The anchors whose largest
    ranked value is above ``thresh`` (a comparison of K times fewer values) are scored, their
    pairs above the score threshold kept, and one sort by image, level and score takes the
    top-k of each image and level. (The top-k of the pairs above the threshold, then those
    whose score passes, as in eager mode, are the same: the others rank below every passing
    one.) An anchor with a NaN value, whose largest value is NaN, gives no candidate (eager
    mode and Detectron2 keep its other passing classes): a broken model either way.

    Args:
        ranked_levels: #lvl tensors (N, Ri, K), ranked as the scores.
        thresh: every pair whose score passes has a ranked value above this.
        to_scores: the scores, in [0, 1], of (M, K) ranked values.
        score_thresh: a candidate's score must be above this.
        k: candidates kept per level and image.

    Returns:
        (image, anchor, class, score) of the C candidates, (C,) each, int64 but the scores,
        by image and level, each level's by descending score.
    """
    num_images, num_levels = ranked_levels[0].shape[0], len(ranked_levels)
    ranked = torch.cat(ranked_levels, dim=1)  # (N, R, K)
    image, anchor = (ranked.amax(dim=2) > thresh).nonzero().unbind(1)
    scores = to_scores(ranked[image, anchor])
    row, classes = (scores > score_thresh).nonzero().unbind(1)
    image, anchor, scores = image[row], anchor[row], scores[row, classes]
    # The first anchor of each level but the first.
    level_starts = torch.tensor([x.shape[1] for x in ranked_levels[:-1]], device=ranked.device)
    level = (anchor[:, None] >= level_starts.cumsum(0)).sum(1)
    keep = _top_k_per_segment(image * num_levels + level, scores, k, num_images * num_levels)
    return image[keep], anchor[keep], classes[keep], scores[keep]


class GridAnchors:
    """
    The anchors of Detectron2's ``DefaultAnchorGenerator`` on feature maps of given sizes,
    computed only where indexed: ``GridAnchors(generator, sizes)[index]`` equals
    ``torch.cat([x.tensor for x in generator(features)])[index]`` for the (M,) int64 indices
    of anchors into the concatenation of the levels: bit for bit on CPU (where ``torch.arange``
    computes in float64, as here), and on any device where offset x stride is exact in float32. The
    exported graph decodes its candidates with it instead of building every anchor.
    """

    def __init__(self, generator: DefaultAnchorGenerator, grid_sizes: List[Tuple[int, int]]):
        """
        Args:
            generator: the anchors' generator; its class's own grid, not a subclass's.
            grid_sizes: (height, width) of each level's feature map.
        """
        if type(generator) is not DefaultAnchorGenerator:
            raise TypeError(f"GridAnchors: {type(generator).__name__} is not Detectron2's grid")
        cell_anchors = list(generator.cell_anchors)
        if len({len(x) for x in cell_anchors}) != 1:
            raise ValueError("GridAnchors: the levels have different numbers of cell anchors")
        device = cell_anchors[0].device
        self.cell_anchors = torch.stack(cell_anchors)  # (L, A, 4)
        # The generator's grid offsets are torch.arange(offset * stride, ..., step=stride) in
        # float32: start + i * step computed in float64, then rounded.
        self.strides = torch.tensor(generator.strides, dtype=torch.float64, device=device)
        self.offset = generator.offset
        self.widths = torch.tensor([width for _, width in grid_sizes], device=device)
        sizes = torch.tensor([height * width for height, width in grid_sizes], device=device)
        sizes = sizes * len(cell_anchors[0])
        self.level_starts = sizes.cumsum(0) - sizes

    def __getitem__(self, index: Tensor) -> Tensor:
        num_cell_anchors = self.cell_anchors.shape[1]
        level = (index[:, None] >= self.level_starts[1:]).sum(1)
        # The generator's order: by level, then by cell (row-major), then by cell anchor.
        in_level = index - self.level_starts[level]
        cell = torch.div(in_level, num_cell_anchors, rounding_mode="floor")
        width, stride = self.widths[level], self.strides[level]
        start = self.offset * stride
        x = cell % width
        y = torch.div(cell, width, rounding_mode="floor")
        shift_x = (x.to(torch.float64) * stride + start).to(torch.float32)
        shift_y = (y.to(torch.float64) * stride + start).to(torch.float32)
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
        return shifts + self.cell_anchors[level, in_level % num_cell_anchors]


def _capped_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float, cap: int
) -> Tensor:
    """
    The first ``cap`` boxes that :func:`_batched_nms` keeps (by descending score), Detectron2's
    per-image cap. Greedy NMS keeps a box unless a kept box of higher score overlaps it, so the
    NMS of the highest-scored candidates keeps exactly the boxes that the NMS of all keeps
    among them: in eager mode, when more than ``_NMS_FIRST_PER_CAP * cap`` candidates remain,
    that many go first (with every box tied with the last), and the others are needed only
    when these keep fewer than ``cap`` (a crowded image keeps more; a trained model on a sparse
    one suppresses most).
    """
    num_first = _NMS_FIRST_PER_CAP * cap
    if not torch.compiler.is_exporting() and 0 < num_first < len(scores):
        lowest = scores.topk(num_first).values[-1]
        first = (scores >= lowest).nonzero()[:, 0]  # in the candidates' order
        keep = _batched_nms(boxes[first], scores[first], groups[first], iou_thresh)
        if len(keep) >= cap:
            return first[keep[:cap]]
    return _batched_nms(boxes, scores, groups, iou_thresh)[:cap]


# The candidates of the first NMS of _capped_nms, per detection of the cap.
_NMS_FIRST_PER_CAP = 2


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


def _top_k_per_segment(segment: Tensor, scores: Tensor, k: int, num_segments: int) -> Tensor:
    """
    Indices of the k highest scores of each segment.

    Args:
        segment: (M,) int64 segment ids in [0, num_segments).
        scores: (M,) scores in [0, 1].
        k: how many to keep per segment.
        num_segments: the number of segments.

    Returns:
        (M',) int64 indices into the M entries, ordered by segment and then by descending
        score.
    """
    # One ascending sort (ONNX has no stable sort to chain two): by segment, then by descending
    # score. In float64 beside segment ids below 1,000, distinct float32 scores above 1e-5 stay
    # distinct.
    order = (segment.to(torch.float64) * 4 - scores.to(torch.float64)).sort().indices
    segment = segment[order]
    # Rank within the segment: position minus the segment's first position.
    counts = (segment[:, None] == torch.arange(num_segments, device=segment.device)).sum(0)
    rank = (
        torch.arange(segment.shape[0], device=segment.device) - (counts.cumsum(0) - counts)[segment]
    )
    return order[rank < k]
