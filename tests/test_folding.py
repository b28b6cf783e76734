"""
Inference with the batch norms folded into the convolutions (FOLD_BATCH_NORMS) and the
convolutions' weights packed for oneDNN (PACK_CONV_WEIGHTS).
"""

import copy

import pytest
import torch
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock
from torch import nn

from focal_det2.modeling.folding import _PackedConvolution, inference_copy

from helpers import OpCounter, assert_close_to_largest
from helpers import demo_cfg_without_fpn_norm as demo_cfg

# Folded and unfolded float32 convolutions round differently: measured on this model, feature
# maps differ by up to 3e-6 of their largest value, boxes by 3e-5 px, scores by 2e-7.
FEATURE_RTOL = 1e-5
BOX_ATOL = 1e-2
SCORE_ATOL = 1e-5


NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d, CycleBatchNormList)


def _model(fold: bool, backbone_norm: str = "BN", *opts):
    """
    The demo model (BN or FrozenBN backbone, per-level BN head), its norms far from the
    identity.
    """
    cfg = demo_cfg(
        "MODEL.FOCAL_RETINANET.FOLD_BATCH_NORMS", fold, "MODEL.RESNETS.NORM", backbone_norm, *opts
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                module.running_mean.normal_(0, 0.5, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(module, NORMS) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.2, generator=g)
        # Spread logits: well-separated scores, some above the threshold.
        model.head.cls_score.weight.normal_(0, 0.05, generator=g)
        model.head.cls_score.bias.fill_(-3.0)
    return model.eval()


def _images():
    g = torch.Generator().manual_seed(2)
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g).float()}
        for h, w in ((256, 192), (160, 256))
    ]


def _dense_outputs(model, backbone, head):
    with torch.no_grad():
        images = model.preprocess_image(_images())
        features = backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        logits, deltas = head(features)
    return features + logits + deltas


def _assert_dense_close(ours, reference):
    for x, y in zip(ours, reference, strict=True):
        assert_close_to_largest(x, y, FEATURE_RTOL)


def _assert_detections_close(ours, reference):
    for x, y in zip(ours, reference, strict=True):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 10
        # Matched by class and box, not by rank: scores closer than the rounding may swap.
        distance = torch.cdist(x.pred_boxes.tensor, y.pred_boxes.tensor)
        distance[x.pred_classes[:, None] != y.pred_classes[None]] = float("inf")
        match = distance.argmin(dim=1)
        assert len(match.unique()) == len(y)
        torch.testing.assert_close(x.scores, y.scores[match], rtol=0, atol=SCORE_ATOL)
        torch.testing.assert_close(
            x.pred_boxes.tensor, y.pred_boxes.tensor[match], rtol=0, atol=BOX_ATOL
        )


@pytest.mark.parametrize("backbone_norm", ["BN", "FrozenBN"])
def test_folded_inference_equals_unfolded(backbone_norm):
    folded, unfolded = _model(True, backbone_norm), _model(False, backbone_norm)
    keys = list(folded.state_dict())
    with torch.no_grad():
        ours, reference = folded(_images()), unfolded(_images())
        backbone, head = folded.inference_modules()
        assert unfolded.inference_modules() == (unfolded.backbone, unfolded.head)
    _assert_detections_close(ours, reference)
    assert backbone is not folded.backbone and head is not folded.head
    # Every batch norm folded, in the backbone and in the head's per-level ones.
    for module in (backbone, head):
        assert not any(isinstance(m, NORMS) for m in module.modules())
    _assert_dense_close(
        _dense_outputs(folded, backbone, head),
        _dense_outputs(unfolded, unfolded.backbone, unfolded.head),
    )
    # The copies share what is not folded, and are no part of the model's state.
    assert head.cls_score.weight is folded.head.cls_score.weight
    assert backbone.fpn_output3.weight is folded.backbone.fpn_output3.weight
    assert list(folded.state_dict()) == keys


def test_folded_copies_follow_the_weights():
    model = _model(fold=True)
    with torch.no_grad():
        model(_images())
        first = model.inference_modules()
        assert model.inference_modules() == first  # unchanged weights: the same copies
        # An in-place change (an optimizer step, load_state_dict) folds again.
        model.backbone.bottom_up.stem.conv1.norm.running_var.mul_(3.0)
        model.head.cls_subnet[1][2].running_mean.add_(0.5)
        backbone, head = model.inference_modules()
    assert backbone is not first[0] and head is not first[1]
    unfolded = copy.deepcopy(model)
    unfolded.fold_batch_norms = False
    _assert_dense_close(
        _dense_outputs(model, backbone, head),
        _dense_outputs(unfolded, unfolded.backbone, unfolded.head),
    )
    # With gradients, inference runs the model's own modules, so that they get gradients.
    with torch.enable_grad():
        assert model.inference_modules() == (model.backbone, model.head)
        scores = model(_images())[0]["instances"].scores
        scores.sum().backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad is not None
    # Every mode change drops the copies: changes autograd does not count (here a .data
    # edit) are folded at the next eval().
    model.train()
    assert model._folded is None
    assert model.inference_modules() == (model.backbone, model.head)
    model.eval()
    with torch.no_grad():
        stale = model.inference_modules()
        model.backbone.bottom_up.res3[0].conv1.norm.running_mean.data.add_(1.0)
        unfolded.backbone.bottom_up.res3[0].conv1.norm.running_mean.data.add_(1.0)
        assert model.inference_modules() == stale  # not counted: why eval() folds anew
        model.eval()
        backbone, head = model.inference_modules()
    assert backbone is not stale[0]
    _assert_dense_close(
        _dense_outputs(model, backbone, head),
        _dense_outputs(unfolded, unfolded.backbone, unfolded.head),
    )
    # Copies and pickles leave the cache out.
    assert copy.deepcopy(model)._folded is None


def test_forward_hooks_see_the_models_own_modules():
    model = _model(fold=True)
    calls = []
    with torch.no_grad():
        model(_images())  # folded
        stem = model.backbone.bottom_up.stem
        handle = stem.register_forward_hook(lambda *args: calls.append(1))
        assert model.inference_modules() == (model.backbone, model.head)
        model(_images())
        assert len(calls) == 1
        handle.remove()
        assert model.inference_modules()[0] is not model.backbone


def _packed_convolutions(module):
    """The packing forwards of the module's convolutions, the head's per-level ones included."""
    forwards = [m.forward for m in module.modules() if isinstance(m, nn.Conv2d)]
    for m in module.modules():
        forwards += getattr(m, "level_forwards", [])
    return [f for f in forwards if isinstance(f, _PackedConvolution)]


@pytest.mark.parametrize("channels_last", ["on", "off"])
def test_packed_weights_give_the_same_detections(channels_last):
    opts = ["MODEL.FOCAL_RETINANET.CHANNELS_LAST", channels_last]
    packed = _model(True, "BN", *opts)
    unpacked = _model(True, "BN", *opts, "MODEL.FOCAL_RETINANET.PACK_CONV_WEIGHTS", False)
    small = [{"image": x["image"][:, :128, :160]} for x in _images()]
    with torch.no_grad():
        # Each shape is packed at its second call: 3 calls of 2 sizes run both paths.
        for images in (_images(), small, _images(), small, _images()):
            ours, reference = packed(images), unpacked(images)
            for x, y in zip(ours, reference, strict=True):
                x, y = x["instances"], y["instances"]
                assert len(x) == len(y) > 0
                # The same oneDNN kernel: bit for bit.
                assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
                assert torch.equal(x.scores, y.scores)
        copies = packed.inference_modules()
    assert _packed_convolutions(unpacked.inference_modules()[0]) == []
    convolutions = [c for m in copies for c in _packed_convolutions(m)]
    # R18 + FPN + the head: every convolution, the head's per level.
    assert len(convolutions) > 40
    conv = copies[0].bottom_up.res3[0].conv1.forward
    shapes_packed = [shape for shape, w in conv.packed.items() if w is not None]
    # NCHW feature maps run eager PyTorch's convolution: nothing packed.
    assert len(shapes_packed) == (2 if channels_last == "on" else 0)


def test_packed_weights_are_kept_for_the_last_shapes():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    packed = _PackedConvolution(conv, conv.weight.detach(), conv.bias.detach())
    sizes = [(5 + i, 7) for i in range(10)]
    with torch.no_grad():
        for calls in (sizes, sizes[-8:]):
            for size in calls:
                x = torch.randn(1, 4, *size).contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)
    # The last 8 shapes, each packed at its second call; the first 2 were dropped.
    assert [tuple(s[-2:]) for s in packed.packed] == sizes[-8:]
    assert all(w is not None for w in packed.packed.values())


@pytest.mark.parametrize("opts", [["MODEL.RETINANET.NORM", "GN", "MODEL.RESNETS.NORM", "GN"]])
def test_nothing_to_fold_keeps_the_modules(opts):
    model = build_model(demo_cfg(*opts, "MODEL.FOCAL_RETINANET.PACK_CONV_WEIGHTS", False)).eval()
    with torch.no_grad():
        assert model.inference_modules() == (model.backbone, model.head)
        # Packing still makes copies: their convolutions are packed, their norms unchanged.
        model.pack_conv_weights = True
        model.eval()  # drops the copies
        backbone, head = model.inference_modules()
    assert _packed_convolutions(backbone) and _packed_convolutions(head)
    assert any(isinstance(m, nn.GroupNorm) for m in backbone.modules())


RELUS = ("aten.relu.default", "aten.relu_.default")
RESIDUAL_CONVOLUTION = "mkldnn._convolution_pointwise.binary"


def test_relus_and_residual_additions_run_in_the_packed_convolutions():
    opts = ["MODEL.FOCAL_RETINANET.CHANNELS_LAST", "on"]
    packed = _model(True, "BN", *opts)
    unpacked = _model(True, "BN", *opts, "MODEL.FOCAL_RETINANET.PACK_CONV_WEIGHTS", False)
    with torch.no_grad():
        packed(_images())  # each shape is packed at its second call
        with OpCounter() as fused_ops:
            ours = packed(_images())
        with OpCounter() as eager_ops:
            reference = unpacked(_images())
    # R18: a stem and 8 residual blocks of 2 ReLUs; the head: NUM_CONVS per subnet and level;
    # FPN's P6 -> P7 starts with a ReLU (before its convolution: not fused).
    # The demo head's subnets: (convolution, batch norm, ReLU) x NUM_CONVS.
    head_relus = 2 * len(packed.head.cls_subnet) // 3 * 5
    assert sum(eager_ops.counts[op] for op in RELUS) == 1 + 8 * 2 + head_relus + 1
    assert sum(fused_ops.counts[op] for op in RELUS) == 1
    assert fused_ops.counts[RESIDUAL_CONVOLUTION] == 8
    assert eager_ops.counts[RESIDUAL_CONVOLUTION] == 0
    for x, y in zip(ours, reference, strict=True):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        # Post-ops add the same float32 values: bit for bit.
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_bottleneck_block_and_stem_fused_compute_detectron2s(stride):
    torch.manual_seed(0)
    stem = BasicStem(3, 16, norm="BN")
    block = BottleneckBlock(16, 32, bottleneck_channels=8, stride=stride, norm="BN")
    module = nn.Sequential(stem, block)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    module.eval()
    detectron2s = copy.deepcopy(module)
    x = torch.randn(2, 3, 40, 56, generator=g)
    with torch.no_grad():
        expected = detectron2s(x)
        fused = inference_copy(module.to(memory_format=torch.channels_last), pack_weights=True)
        # NCHW and channels-last inputs; each shape packs at its second call (the first runs
        # the eager fallbacks).
        for image in (x, x, x.contiguous(memory_format=torch.channels_last)):
            with OpCounter() as ops:
                out = fused(image)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert sum(ops.counts[op] for op in RELUS) == 0
    assert ops.counts[RESIDUAL_CONVOLUTION] == 1


# NNPACK's Winograd algorithm rounds differently from oneDNN's direct convolution: measured up
# to 2e-5 of the largest output per 256-channel convolution; on the demo model with a
# 256-channel FPN, P3's logits and deltas by 3e-6 of their largest value, boxes by 3e-5 px,
# scores by 1.2e-7 (within the folding tolerances above).
WINOGRAD_RTOL = 1e-4
WINOGRAD = "aten._nnpack_spatial_convolution.default"
needs_nnpack = pytest.mark.skipif(not torch._nnpack_available(), reason="torch without NNPACK")


@needs_nnpack
@pytest.mark.parametrize("relu", [False, True])
def test_winograd_convolutions_compute_the_convolution(relu):
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1)
    winograd = _PackedConvolution(conv, conv.weight.detach(), conv.bias.detach(), winograd=True)
    winograd.relu = relu
    x = torch.randn(2, 256, 40, 44)
    with torch.no_grad():
        expected = torch.relu(conv(x)) if relu else conv(x)
        for image in (x, x.contiguous(memory_format=torch.channels_last)):
            with OpCounter() as ops:
                out = winograd(image)
            assert ops.counts[WINOGRAD] == 2  # image by image
            error = (out - expected).abs().max().item()
            assert 0 < error <= WINOGRAD_RTOL * expected.abs().max().item()
        # Below 40 x 40 px, oneDNN's direct convolution.
        with OpCounter() as ops:
            winograd(x[..., :39, :40])
        assert ops.counts[WINOGRAD] == 0


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(128, 256, 3, padding=1),
        nn.Conv2d(256, 256, 3, padding=1, stride=2),
        nn.Conv2d(256, 256, 3, padding=2, dilation=2),
        nn.Conv2d(256, 256, 1),
        nn.Conv2d(256, 36, 3, padding=1),
        Conv2d(256, 256, 3, padding=1, activation=nn.ReLU()),
    ],
)
def test_winograd_only_for_wide_3x3_convolutions_of_stride_1(conv):
    winograd = _PackedConvolution(conv, conv.weight.detach(), conv.bias.detach(), winograd=True)
    with torch.no_grad(), OpCounter() as ops:
        out = winograd(torch.randn(1, conv.in_channels, 48, 48))
    assert ops.counts[WINOGRAD] == 0
    assert out.shape[1] == conv.out_channels


@needs_nnpack
def test_winograd_head_gives_the_same_detections():
    opts = ["MODEL.FPN.OUT_CHANNELS", 256]
    winograd = _model(True, "BN", *opts, "MODEL.FOCAL_RETINANET.WINOGRAD", "on")
    direct = _model(True, "BN", *opts, "MODEL.FOCAL_RETINANET.WINOGRAD", "off")
    g = torch.Generator().manual_seed(2)
    # Padded to 352 x 384: P3 is 44 x 48, P4 22 x 24.
    images = [
        {"image": torch.randint(0, 256, (3, h, w), generator=g).float()}
        for h, w in ((320, 384), (352, 320))
    ]
    with torch.no_grad():
        with OpCounter() as ops:
            ours = winograd(images)
        reference = direct(images)
    # P3 only, the head only (not FPN's 256-channel output convolution): per image, the
    # subnets' 2 x NUM_CONVS convolutions (the predictors have < 256 outputs here).
    assert ops.counts[WINOGRAD] == 2 * 2 * 2
    _assert_detections_close(ours, reference)
