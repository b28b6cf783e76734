"""
Anchor coverage of a config's training data: for every ground-truth box of ``DATASETS.TRAIN``,
resized as training resizes it, the best IoU with the anchors the model places on that image.

    python -m focal_det2.anchor_coverage --config-file CFG [--output DIR] [KEY VALUE ...]

prints a table by object size (octaves of the square root of the box area, after the resize)
and by aspect ratio (h / w, the convention of ``MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS``):

- matched: best IoU >= the foreground threshold ``MODEL.RETINANET.IOU_THRESHOLDS[-1]``;
- low-quality only: below it, but the box still gets its best anchors as foreground through
  Detectron2's low-quality rule (``MODEL.FOCAL_RETINANET.ALLOW_LOW_QUALITY_MATCHES``);
- never: no foreground anchor (below the threshold without that rule, or no overlap at all);

writes the same as ``anchor_coverage.png`` in ``--output`` and suggests anchor sizes when more
than 5% of the boxes have no anchor at the threshold. The anchors are Detectron2's anchor
generator built from the config on the backbone's feature strides, at the image size that
Detectron2's ``ResizeShortestEdge`` (``build_augmentation``) and the backbone's padding give;
with several training sizes each box counts once per size. A box whose best anchors all match
another box better is counted as matched all the same: Detectron2's matcher would give those
anchors to the other box.
"""

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation
from detectron2.modeling import build_anchor_generator, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = [
    "AnchorCoverage",
    "POOR_COVERAGE_SHARE",
    "anchor_coverage",
    "best_anchor_iou",
    "best_grid_anchor_iou",
    "log_anchor_coverage",
    "main",
    "train_image_sizes",
]

logger = logging.getLogger(__name__)

#: A share of boxes without an anchor at the foreground threshold above which coverage is poor.
POOR_COVERAGE_SHARE = 0.05

# Bucket edges: octaves of sqrt(area) in pixels, and of h / w around 1 (0.5, 1, 2 at the centres).
_SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, math.inf)
_RATIO_EDGES = (0, 2**-1.5, 2**-0.5, 2**0.5, 2**1.5, math.inf)
# IoUs of one chunk of boxes against all anchors: at most this many floats at a time.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class AnchorCoverage:
    """
    Per (box, training size) sample: its best anchor IoU, size and aspect ratio after resize.

    Attributes:
        best_iou: (M,) best IoU of each sample with any anchor.
        sqrt_area: (M,) square root of the resized box's area, pixels.
        aspect_ratio: (M,) h / w of the box.
        fg_threshold: the foreground IoU threshold.
        low_quality_matches: whether Detectron2's low-quality rule applies.
        anchor_sizes, aspect_ratios: the config's anchors, for the suggestion.
        num_sizes: training sizes per box (each box counts once per size).
    """

    best_iou: np.ndarray
    sqrt_area: np.ndarray
    aspect_ratio: np.ndarray
    fg_threshold: float
    low_quality_matches: bool
    anchor_sizes: Sequence[Sequence[float]]
    aspect_ratios: Sequence[Sequence[float]]
    num_sizes: int = 1

    @property
    def matched(self) -> np.ndarray:
        return self.best_iou >= self.fg_threshold

    @property
    def low_quality_only(self) -> np.ndarray:
        # Detectron2's rule marks a box's best anchors; with no overlap at all there are none.
        return ~self.matched & (self.best_iou > 0) & self.low_quality_matches

    @property
    def never(self) -> np.ndarray:
        return ~self.matched & ~self.low_quality_only

    def shares(self, mask: Optional[np.ndarray] = None) -> Tuple[int, float, float, float]:
        """(count, share matched, share low-quality only, share never) of the masked samples."""
        mask = np.ones_like(self.matched) if mask is None else mask
        count = int(mask.sum())
        if count == 0:
            return 0, math.nan, math.nan, math.nan
        return (
            count,
            float(self.matched[mask].mean()),
            float(self.low_quality_only[mask].mean()),
            float(self.never[mask].mean()),
        )

    @property
    def unmatched_share(self) -> float:
        """Share of samples without an anchor at the foreground threshold."""
        return 1.0 - self.shares()[1] if self.best_iou.size else 0.0

    def summary(self) -> str:
        """One line: the boxes, and the shares matched, low-quality only and never matched."""
        count, matched, low, never = self.shares()
        per_size = f" x {self.num_sizes} training sizes" if self.num_sizes > 1 else ""
        return (
            f"anchor coverage of {count // self.num_sizes} training boxes{per_size}: "
            f"{100 * matched:.1f}% matched at IoU >= {self.fg_threshold:g}, "
            f"{100 * low:.1f}% only by the low-quality rule, {100 * never:.1f}% never "
            f"(median best IoU {np.median(self.best_iou) if count else math.nan:.2f})"
        )

    def rows(self) -> List[Tuple[str, Tuple[int, float, float, float]]]:
        """(label, shares) per non-empty size bucket, per non-empty ratio bucket, and all."""
        rows = []
        for label, values, edges, unit in (
            ("size", self.sqrt_area, _SIZE_EDGES, "px"),
            ("h/w", self.aspect_ratio, _RATIO_EDGES, ""),
        ):
            for low, high in zip(edges[:-1], edges[1:]):
                mask = (values >= low) & (values < high)
                if mask.any():
                    rows.append((f"{label} {_range_label(low, high, unit)}", self.shares(mask)))
        rows.append(("all", self.shares()))
        return rows

    def table(self) -> str:
        """The rows as a Markdown table."""
        lines = [
            "| boxes by | count | matched | low-quality only | never | median best IoU |",
            "|--|--|--|--|--|--|",
        ]
        for label, (count, matched, low, never) in self.rows():
            lines.append(
                f"| {label} | {count} | {100 * matched:.1f}% | {100 * low:.1f}% | "
                f"{100 * never:.1f}% | {self._median_iou(label):.2f} |"
            )
        return "\n".join(lines)

    def _median_iou(self, label: str) -> float:
        if label == "all":
            return float(np.median(self.best_iou)) if self.best_iou.size else math.nan
        kind, _ = label.split(" ", 1)
        values, edges, unit = (
            (self.sqrt_area, _SIZE_EDGES, "px")
            if kind == "size"
            else (self.aspect_ratio, _RATIO_EDGES, "")
        )
        for low, high in zip(edges[:-1], edges[1:]):
            if label == f"{kind} {_range_label(low, high, unit)}":
                return float(np.median(self.best_iou[(values >= low) & (values < high)]))
        return math.nan

    def suggestion(self) -> Optional[str]:
        """
        Anchor settings that would cover the boxes, when more than 5% have no anchor at the
        foreground threshold; None otherwise. Sizes: the same number of levels and scales per
        octave, doubling per level, the first level's base size the power of 2 nearest (in log
        scale) to the 2nd percentile of the boxes' sizes. Ratios: the unmatched boxes' median
        h / w (rounded to a power of 2) added when it is not one of the config's.
        """
        if self.unmatched_share <= POOR_COVERAGE_SHARE:
            return None
        scales = [s / self.anchor_sizes[0][0] for s in self.anchor_sizes[0]]
        base = 2 ** round(math.log2(max(np.percentile(self.sqrt_area, 2), 1.0)))
        sizes = [
            [round(base * 2**level * s, 2) for s in scales]
            for level in range(len(self.anchor_sizes))
        ]
        parts = [f"MODEL.ANCHOR_GENERATOR.SIZES {sizes}"]
        unmatched = ~self.matched
        ratio = 2 ** round(math.log2(float(np.median(self.aspect_ratio[unmatched]))))
        ratios = sorted({*self.aspect_ratios[0], ratio})
        if len(ratios) > len(self.aspect_ratios[0]):
            parts.append(f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS [{ratios}]")
        size_range = np.percentile(self.sqrt_area[unmatched], [5, 95])
        return (
            f"{100 * self.unmatched_share:.1f}% of the boxes have no anchor at IoU >= "
            f"{self.fg_threshold:g} (their sizes {size_range[0]:.0f}-{size_range[1]:.0f} px, "
            f"median h/w {np.median(self.aspect_ratio[unmatched]):.2f}); try " + " ".join(parts)
        )

    def plot(self, path: str) -> None:
        """Stacked bars of the shares by size and by aspect ratio, written to ``path`` (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()[:-1]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, kind in zip(axes, ("size", "h/w")):
            selected = [(label.split(" ", 1)[1], s) for label, s in rows if label.startswith(kind)]
            labels = [f"{label}\n(n={s[0]})" for label, s in selected]
            bottom = np.zeros(len(selected))
            for index, name, color in (
                (1, "matched", "tab:green"),
                (2, "low-quality only", "tab:orange"),
                (3, "never", "tab:red"),
            ):
                values = np.array([100 * s[index] for _, s in selected])
                ax.bar(labels, values, bottom=bottom, label=name, color=color)
                bottom += values
            ax.set_xlabel("sqrt(box area), px (after resize)" if kind == "size" else "h / w")
            ax.set_ylabel("% of boxes")
            ax.set_ylim(0, 100)
            ax.tick_params(axis="x", labelsize=8)
        axes[0].legend(loc="lower right")
        fig.suptitle(self.summary(), fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _range_label(low: float, high: float, unit: str) -> str:
    if unit:
        return f"{low:g}-{high:g} {unit}" if math.isfinite(high) else f">= {low:g} {unit}"
    if low == 0:
        return f"< {high:.2f}"
    return f"{low:.2f}-{high:.2f}" if math.isfinite(high) else f">= {low:.2f}"


def best_anchor_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """
    Args:
        boxes: (M, 4) XYXY boxes; anchors: (A, 4) XYXY anchors.
    Returns:
        (M,) the best IoU of each box with any anchor (0 without anchors), in chunks of boxes.
    """
    if len(anchors) == 0 or len(boxes) == 0:
        return boxes.new_zeros(len(boxes))
    step = max(1, _CHUNK_ELEMENTS // len(anchors))
    anchor_boxes = Boxes(anchors)
    return torch.cat(
        [
            pairwise_iou(Boxes(boxes[i : i + step]), anchor_boxes).max(dim=1).values
            for i in range(0, len(boxes), step)
        ]
    )


def best_grid_anchor_iou(
    boxes: torch.Tensor,
    anchor_generator: DefaultAnchorGenerator,
    grid_sizes: Sequence[Tuple[int, int]],
) -> torch.Tensor:
    """
    :func:`best_anchor_iou` against the anchors of Detectron2's ``DefaultAnchorGenerator`` on
    feature maps of ``grid_sizes``, without comparing each box with every anchor: for two boxes
    of fixed shapes, the intersection (so the IoU) only shrinks as their centres move apart in
    x or in y, so of the anchors of one cell shape the best is the one whose grid centre is
    nearest in x and in y (clamped to the feature map). M x (cell shapes) IoUs instead of
    M x (all anchors).

    Args:
        boxes: (M, 4) XYXY boxes.
        anchor_generator: its ``cell_anchors``, ``strides`` and ``offset`` place the anchors.
        grid_sizes: (H_l, W_l) of each level's feature map.

    Returns:
        (M,) the best IoU of each box with any anchor.
    """
    best = boxes.new_zeros(len(boxes))
    box_centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2  # (M, 1, 2)
    box_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
    for cells, stride, (grid_h, grid_w) in zip(
        anchor_generator.cell_anchors, anchor_generator.strides, grid_sizes
    ):
        cells = cells.to(boxes)  # (A, 4), placed at shift (offset + i) * stride
        cell_centre = (cells[:, :2] + cells[:, 2:]) / 2  # (A, 2)
        first = anchor_generator.offset * stride
        index = torch.round((box_centre - cell_centre - first) / stride)
        limit = boxes.new_tensor([grid_w - 1, grid_h - 1])
        shift = first + torch.minimum(index.clamp_min(0), limit) * stride  # (M, A, 2)
        anchors = cells + shift.repeat(1, 1, 2)  # (M, A, 4)
        low = torch.maximum(anchors[..., :2], boxes[:, None, :2])
        high = torch.minimum(anchors[..., 2:], boxes[:, None, 2:])
        inter = (high - low).clamp_min(0).prod(dim=-1)
        anchor_area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
        union = box_area + anchor_area - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1e-12), 0.0)
        best = torch.maximum(best, iou.max(dim=1).values)
    return best


def train_image_sizes(augmentations: Sequence[T.Augmentation]) -> Tuple[List[int], int]:
    """
    The shorter-edge lengths and the longer-edge limit of the training resize: each length of
    a "choice" ``ResizeShortestEdge``, the ends and middle of a "range" one.
    """
    resize = [a for a in augmentations if isinstance(a, T.ResizeShortestEdge)]
    if not resize:
        raise ValueError("the training augmentations have no ResizeShortestEdge (INPUT.*)")
    lengths = list(resize[0].short_edge_length)
    if resize[0].is_range:
        low, high = lengths
        lengths = sorted({low, (low + high) // 2, high})
    return lengths, resize[0].max_size


def _padded(length: int, divisibility: int) -> int:
    return -(-length // divisibility) * divisibility if divisibility > 1 else length


def anchor_coverage(cfg: CN) -> AnchorCoverage:
    """
    The anchor coverage of the training sets of ``cfg`` (see the module docstring): loads the
    records of ``DATASETS.TRAIN`` and builds the backbone (for its strides) and the anchor
    generator from the config.
    """
    backbone = build_backbone(cfg)
    in_features = cfg.MODEL.RETINANET.IN_FEATURES
    shapes = backbone.output_shape()
    feature_shapes = [shapes[f] for f in in_features]
    anchor_generator = build_anchor_generator(cfg, feature_shapes)
    divisibility = backbone.size_divisibility
    constraints = getattr(backbone, "padding_constraints", {}) or {}
    divisibility = constraints.get("size_divisibility", divisibility)
    square = constraints.get("square_size", 0)
    lengths, max_size = train_image_sizes(build_augmentation(cfg, is_train=True))

    # Boxes grouped by the padded image size, whose anchors they share.
    groups: Dict[Tuple[int, int], List[np.ndarray]] = {}
    for name in cfg.DATASETS.TRAIN:
        for record in DatasetCatalog.get(name):
            annotations = [a for a in record.get("annotations", ()) if not a.get("iscrowd", 0)]
            if not annotations:
                continue
            if "height" not in record or "width" not in record:
                raise ValueError(
                    f"dataset {name!r}: record {record.get('file_name', '?')} has no "
                    "height/width; the anchor coverage needs the image size."
                )
            height, width = record["height"], record["width"]
            boxes = np.array(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
                dtype=np.float64,
            )
            for length in lengths:
                new_h, new_w = T.ResizeShortestEdge.get_output_shape(
                    height, width, length, max_size
                )
                scaled = boxes * np.array([new_w / width, new_h / height] * 2)
                key = (
                    (square, square)
                    if square > 0
                    else (_padded(new_h, divisibility), _padded(new_w, divisibility))
                )
                groups.setdefault(key, []).append(scaled)

    best, all_boxes = [], []
    for (height, width), box_lists in groups.items():
        # The anchor generator reads only the feature maps' sizes: empty (1, 0, H, W) tensors.
        grid_sizes = [(-(-height // s.stride), -(-width // s.stride)) for s in feature_shapes]
        boxes = torch.as_tensor(np.concatenate(box_lists), dtype=torch.float32)
        if type(anchor_generator) is DefaultAnchorGenerator:
            best.append(best_grid_anchor_iou(boxes, anchor_generator, grid_sizes).numpy())
        else:
            # Any other generator: every anchor, from empty (1, 0, H, W) feature maps (it
            # reads only their sizes).
            features = [torch.empty((1, 0, h, w)) for h, w in grid_sizes]
            anchors = Boxes.cat(anchor_generator(features)).tensor
            best.append(best_anchor_iou(boxes, anchors).numpy())
        all_boxes.append(boxes.numpy())
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), dtype=np.float32)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return AnchorCoverage(
        best_iou=np.concatenate(best) if best else np.zeros(0, dtype=np.float32),
        sqrt_area=np.sqrt(np.clip(widths * heights, 0, None)),
        aspect_ratio=heights / np.maximum(widths, 1e-6),
        fg_threshold=float(cfg.MODEL.RETINANET.IOU_THRESHOLDS[-1]),
        low_quality_matches=bool(cfg.MODEL.FOCAL_RETINANET.ALLOW_LOW_QUALITY_MATCHES),
        anchor_sizes=[list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES],
        aspect_ratios=[list(r) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS],
        num_sizes=len(lengths),
    )


def log_anchor_coverage(cfg: CN) -> AnchorCoverage:
    """
    Log the one-line summary of :func:`anchor_coverage`, and a warning with the suggested
    anchors when more than 5% of the boxes have no anchor at the foreground threshold.
    """
    report = anchor_coverage(cfg)
    logger.info(report.summary())
    if report.unmatched_share > POOR_COVERAGE_SHARE:
        logger.warning(
            "%s (python -m focal_det2.anchor_coverage for the table)", report.suggestion()
        )
    return report


def main(argv: Optional[Sequence[str]] = None) -> AnchorCoverage:
    """The command line: print the table and the suggestion, write the PNG."""
    from .config import load_config
    from .data import add_register_coco_argument, register_coco_datasets

    parser = argparse.ArgumentParser(
        prog="python -m focal_det2.anchor_coverage", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--output", default=".", metavar="DIR", help="folder of anchor_coverage.png (default .)"
    )
    add_register_coco_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs of the config")
    args = parser.parse_args(argv)
    try:
        register_coco_datasets(args.register_coco)
        cfg = load_config(args.config_file, args.opts)
    except ValueError as e:
        parser.error(str(e))
    report = anchor_coverage(cfg)
    print(report.summary())
    print()
    print(report.table())
    suggestion = report.suggestion()
    if suggestion:
        print()
        print(suggestion)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "anchor_coverage.png")
    report.plot(path)
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
