"""The head's 3x3 convolutions by NNPACK's Winograd algorithm (MODEL.FOCAL_RETINANET.WINOGRAD)."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn import functional as F

from focal_det2.modeling import winograd
from focal_det2.modeling.winograd import use_winograd, winograd_conv2d

from helpers import OpCounter, assert_close_to_largest
from helpers import demo_cfg_without_fpn_norm as demo_cfg

WINOGRAD = "aten._nnpack_spatial_convolution.default"
pytestmark = pytest.mark.skipif(not torch._nnpack_available(), reason="torch without NNPACK")
WEIGHT_GRADIENT = "aten.bmm.default"  # the F(4x4, 3x3) weight gradient's one batched product
# Winograd and direct float32 convolutions round differently: measured on one 256-channel
# convolution, the output and the input's gradient within 1.7e-5 of their largest value, the
# weight's within 7e-6; through the demo model's 256-channel head, losses equal at
# initialisation, gradients within 7e-5 of each parameter's largest.
CONV_RTOL = 1e-4
LOSS_RTOL = 1e-4
GRAD_RTOL = 5e-4


@pytest.mark.parametrize("bias", [True, False])
def test_winograd_convolution_and_its_gradients_are_the_convolutions(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 40, 48, generator=g).requires_grad_()
    weight = (torch.randn(64, 256, 3, 3, generator=g) * 0.05).requires_grad_()
    b = torch.randn(64, generator=g).requires_grad_() if bias else None
    upstream = torch.randn(2, 64, 40, 48, generator=g)
    inputs = [x, weight] + ([b] if bias else [])
    with OpCounter() as ops:
        ours = winograd_conv2d(x, weight, b)
        ours_grads = torch.autograd.grad(ours, inputs, upstream)
    reference = F.conv2d(x, weight, b, padding=1)
    reference_grads = torch.autograd.grad(reference, inputs, upstream)
    # Image by image, forward and the input's gradient; the weight's in one product.
    assert ops.counts[WINOGRAD] == 2 * 2
    assert ops.counts[WEIGHT_GRADIENT] == 1
    assert_close_to_largest(ours, reference, CONV_RTOL)
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        assert_close_to_largest(mine, theirs, CONV_RTOL)
    # Other algorithms, not the same kernels.
    assert not torch.equal(ours, reference)
    assert not torch.equal(ours_grads[1], reference_grads[1])


@pytest.mark.parametrize(
    "shape, tiles, products",
    [
        ((2, 24, 33, 45), 256, 1),  # 9 x 12 tiles per image: both images in one product
        ((3, 24, 33, 45), 108, 3),  # one image per product: sums across products
        ((2, 24, 33, 45), 30, 10),  # bands of 2 tile rows (the last of 1) per product
        ((2, 24, 5, 3), 256, 1),  # smaller than one tile
    ],
)
def test_weight_gradient_by_tiles_is_the_convolutions(shape, tiles, products, monkeypatch):
    # F(4x4, 3x3) backpropagated: any size (partial tiles at the right and bottom edges).
    monkeypatch.setattr(winograd, "_TILES_PER_PRODUCT", tiles)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(40, shape[1], 3, 3, generator=g)
    upstream = torch.randn(shape[0], 40, *shape[2:], generator=g)
    reference = torch.ops.aten.convolution_backward(
        upstream, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    with OpCounter() as ops:
        ours = winograd._weight_gradient(x, upstream)
    assert ops.counts[WEIGHT_GRADIENT] + ops.counts["aten.baddbmm_.default"] == products
    assert_close_to_largest(ours, reference, CONV_RTOL)


def test_maps_too_small_for_nnpack_take_only_the_weight_gradient_by_winograd():
    conv = nn.Conv2d(256, 256, 3, padding=1)
    assert use_winograd(conv) == [conv]
    x = torch.randn(2, 256, 33, 36, requires_grad=True)  # 1,188 px: >= 32 x 32, < 40 x 40
    with OpCounter() as ops:
        conv(x).sum().backward()
    assert ops.counts[WINOGRAD] == 0 and ops.counts[WEIGHT_GRADIENT] == 1
    reference = nn.Conv2d(256, 256, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    reference(x.detach()).sum().backward()
    assert_close_to_largest(conv.weight.grad, reference.weight.grad, CONV_RTOL)
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad)
    # Without gradients, or below 32 x 32, the direct convolution alone.
    with OpCounter() as ops:
        with torch.no_grad():
            conv(x)
        conv(torch.randn(2, 256, 31, 33, requires_grad=True)).sum().backward()
    assert ops.counts[WINOGRAD] == 0 and ops.counts[WEIGHT_GRADIENT] == 0


def _model(winograd: str):
    # The paper's head (no norm) on a 256-channel FPN.
    cfg = demo_cfg(
        "MODEL.FPN.OUT_CHANNELS",
        256,
        "MODEL.RETINANET.NORM",
        "",
        "MODEL.FOCAL_RETINANET.WINOGRAD",
        winograd,
    )
    torch.manual_seed(0)
    return build_model(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    batch = []
    # Padded to 352 x 384: P3 44 x 48 (Winograd), P4 22 x 24 (direct).
    for (h, w), box in (((320, 384), [30.0, 40.0, 150.0, 160.0]), ((352, 320), [60, 20, 300, 90])):
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([box]))
        instances.gt_classes = torch.tensor([4])
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "instances": instances})
    return batch


def test_a_winograd_head_trains_as_the_direct_one():
    winograd, direct = _model("on"), _model("off")
    keys = list(direct.state_dict())
    assert list(winograd.state_dict()) == keys
    assert [type(m) for m in winograd.modules()] == [type(m) for m in direct.modules()]
    losses = {}
    for name, model in (("winograd", winograd), ("direct", direct)):
        model.train()
        with EventStorage(0), OpCounter() as ops:
            loss_dict = model(_batch())
            sum(loss_dict.values()).backward()
        losses[name] = loss_dict
        # P3 only (P4's 22 x 24 px are too small for either): per image, the FPN's output
        # convolution and the subnets' 2 x NUM_CONVS (the predictors have < 256 outputs here),
        # forward and the input's gradient; their weights' gradients, one product each.
        fitting = 1 + 2 * 2 if name == "winograd" else 0
        assert ops.counts[WINOGRAD] == fitting * 2 * 2
        assert ops.counts[WEIGHT_GRADIENT] == fitting
    for key, value in losses["direct"].items():
        torch.testing.assert_close(losses["winograd"][key], value, rtol=LOSS_RTOL, atol=0)
    parameters = dict(direct.named_parameters())
    with_gradients = [n for n, p in parameters.items() if p.grad is not None]
    assert [n for n, p in winograd.named_parameters() if p.grad is not None] == with_gradients
    for name, parameter in winograd.named_parameters():
        if parameter.grad is not None:
            assert_close_to_largest(parameter.grad, parameters[name].grad, GRAD_RTOL)


def test_only_fitting_convolutions_take_winograd():
    module = nn.Sequential(
        nn.Conv2d(256, 256, 3, padding=1),
        nn.Conv2d(128, 256, 3, padding=1),
        nn.Conv2d(256, 256, 3, padding=1, stride=2),
        nn.Conv2d(256, 256, 1),
    )
    assert use_winograd(module) == [module[0]]
    with torch.no_grad(), OpCounter() as ops:
        module[0](torch.randn(1, 256, 39, 40))  # below 40 x 40 px: direct
        module[0](torch.randn(1, 256, 40, 40))
    assert ops.counts[WINOGRAD] == 1
    # Under autocast, the convolution autocast lowers to bfloat16.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCounter() as ops:
        out = module[0](torch.randn(1, 256, 40, 40))
    assert ops.counts[WINOGRAD] == 0 and out.dtype == torch.bfloat16


def test_exported_graphs_keep_the_standard_convolution():
    model = _model("on").eval()

    def features(height, width):
        return [torch.randn(1, 256, height // 2**i, width // 2**i) for i in range(5)]

    with torch.no_grad(), OpCounter() as ops:
        model.head(features(48, 64))
    assert ops.counts[WINOGRAD] == 2 * 2
    # Dynamic sizes, as focal_det2.export exports: no guard on the maps' size either. Level i
    # is 2**(4 - i) x (height, width) of P7.
    height, width = torch.export.Dim("height", min=1, max=32), torch.export.Dim("width", max=32)
    dims = [{2: height * 2 ** (4 - i), 3: width * 2 ** (4 - i)} for i in range(5)]
    program = torch.export.export(
        model.head, (features(48, 64),), dynamic_shapes=(dims,), strict=False
    )
    assert "nnpack" not in str(program.graph)
    for size in ((48, 64), (16, 32), (256, 320)):
        inputs = features(*size)
        with torch.no_grad():
            eager = model.head(inputs)
        exported = program.module()(inputs)
        for ours, reference in zip(exported, eager, strict=True):
            for x, y in zip(ours, reference, strict=True):
                assert_close_to_largest(x, y, CONV_RTOL)


def test_jit_traced_graphs_keep_the_standard_convolution():
    conv = nn.Conv2d(256, 256, 3, padding=1)
    use_winograd(conv)
    with torch.no_grad():
        traced = torch.jit.trace(conv, torch.randn(2, 256, 48, 48))
    assert "nnpack" not in str(traced.graph)
    # Not tied to the traced batch (NNPACK's path splits it image by image).
    x = torch.randn(3, 256, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
