"""
Deprecated: the loss functions moved to :mod:`focal_det2.modeling.losses` (and OHEM selection
to :mod:`focal_det2.modeling.sampling`), where every loss function takes
``(inputs, targets, alpha, gamma, [beta,] reduction)`` and ``alpha < 0`` means no weighting.
This module keeps the earlier signatures working, with a ``DeprecationWarning``.
"""

import functools
import warnings
from typing import Callable, Optional

from torch import Tensor

from .modeling import losses as _losses
from .modeling.sampling import ohem_select

__all__ = [
    "focal_star_loss",
    "ohem_select",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "softmax_focal_loss",
]


def _deprecated(function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        warnings.warn(
            f"focal_det2.losses.{function.__name__} is deprecated; use "
            f"focal_det2.modeling.losses.{function.__name__} (arguments: inputs, targets, "
            "alpha, gamma, [beta,] reduction).",
            DeprecationWarning,
            stacklevel=2,
        )
        return function(*args, **kwargs)

    return wrapper


sigmoid_focal_loss = _deprecated(_losses.sigmoid_focal_loss)
sigmoid_focal_loss_with_labels = _deprecated(_losses.sigmoid_focal_loss_with_labels)


@_deprecated
def focal_star_loss(
    inputs: Tensor,
    targets: Tensor,
    gamma: float,
    beta: float,
    reduction: str = "none",
    alpha: float = -1.0,
) -> Tensor:
    """:func:`focal_det2.modeling.losses.focal_star_loss` with its earlier argument order."""
    return _losses.focal_star_loss(inputs, targets, alpha, gamma, beta, reduction)


@_deprecated
def softmax_focal_loss(
    logits: Tensor,
    labels: Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    reduction: str = "none",
) -> Tensor:
    """:func:`focal_det2.modeling.losses.softmax_focal_loss` with its earlier argument order
    (``alpha=None``: no weighting)."""
    return _losses.softmax_focal_loss(
        logits, labels, -1.0 if alpha is None else alpha, gamma, reduction
    )
