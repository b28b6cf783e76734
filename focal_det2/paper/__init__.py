"""
The paper's figures and tables reproduced with the plugin: Figure 4 (the cumulative distribution
of the focal loss over positive and negative samples of a trained model) and ablation sweeps
(one ``train_net.py`` run per grid point, collected into a table). Run as
``python -m focal_det2.paper {figure4,sweep} ...``.
"""

from .figure4 import collect_samples, cumulative_loss_curve, focal_loss_curves
from .sweep import expand_grid, parse_set, run_name

__all__ = [
    "collect_samples",
    "cumulative_loss_curve",
    "expand_grid",
    "focal_loss_curves",
    "parse_set",
    "run_name",
]
