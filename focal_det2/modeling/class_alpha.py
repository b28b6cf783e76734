"""
Per-class alpha of the classification losses: ``MODEL.FOCAL_RETINANET.CLASS_ALPHA`` (given) or
``MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY`` (derived from the training sets' instance
counts), else ``MODEL.RETINANET.FOCAL_LOSS_ALPHA`` for every class (the paper).

The derived alpha moves the paper's alpha on the odds scale by the class's rarity:

    alpha_k / (1 - alpha_k) = alpha / (1 - alpha) * (median_j n_j / n_k) ** p

clipped to [0.01, 0.99], with n_k the number of (non-crowd) instances of class k in
``DATASETS.TRAIN`` (at least 1) and p the power. A class of median frequency keeps alpha; a
class r times rarer weighs its positives r^p times more against its negatives.

Only training uses alpha: a model built for inference where the training sets are not
registered or their files are missing (export, prediction) gets ``FOCAL_LOSS_ALPHA``, and the
state dict is the same either way.
"""

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import log_first_n
from torch import Tensor

__all__ = [
    "CLASS_ALPHA_CLIP",
    "alpha_from_frequency",
    "check_class_alpha_config",
    "class_alpha_from_config",
    "count_instances",
]

logger = logging.getLogger(__name__)

#: Bounds of a derived per-class alpha: neither the positives nor the negatives of a class
#: lose all their weight, even for a class absent from the training set.
CLASS_ALPHA_CLIP = (0.01, 0.99)

# Instance counts per (dataset name, its registered loader, number of classes): building a model
# builds its loss twice (the head asks it for its logits), and records load in seconds to
# minutes. A dataset registered again gets a new loader, so a new entry.
_COUNTS: Dict[Tuple[str, Any, int], np.ndarray] = {}


def alpha_from_frequency(counts: Sequence[int], alpha: float, power: float) -> Tensor:
    """
    Per-class alphas from instance counts (the formula of the module docstring).

    Args:
        counts: (K,) instances of each class in the training set.
        alpha: the alpha of a class of median frequency, in (0, 1).
        power: p >= 0; 0 gives ``alpha`` for every class.

    Returns:
        (K,) float32 alphas in [0.01, 0.99].
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) to derive per-class alphas; got {alpha}.")
    if not power >= 0:
        raise ValueError(f"the power must be >= 0; got {power}.")
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    median = np.median(n)
    log_odds = math.log(alpha / (1 - alpha)) + power * np.log(median / n)
    derived = 1.0 / (1.0 + np.exp(-log_odds))
    return torch.as_tensor(np.clip(derived, *CLASS_ALPHA_CLIP), dtype=torch.float32)


def count_instances(dataset_names: Sequence[str], num_classes: int) -> List[int]:
    """
    Instances per class over the records of ``dataset_names`` (``DatasetCatalog.get``:
    category ids already contiguous), crowd annotations excluded, as Detectron2's
    ``print_instances_class_histogram`` counts them.

    Raises:
        KeyError: a dataset is not registered.
        ValueError: a category id is outside [0, num_classes).
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for name in dataset_names:
        key = (name, DatasetCatalog[name], num_classes)
        if key not in _COUNTS:
            _COUNTS[key] = _count_dataset(name, num_classes)
        counts += _COUNTS[key]
    return counts.tolist()


def _count_dataset(name: str, num_classes: int) -> np.ndarray:
    """(K,) instances per class of one dataset's records."""
    ids = np.asarray(
        [
            a["category_id"]
            for record in DatasetCatalog.get(name)
            for a in record.get("annotations", ())
            if not a.get("iscrowd", 0)
        ],
        dtype=np.int64,
    )
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise ValueError(
            f"dataset {name!r} has category id {bad}, outside the "
            f"MODEL.RETINANET.NUM_CLASSES = {num_classes} classes (0..{num_classes - 1})."
        )
    return np.bincount(ids, minlength=num_classes)


def check_class_alpha_config(cfg: CN) -> None:
    """Raise ValueError naming the key for an invalid per-class alpha setting."""
    focal, num_classes = cfg.MODEL.FOCAL_RETINANET, cfg.MODEL.RETINANET.NUM_CLASSES
    class_alpha, power = list(focal.CLASS_ALPHA), focal.CLASS_ALPHA_FROM_FREQUENCY
    if class_alpha and power != 0:
        raise ValueError(
            "Invalid config: MODEL.FOCAL_RETINANET.CLASS_ALPHA and "
            "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY are both set; set one of them."
        )
    if class_alpha:
        if len(class_alpha) != num_classes:
            raise ValueError(
                f"Invalid config: MODEL.FOCAL_RETINANET.CLASS_ALPHA has {len(class_alpha)} "
                f"values for MODEL.RETINANET.NUM_CLASSES = {num_classes}; give one alpha per "
                "class, or [] for MODEL.RETINANET.FOCAL_LOSS_ALPHA for every class."
            )
        bad = [a for a in class_alpha if not 0 <= a <= 1]
        if bad:
            raise ValueError(
                f"Invalid config: MODEL.FOCAL_RETINANET.CLASS_ALPHA = {class_alpha}: {bad[0]} "
                "is not in [0, 1]."
            )
    if not power >= 0:
        raise ValueError(
            f"Invalid config: MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY = {power}; "
            "allowed: >= 0 (0 = off)."
        )
    alpha = cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA
    if power > 0 and not 0 < alpha < 1:
        raise ValueError(
            f"Invalid config: MODEL.RETINANET.FOCAL_LOSS_ALPHA = {alpha}; "
            "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY needs it in (0, 1)."
        )


def class_alpha_from_config(cfg: CN) -> Union[float, Tensor]:
    """
    The alpha of the classification loss: a (K,) tensor for a per-class alpha (logged with the
    class names), else the float ``MODEL.RETINANET.FOCAL_LOSS_ALPHA``. Called by the losses'
    ``from_config``; loads the training sets' records for ``CLASS_ALPHA_FROM_FREQUENCY``.
    """
    check_class_alpha_config(cfg)
    focal, alpha = cfg.MODEL.FOCAL_RETINANET, cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA
    train_sets = list(cfg.DATASETS.TRAIN)
    counts: Optional[List[int]] = None
    if focal.CLASS_ALPHA:
        class_alpha = torch.tensor(list(focal.CLASS_ALPHA), dtype=torch.float32)
        source = "MODEL.FOCAL_RETINANET.CLASS_ALPHA"
    elif focal.CLASS_ALPHA_FROM_FREQUENCY > 0:
        try:
            if not train_sets:
                raise KeyError("DATASETS.TRAIN is empty")
            counts = count_instances(train_sets, cfg.MODEL.RETINANET.NUM_CLASSES)
        except (KeyError, OSError) as e:
            # Not registered here, or their files are not: inference never uses alpha, so a
            # model built to predict or export still builds. Training would fail on loading
            # the same datasets.
            logger.info(
                "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY: the training sets %s are not "
                "available (%s); the loss uses MODEL.RETINANET.FOCAL_LOSS_ALPHA = %s for every "
                "class (no effect on inference).",
                train_sets,
                e,
                alpha,
            )
            return alpha
        class_alpha = alpha_from_frequency(counts, alpha, focal.CLASS_ALPHA_FROM_FREQUENCY)
        source = (
            "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY "
            f"{focal.CLASS_ALPHA_FROM_FREQUENCY} on the instance counts of {train_sets}"
        )
    else:
        return alpha
    names = _class_names(train_sets, len(class_alpha))
    lines = [
        f"  {name}: alpha {a:.3f}" + ("" if counts is None else f" ({counts[i]} instances)")
        for i, (name, a) in enumerate(zip(names, class_alpha.tolist()))
    ]
    # Once per process and setting, however many times the loss is built.
    log_first_n(
        logging.INFO,
        f"Per-class alpha of the classification loss ({source}):\n" + "\n".join(lines),
        name=__name__,
        key="message",
    )
    return class_alpha


def _class_names(dataset_names: Sequence[str], num_classes: int) -> List[str]:
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) == num_classes:
            return list(classes)
    return [f"class {i}" for i in range(num_classes)]
