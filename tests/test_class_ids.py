"""Ground-truth class ids outside the model's classes stop training with the id and the key."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from focal_det2.modeling.losses import FOCAL_CLS_LOSS_REGISTRY

from helpers import demo_cfg


def _model(num_classes: int, loss_name: str, diagnostics_period: int):
    cfg = demo_cfg(
        "MODEL.RETINANET.NUM_CLASSES",
        num_classes,
        "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME",
        loss_name,
        "MODEL.FOCAL_RETINANET.DIAGNOSTICS_PERIOD",
        diagnostics_period,
    )
    torch.manual_seed(0)
    return build_model(cfg).train()


def _batch(class_ids):
    instances = Instances((128, 128))
    boxes = [[8.0 + 20 * i, 10.0, 40.0 + 20 * i, 60.0] for i in range(len(class_ids))]
    instances.gt_boxes = Boxes(torch.tensor(boxes))
    instances.gt_classes = torch.tensor(class_ids)
    # Two images: BatchNorm needs more than one value per channel at P7 (1 x 1).
    return [{"image": torch.zeros(3, 128, 128), "instances": instances}] * 2


@pytest.mark.parametrize(
    "loss_name, diagnostics_period",
    [(name, 0) for name, _ in sorted(FOCAL_CLS_LOSS_REGISTRY)] + [("SigmoidFocalLoss", 1)],
)
def test_class_id_past_num_classes_is_an_error_naming_it(loss_name, diagnostics_period):
    model = _model(5, loss_name, diagnostics_period)
    with EventStorage(0), pytest.raises(ValueError) as error:
        model(_batch([1, 7, 3]))
    message = str(error.value)
    assert "class id 7" in message and "MODEL.RETINANET.NUM_CLASSES = 5" in message


def test_negative_class_id_is_an_error():
    model = _model(5, "SigmoidFocalLoss", 0)
    with EventStorage(0), pytest.raises(ValueError, match="class id -1"):
        model(_batch([1, -1]))


def test_class_ids_within_num_classes_train():
    model = _model(5, "SigmoidFocalLoss", 1)
    with EventStorage(0):
        losses = model(_batch([0, 4]))
    assert all(torch.isfinite(v) for v in losses.values())
