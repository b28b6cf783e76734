"""
3x3 convolutions by NNPACK's Winograd algorithm (F(6x6, 3x3), in torch's CPU build): 2.25x
fewer multiplications than a direct convolution, the same values up to float rounding (up to
2e-5 of the largest output). Where oneDNN runs without AVX-512 it is 1.2-2.4x faster than
oneDNN's direct convolution on the RetinaNet head's 256-channel maps of 40 x 40 and more
(1.7-2.4x from 64 x 64; ``MODEL.FOCAL_RETINANET.WINOGRAD``, benchmarks/README.md); with
AVX-512 about as fast.

NNPACK takes NCHW maps and runs one image at a time (on a batch it picks its training
algorithm, 4-5x slower here); its output is NCHW, which the next such convolution takes as it
is. In training, the input's gradient is the same kind of convolution (the weight flipped and
transposed), also by Winograd; the weight's gradient is oneDNN's.
"""

from functools import partial
from typing import List, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["winograd_fits", "winograd_pays", "winograd_conv2d", "use_winograd"]

# Convolutions with fewer input or output channels (the box predictor's 36; an input gradient
# then has as few input channels), or on smaller maps, are faster direct (measured per
# convolution, benchmarks/README.md).
_MIN_CHANNELS = 256
_MIN_PIXELS = 40 * 40


def winograd_fits(conv: nn.Conv2d) -> bool:
    """
    Whether ``conv`` is a convolution that NNPACK's Winograd path computes and that pays: 3x3,
    stride 1, padding 1, >= 256 input and output channels, nothing after it (Detectron2's
    ``Conv2d`` without ``norm`` and ``activation``).
    """
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels >= _MIN_CHANNELS
        and conv.out_channels >= _MIN_CHANNELS
        and getattr(conv, "norm", None) is None
        and getattr(conv, "activation", None) is None
        and torch._nnpack_available()
    )


def winograd_pays(x: Tensor) -> bool:
    """Whether a fitting convolution runs ``x`` (N, C, H, W) by Winograd: float32 large maps."""
    return (
        x.dim() == 4
        and x.numel() > 0
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.shape[-2] * x.shape[-1] >= _MIN_PIXELS
    )


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """
    ``F.conv2d(x, weight, bias, padding=1)`` of a 3x3 ``weight`` by Winograd, NCHW out; with
    gradients where they are needed.
    """
    if x.shape[0] == 0:
        return F.conv2d(x, weight, bias, padding=1)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _WinogradConv2d.apply(x, weight, bias)
    return _per_image(x, weight, bias)


def _per_image(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # _nnpack_available() initialises NNPACK (once), which its convolution needs first.
    if not torch._nnpack_available():
        raise RuntimeError("NNPACK is not available in this build of torch")
    weight = weight.contiguous()
    outs = [
        torch._nnpack_spatial_convolution(image, weight, bias, [1, 1])
        for image in x.contiguous().split(1)
    ]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class _WinogradConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _per_image(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # A stride-1 convolution's input gradient: the output gradient convolved with the
            # weight flipped in space, input and output channels swapped (padding 3 - 1 - 1).
            grad_input = _per_image(grad, weight.flip(2, 3).transpose(0, 1), None)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                [weight.shape[0]] if ctx.has_bias else None,
                [1, 1],
                [1, 1],
                [1, 1],
                False,
                [0, 0],
                1,
                [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
            )
        return grad_input, grad_weight, grad_bias


def _winograd_or_direct(conv: nn.Conv2d, x: Tensor) -> Tensor:
    # Traced graphs (torch.export, ONNX) keep the standard convolution, without a guard on
    # the map's size (asked first); autocast its own.
    if (
        not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
        and winograd_pays(x)
    ):
        return winograd_conv2d(x, conv.weight, conv.bias)
    return conv._conv_forward(x, conv.weight, conv.bias)


def use_winograd(module: nn.Module) -> List[nn.Conv2d]:
    """
    Let the plain ``nn.Conv2d`` of ``module`` that fit (:func:`winograd_fits`; e.g. the
    RetinaNet head's) run large float32 maps by Winograd, in training and in inference, by
    their instances' forwards: parameters, state-dict keys and module types stay. Returns them.
    """
    convolutions = [m for m in module.modules() if type(m) is nn.Conv2d and winograd_fits(m)]
    for conv in convolutions:
        conv.forward = partial(_winograd_or_direct, conv)
    return convolutions
