"""
Training on one's own data: per-class alpha from the config (given or from the class
frequencies), the config lint, the anchor coverage report and images without annotations.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_anchor_generator, build_backbone, build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage

from focal_det2 import check_config
from focal_det2.anchor_coverage import anchor_coverage, best_anchor_iou, best_grid_anchor_iou
from focal_det2.anchor_coverage import main as anchor_coverage_main
from focal_det2.config import load_config
from focal_det2.data import register_coco_datasets
from focal_det2.lint import ConfigLintError
from focal_det2.modeling._fused_focal_loss import DISABLE_COMPILE_ENV
from focal_det2.modeling.class_alpha import alpha_from_frequency
from focal_det2.modeling.losses import (
    SoftmaxFocalLoss,
    build_cls_loss,
    focal_star_loss,
    sigmoid_focal_loss_with_labels,
    softmax_focal_loss,
)

from helpers import DEMO_CONFIG, SIZE_128, TRAIN_AT_256, demo_cfg, run_train_net, tiny_args

ALPHA_LOSSES = ["SigmoidFocalLoss", "BalancedCrossEntropyLoss", "FocalStarLoss", "SoftmaxFocalLoss"]


@pytest.fixture(autouse=True)
def _seed_and_eager_loss(monkeypatch):
    # The eager fused loss (here and in train_net.py runs): the compiled kernel has its tests.
    monkeypatch.setenv(DISABLE_COMPILE_ENV, "1")
    torch.manual_seed(0)


def _register(name, records, thing_classes):
    """Register in-memory records (XYWH boxes) as a dataset of ``thing_classes``."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(thing_classes))


def _records_with_counts(counts):
    """One 64 x 64 image per instance, its class given by ``counts`` (instances per class)."""
    records = []
    for class_id, count in enumerate(counts):
        for _ in range(count):
            annotation = {"bbox": [8, 8, 16, 16], "bbox_mode": BoxMode.XYWH_ABS}
            records.append(
                {
                    "file_name": f"{len(records)}.jpg",
                    "height": 64,
                    "width": 64,
                    "annotations": [{**annotation, "category_id": class_id}],
                }
            )
    # A crowd annotation is not an instance.
    records[0]["annotations"].append(
        {"bbox": [0, 0, 8, 8], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "iscrowd": 1}
    )
    return records


# ----- per-class alpha ----------------------------------------------------------------------


def test_alpha_from_frequency_formula():
    counts = [80, 40, 20, 10, 0]
    alpha = alpha_from_frequency(counts, 0.25, 1.0)
    # median 20: odds alpha_k / (1 - alpha_k) = (1/3) * 20 / n_k, n_k at least 1.
    odds = np.array([1 / 12, 1 / 6, 1 / 3, 2 / 3, 20 / 3])
    expected = np.clip(odds / (1 + odds), 0.01, 0.99)
    np.testing.assert_allclose(alpha.numpy(), expected, rtol=1e-6)
    assert alpha[2] == pytest.approx(0.25)  # the median class keeps the paper's alpha
    torch.testing.assert_close(alpha_from_frequency(counts, 0.25, 0.0), torch.full((5,), 0.25))
    # Clipped: a class absent from the data still keeps some weight on its negatives.
    assert alpha_from_frequency([1000, 1000, 0], 0.5, 3.0)[2] == pytest.approx(0.99)


@pytest.mark.parametrize("name", ALPHA_LOSSES)
def test_each_loss_takes_the_per_class_alpha_of_the_config(name):
    class_alpha = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.25]
    loss = build_cls_loss(
        demo_cfg(
            "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME",
            name,
            "MODEL.FOCAL_RETINANET.CLASS_ALPHA",
            class_alpha,
        )
    )
    alpha = torch.tensor(class_alpha)
    torch.testing.assert_close(loss.alpha, alpha)
    # A non-persistent buffer: it follows the module, and the state dict keeps its keys.
    assert "alpha" in dict(loss.named_buffers()) and "alpha" not in loss.state_dict()

    n = 50
    logits = torch.randn(2, n, loss.num_logits(10), dtype=torch.float64)
    labels = torch.randint(-1, 11, (2, n))
    value = loss(logits, labels, torch.zeros(n, 4))
    valid = labels >= 0
    x, y = logits[valid], labels[valid]
    if name == "SoftmaxFocalLoss":
        expected = softmax_focal_loss(x, y, alpha, 2.0, "sum")
    elif name == "FocalStarLoss":
        targets = torch.nn.functional.one_hot(y, 11)[:, :-1].double()
        expected = focal_star_loss(x, targets, alpha, 2.0, 1.0, "sum")
    else:
        gamma = 0.0 if name == "BalancedCrossEntropyLoss" else 2.0
        # Reference: one scalar-alpha loss per class column (label 0 positive, 1 background).
        expected = sum(
            sigmoid_focal_loss_with_labels(
                x[:, k : k + 1], torch.where(y == k, 0, 1), float(alpha[k]), gamma, "sum"
            )
            for k in range(10)
        )
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ALPHA_LOSSES)
def test_equal_per_class_alphas_are_the_scalar_alpha(name):
    scalar = build_cls_loss(demo_cfg("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", name))
    per_class = build_cls_loss(
        demo_cfg(
            "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME",
            name,
            "MODEL.FOCAL_RETINANET.CLASS_ALPHA",
            [0.25] * 10,
        )
    )
    logits = torch.randn(2, 40, scalar.num_logits(10))
    labels = torch.randint(-1, 11, (2, 40))
    anchors = torch.zeros(40, 4)
    torch.testing.assert_close(per_class(logits, labels, anchors), scalar(logits, labels, anchors))


def test_class_alpha_from_frequency_counts_the_training_sets(caplog):
    records, loads = _records_with_counts([8, 4, 2, 1]), []
    _register("alpha_counts", records, ["cat", "dog", "owl", "yak"])
    DatasetCatalog.remove("alpha_counts")
    DatasetCatalog.register("alpha_counts", lambda: loads.append(1) or records)
    cfg = demo_cfg(
        "DATASETS.TRAIN",
        "('alpha_counts',)",
        "MODEL.RETINANET.NUM_CLASSES",
        "4",
        "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY",
        "0.5",
    )
    with caplog.at_level(logging.INFO, logger="focal_det2"):
        loss = build_model(cfg).cls_loss
    torch.testing.assert_close(loss.alpha, alpha_from_frequency([8, 4, 2, 1], 0.25, 0.5))
    assert loss.alpha[3] > loss.alpha[2] > 0.25 > loss.alpha[0]
    # The model builds its loss twice (the head asks it for its logits): loaded and logged once,
    # with the class names.
    assert len(loads) == 1 and caplog.text.count("Per-class alpha") == 1
    for line in ("cat: alpha 0.1", "yak: alpha 0.3", "(1 instances)"):
        assert line in caplog.text


def test_model_without_its_training_sets_still_builds_with_the_scalar_alpha(caplog):
    cfg = demo_cfg(
        "DATASETS.TRAIN",
        "('not_registered_here',)",
        "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY",
        "1.0",
    )
    with caplog.at_level(logging.INFO, logger="focal_det2"):
        model = build_model(cfg)
    assert model.cls_loss.alpha == 0.25 and "no effect on inference" in caplog.text
    reference = build_model(demo_cfg("MODEL.FOCAL_RETINANET.CLASS_ALPHA", [0.3] * 10))
    assert list(model.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize(
    "opts, message",
    [
        (("MODEL.FOCAL_RETINANET.CLASS_ALPHA", [0.25] * 9), "has 9 values for"),
        (("MODEL.FOCAL_RETINANET.CLASS_ALPHA", [0.25] * 9 + [1.5]), "1.5 is not in"),
        (
            (
                "MODEL.FOCAL_RETINANET.CLASS_ALPHA",
                [0.25] * 10,
                "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY",
                1.0,
            ),
            "both set",
        ),
        (("MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY", -1.0), ">= 0"),
        (
            (
                "MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY",
                1.0,
                "MODEL.RETINANET.FOCAL_LOSS_ALPHA",
                -1.0,
            ),
            "needs it in",
        ),
    ],
)
def test_bad_per_class_alpha_config_names_the_key(opts, message):
    cfg = demo_cfg(*opts)
    with pytest.raises(ValueError, match=message):
        build_cls_loss(cfg)
    with pytest.raises(ConfigLintError, match=message):
        check_config(cfg)


# ----- config lint --------------------------------------------------------------------------


@pytest.fixture
def tiny_registered(tiny_coco):
    register_coco_datasets([("own_tiny_train", *tiny_coco["train"])])
    return "own_tiny_train"


def test_lint_accepts_the_demo_config(tiny_registered):
    assert check_config(demo_cfg("DATASETS.TRAIN", f"('{tiny_registered}',)")) == []


def test_lint_num_classes_of_the_data_and_ignored_keys(tiny_registered, caplog):
    cfg = demo_cfg(
        "DATASETS.TRAIN",
        f"('{tiny_registered}',)",
        "MODEL.RETINANET.NUM_CLASSES",
        "80",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "10",
        "MODEL.RPN.NMS_THRESH",
        "0.6",
    )
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigLintError) as error:
        check_config(cfg)
    assert str(error.value) == (
        "MODEL.RETINANET.NUM_CLASSES is 80 but the training dataset(s) 'own_tiny_train' have "
        "10 classes (thing_classes): set MODEL.RETINANET.NUM_CLASSES 10."
    )
    assert (
        "MODEL.ROI_HEADS.NUM_CLASSES = 10 is set, but RetinaNet ignores MODEL.ROI_HEADS.*; "
        "set MODEL.RETINANET.NUM_CLASSES instead." in caplog.text
    )
    assert "MODEL.RPN.NMS_THRESH = 0.6 is set, but RetinaNet ignores MODEL.RPN.*." in caplog.text

    cfg.MODEL.RETINANET.NUM_CLASSES = 10
    warnings = check_config(cfg)
    assert [w.split(" =")[0] for w in warnings] == [
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "MODEL.RPN.NMS_THRESH",
    ]
    cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME = "OhemCrossEntropyLoss"
    cfg.MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY = 1.0
    assert "OhemCrossEntropyLoss has no alpha" in check_config(cfg)[-1]


def test_lint_datasets_of_different_class_counts(tiny_registered):
    _register("three_classes", [], ["a", "b", "c"])
    cfg = demo_cfg("DATASETS.TRAIN", f"('{tiny_registered}', 'three_classes')")
    with pytest.raises(ConfigLintError, match="'own_tiny_train': 10, 'three_classes': 3"):
        check_config(cfg)
    with pytest.raises(ConfigLintError, match="'nowhere', which is not a registered dataset"):
        check_config(demo_cfg("DATASETS.TRAIN", "('nowhere',)"))


def test_train_net_stops_on_the_num_classes_trap(tiny_coco, tmp_path):
    out = tmp_path / "out"
    result = run_train_net(
        *tiny_args(
            tiny_coco, out, "MODEL.RETINANET.NUM_CLASSES", "80", "MODEL.ROI_HEADS.NUM_CLASSES", "10"
        )
    )
    assert result.returncode != 0
    assert "MODEL.RETINANET.NUM_CLASSES is 80 but the training dataset(s) 'tiny_train' have 10" in (
        result.stdout
    )
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 10 is set, but RetinaNet ignores" in result.stdout
    assert not out.exists()


# ----- anchor coverage ----------------------------------------------------------------------

# One anchor per level, square: 16 px on P3 (stride 8), 32 on P4 (stride 16), ...
ONE_ANCHOR = (
    "MODEL.ANCHOR_GENERATOR.SIZES",
    "[[16], [32], [64], [128], [256]]",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "[[1.0]]",
)


def _box(cx, cy, w, h):
    return {"bbox": [cx - w / 2, cy - h / 2, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}


def _hand_made_coverage(*opts):
    """Boxes of known best IoUs with the ONE_ANCHOR anchors (centres on multiples of the stride)."""
    records = [
        {
            "file_name": "a.jpg",
            "height": 256,
            "width": 256,
            "annotations": [
                _box(64, 64, 16, 16),  # the 16 px anchor at (64, 64): IoU 1
                _box(64, 64, 16, 12),  # 192 / 256 = 0.75
                _box(68, 64, 16, 16),  # 4 px off every P3 centre: 192 / 320 = 0.6
                _box(128, 128, 40, 40),  # the 32 px anchor: 1024 / 1600 = 0.64
                _box(64, 64, 8, 8),  # 64 / 256 = 0.25: below 0.5
                _box(64, 64, 6, 6),  # 36 / 256 = 0.140625
            ],
        },
        # Resized from 512 to 256 px: a 32 px box at (128, 128) becomes the 16 px anchor at 64.
        {
            "file_name": "b.jpg",
            "height": 512,
            "width": 512,
            "annotations": [_box(128, 128, 32, 32)],
        },
        {"file_name": "c.jpg", "height": 256, "width": 256, "annotations": []},
    ]
    _register("hand_made", records, ["thing"])
    cfg = demo_cfg(
        "DATASETS.TRAIN",
        "('hand_made',)",
        "MODEL.RETINANET.NUM_CLASSES",
        "1",
        *ONE_ANCHOR,
        *TRAIN_AT_256,
        *opts,
    )
    return anchor_coverage(cfg)


def test_anchor_coverage_of_boxes_with_known_ious():
    report = _hand_made_coverage()
    np.testing.assert_allclose(
        report.best_iou, [1.0, 0.75, 0.6, 0.64, 0.25, 0.140625, 1.0], rtol=1e-6
    )
    np.testing.assert_allclose(report.sqrt_area, [16, math.sqrt(192), 16, 40, 8, 6, 16], rtol=1e-6)
    count, matched, low, never = report.shares()
    assert (count, matched, low, never) == (7, 5 / 7, 2 / 7, 0.0)
    rows = dict(report.rows())
    assert rows["size 0-8 px"] == (1, 0.0, 1.0, 0.0)
    assert rows["size 8-16 px"] == (2, 0.5, 0.5, 0.0)  # sqrt(192) and the 8 px box
    assert rows["size 16-32 px"] == (3, 1.0, 0.0, 0.0)
    assert "| all | 7 | 71.4% | 28.6% | 0.0% |" in report.table()
    assert report.summary().startswith(
        "anchor coverage of 7 training boxes: 71.4% matched at IoU >= 0.5, 28.6% only by the "
        "low-quality rule, 0.0% never"
    )
    # 28.6% without an anchor at the threshold: poor, so a suggestion.
    assert report.suggestion().startswith("28.6% of the boxes have no anchor at IoU >= 0.5")

    # Without Detectron2's low-quality rule those boxes get no anchor; a higher threshold moves
    # the 0.6 and 0.64 boxes below it.
    strict = _hand_made_coverage(
        "MODEL.FOCAL_RETINANET.ALLOW_LOW_QUALITY_MATCHES", "False",
        "MODEL.RETINANET.IOU_THRESHOLDS", "[0.4, 0.7]",
    )  # fmt: skip
    assert strict.shares() == (7, 3 / 7, 0.0, 4 / 7)


def test_anchor_coverage_counts_each_training_size():
    # At 512 px every box and anchor doubles (the anchors one level up) except where no anchor
    # half the size exists: the 8 px box becomes the 16 px anchor, the 6 px one 144 / 256 of it.
    report = _hand_made_coverage(
        "INPUT.MIN_SIZE_TRAIN", "(256, 512)", "INPUT.MAX_SIZE_TRAIN", "512"
    )
    np.testing.assert_allclose(
        np.sort(report.best_iou),
        np.sort(
            [1.0, 0.75, 0.6, 0.64, 0.25, 0.140625, 1.0] + [1.0, 0.75, 0.6, 0.64, 1.0, 0.5625, 1.0]
        ),
        rtol=1e-6,
    )


def test_grid_search_of_the_best_anchor_equals_all_anchors():
    cfg = demo_cfg("MODEL.ANCHOR_GENERATOR.OFFSET", "0.5")
    backbone = build_backbone(cfg)
    shapes = [backbone.output_shape()[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
    generator = build_anchor_generator(cfg, shapes)
    g = torch.Generator().manual_seed(0)
    # Boxes of 1-150 px, some reaching past the image, some far outside the anchors' range.
    xy = torch.rand(2000, 2, generator=g) * 400 - 60
    boxes = torch.cat([xy, xy + torch.exp(torch.rand(2000, 2, generator=g) * 5)], dim=1)
    for height, width in [(256, 256), (384, 128)]:
        grids = [(-(-height // s.stride), -(-width // s.stride)) for s in shapes]
        anchors = Boxes.cat(generator([torch.empty(1, 0, h, w) for h, w in grids])).tensor
        torch.testing.assert_close(
            best_grid_anchor_iou(boxes, generator, grids),
            best_anchor_iou(boxes, anchors),
            rtol=0,
            atol=1e-5,
        )


def test_anchor_coverage_command_writes_the_table_and_png(tmp_path, capsys):
    _hand_made_coverage()  # registers "hand_made"
    anchor_coverage_main(
        [
            "--config-file",
            str(DEMO_CONFIG),
            "--output",
            str(tmp_path),
            "DATASETS.TRAIN",
            "('hand_made',)",
            "MODEL.RETINANET.NUM_CLASSES",
            "1",
            *ONE_ANCHOR,
            *TRAIN_AT_256,
        ]
    )
    printed = capsys.readouterr().out
    assert "| size 16-32 px | 3 | 100.0% | 0.0% | 0.0% |" in printed
    assert "try MODEL.ANCHOR_GENERATOR.SIZES" in printed
    assert (tmp_path / "anchor_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- images without annotations -----------------------------------------------------------


def test_negative_images_give_only_background_loss():
    cfg = demo_cfg("MODEL.RETINANET.NUM_CLASSES", "10")
    model = build_model(cfg)
    model.train()
    batch = [
        {
            "image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
            "instances": Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)),
                                   gt_classes=torch.zeros(0, dtype=torch.int64)),
        }
        for _ in range(2)
    ]  # fmt: skip
    with EventStorage():
        losses = model(batch)
    assert losses["loss_box_reg"].item() == 0
    assert losses["loss_cls"].item() > 0 and math.isfinite(losses["loss_cls"].item())
    sum(losses.values()).backward()
    assert model.head.cls_score.weight.grad.abs().sum() > 0


def test_training_keeps_negative_images_when_asked(tiny_coco, tmp_path):
    json_file, image_root = tiny_coco["train"]
    data = json.loads(open(json_file).read())
    negatives = {image["id"] for image in data["images"][:6]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in negatives]
    with_negatives = tmp_path / "with_negatives.json"
    with_negatives.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = tiny_args(
        {"train": (str(with_negatives), image_root), "val": tiny_coco["val"]},
        out,
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
        "False",
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "4",
        *SIZE_128,
        "TEST.EVAL_PERIOD",
        "0",
    )
    result = run_train_net(*args)
    assert result.returncode == 0, result.stdout[-3000:]
    # Detectron2 keeps the 6 images without annotations (it would log "Removed 6 images").
    assert "Removed 6 images with no usable annotations" not in result.stdout
    assert "anchor coverage of" in result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all(math.isfinite(m["loss_cls"]) for m in metrics if "loss_cls" in m)


# ----- the demo's softmax classifier --------------------------------------------------------


def test_demo_config_trains_the_softmax_focal_loss():
    cfg = load_config(str(DEMO_CONFIG), ["MODEL.FOCAL_RETINANET.DIAGNOSTICS_PERIOD", "0"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model.cls_loss, SoftmaxFocalLoss)
    # K + 1 logits per anchor: 10 digits and background.
    assert model.head.cls_score.out_channels == 9 * 11
    instances = Instances(
        (128, 128),
        gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 64.0, 110.0, 120.0]])),
        gt_classes=torch.tensor([8, 3]),
    )
    g = torch.Generator().manual_seed(0)
    batch = [
        {"image": torch.randint(0, 255, (3, 128, 128), generator=g), "instances": instances}
        for _ in range(2)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cls_losses = []
    with EventStorage():
        for _ in range(30):
            losses = model(batch)
            cls_losses.append(losses["loss_cls"].item())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    assert all(math.isfinite(loss) for loss in cls_losses)
    assert cls_losses[-1] < 0.5 * cls_losses[0], cls_losses
