"""
Inference copies of the backbone and the head with their batch norms folded into the preceding
convolutions: in inference a batch norm is a per-channel affine map, so
``bn(conv(x)) = conv'(x)`` with scaled weights and a new bias, one pass over each feature map
less. The copies share every tensor that folding does not change.
"""

import copy
from typing import List, Optional

import torch
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_batch_norms", "state_signature"]


def fold_batch_norms(module: nn.Module) -> Optional[nn.Module]:
    """
    A copy of ``module`` for inference in which every batch norm that follows a convolution is
    folded into it; None when there is none. Folded are Detectron2's ``Conv2d`` with a ``norm``
    (the backbone's and FPN's convs) and, in ``nn.Sequential`` (the RetinaNet head's subnets),
    an ``nn.Conv2d`` followed by a batch norm or by Detectron2's per-level
    ``CycleBatchNormList``, whose levels then get one folded convolution each, cycled the same
    way. Batch norms without running statistics, or in training mode, are left as they are;
    subclasses of the convolutions are not folded (they may compute something else).

    The copy shares the other parameters and buffers with ``module``, holds the folded weights
    without gradients, and is only valid while ``module`` does not change (see
    :func:`state_signature`).
    """
    with torch.no_grad():
        return _fold_batch_norms(module)


def _fold_batch_norms(module: nn.Module) -> Optional[nn.Module]:
    # Pre-filled memo: the copy shares every existing tensor instead of duplicating it.
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    folded_copy = copy.deepcopy(module, memo=shared)
    folded_any = False
    for sub in folded_copy.modules():
        if type(sub) is Conv2d and _has_running_stats(sub.norm):
            _fold_into(sub, sub.norm)
            sub.norm = None
            folded_any = True
        elif isinstance(sub, nn.Sequential):
            for i in range(len(sub) - 1):
                conv, norm = sub[i], sub[i + 1]
                if type(conv) is not nn.Conv2d:
                    continue
                if isinstance(norm, CycleBatchNormList) and all(map(_has_running_stats, norm)):
                    sub[i] = _PerLevelConv(conv, norm)
                elif _has_running_stats(norm):
                    _fold_into(conv, norm)
                else:
                    continue
                sub[i + 1] = nn.Identity()
                folded_any = True
    return folded_copy if folded_any else None


def state_signature(modules: List[nn.Module]) -> Optional[tuple]:
    """
    What identifies the values of the modules' parameters and buffers: their storage and
    version counter (in-place changes through autograd-visible ops, from an optimizer step to
    ``load_state_dict``, increment it; ``.to()`` and ``.data =`` change the storage). None when
    a copy would not behave as the modules: a forward hook or pre-hook is registered (it must
    see the modules' own calls), or a tensor is an inference tensor (no version counter).
    """
    signature = []
    for module in modules:
        for sub in module.modules():
            if sub._forward_hooks or sub._forward_pre_hooks:
                return None
            for t in (*sub._parameters.values(), *sub._buffers.values()):
                if t is None:
                    continue
                if t.is_inference():
                    return None
                signature.append((t.data_ptr(), t._version))
    return tuple(signature)


def _has_running_stats(norm) -> bool:
    """Whether ``norm`` is an affine map per channel: a batch norm using running statistics."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and not norm.training
        and norm.running_var is not None
    )


def _folded_weights(conv: nn.Conv2d, norm, weight=None, bias=None):
    """The (weight, bias) of ``norm(conv(x))`` in inference; ``weight``, ``bias``: the affine."""
    if isinstance(norm, FrozenBatchNorm2d) or norm.affine:
        weight, bias = norm.weight, norm.bias
    folded_weight, folded_bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, weight, bias
    )
    memory_format = (
        torch.channels_last
        if conv.weight.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    return (
        folded_weight.detach().contiguous(memory_format=memory_format),
        folded_bias.detach(),
    )


def _fold_into(conv: nn.Conv2d, norm) -> None:
    weight, bias = _folded_weights(conv, norm)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


class _PerLevelConv(nn.Module):
    """
    A convolution followed by ``CycleBatchNormList``, folded: one weight and bias per level,
    used in turn as that list uses its batch norms (the caller runs the levels in order).
    """

    def __init__(self, conv: nn.Conv2d, norms: CycleBatchNormList):
        super().__init__()
        self.conv = conv
        affine = (norms.weight, norms.bias) if norms._affine else (None, None)
        folded = [_folded_weights(conv, norm, *affine) for norm in norms]
        self.weights = [w for w, _ in folded]
        self.biases = [b for _, b in folded]
        self.position = norms._pos

    def forward(self, x: Tensor) -> Tensor:
        level = self.position
        self.position = (level + 1) % len(self.weights)
        return self.conv._conv_forward(x, self.weights[level], self.biases[level])
