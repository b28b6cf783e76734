"""FocalRetinaNet at default config is Detectron2's RetinaNet: weights, losses, grads, outputs."""

import copy
import math

import numpy as np
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator, RotatedAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.retinanet import RetinaNet, permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import focal_det2
from focal_det2 import FocalRetinaNet
from focal_det2.modeling import postprocess
from focal_det2.modeling.losses import build_cls_loss
from focal_det2.modeling.postprocess import GridAnchors, dense_detections

from helpers import demo_cfg

# float32 sums of ~10^5 terms in a different order: relative differences of a few 1e-6.
LOSS_RTOL = 1e-5
# Gradients: max abs difference relative to the largest gradient of the same parameter.
GRAD_RTOL = 1e-4
GRAD_ATOL = 1e-7
BOX_ATOL = 1e-3
SCORE_ATOL = 1e-6


def d2_retinanet_cfg(norm=""):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RETINANET.NORM = norm
    # Small inputs keep the test fast; parity does not depend on the size.
    cfg.INPUT.MIN_SIZE_TEST = 160
    return cfg


def build_pair(norm="", channels_last=True, box_reg_loss_type="smooth_l1"):
    """
    Detectron2's RetinaNet and a FocalRetinaNet holding the same weights in the same memory
    format (``MODEL.FOCAL_RETINANET.CHANNELS_LAST``).
    """
    torch.manual_seed(0)
    cfg = d2_retinanet_cfg(norm)
    cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = box_reg_loss_type
    reference = build_model(cfg)
    if channels_last:
        reference.to(memory_format=torch.channels_last)
    cfg = cfg.clone()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.FOCAL_RETINANET.CHANNELS_LAST = "on" if channels_last else "off"
    # Detectron2's computation, bit for bit; folding is tested in tests/test_folding.py.
    cfg.MODEL.FOCAL_RETINANET.FOLD_BATCH_NORMS = False
    ours = build_model(cfg)
    assert type(reference) is RetinaNet and type(ours) is FocalRetinaNet
    with torch.no_grad():
        # Make the classifier confident somewhere, so that inference returns detections.
        reference.head.cls_score.weight.normal_(0, 0.05)
        reference.head.cls_score.bias.fill_(-2.0)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def make_batch():
    g = torch.Generator().manual_seed(1)
    sizes = [(160, 224), (128, 96), (96, 160)]
    boxes = [
        torch.tensor([[10.0, 20.0, 90.0, 120.0], [100.0, 30.0, 200.0, 70.0], [5, 5, 40, 30]]),
        torch.zeros((0, 4)),  # an image without objects
        torch.tensor([[30.0, 10.0, 60.0, 70.0]]),
    ]
    batch = []
    for (h, w), b in zip(sizes, boxes):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(b)
        inst.gt_classes = torch.randint(0, 80, (len(b),), generator=g)
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


@pytest.mark.parametrize("norm", ["", "GN"])
def test_state_dict_keys_shapes_and_strict_load_both_ways(norm):
    reference, ours = build_pair(norm)
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in ref_sd.items()} == {k: v.shape for k, v in our_sd.items()}
    reference.load_state_dict(our_sd, strict=True)


def losses_and_grads(model, batch):
    model.train()
    model.zero_grad()
    with EventStorage(0):
        losses = model(copy.deepcopy(batch))
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("norm", ["", "GN"])
def test_losses_and_gradients_match_detectron2(norm, channels_last):
    reference, ours = build_pair(norm, channels_last)
    batch = make_batch()
    ref_losses, ref_grads = losses_and_grads(reference, batch)
    our_losses, our_grads = losses_and_grads(ours, batch)
    assert set(our_losses) == {"loss_cls", "loss_box_reg"} == set(ref_losses)
    for key in ref_losses:
        torch.testing.assert_close(our_losses[key], ref_losses[key], rtol=LOSS_RTOL, atol=0)
    assert ref_losses["loss_cls"] > 0 and ref_losses["loss_box_reg"] > 0
    assert set(our_grads) == set(ref_grads) and len(ref_grads) > 50
    for name, grad in ref_grads.items():
        error = (our_grads[name] - grad).abs().max().item()
        assert error <= GRAD_RTOL * grad.abs().max().item() + GRAD_ATOL, (name, error)


@pytest.mark.parametrize("box_reg_loss_type", ["giou", "diou", "ciou"])
def test_iou_box_losses_match_detectron2(box_reg_loss_type):
    # Ours decodes the foreground anchors only; Detectron2 decodes all and masks afterwards.
    reference, ours = build_pair(box_reg_loss_type=box_reg_loss_type)
    batch = make_batch()
    ref_losses, ref_grads = losses_and_grads(reference, batch)
    our_losses, our_grads = losses_and_grads(ours, batch)
    assert ref_losses["loss_box_reg"] > 0
    torch.testing.assert_close(
        our_losses["loss_box_reg"], ref_losses["loss_box_reg"], rtol=LOSS_RTOL, atol=0
    )
    for name in ("head.bbox_pred.weight", "head.bbox_pred.bias"):
        error = (our_grads[name] - ref_grads[name]).abs().max().item()
        assert error <= GRAD_RTOL * ref_grads[name].abs().max().item() + GRAD_ATOL, (name, error)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_dense_predictions_are_transposed_as_detectron2_does(memory_format):
    _, ours = build_pair()
    g = torch.Generator().manual_seed(3)
    predictions = [
        [
            torch.randn(2, 9 * dim, h, w, generator=g).contiguous(memory_format=memory_format)
            for h, w in ((6, 5), (3, 3))
        ]
        for dim in (80, 4)
    ]
    transposed = ours._transpose_dense_predictions(predictions, [80, 4])
    for ours_maps, maps, dim in zip(transposed, predictions, (80, 4), strict=True):
        for x, y in zip(ours_maps, maps, strict=True):
            assert torch.equal(x, permute_to_N_HWA_K(y, dim))


def test_channels_last_is_only_a_memory_format():
    """
    CHANNELS_LAST changes no value: in float64 (where summation order does not
    matter) the losses and gradients equal those of the contiguous model. In float32 the
    gradients of this randomly initialised, unnormalised R50 differ from float64 by up to ~1%
    in either format, which is why the parity tests compare models of the same format.
    """
    _, ours = build_pair(channels_last=True)
    conv_weight = ours.backbone.bottom_up.stem.conv1.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv_weight.is_contiguous()
    ours.double()
    contiguous = copy.deepcopy(ours)
    contiguous.channels_last = {True: False, False: False}
    contiguous.train()
    assert ours.head.cls_score.weight.stride() != contiguous.head.cls_score.weight.stride()
    batch = make_batch()
    for x in batch:
        x["image"] = x["image"].double()
    (nhwc_losses, nhwc_grads), (nchw_losses, nchw_grads) = (
        losses_and_grads(ours, batch),
        losses_and_grads(contiguous, batch),
    )
    for key in nchw_losses:
        torch.testing.assert_close(nhwc_losses[key], nchw_losses[key], rtol=1e-12, atol=0)
    for name, grad in nchw_grads.items():
        error = (nhwc_grads[name] - grad).abs().max().item()
        assert error <= 1e-10 * grad.abs().max().item(), (name, error)


def spread_classifier(reference, ours, batch):
    """
    Classifier weights giving logits of about N(-4, 1.7) on ``batch``: thousands of candidates
    above the score threshold on each level (so that the per-level top-k selects) and
    unsaturated scores (saturated ones tie, and ties make the order arbitrary).
    """
    torch.manual_seed(2)
    cls_score = reference.head.cls_score
    with torch.no_grad():
        features = reference.backbone(reference.preprocess_image(batch).tensor)
        subnet = reference.head.cls_subnet(features[reference.head_in_features[0]])
        fan_in = cls_score.weight[0].numel()
        cls_score.weight.normal_(0, 1.7 / (subnet.pow(2).mean().sqrt().item() * fan_in**0.5))
        cls_score.bias.fill_(-4.0)
    ours.load_state_dict(reference.state_dict(), strict=True)


def canonical(instances):
    """Detections ordered by descending score, then class and box: the same set, one order."""
    boxes = instances.pred_boxes.tensor.numpy()
    order = np.lexsort((*boxes.T[::-1], instances.pred_classes.numpy(), -instances.scores.numpy()))
    return instances[torch.from_numpy(order)]


@pytest.mark.parametrize(
    "norm, batched", [("", True), ("GN", False)], ids=["one_batch", "GN-one_image_each"]
)
# The ways of the post-processing to the per-level top-k: every candidate kept (no image has
# more than TOPK_CANDIDATES_TEST), the top-k of the candidates above the threshold (few pass),
# the top-k of those above a bound raised from a sample of the pairs (many pass, as with an
# untrained model; here forced on every level).
@pytest.mark.parametrize(
    "topk, sampled_pairs_per_topk, raises_bounds",
    [(10**6, 64, False), (20, 10**9, False), (20, 0, True), (1000, 64, True)],
    ids=["all_kept", "topk_of_passing", "topk_above_sampled_bound", "default_topk"],
)
def test_detections_match_detectron2(
    norm, batched, topk, sampled_pairs_per_topk, raises_bounds, monkeypatch
):
    monkeypatch.setattr(postprocess, "_SAMPLED_PAIRS_PER_TOPK", sampled_pairs_per_topk)
    raised_bounds = []
    pairs_above_bounds = postprocess._pairs_above_bounds

    def recording_pairs_above_bounds(ranked, thresh, k):
        image, index = pairs_above_bounds(ranked, thresh, k)
        raised_bounds.append(len(index) < int((ranked > thresh).sum()))
        return image, index

    monkeypatch.setattr(postprocess, "_pairs_above_bounds", recording_pairs_above_bounds)
    reference, ours = build_pair(norm)
    reference.test_topk_candidates = ours.test_topk_candidates = topk
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in make_batch()]
    reference.eval()
    spread_classifier(reference, ours, batch)
    calls = [batch] if batched else [[x] for x in batch]
    outputs = []
    for model in (reference, ours):
        model.eval()
        with torch.no_grad():
            outputs.append([x["instances"] for call in calls for x in model(copy.deepcopy(call))])
    for ref, our in zip(*outputs):
        assert our.image_size == ref.image_size
        ref, our = canonical(ref), canonical(our)
        assert torch.equal(our.pred_classes, ref.pred_classes)
        # The same float32 operations on the same values: equal boxes, not only close. Scores
        # may differ in the last bit: Detectron2 takes the sigmoid of a whole level, we of the
        # candidates only, and the SIMD and scalar code of sigmoid round differently.
        torch.testing.assert_close(our.scores, ref.scores, rtol=2**-23, atol=0)
        assert torch.equal(our.pred_boxes.tensor, ref.pred_boxes.tensor)
        assert len(ref) > 0
    # Whether a level's bound was raised above the threshold (P3 at the default top-k).
    assert any(raised_bounds) == raises_bounds


def loss_named(name):
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME = name
    return build_cls_loss(cfg)


@pytest.mark.parametrize("thresh", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("name", ["SigmoidFocalLoss", "FocalStarLoss"])
def test_score_threshold_logit_lets_every_passing_score_through(name, thresh):
    # Every float32 logit within 1e5 ulps of the threshold, and far ones.
    loss = loss_named(name)
    x_t = loss.score_threshold_logit(thresh)
    exact = torch.tensor(x_t, dtype=torch.float32)
    logits = torch.cat(
        [exact + torch.arange(-100_000, 100_000) * 1e-7, torch.linspace(-30, 30, 10_001)]
    )
    passing = loss.predict_scores(logits) > thresh
    assert passing.any() and not passing.all()
    assert (logits[passing] > x_t).all()
    # The margin is small: a logit 1e-3 above the threshold passes.
    assert loss.predict_scores(torch.tensor(x_t + 1e-3)) > thresh


@pytest.mark.parametrize("name", ["SigmoidFocalLoss", "FocalStarLoss", "SoftmaxFocalLoss"])
def test_logit_threshold_detections_equal_scoring_every_anchor(name, monkeypatch):
    """dense_detections with the logit threshold returns what scoring every logit returns."""
    g = torch.Generator().manual_seed(0)
    loss = loss_named(name)
    num_images, num_classes = 2, 5
    sizes = [4000, 900, 60]  # anchors per level: the first one has more candidates than top-k
    logits = [
        torch.randn(num_images, r, loss.num_logits(num_classes), generator=g) * 2 - 2 for r in sizes
    ]
    deltas = [torch.randn(num_images, r, 4, generator=g) * 0.2 for r in sizes]
    anchors = []
    for r in sizes:
        xy = torch.rand(r, 2, generator=g) * 200
        anchors.append(torch.cat([xy, xy + 8 + torch.rand(r, 2, generator=g) * 60], dim=1))
    kwargs = dict(
        cls_loss=loss,
        box2box_transform=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)),
        score_thresh=0.05,
        topk_candidates=1000,
        nms_thresh=0.5,
        max_detections_per_image=100,
    )
    fast = dense_detections(logits, deltas, anchors, **kwargs)
    monkeypatch.setattr(type(loss), "score_threshold_logit", lambda self, t: None)
    monkeypatch.setattr(
        type(loss), "predict_candidate_scores", lambda self, x, t: self.predict_scores(x)
    )
    every = dense_detections(logits, deltas, anchors, **kwargs)
    for a, b in zip(fast, every):
        assert torch.equal(a, b)
    boxes, scores, classes, image = fast
    assert (torch.bincount(image, minlength=num_images) == 100).all()  # the cap was reached
    # Per image, by descending score.
    for i in range(num_images):
        assert (scores[image == i].diff() <= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("thresh", [0.0, 1e-3, 0.05, 0.5])
def test_softmax_candidate_scores_are_its_scores_wherever_they_pass(thresh, dtype):
    loss = loss_named("SoftmaxFocalLoss")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5000, 11, generator=g) * 3
    logits[0, :100] = 0.0  # every class at 1/11
    if thresh > 0:
        # Rows at the bound: class 0 at log(thresh) + d below a dominant background logit.
        d = torch.linspace(-2e-3, 4e-3, 1000)
        logits[1, :1000] = -30.0
        logits[1, :1000, 0] = math.log(thresh) + d
        logits[1, :1000, -1] = 0.0
    logits = logits.to(dtype)
    full = loss.predict_scores(logits)
    fast = loss.predict_candidate_scores(logits, thresh)
    passing = full > thresh
    assert passing.any() and (thresh == 0 or not passing.all())
    assert torch.equal(fast[passing], full[passing])
    assert (fast[~passing] <= thresh).all()
    # In float32, anchors that cannot pass are not scored; half precision scores every anchor.
    unscored = (fast == 0).all(dim=-1)
    assert unscored.any() == (thresh > 0 and dtype == torch.float32)


@pytest.mark.parametrize("layout", ["spread", "sampled_pairs_largest"])
def test_passing_pairs_are_the_top_k_above_the_threshold(layout):
    g = torch.Generator().manual_seed(0)
    k, thresh = 50, 0.0
    # About half of the pairs pass; the first two levels are large enough to be sampled; none
    # of the last one's.
    sampled = postprocess._SAMPLED_PAIRS_PER_TOPK * k
    levels = [torch.randn(2, n, generator=g) for n in (3 * sampled, sampled, 500)]
    levels.append(-1 - torch.rand(2, 300, generator=g))
    # Fewer than k pass, beside values just below the threshold.
    passing = torch.rand(2, 200, generator=g) < 0.1
    levels.append(
        torch.where(
            passing, 0.5 + torch.rand(2, 200, generator=g), -0.45 * torch.rand(2, 200, generator=g)
        )
    )
    if layout == "sampled_pairs_largest":
        # The sample then overestimates the bound: fewer than k pairs above it, so the
        # threshold itself must be used.
        for x in levels:
            x[:, :: postprocess._SAMPLE_STRIDE] += 10
    image, index, values = postprocess._passing_pairs(levels, thresh, k)
    expected, first_pair = set(), 0
    for x in levels:
        for i in range(len(x)):
            passing = (x[i] > thresh).nonzero()[:, 0]
            top = passing[x[i][passing].topk(min(k, len(passing))).indices]
            expected |= {(i, int(j) + first_pair, float(x[i][j])) for j in top}
        first_pair += x.shape[1]
    found = set(zip(image.tolist(), index.tolist(), values.tolist()))
    assert found == expected and len(values) == len(expected)
    # The exported graph's selection (no sampled bound, all levels at once), the same
    # candidates as (anchor, class) pairs of 5 classes, scored: the values as logits of scores
    # above 0.5, the anchors compared to a lower bound, as to a logit threshold's margin.
    # All levels, the last two, and one level alone.
    for first, last in ((0, len(levels)), (len(levels) - 2, len(levels)), (2, 3)):
        image, anchor, classes, scores = postprocess._top_k_pairs(
            [x.view(2, -1, 5) for x in levels[first:last]],
            thresh - 0.5,
            lambda x: x.double().sigmoid(),
            0.5,
            k,
        )
        first_pair = sum(x.shape[1] for x in levels[:first])
        end_pair = sum(x.shape[1] for x in levels[:last])
        index = anchor * 5 + classes + first_pair
        assert set(zip(image.tolist(), index.tolist())) == {
            (i, j) for i, j, _ in expected if first_pair <= j < end_pair
        }
        assert torch.equal(scores, torch.cat(levels, dim=1)[image, index].double().sigmoid())
    image, _ = postprocess._pairs_above_bounds(levels[0], thresh, k)
    counts = torch.bincount(image, minlength=2)
    assert (counts < (levels[0] > thresh).sum(1)).all() == (layout == "spread")
    assert (counts >= k).all()


@pytest.mark.parametrize(
    "offset, strides", [(0.0, [8, 16, 32, 64, 128]), (0.5, [8, 16, 32, 64, 128]), (0.3, [7, 13])]
)
def test_grid_anchors_are_the_generators_anchors_where_indexed(offset, strides):
    generator = DefaultAnchorGenerator(
        sizes=[[16 * 2**i, 20.16 * 2**i, 25.4 * 2**i] for i in range(len(strides))],
        aspect_ratios=[[0.5, 1.0, 2.0]],
        strides=strides,
        offset=offset,
    )
    g = torch.Generator().manual_seed(0)
    for height, width in [(37, 51), (1, 1), (100, 3)]:
        grid_sizes = [(max(1, height >> i), max(1, width >> i)) for i in range(len(strides))]
        features = [torch.zeros(1, 1, h, w) for h, w in grid_sizes]
        every = torch.cat([x.tensor for x in generator(features)])
        index = torch.cat([torch.arange(len(every)), torch.randint(len(every), (50,), generator=g)])
        assert torch.equal(GridAnchors(generator, grid_sizes)[index], every[index])
    with pytest.raises(TypeError, match="RotatedAnchorGenerator"):
        GridAnchors(
            RotatedAnchorGenerator(
                sizes=[[32]], aspect_ratios=[[1.0]], angles=[[0]], strides=[8], offset=0.0
            ),
            [(2, 2)],
        )


def test_exported_models_compute_the_anchors_of_the_candidates_only(monkeypatch):
    model = build_model(demo_cfg("MODEL.DEVICE", "cpu")).eval()
    features = [torch.zeros(1, 1, 40 >> i, 44 >> i) for i in range(5)]
    every = torch.cat([x.tensor for x in model.anchor_generator(features)])
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    anchors = model._inference_anchors(features)
    assert isinstance(anchors, GridAnchors)
    assert torch.equal(anchors[torch.arange(len(every))], every)

    class OwnGenerator(DefaultAnchorGenerator):
        pass

    # Another generator, even a subclass, may change the grid: all of its anchors.
    model.anchor_generator.__class__ = OwnGenerator
    anchors = model._inference_anchors(features)
    assert isinstance(anchors, list) and torch.equal(torch.cat(anchors), every)


def test_passing_pairs_beside_nan_samples_and_without_top_k():
    g = torch.Generator().manual_seed(0)
    k = 5
    ranked = torch.rand(2, postprocess._SAMPLED_PAIRS_PER_TOPK * k * 4, generator=g)
    # Image 0: NaN at every sampled pair, 20 pairs above the threshold; image 1 raises its bound.
    ranked[0] = 0.0
    ranked[0, :: postprocess._SAMPLE_STRIDE] = float("nan")
    ranked[0, 1:41:2] = 0.9
    image, index, values = postprocess._passing_pairs([ranked], 0.5, k)
    assert torch.bincount(image, minlength=2).tolist() == [k, k]
    assert (values[image == 0] == 0.9).all()
    assert (values[image == 1] >= ranked[1].topk(k).values[-1]).all()
    assert all(len(x) == 0 for x in postprocess._passing_pairs([ranked], 0.5, 0))


@pytest.mark.parametrize("crowding", ["few_suppressed", "most_suppressed"])
def test_capped_nms_is_the_cap_of_the_full_nms(crowding, monkeypatch):
    # Candidates spread over the image (NMS keeps most: the first NMS of the highest-scored
    # ones reaches the cap) or piled on a few places (it keeps few: the rest is needed).
    g = torch.Generator().manual_seed(0)
    num, cap = 600, 100
    spread = 400.0 if crowding == "few_suppressed" else 20.0
    xy = torch.rand(num, 2, generator=g) * spread
    boxes = torch.cat([xy, xy + 20 + torch.rand(num, 2, generator=g) * 20], dim=1)
    scores = torch.rand(num, generator=g)
    # Ties at the boundary of the first NMS (the 2 x cap-th highest score): all of them go in.
    scores[::7] = scores.sort(descending=True).values[2 * cap - 1]
    groups = torch.randint(0, 5, (num,), generator=g)
    full = postprocess._batched_nms(boxes, scores, groups, 0.5)
    first_calls = []
    original = postprocess._batched_nms
    monkeypatch.setattr(
        postprocess,
        "_batched_nms",
        lambda *args: first_calls.append(len(args[0])) or original(*args),
    )
    capped = postprocess._capped_nms(boxes, scores, groups, 0.5, cap)
    assert torch.equal(capped, full[:cap])
    # The first NMS saw the highest-scored 2 x cap candidates and those tied with them.
    assert first_calls[0] == int((scores >= scores.sort(descending=True).values[2 * cap - 1]).sum())
    assert 2 * cap < first_calls[0] < num
    assert len(first_calls) == (1 if crowding == "few_suppressed" else 2)
