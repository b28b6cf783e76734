"""
3x3 convolutions by Winograd's minimal filtering algorithms: the same values up to float rounding
(within 2e-5 of the largest output or gradient), fewer multiplications. Forward and the
input's gradient by NNPACK's F(6x6, 3x3) (in torch's CPU build; 5.1x fewer multiplications);
the weight's gradient, which NNPACK lacks, by F(4x4, 3x3) of Lavin & Gray ("Fast Algorithms
for Convolutional Neural Networks", 2016; 4x fewer) written in PyTorch ops here: the input's
6 x 6 tiles and the output gradient's 4 x 4 tiles are transformed by small fixed convolutions,
their 36 transformed positions multiplied by one batched matrix product that sums over images
and tiles, and the 6 x 6 result folded back to 3 x 3. Where oneDNN runs without AVX-512, the
RetinaNet head's 256-channel convolutions run 1.2-2.4x faster forward on maps of 40 x 40 and
more, and their weight's gradient 1.9-2.5x faster from 32 x 32 (``MODEL.FOCAL_RETINANET.WINOGRAD``,
``benchmarks/bench_winograd.py``); with AVX-512 oneDNN's direct forward is about as fast.
Exported graphs, which cannot call NNPACK, get F(4x4, 3x3) forward in standard operators
(:func:`winograd_conv2d_graph`).

NNPACK takes NCHW maps and runs one image at a time (on a batch it picks its training
algorithm, 4-5x slower here); its output is NCHW, which the next such convolution takes as it
is. In training, the input's gradient is the same kind of convolution (the weight flipped and
transposed).
"""

from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.layers import Conv2d
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = [
    "graph_winograd_fits",
    "use_graph_winograd",
    "winograd_conv2d_graph",
    "winograd_fits",
    "winograd_pays",
    "weight_gradient_pays",
    "winograd_conv2d",
    "use_winograd",
]

# Convolutions with fewer input or output channels (the box predictor's 36; an input gradient
# then has as few input channels), or on smaller maps, are faster direct (measured per
# convolution, benchmarks/README.md): NNPACK below 40 x 40, the weight's gradient below 32 x 32.
_MIN_CHANNELS = 256
_MIN_PIXELS = 40 * 40
_MIN_WEIGHT_GRADIENT_PIXELS = 32 * 32

# F(4x4, 3x3): a 4 x 4 output tile Y = A^T [(G w G^T) * (B^T d B)] A of a 6 x 6 input tile d.
_B_T = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float32,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float32,
)
_A_T = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    dtype=torch.float32,
)
# Backpropagated through that forward, the weight's gradient is G^T dU G with
# dU = sum over tiles and images of (A dY A^T) * (B^T d B): the two transforms as stride-4
# convolutions of one channel with 36 filters, one per position of the 6 x 6 tile (6 x 6
# overlapping tiles of the input, 4 x 4 of the gradient); the fold back to 3 x 3 a 9 x 36 matrix.
_INPUT_TILE_FILTERS = torch.einsum("ab,ed->aebd", _B_T, _B_T).reshape(36, 1, 6, 6)
_GRADIENT_TILE_FILTERS = torch.einsum("ba,de->aebd", _A_T, _A_T).reshape(36, 1, 4, 4)
_FOLD_TO_3X3 = torch.einsum("ai,bj->ijab", _G, _G).reshape(9, 36)
# F(4x4, 3x3)'s output transform as one matrix: row 4i + j of a 4 x 4 output tile from the 36
# products, row-major (6 x 6).
_OUTPUT_TILE_MATRIX = torch.einsum("ia,jb->ijab", _A_T, _A_T).reshape(16, 36)
# In exported graphs run by onnxruntime (AVX2): 3x3 convolutions of 128-512 channels on maps of
# 13 x 17 to 100 x 134 ran 1.1-2.5x faster by winograd_conv2d_graph, 64-channel ones 0.8-1.06x
# (benchmarks/README.md).
_MIN_GRAPH_CHANNELS = 128
# On fewer 4 x 4 tiles the transforms' and the batched product's fixed costs (the transformed
# weights are 4x larger) outweigh the saved multiplications: in onnxruntime, R18's 512-channel
# convolutions at 8 x 11 (6 tiles) ran slower than direct, and the demo model at 256 px, its
# 128- and 256-channel ones on 88 and 24 tiles by Winograd, 3% slower in all (R50-FPN at
# 800 px, from 221 tiles: 1.17x faster in all).
_MIN_GRAPH_TILES = 128
# Tiles per batched product: images, or bands of tile rows of one image, of about this many
# tiles (>= 1 row). Fewer make slow thin products; more, only more memory (the transformed
# tiles: 36 x tiles x (input + output channels) floats, 19 MB for 256 -> 256).
_TILES_PER_PRODUCT = 256


def winograd_fits(conv: nn.Conv2d) -> bool:
    """
    Whether ``conv`` is a convolution that NNPACK's Winograd path computes and that pays: 3x3,
    stride 1, padding 1, >= 256 input and output channels, nothing after it (Detectron2's
    ``Conv2d`` without ``norm`` and ``activation``).
    """
    return (
        _same_size_3x3(conv, _MIN_CHANNELS)
        and getattr(conv, "norm", None) is None
        and getattr(conv, "activation", None) is None
        and torch._nnpack_available()
    )


def _same_size_3x3(conv: nn.Conv2d, min_channels: int) -> bool:
    """A dense 3x3 convolution, stride 1, zero padding 1, >= ``min_channels`` in and out."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels >= min_channels
        and conv.out_channels >= min_channels
    )


def winograd_pays(x: Tensor) -> bool:
    """
    Whether a fitting convolution runs ``x`` (N, C, H, W) by Winograd: float32 large maps, in
    eager mode (not traced), outside autocast.
    """
    return _float32_cpu_map(x, _MIN_PIXELS)


def weight_gradient_pays(x: Tensor) -> bool:
    """Whether a fitting convolution of ``x`` takes its weight's gradient by Winograd."""
    return _float32_cpu_map(x, _MIN_WEIGHT_GRADIENT_PIXELS)


def _float32_cpu_map(x: Tensor, min_pixels: int) -> bool:
    # Traced graphs (torch.compile, torch.export, ONNX, torch.jit.trace) keep the standard
    # convolution, without a guard on the map's size (asked first); autocast its own.
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and x.dim() == 4
        and x.numel() > 0
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.shape[-2] * x.shape[-1] >= min_pixels
    )


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """
    ``F.conv2d(x, weight, bias, padding=1)`` of a 3x3 ``weight``, with gradients where they are
    needed: forward and the input's gradient by Winograd (NCHW out) where :func:`winograd_pays`,
    the weight's gradient where :func:`weight_gradient_pays`, the rest direct.
    """
    if x.shape[0] == 0:
        return F.conv2d(x, weight, bias, padding=1)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _WinogradConv2d.apply(x, weight, bias)
    return _forward(x, weight, bias)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if winograd_pays(x):
        return _per_image(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


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
        ctx.save_for_backward(x, weight)
        return _forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if winograd_pays(grad):
                # A stride-1 convolution's input gradient: the output gradient convolved with
                # the weight flipped in space, input and output channels swapped (padding
                # 3 - 1 - 1).
                grad_input = _per_image(grad, weight.flip(2, 3).transpose(0, 1), None)
            else:
                grad_input = _direct_gradients(grad, x, weight, input=True)
        if ctx.needs_input_grad[1]:
            if weight_gradient_pays(x):
                # In the weight's memory format, as autograd would otherwise copy it to.
                grad_weight = torch.empty_like(weight).copy_(_weight_gradient(x, grad))
            else:
                grad_weight = _direct_gradients(grad, x, weight, input=False)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias


def _direct_gradients(grad: Tensor, x: Tensor, weight: Tensor, input: bool) -> Tensor:
    """The input's (``input``) or the weight's gradient of a 3x3, padding-1 convolution."""
    grads = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [input, not input, False]
    )
    return grads[0] if input else grads[1]


def _weight_gradient(x: Tensor, grad: Tensor) -> Tensor:
    """
    The weight's gradient of ``F.conv2d(x, weight, padding=1)`` (3x3) given the output's
    ``grad``, by Winograd's F(4x4, 3x3) (module docstring); a (c_out, c_in, 3, 3) view.
    """
    n, c_in, height, width = x.shape
    c_out = grad.shape[1]
    # 4 x 4 tiles of the output, zero-padded to whole tiles: zero gradients add nothing.
    tiles_y, tiles_x = -(-height // 4), -(-width // 4)
    pad_y, pad_x = 4 * tiles_y - height, 4 * tiles_x - width
    x = F.pad(x, (1, 1 + pad_x, 1, 1 + pad_y))
    grad = F.pad(grad, (0, pad_x, 0, pad_y))
    tile_gradient = None  # (36, c_out, c_in)
    for images, first_row, end_row in _products(n, tiles_y, tiles_x):
        count, tiles = images.stop - images.start, (end_row - first_row) * tiles_x
        # Tile row i: input rows 4i to 4i + 5 (padded), gradient rows 4i to 4i + 3.
        inputs = F.conv2d(
            x[images, :, 4 * first_row : 4 * end_row + 2].reshape(count * c_in, 1, -1, x.shape[-1]),
            _INPUT_TILE_FILTERS,
            stride=4,
        ).view(count, c_in, 36, tiles)
        grads = F.conv2d(
            grad[images, :, 4 * first_row : 4 * end_row].reshape(
                count * c_out, 1, -1, grad.shape[-1]
            ),
            _GRADIENT_TILE_FILTERS,
            stride=4,
        ).view(count, c_out, 36, tiles)
        # Position by position, the sum over images and tiles: (c_out, tiles) @ (tiles, c_in).
        if count == 1:
            inputs, grads = inputs[0].permute(1, 2, 0), grads[0].transpose(0, 1)
        else:
            inputs = inputs.permute(2, 0, 3, 1).reshape(36, count * tiles, c_in)
            grads = grads.permute(2, 1, 0, 3).reshape(36, c_out, count * tiles)
        if tile_gradient is None:
            tile_gradient = torch.bmm(grads, inputs)
        else:
            tile_gradient.baddbmm_(grads, inputs)
    weight_grad = _FOLD_TO_3X3 @ tile_gradient.view(36, c_out * c_in)
    return weight_grad.view(3, 3, c_out, c_in).permute(2, 3, 0, 1)


def _products(n: int, tiles_y: int, tiles_x: int) -> Iterator[Tuple[slice, int, int]]:
    """(images, first tile row, end tile row) of about ``_TILES_PER_PRODUCT`` tiles each."""
    rows = max(1, _TILES_PER_PRODUCT // tiles_x)
    if rows >= tiles_y:
        per_product = rows // tiles_y
        for first in range(0, n, per_product):
            yield slice(first, min(n, first + per_product)), 0, tiles_y
    else:
        for image in range(n):
            for first_row in range(0, tiles_y, rows):
                yield slice(image, image + 1), first_row, min(tiles_y, first_row + rows)


def graph_winograd_fits(conv: nn.Module) -> bool:
    """
    Whether :func:`use_graph_winograd` runs ``conv`` by :func:`winograd_conv2d_graph`: an
    ``nn.Conv2d`` or Detectron2 ``Conv2d`` (its norm and activation then follow), 3x3, stride 1,
    padding 1, >= 128 input and output channels.
    """
    return type(conv) in (nn.Conv2d, Conv2d) and _same_size_3x3(conv, _MIN_GRAPH_CHANNELS)


def winograd_conv2d_graph(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """
    ``F.conv2d(x, weight, bias, padding=1)`` of a 3x3 ``weight`` by Winograd's F(4x4, 3x3) in
    standard operators (a convolution, matrix products, a pixel shuffle), which ``torch.export``
    traces for any map size and ONNX runtimes run: the input's 6 x 6 tiles transformed by a
    stride-4 convolution of one channel with 36 filters, the 36 products of the transformed
    tiles and weights as one batched matrix product over the channels, and the output tiles
    transformed and laid out by one matrix product and a pixel shuffle. Forward only. Laid out
    so that, for one image, onnxruntime moves no tensor but by whole rows of tiles: a product
    laid out tile-first (channels last) cost it 3x the product's time in transposes.
    """
    n, c_in, height, width = x.shape
    c_out = weight.shape[0]
    # At least 2 x 2 tiles: torch.export would guard a dynamic count of tiles against 1
    # (views and contiguity differ for size-1 dimensions).
    tiles_y = torch.sym_max((height + 3) // 4, 2)
    tiles_x = torch.sym_max((width + 3) // 4, 2)
    x = F.pad(x, (1, 1 + 4 * tiles_x - width, 1, 1 + 4 * tiles_y - height))
    tiles = F.conv2d(
        x.reshape(n * c_in, 1, 4 * tiles_y + 2, 4 * tiles_x + 2),
        _INPUT_TILE_FILTERS.to(x),
        stride=4,
    )  # (n * c_in, 36, tiles_y, tiles_x)
    tiles = tiles.reshape(n, c_in, 36, tiles_y * tiles_x).permute(2, 1, 0, 3)
    g = _G.to(weight)
    # A function of the weights only: exported graphs compute it from constants, which
    # onnxruntime folds when it loads the graph.
    weight_tiles = (g @ weight @ g.T).permute(2, 3, 0, 1).reshape(36, c_out, c_in)
    products = weight_tiles @ tiles.reshape(36, c_in, n * tiles_y * tiles_x)
    out = _OUTPUT_TILE_MATRIX.to(products) @ products.reshape(36, -1)
    out = out.reshape(16, c_out, n, tiles_y, tiles_x).permute(2, 1, 0, 3, 4)
    out = F.pixel_shuffle(out.reshape(n, c_out * 16, tiles_y, tiles_x), 4)
    # Cropped by a negative padding: a slice to a size that may equal the map's would make
    # torch.export guard on which, for dynamic sizes.
    out = F.pad(out, (0, width - 4 * tiles_x, 0, height - 4 * tiles_y))
    return out if bias is None else out + bias[:, None, None]


def _graph_winograd_forward(conv: nn.Conv2d, x: Tensor) -> Tensor:
    x = winograd_conv2d_graph(x, conv.weight, conv.bias)
    if getattr(conv, "norm", None) is not None:
        x = conv.norm(x)
    if getattr(conv, "activation", None) is not None:
        x = conv.activation(x)
    return x


def use_graph_winograd(module: nn.Module, run: Callable[[], object]) -> List[nn.Conv2d]:
    """
    Let the convolutions of ``module`` that fit (:func:`graph_winograd_fits`) and whose largest
    map in ``run()`` has at least ``_MIN_GRAPH_TILES`` 4 x 4 tiles run by
    :func:`winograd_conv2d_graph`, at every map size, by their instances' forwards: for a
    module to export (:func:`focal_det2.export.export_program`, on a copy). Returns them.

    Args:
        module: holds the convolutions.
        run: calls ``module`` on an input of the size to export for.
    """
    largest_tiles: Dict[nn.Module, int] = {}

    def record(conv: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
        height, width = inputs[0].shape[-2:]
        tiles = -(-height // 4) * -(-width // 4)
        largest_tiles[conv] = max(tiles, largest_tiles.get(conv, 0))

    fitting = [m for m in module.modules() if graph_winograd_fits(m)]
    hooks = [conv.register_forward_pre_hook(record) for conv in fitting]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    convolutions = [m for m in fitting if largest_tiles.get(m, 0) >= _MIN_GRAPH_TILES]
    for conv in convolutions:
        conv.forward = partial(_graph_winograd_forward, conv)
    return convolutions


def _winograd_or_direct(conv: nn.Conv2d, x: Tensor) -> Tensor:
    if winograd_pays(x) or (
        torch.is_grad_enabled() and conv.weight.requires_grad and weight_gradient_pays(x)
    ):
        return winograd_conv2d(x, conv.weight, conv.bias)
    return conv._conv_forward(x, conv.weight, conv.bias)


def use_winograd(module: nn.Module) -> List[nn.Conv2d]:
    """
    Let the ``nn.Conv2d`` and Detectron2 ``Conv2d`` of ``module`` that fit
    (:func:`winograd_fits`; e.g. the RetinaNet head's and the FPN's output convolutions) run by
    Winograd where it pays, in training and in inference, by their instances' forwards:
    parameters, state-dict keys and module types stay. Returns them.
    """
    convolutions = [
        m for m in module.modules() if type(m) in (nn.Conv2d, Conv2d) and winograd_fits(m)
    ]
    for conv in convolutions:
        conv.forward = partial(_winograd_or_direct, conv)
    return convolutions
