"""
Config lint before training: settings that train, but not as the user meant.

- error: ``MODEL.RETINANET.NUM_CLASSES`` differs from the number of ``thing_classes`` of the
  training datasets (the model would have classes no data trains, or data whose ids it rejects),
  training datasets of different numbers of classes, and an invalid per-class alpha;
- warning: a key of the two-stage detectors (``MODEL.ROI_HEADS.*``, ``MODEL.RPN.*``,
  ``MODEL.ROI_BOX_HEAD.*``) set to a non-default value while the meta-architecture is a
  RetinaNet, which ignores it (e.g. ``MODEL.ROI_HEADS.NUM_CLASSES`` for
  ``MODEL.RETINANET.NUM_CLASSES``), and a per-class alpha for a loss without alpha (OHEM).
"""

import logging
from typing import Any, Dict, Iterator, List, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from .config import add_focal_config
from .modeling.class_alpha import check_class_alpha_config

__all__ = ["ConfigLintError", "RETINANET_META_ARCHITECTURES", "check_config"]

logger = logging.getLogger(__name__)

#: Meta-architectures that read MODEL.RETINANET.* and ignore the two-stage keys.
RETINANET_META_ARCHITECTURES = ("FocalRetinaNet", "RetinaNet")

# The config nodes of two-stage detectors, which RetinaNet never reads.
_IGNORED_NODES = ("MODEL.ROI_HEADS", "MODEL.RPN", "MODEL.ROI_BOX_HEAD")

# RetinaNet's own key where a two-stage key has one of the same meaning.
_RETINANET_KEY = {
    "MODEL.ROI_HEADS.NUM_CLASSES": "MODEL.RETINANET.NUM_CLASSES",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "MODEL.RETINANET.SCORE_THRESH_TEST",
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": "MODEL.RETINANET.NMS_THRESH_TEST",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": "MODEL.RETINANET.IOU_THRESHOLDS",
    "MODEL.ROI_HEADS.IOU_LABELS": "MODEL.RETINANET.IOU_LABELS",
    "MODEL.ROI_HEADS.IN_FEATURES": "MODEL.RETINANET.IN_FEATURES",
    "MODEL.RPN.IOU_THRESHOLDS": "MODEL.RETINANET.IOU_THRESHOLDS",
    "MODEL.RPN.IN_FEATURES": "MODEL.RETINANET.IN_FEATURES",
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    "MODEL.ROI_BOX_HEAD.NORM": "MODEL.RETINANET.NORM",
}


class ConfigLintError(ValueError):
    """A config that would train, but not the model the user meant; the message says the fix."""


def check_config(cfg: CN) -> List[str]:
    """
    Lint a training config (see the module docstring). Warnings are logged (logger
    ``focal_det2.lint``) and returned; errors are raised together, after the warnings.

    Args:
        cfg: the full config, with the plugin's keys (``add_focal_config``).

    Returns:
        The warnings, one message per key.

    Raises:
        ConfigLintError: naming the key to set and the numbers that disagree.
    """
    if cfg.MODEL.META_ARCHITECTURE not in RETINANET_META_ARCHITECTURES:
        return []
    warnings = [_ignored_key_warning(key, value) for key, value in _ignored_keys(cfg)]
    focal = cfg.MODEL.FOCAL_RETINANET
    if focal.CLS_LOSS_NAME == "OhemCrossEntropyLoss" and (
        focal.CLASS_ALPHA or focal.CLASS_ALPHA_FROM_FREQUENCY
    ):
        warnings.append(
            "MODEL.FOCAL_RETINANET.CLASS_ALPHA / CLASS_ALPHA_FROM_FREQUENCY is set, but "
            "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME OhemCrossEntropyLoss has no alpha."
        )
    for message in warnings:
        logger.warning(message)
    errors = _num_classes_errors(cfg)
    try:
        check_class_alpha_config(cfg)
    except ValueError as e:
        errors.append(str(e))
    if errors:
        raise ConfigLintError("\n".join(errors))
    return warnings


def _flatten(node: CN, prefix: str) -> Iterator[Tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _flatten(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def _ignored_keys(cfg: CN) -> List[Tuple[str, Any]]:
    """(key, value) of each two-stage key whose value differs from the defaults."""
    defaults = get_cfg()
    add_focal_config(defaults)
    changed = []
    for node_name in _IGNORED_NODES:
        node, default_node = cfg, defaults
        for part in node_name.split("."):
            node, default_node = node.get(part), default_node.get(part)
        if node is None:
            continue
        default_values: Dict[str, Any] = dict(_flatten(default_node, node_name))
        for key, value in _flatten(node, node_name):
            if key not in default_values or default_values[key] != value:
                changed.append((key, value))
    return changed


def _ignored_key_warning(key: str, value: Any) -> str:
    hint = f"; set {_RETINANET_KEY[key]} instead" if key in _RETINANET_KEY else ""
    return f"{key} = {value!r} is set, but RetinaNet ignores {key.rsplit('.', 1)[0]}.*{hint}."


def _num_classes_errors(cfg: CN) -> List[str]:
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    found = {}
    for name in cfg.DATASETS.TRAIN:
        classes = _thing_classes(name)
        if classes is not None:
            found[name] = len(classes)
    if not found:
        return []
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name!r}: {n}" for name, n in found.items())
        return [
            f"the training datasets (DATASETS.TRAIN) have different numbers of classes "
            f"(thing_classes): {listed}; train on datasets of one class list."
        ]
    (num_data_classes,) = set(found.values())
    if num_data_classes == num_classes:
        return []
    names = ", ".join(repr(name) for name in found)
    return [
        f"MODEL.RETINANET.NUM_CLASSES is {num_classes} but the training dataset(s) {names} "
        f"have {num_data_classes} classes (thing_classes): set MODEL.RETINANET.NUM_CLASSES "
        f"{num_data_classes}."
    ]


def _thing_classes(name: str):
    """The dataset's thing_classes; loading its records when only that sets them (COCO json)."""
    if name not in DatasetCatalog.list():
        raise ConfigLintError(
            f"DATASETS.TRAIN names {name!r}, which is not a registered dataset (register it, "
            "e.g. train_net.py --register-coco NAME JSON IMAGE_ROOT)."
        )
    classes = MetadataCatalog.get(name).get("thing_classes")
    if classes is None:
        DatasetCatalog.get(name)
        classes = MetadataCatalog.get(name).get("thing_classes")
    return classes
