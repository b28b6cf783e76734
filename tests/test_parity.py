"""FocalRetinaNet at default config is Detectron2's RetinaNet: weights, losses, grads, outputs."""

import copy

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import focal_det2
from focal_det2 import FocalRetinaNet

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


def build_pair(norm=""):
    """Detectron2's RetinaNet and a FocalRetinaNet holding the same weights."""
    torch.manual_seed(0)
    cfg = d2_retinanet_cfg(norm)
    reference = build_model(cfg)
    cfg = cfg.clone()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
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


@pytest.mark.parametrize("norm", ["", "GN"])
def test_losses_and_gradients_match_detectron2(norm):
    reference, ours = build_pair(norm)
    batch = make_batch()
    results = []
    for model in (reference, ours):
        model.train()
        model.zero_grad()
        with EventStorage(0):
            losses = model(copy.deepcopy(batch))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (ref_losses, ref_grads), (our_losses, our_grads) = results
    assert set(our_losses) == {"loss_cls", "loss_box_reg"} == set(ref_losses)
    for key in ref_losses:
        torch.testing.assert_close(our_losses[key], ref_losses[key], rtol=LOSS_RTOL, atol=0)
    assert ref_losses["loss_cls"] > 0 and ref_losses["loss_box_reg"] > 0
    assert set(our_grads) == set(ref_grads) and len(ref_grads) > 50
    for name, grad in ref_grads.items():
        error = (our_grads[name] - grad).abs().max().item()
        assert error <= GRAD_RTOL * grad.abs().max().item() + GRAD_ATOL, (name, error)


def test_detections_match_detectron2():
    reference, ours = build_pair()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in make_batch()]
    outputs = []
    for model in (reference, ours):
        model.eval()
        with torch.no_grad():
            outputs.append([x["instances"] for x in model(copy.deepcopy(batch))])
    num_detections = 0
    for ref, our in zip(*outputs):
        assert our.image_size == ref.image_size
        assert torch.equal(our.pred_classes, ref.pred_classes)
        torch.testing.assert_close(our.scores, ref.scores, atol=SCORE_ATOL, rtol=0)
        torch.testing.assert_close(
            our.pred_boxes.tensor, ref.pred_boxes.tensor, atol=BOX_ATOL, rtol=0
        )
        num_detections += len(ref)
    assert num_detections > 0
