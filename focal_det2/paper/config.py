"""Config loading shared by the paper's commands."""

import os
from typing import Sequence

import torch
from detectron2.config import CfgNode, get_cfg

from ..config import add_focal_config

__all__ = ["load_config"]


def load_config(config_file: str, opts: Sequence[str]) -> CfgNode:
    """
    The frozen config of ``config_file`` with the ``KEY VALUE`` overrides ``opts``, as
    ``train_net.py`` builds it (CPU when CUDA is not available).

    Raises:
        ValueError: naming the file, or the file and the key, when either is invalid.
    """
    if not config_file or not os.path.isfile(config_file):
        raise ValueError(f"config file not found: {config_file!r}")
    cfg = get_cfg()
    add_focal_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise ValueError(f"invalid config ({config_file}, command line): {e}") from e
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg
