"""
Inference copies of the backbone and the head:

- with their batch norms folded into the preceding convolutions: in inference a batch norm is a
  per-channel affine map, so ``bn(conv(x)) = conv'(x)`` with scaled weights and a new bias, one
  pass over each feature map less;
- on a CPU, with the weights of their convolutions reordered once into oneDNN's blocked layout:
  eager PyTorch reorders every weight at every call (for R18's 512-channel 3x3 convolutions
  at 8 x 11 px, about half of their time), for the same kernel and the same results;
- with those convolutions running the ReLU, and a residual block's addition before it, as
  oneDNN post-ops (:func:`_fuse_activations`): one pass over the feature map less each, the
  same values;
- optionally (the head's copy where oneDNN lacks AVX-512), with the 3x3 convolutions of >= 256
  input channels on maps of >= 40 x 40 run by NNPACK's Winograd algorithm (F(6x6, 3x3)): 5x
  fewer multiplications than oneDNN's direct convolution, the same values up to rounding.

The copies share every tensor that folding does not change.
"""

import copy
from collections import OrderedDict
from functools import partial
from typing import List, Optional

import torch
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .winograd import winograd_conv2d, winograd_fits, winograd_pays

__all__ = ["inference_copy", "state_signature"]


def inference_copy(
    module: nn.Module, pack_weights: bool, winograd: bool = False
) -> Optional[nn.Module]:
    """
    A copy of ``module`` for inference in which every batch norm that follows a convolution is
    folded into it and, with ``pack_weights``, every convolution on a CPU takes its weight packed
    for oneDNN (:class:`_PackedConvolution`), with the ReLUs and residual additions that follow
    them as its post-ops (:func:`_fuse_activations`) and, with ``winograd`` too, the 3x3 ones
    of >= 256 input channels on large maps run by NNPACK's Winograd algorithm (see
    :class:`_PackedConvolution`); None when nothing changes. Folded are
    Detectron2's ``Conv2d`` with a ``norm`` (the backbone's and FPN's convs) and, in
    ``nn.Sequential`` (the RetinaNet head's subnets), an ``nn.Conv2d`` followed by a batch norm
    or by Detectron2's per-level ``CycleBatchNormList``, whose levels then get one folded
    convolution each, cycled the same way. Batch norms without running statistics, or in
    training mode, are left as they are; subclasses of the convolutions are not folded (they may
    compute something else).

    The copy shares the other parameters and buffers with ``module``, holds the folded weights
    without gradients, and is only valid while ``module`` does not change (see
    :func:`state_signature`).
    """
    with torch.no_grad():
        return _inference_copy(module, pack_weights and _onednn_packing_available(), winograd)


def _inference_copy(module: nn.Module, pack_weights: bool, winograd: bool) -> Optional[nn.Module]:
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
    packed_any = False
    if pack_weights:
        for sub in folded_copy.modules():
            if isinstance(sub, _PerLevelConv):
                packed_any |= sub.pack_weights(winograd)
            elif type(sub) in (Conv2d, nn.Conv2d) and _packable(sub, sub.weight):
                # The instance's forward, not a new module: Detectron2's FPN also holds its
                # convolutions in plain lists, which a replaced attribute would not reach.
                sub.forward = _PackedConvolution(sub, sub.weight, sub.bias, winograd)
                packed_any = True
        _fuse_activations(folded_copy)
    return folded_copy if folded_any or packed_any else None


def _fuse_activations(module: nn.Module) -> None:
    """
    Let the packed convolutions of ``module`` run what follows them as oneDNN post-ops: in an
    ``nn.Sequential`` (the head's subnets), a ``nn.ReLU`` after a convolution (and its folded
    norm, now an ``nn.Identity``); in Detectron2's ResNet, the ReLU after the stem's and the
    blocks' convolutions and, after a block's last one, the residual addition and its ReLU
    (the blocks' forwards are replaced by :func:`_fused_block_forward`, the stem's by
    :func:`_fused_stem_forward`). Modules whose convolutions are not all packed, or keep a
    norm (GroupNorm) or an activation, are left as they are; subclasses of the blocks too.
    """
    for sub in module.modules():
        if type(sub) is BasicStem:
            convolutions = _fusable_forwards(sub.conv1)
            if convolutions:
                convolutions[0].relu = True
                sub.forward = partial(_fused_stem_forward, sub)
        elif type(sub) in (BasicBlock, BottleneckBlock):
            names = ["conv1", "conv2"] + (["conv3"] if type(sub) is BottleneckBlock else [])
            convolutions = [_fusable_forwards(getattr(sub, name)) for name in names]
            if all(convolutions):
                for (inner,) in convolutions[:-1]:
                    inner.relu = True
                sub.forward = partial(_fused_block_forward, sub, names, convolutions[-1][0])
        elif isinstance(sub, nn.Sequential):
            layers = [(i, layer) for i, layer in enumerate(sub) if type(layer) is not nn.Identity]
            for (_, layer), (i, after) in zip(layers, layers[1:]):
                convolutions = _fusable_forwards(layer)
                if convolutions and type(after) is nn.ReLU:
                    for convolution in convolutions:
                        convolution.relu = True
                    sub[i] = nn.Identity()


def _fusable_forwards(module: nn.Module) -> List["_PackedConvolution"]:
    """
    The packed forwards of a convolution whose output nothing else transforms (one per level
    for :class:`_PerLevelConv`), or [] when it has none.
    """
    if isinstance(module, _PerLevelConv):
        forwards = module.level_forwards
    elif isinstance(module, nn.Conv2d):
        if getattr(module, "norm", None) is not None:
            return []
        if getattr(module, "activation", None) is not None:
            return []
        forwards = [module.__dict__.get("forward")]
    else:
        return []
    return forwards if all(isinstance(f, _PackedConvolution) for f in forwards) else []


def _fused_stem_forward(stem: BasicStem, x: Tensor) -> Tensor:
    # BasicStem.forward, its ReLU in the convolution. In a channels-last model, the image too
    # (the only NCHW input of a convolution there), for the packed convolution: 5-15% faster.
    if stem.conv1.weight.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(stem.conv1(x), kernel_size=3, stride=2, padding=1)


def _fused_block_forward(
    block: nn.Module, names: List[str], last: "_PackedConvolution", x: Tensor
) -> Tensor:
    # BasicBlock.forward and BottleneckBlock.forward, the ReLUs in the convolutions.
    out = x
    for name in names[:-1]:
        out = getattr(block, name)(out)
    shortcut = x if block.shortcut is None else block.shortcut(x)
    return last.add_relu(out, shortcut)


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


def _onednn_packing_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _packable(conv: nn.Conv2d, weight: Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class _PackedConvolution:
    """
    The forward of ``conv`` (Detectron2's ``Conv2d`` with its norm and activation, or
    ``nn.Conv2d``) with ``weight`` and ``bias``, where the input is a channels-last float32
    feature map on the CPU: oneDNN's convolution with the weight reordered into its blocked
    layout once per input shape instead of at every call. The same kernel as eager PyTorch's
    channels-last convolution, bit for bit. The layout oneDNN picks depends on the input's size
    (a weight packed for another size can run 10-1,000x slower), so a shape is packed at its
    second call, and the last ``_SHAPES_PER_CONVOLUTION`` shapes are kept: a fixed test size
    packs each weight once (a head shared by the levels once per level), sizes that do not
    recur cost nothing. Other inputs (NCHW, for which the fused op would return channels-last)
    run eager PyTorch's convolution. With ``relu`` (set by :func:`_fuse_activations`), a ReLU
    follows, as a post-op of the packed convolution.

    With ``winograd``, a convolution that fits :func:`~.winograd.winograd_fits` runs the maps
    that :func:`~.winograd.winograd_pays` by NNPACK's Winograd algorithm, in either memory
    format, and returns NCHW (the next such convolution takes it as it is).
    """

    def __init__(
        self, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor], winograd: bool = False
    ):
        self.conv, self.weight, self.bias = conv, weight, bias
        self.conv_args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        # Input shape -> packed weight, or None when seen once; oldest first.
        self.packed: "OrderedDict[torch.Size, Optional[Tensor]]" = OrderedDict()
        self.relu = False
        # NNPACK takes the weight in NCHW order.
        self.winograd_weight = weight.contiguous() if winograd and winograd_fits(conv) else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.winograd_weight is not None and winograd_pays(x):
            out = winograd_conv2d(x, self.winograd_weight, self.bias)
            return F.relu_(out) if self.relu else out
        return self._forward(x, self._packed_weight_for(x))

    def add_relu(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(self(x) + other)``, the end of a residual block, in one oneDNN call."""
        packed = self._packed_weight_for(x)
        if (
            packed is None
            or other.dtype != torch.float32
            or not other.is_contiguous(memory_format=torch.channels_last)
        ):
            out = self._forward(x, packed)
            out += other
            return F.relu_(out)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, packed, self.bias, *self.conv_args, "add", 1.0, "relu", [], ""
        )

    def _forward(self, x: Tensor, packed: Optional[Tensor]) -> Tensor:
        conv = self.conv
        if packed is not None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, packed, self.bias, *self.conv_args, "relu" if self.relu else "none", [], ""
            )
        x = conv._conv_forward(x, self.weight, self.bias)
        if getattr(conv, "norm", None) is not None:
            x = conv.norm(x)
        if getattr(conv, "activation", None) is not None:
            x = conv.activation(x)
        return F.relu_(x) if self.relu else x

    def _packed_weight_for(self, x: Tensor) -> Optional[Tensor]:
        if (
            x.dim() == 4
            and x.numel() > 0
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return self._packed_weight(x.shape)
        return None

    def _packed_weight(self, shape: torch.Size) -> Optional[Tensor]:
        # One lookup: threads sharing the model may evict the shape meanwhile.
        packed = self.packed.get(shape, _UNSEEN)
        if packed is _UNSEEN:
            self.packed[shape] = None
            if len(self.packed) > _SHAPES_PER_CONVOLUTION:
                self.packed.popitem(last=False)
            return None
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.contiguous().to_mkldnn(), *self.conv_args, list(shape)
            )
            self.packed[shape] = packed
        return packed


# Input shapes remembered per convolution: more than the 5 feature levels a head runs on.
_SHAPES_PER_CONVOLUTION = 8
_UNSEEN = object()


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
        self.level_forwards = [
            partial(self.conv._conv_forward, weight=w, bias=b)
            for w, b in zip(self.weights, self.biases)
        ]

    def pack_weights(self, winograd: bool = False) -> bool:
        """Pack each level's weight for oneDNN (:class:`_PackedConvolution`), if it applies."""
        if not _packable(self.conv, self.weights[0]):
            return False
        self.level_forwards = [
            _PackedConvolution(self.conv, w, b, winograd) for w, b in zip(self.weights, self.biases)
        ]
        return True

    def forward(self, x: Tensor) -> Tensor:
        level = self.position
        self.position = (level + 1) % len(self.level_forwards)
        return self.level_forwards[level](x)
