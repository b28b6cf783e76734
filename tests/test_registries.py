"""Configs, registries (losses, heads), prior init and config validation."""

import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import Tensor

import focal_det2
from focal_det2 import FOCAL_CLS_LOSS_REGISTRY, FOCAL_HEAD_REGISTRY, build_cls_loss
from focal_det2.modeling import ClassificationLoss, check_focal_config

from helpers import demo_cfg

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
LOSS_NAMES = sorted(name for name, _ in FOCAL_CLS_LOSS_REGISTRY)


def load_cfg(path, *opts):
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    return cfg


def gn_demo_cfg(*opts):
    """
    The demo model with the paper's loss and a GroupNorm head (batch statistics of tiny batches
    are noise).
    """
    return demo_cfg("MODEL.RETINANET.NORM", "GN", *opts)


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for boxes in (
        [[10.0, 12.0, 50.0, 60.0], [70.0, 20.0, 120.0, 50.0]],
        [[30.0, 30.0, 90.0, 100.0]],
    ):
        instances = Instances((128, 128))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.randint(0, 10, (len(boxes),), generator=g)
        image = torch.randint(0, 256, (3, 128, 128), generator=g).float()
        batch.append({"image": image, "instances": instances})
    return batch


def test_defaults_reproduce_the_paper():
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    assert cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA == 0.25
    assert cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA == 2.0
    assert cfg.MODEL.RETINANET.PRIOR_PROB == 0.01
    assert cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME == "SigmoidFocalLoss"
    assert cfg.MODEL.FOCAL_RETINANET.HEAD_NAME == "FocalRetinaNetHead"
    assert cfg.DATASETS.INVALID_POLICY == "error"
    cfg = load_cfg(CONFIG_DIR / "retinanet_R50_FPN.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "FocalRetinaNet"
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.01, 90000)
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert cfg.MODEL.RETINANET.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert [len(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES] == [3] * 5
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0][1] == pytest.approx(32 * 2 ** (1 / 3))
    assert cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]


def test_registered_in_detectron2_and_own_registries():
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("FocalRetinaNet") is focal_det2.FocalRetinaNet
    assert {"focal_demo_train", "focal_demo_val"} <= set(DatasetCatalog.list())
    assert set(LOSS_NAMES) == {
        "SigmoidFocalLoss",
        "BalancedCrossEntropyLoss",
        "FocalStarLoss",
        "SoftmaxFocalLoss",
        "OhemCrossEntropyLoss",
    }
    assert "FocalRetinaNetHead" in {n for n, _ in FOCAL_HEAD_REGISTRY}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_merges_and_validates(path):
    cfg = load_cfg(path)
    check_focal_config(cfg)
    assert isinstance(build_cls_loss(cfg), ClassificationLoss)


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_each_loss_trains_with_finite_decreasing_loss(loss_name):
    torch.manual_seed(0)
    cfg = gn_demo_cfg("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", loss_name)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    batch = tiny_batch()
    losses = []
    with EventStorage(0) as storage:
        for _ in range(8):
            loss_dict = model(batch)
            total = sum(loss_dict.values())
            assert all(torch.isfinite(v) for v in loss_dict.values()), loss_dict
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            # Detectron2's EMA normaliser moves from 100 towards the number of positives in
            # these few steps: compare the summed (unnormalised) losses.
            normalizer = model.loss_normalizer
            cls_sum = loss_dict["loss_cls"] * (
                normalizer if model.cls_loss.normalize_by_num_foreground else 1.0
            )
            losses.append((cls_sum + loss_dict["loss_box_reg"] * normalizer).item())
            storage.step()
    assert losses[-1] < 0.9 * losses[0], losses
    # Inference turns the loss's logits into K class scores. Without a score threshold every
    # image has detections (at most 100 after NMS), each of a class in [0, K) with a score in
    # (0, 1].
    model.eval()
    model.test_score_thresh = 0.0
    with torch.no_grad():
        (output,) = model([{"image": batch[0]["image"]}])
    detections = output["instances"]
    assert 0 < len(detections) <= 100
    assert detections.pred_classes.min() >= 0 and detections.pred_classes.max() < 10
    assert (detections.scores > 0).all() and (detections.scores <= 1).all()


@pytest.mark.parametrize("prior, bias", [(0.01, -math.log(99)), (0.5, 0.0), (0.2, -math.log(4))])
def test_prior_probability_sets_classifier_bias(prior, bias):
    model = build_model(gn_demo_cfg("MODEL.RETINANET.PRIOR_PROB", prior))
    torch.testing.assert_close(model.head.cls_score.bias, torch.full((90,), bias))


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("prior", [0.01, 0.2])
def test_initial_scores_are_the_prior_for_every_loss(loss_name, prior):
    # At init the classifier's input contributes ~0 (weights N(0, 0.01)): the scores are those of
    # the bias. Sigmoid losses: each class pi; softmax: foreground pi in all, pi / K per class.
    torch.manual_seed(0)
    model = build_model(
        gn_demo_cfg(
            "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", loss_name, "MODEL.RETINANET.PRIOR_PROB", prior
        )
    )
    bias = model.head.cls_score.bias.detach().view(9, model.num_logits)
    scores = model.cls_loss.predict_scores(bias.double())
    per_class = prior / 10 if loss_name == "SoftmaxFocalLoss" else prior
    torch.testing.assert_close(scores, torch.full((9, 10), per_class, dtype=torch.float64))
    model.eval()
    with torch.no_grad():
        features = [torch.randn(1, 64, 2**i, 2**i) for i in range(5, 0, -1)]
        logits = model.head(features)[0][0]  # (1, A * L, 32, 32), P3
    per_anchor_logits = logits.view(9, model.num_logits, -1).transpose(1, 2)
    mean_score = model.cls_loss.predict_scores(per_anchor_logits).mean().item()
    assert abs(mean_score - per_class) < 0.15 * per_class


def test_softmax_loss_has_a_background_logit_and_gn_head_has_group_norm():
    model = build_model(gn_demo_cfg("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SoftmaxFocalLoss"))
    assert model.head.cls_score.out_channels == 9 * 11
    model = build_model(gn_demo_cfg("MODEL.RETINANET.NORM", "GN"))
    assert isinstance(model.head.cls_subnet[1], torch.nn.GroupNorm)


def test_user_registered_loss_is_used():
    @FOCAL_CLS_LOSS_REGISTRY.register()
    class SquaredLogitLoss(ClassificationLoss):
        def __init__(self, cfg):
            super().__init__()

        def per_anchor_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
            return logits.pow(2).sum(dim=1)

    try:
        model = build_model(gn_demo_cfg("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SquaredLogitLoss"))
        assert isinstance(model.cls_loss, SquaredLogitLoss)
        model.train()
        with EventStorage(0):
            assert model(tiny_batch())["loss_cls"] > 0
    finally:
        FOCAL_CLS_LOSS_REGISTRY._obj_map.pop("SquaredLogitLoss")


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", -1.0, ">= 0"),
        ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", 1.5, "[0, 1], or -1"),
        ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", -0.5, "[0, 1], or -1"),
        ("MODEL.RETINANET.PRIOR_PROB", 1.0, "(0, 1)"),
        ("MODEL.RETINANET.PRIOR_PROB", 0.0, "(0, 1)"),
        ("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "Nope", "SigmoidFocalLoss"),
        ("MODEL.FOCAL_RETINANET.HEAD_NAME", "Nope", "FocalRetinaNetHead"),
        # A head removed from the registry names its replacement.
        ("MODEL.FOCAL_RETINANET.HEAD_NAME", "FocalRetinaNetGNHead", 'MODEL.RETINANET.NORM "GN"'),
        ("MODEL.FOCAL_RETINANET.OHEM.BATCH_SIZE_PER_IMAGE", 0, "> 0"),
        ("MODEL.FOCAL_RETINANET.OHEM.NMS_THRESH", 1.5, "(0, 1]"),
        ("MODEL.FOCAL_RETINANET.OHEM.FG_FRACTION", 0.0, "(0, 1], or -1"),
        ("MODEL.FOCAL_RETINANET.DIAGNOSTICS_PERIOD", -1, ">= 0"),
    ],
)
def test_invalid_config_raises_naming_key_and_allowed_values(key, value, allowed):
    cfg = gn_demo_cfg(key, value)
    with pytest.raises(ValueError) as error:
        build_model(cfg)
    assert key in str(error.value) and allowed in str(error.value)


def test_focal_star_needs_positive_gamma():
    cfg = gn_demo_cfg(
        "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME",
        "FocalStarLoss",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
        0.0,
    )
    with pytest.raises(ValueError, match="MODEL.RETINANET.FOCAL_LOSS_GAMMA"):
        build_model(cfg)
