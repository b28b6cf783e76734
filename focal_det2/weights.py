"""Strict loading of trained weights: a model that does not get every one of its weights from the
file is an error, never a model that silently predicts from random initialisation."""

import os
from typing import Any, Dict, List, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["WeightsError", "load_initial_weights", "load_weights"]

# How many key names a message lists before it summarises the rest by their number.
_MAX_KEYS_SHOWN = 5
# State-dict keys of FocalRetinaNet's classifier: their shape depends on the number of classes.
_CLASSIFIER_KEY = "head.cls_score."


class WeightsError(ValueError):
    """The weights file is missing, unreadable, not a checkpoint, or does not fit the model."""


def load_weights(model: torch.nn.Module, path: str) -> Dict[str, Any]:
    """
    Load a checkpoint into ``model`` with Detectron2's ``DetectionCheckpointer`` (so every
    format it reads works: our ``.pth`` files, Detectron2 model-zoo ``.pkl``), and insist that
    the file sets every weight of the model, each with the model's shape, and nothing else.

    Args:
        model: the model built from the config the weights were trained with.
        path: the checkpoint file (``MODEL.WEIGHTS``).

    Returns:
        The checkpoint's other entries (e.g. ``iteration``), as ``Checkpointer.load`` returns.

    Raises:
        WeightsError: naming ``path`` and what is wrong: no file, unreadable or truncated file,
            not a checkpoint, or the keys and shapes that do not match the model (e.g. a
            different number of classes). ``model`` is then not usable.
    """
    if not path:
        raise WeightsError("no weights file given (MODEL.WEIGHTS is empty)")
    return _load(_CheckingCheckpointer(model, strict=True, drop_classifier=False), path)


def load_initial_weights(
    model: torch.nn.Module, path: str, *, drop_classifier: bool = False
) -> Dict[str, Any]:
    """
    Initialise a model to train from ``path`` (``MODEL.WEIGHTS``) with Detectron2's
    ``DetectionCheckpointer``, which keeps the weights the file lacks at their initialisation (a
    pretrained backbone alone is a valid start) and ignores the file's extra ones. Unlike
    Detectron2, which skips a weight of another shape with a warning, a weight whose shape
    differs from the model's is an error, and so is a file that sets none of the model's
    weights (another architecture).

    Args:
        model: the model to train, built from the config.
        path: the checkpoint file or Detectron2 URL (``MODEL.WEIGHTS``); empty: nothing is
            loaded, the model keeps its random initialisation.
        drop_classifier: leave the file's classifier out (``head.cls_score.*``), so the model's
            keeps its prior initialisation: fine-tuning weights trained on another number of
            classes (``MODEL.FOCAL_RETINANET.WEIGHTS_DROP_CLASSIFIER``).

    Returns:
        The checkpoint's other entries, as ``Checkpointer.load`` returns.

    Raises:
        WeightsError: naming ``path`` and what is wrong: no file, unreadable or truncated file,
            not a checkpoint, weights of other shapes (a classifier of another number of classes
            or of another loss says so), or no weight of the model in the file.
    """
    if not path:
        return {}
    return _load(_CheckingCheckpointer(model, strict=False, drop_classifier=drop_classifier), path)


def _load(checkpointer: "_CheckingCheckpointer", path: str) -> Dict[str, Any]:
    local_path = path
    if "://" in path:
        try:
            local_path = checkpointer.path_manager.get_local_path(path)
        except Exception as e:
            raise WeightsError(f"{path}: cannot fetch the weights ({type(e).__name__}: {e})") from e
    if not os.path.isfile(local_path):
        raise WeightsError(f"{path}: weights file not found")
    try:
        return checkpointer.load(local_path, checkpointables=[])
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    except Exception as e:
        raise WeightsError(
            f"{path}: not a readable checkpoint (truncated or another kind of file?): "
            f"{type(e).__name__}: {e}"
        ) from e


class _CheckingCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` that raises where Detectron2 would only log a warning: for weights
    of other shapes, and either (``strict``) for any weight the file lacks or the model lacks,
    or for a file that sets none of the model's weights (another architecture).
    """

    def __init__(self, model: torch.nn.Module, *, strict: bool, drop_classifier: bool):
        super().__init__(model)
        self.strict = strict
        self.drop_classifier = drop_classifier

    def _load_model(self, checkpoint: Any):
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise WeightsError("not a checkpoint: no state dict of a model inside")
        if self.drop_classifier:
            checkpoint["model"] = {
                k: v for k, v in checkpoint["model"].items() if _CLASSIFIER_KEY not in k
            }
        # fvcore renames (prefix "module.") and drops (other shapes) this dict's entries in place.
        num_weights = len(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        problems = []
        if incompatible.incorrect_shapes:
            shapes = [
                f"{key} {tuple(in_file)} in the file, {tuple(in_model)} in the model"
                for key, in_file, in_model in incompatible.incorrect_shapes
            ]
            problem = "shapes differ: " + _listed(shapes)
            if any(_CLASSIFIER_KEY in key for key, _, _ in incompatible.incorrect_shapes):
                hint = (
                    "set MODEL.RETINANET.NUM_CLASSES to the file's, or"
                    " MODEL.FOCAL_RETINANET.CLS_LOSS_NAME to the loss it was trained with"
                    " (SoftmaxFocalLoss has one more logit per anchor, for background)"
                )
                if not self.strict:
                    hint += (
                        ", or MODEL.FOCAL_RETINANET.WEIGHTS_DROP_CLASSIFIER True to fine-tune it"
                    )
                problem += f" (a classifier of another number of classes: {hint})"
            problems.append(problem)
        if self.strict:
            if incompatible.missing_keys:
                problems.append("missing from the file: " + _listed(incompatible.missing_keys))
            if incompatible.unexpected_keys:
                problems.append("not in the model: " + _listed(incompatible.unexpected_keys))
        elif len(incompatible.unexpected_keys) >= num_weights:
            problems.append(
                f"none of the file's {num_weights} weights is one of the model's "
                "(weights of another architecture?)"
            )
        if problems:
            raise WeightsError("weights do not fit the model: " + "; ".join(problems))
        return incompatible


def _listed(items: Sequence[str]) -> str:
    shown: List[str] = list(items[:_MAX_KEYS_SHOWN])
    if len(items) > _MAX_KEYS_SHOWN:
        shown.append(f"and {len(items) - _MAX_KEYS_SHOWN} more")
    return f"{len(items)} key(s): " + ", ".join(shown)
