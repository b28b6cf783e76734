"""
Figure 4 of the paper: the cumulative distribution of the focal loss, for several gamma, over
the positive and the negative samples of a trained detector's predictions on the validation set.

A sample is one binary (anchor, class) term of the sigmoid classification loss, as the paper's
"samples": for every anchor the matcher does not ignore, its ground-truth class is a positive
sample when the anchor is foreground, and every other class (all K of them on a background
anchor) is a negative sample. The losses carry no alpha weighting (the figure studies gamma
alone), and alpha would only scale each set's curve by a constant, which the normalisation
removes.
"""

import csv
import io
import os
import pickle
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_test_loader,
    detection_utils,
    get_detection_dataset_dicts,
)
from detectron2.layers import cat
from detectron2.modeling import build_model
from torch import Tensor

from ..file_io import atomic_write
from ..modeling import ClassificationLoss, FocalRetinaNet
from ..modeling.losses import sigmoid_focal_loss

__all__ = [
    "collect_samples",
    "cumulative_loss_curve",
    "focal_loss_curves",
    "labelled_test_loader",
    "run_figure4",
]

SETS = ("positives", "negatives")


def _check_sigmoid_model(model: torch.nn.Module, cfg: CfgNode) -> None:
    if not isinstance(model, FocalRetinaNet):
        raise ValueError(
            f"figure4 needs a FocalRetinaNet; MODEL.META_ARCHITECTURE = "
            f"{cfg.MODEL.META_ARCHITECTURE!r}."
        )
    loss = type(model.cls_loss)
    if loss.background_logit or loss.predict_scores is not ClassificationLoss.predict_scores:
        raise ValueError(
            "figure4 applies the sigmoid focal loss to the class logits, which needs a model "
            "scoring each class by sigmoid(logit); MODEL.FOCAL_RETINANET.CLS_LOSS_NAME = "
            f"{cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME!r} does not."
        )


@torch.no_grad()
def collect_samples(model: FocalRetinaNet, data_loader: Iterable) -> Tuple[Tensor, Tensor]:
    """
    Run the model over a data loader whose inputs carry ground-truth ``instances`` and label
    every anchor with the model's own anchor generator and matcher (``label_anchors``).

    Args:
        model: a FocalRetinaNet whose classes are scored by sigmoid(logit), in eval mode.
        data_loader: yields lists of Detectron2 input dicts with "image" and "instances".

    Returns:
        (P,) float32 logits of the positive samples and (Q,) float32 logits of the negative
        samples, on the CPU (see the module docstring for what a sample is).
    """
    positives: List[Tensor] = []
    negatives: List[Tensor] = []
    for batched_inputs in data_loader:
        images = model.preprocess_image(batched_inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        pred_logits, _ = model._transpose_dense_predictions(
            model.head(features), [model.num_logits, 4]
        )
        anchors = model.anchor_generator(features)
        gt_instances = [x["instances"].to(model.device) for x in batched_inputs]
        gt_labels, _ = model.label_anchors(anchors, gt_instances)

        labels = torch.stack(gt_labels)  # (N, R)
        valid = labels >= 0
        logits = cat(pred_logits, dim=1)[valid].float()  # (M, K)
        # Background (label K) gets the all-negative row.
        targets = torch.nn.functional.one_hot(labels[valid], model.num_classes + 1)[:, :-1]
        targets = targets.bool()
        positives.append(logits[targets].cpu())
        negatives.append(logits[~targets].cpu())
    return torch.cat(positives), torch.cat(negatives)


def cumulative_loss_curve(losses: Tensor, fractions: np.ndarray) -> np.ndarray:
    """
    The normalised cumulative loss of the paper's Figure 4 at given fractions of the samples.

    Args:
        losses: (S,) per-sample losses, S > 0.
        fractions: (F,) fractions of the samples in [0, 1].

    Returns:
        (F,) float64: at fraction f, the sum of the round(f * S) smallest losses divided by the
        sum of all, non-decreasing in f, 0 at f = 0 and 1 at f = 1.
    """
    if losses.numel() == 0:
        raise ValueError("no samples: the cumulative loss of an empty set is undefined")
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(losses.double().numpy()))])
    total = cumulative[-1]
    if not total > 0:
        raise ValueError(f"the samples' total loss must be > 0; got {total}")
    counts = np.rint(np.asarray(fractions, dtype=np.float64) * losses.numel()).astype(np.int64)
    return cumulative[counts] / total


def focal_loss_curves(
    samples: Dict[str, Tensor], gammas: Sequence[float], fractions: np.ndarray
) -> Dict[Tuple[str, float], np.ndarray]:
    """
    Args:
        samples: {"positives": (P,) logits, "negatives": (Q,) logits}.
        gammas: focusing parameters of the focal loss (no alpha weighting).
        fractions: (F,) fractions of the samples at which to read the curves.

    Returns:
        {(set name, gamma): (F,) normalised cumulative loss}, computed on all samples.
    """
    curves = {}
    for name, logits in samples.items():
        targets = torch.full_like(logits, float(name == "positives"))
        for gamma in gammas:
            losses = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma)
            curves[name, gamma] = cumulative_loss_curve(losses, fractions)
    return curves


def labelled_test_loader(cfg: CfgNode, max_images: int = 0):
    """
    Detectron2's test loader over ``cfg.DATASETS.TEST`` (the first ``max_images`` images; 0 for
    all) with its test-time resize, whose inputs keep their ground-truth ``instances``.
    """
    # A training mapper keeps the annotations; the test augmentations resize as at inference.
    mapper = DatasetMapper(
        cfg, is_train=True, augmentations=detection_utils.build_augmentation(cfg, is_train=False)
    )
    for name in cfg.DATASETS.TEST:
        if name not in DatasetCatalog.list():
            raise ValueError(f"DATASETS.TEST: dataset {name!r} is not registered")
    dicts = get_detection_dataset_dicts(list(cfg.DATASETS.TEST), filter_empty=False)
    if max_images > 0:
        dicts = dicts[:max_images]
    return build_detection_test_loader(
        dataset=dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
    )


def _gamma_label(gamma: float) -> str:
    return f"{gamma:g}"


def _write_csv(path: str, fractions: np.ndarray, curves, gammas: Sequence[float]) -> None:
    columns = [(name, gamma) for name in SETS for gamma in gammas]

    def write(f):
        writer = csv.writer(f)
        writer.writerow(["fraction"] + [f"{n}_gamma_{_gamma_label(g)}" for n, g in columns])
        for i, fraction in enumerate(fractions):
            writer.writerow([f"{fraction:.6g}"] + [f"{curves[c][i]:.9g}" for c in columns])

    atomic_write(path, write, "w")


def _plot(path: str, fractions: np.ndarray, curves, gammas: Sequence[float], counts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, name in zip(axes, SETS):
        for gamma in gammas:
            ax.plot(fractions, curves[name, gamma], label=f"$\\gamma$ = {_gamma_label(gamma)}")
        ax.set_title(f"{name} ({counts[name]:,} samples)")
        ax.set_xlabel(f"fraction of {name}")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), "wb")


def run_figure4(
    cfg: CfgNode,
    output_dir: str,
    gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    num_points: int = 1001,
    max_images: int = 0,
) -> Dict[str, Dict[float, float]]:
    """
    Compute the curves on ``cfg.DATASETS.TEST`` with the model of ``cfg.MODEL.WEIGHTS`` and
    write ``figure4.png`` and ``figure4.csv`` (columns ``fraction`` and
    ``{positives,negatives}_gamma_G``, ``num_points`` rows) into ``output_dir``.

    Args:
        max_images: use the first this many images; 0 for all.

    Returns:
        {set name: {gamma: share of the set's loss carried by its hardest 20% of samples}}.
    """
    if any(not gamma >= 0 for gamma in gammas):
        raise ValueError(f"--gammas must be >= 0; got {list(gammas)}")
    if not cfg.MODEL.WEIGHTS or not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ValueError(f"MODEL.WEIGHTS: checkpoint file not found: {cfg.MODEL.WEIGHTS!r}")
    model = build_model(cfg)
    _check_sigmoid_model(model, cfg)
    try:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"MODEL.WEIGHTS: cannot load {cfg.MODEL.WEIGHTS}: {e}") from e
    model.eval()
    positives, negatives = collect_samples(model, labelled_test_loader(cfg, max_images))
    samples = {"positives": positives, "negatives": negatives}
    for name, logits in samples.items():
        if logits.numel() == 0:
            raise ValueError(f"no {name} among the anchors of DATASETS.TEST {cfg.DATASETS.TEST}")

    fractions = np.linspace(0.0, 1.0, num_points)
    # The last point, at 80% of the samples, gives the share of the hardest 20%, read exactly.
    curves = focal_loss_curves(samples, gammas, np.append(fractions, 0.8))
    shares = {name: {g: float(1.0 - curves[name, g][-1]) for g in gammas} for name in SETS}
    curves = {key: curve[:-1] for key, curve in curves.items()}
    os.makedirs(output_dir, exist_ok=True)
    counts = {name: logits.numel() for name, logits in samples.items()}
    _write_csv(os.path.join(output_dir, "figure4.csv"), fractions, curves, gammas)
    _plot(os.path.join(output_dir, "figure4.png"), fractions, curves, gammas, counts)
    return shares
