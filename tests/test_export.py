"""
The exported detector (ONNX in onnxruntime, and the torch.export program) gives the PyTorch
model's detections; OnnxPredictor gives DefaultPredictor's.
"""

import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from torch import nn
from torch.nn import functional as F

from focal_det2.config import load_config
from focal_det2.export import (
    OnnxPredictor,
    export_program,
    load_model,
    load_program,
    main,
    save_program,
)
from focal_det2.modeling.winograd import (
    graph_winograd_fits,
    use_graph_winograd,
    winograd_conv2d_graph,
)

from helpers import REPO, assert_close_to_largest, tiny_register_args

# Measured: boxes within 1e-4 px and scores within 1e-6 (ONNX), equal (ExportedProgram).
BOX_ATOL = 0.01
SCORE_ATOL = 1e-4
# The test size of the predictor: the graph takes sides >= MIN_SIDE.
TEST_SIZE = ("INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256")
# The tiny model of the export tests scores up to 0.11 on a grey image and up to 0.6 on the
# demo images: at 0.15 the grey image has no detection.
TINY_MODEL_TEST = (*TEST_SIZE, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.15")
# The example the parity tests' graphs are traced with: R18's 128-channel convolutions (res3,
# stride 8) see 11 x 12 4 x 4 tiles there, >= 128, so the graph runs them by Winograd (at every
# image size); the test images' own sizes would not.
WINOGRAD_EXAMPLE_SIZE = (352, 384)
# Winograd's F(4x4, 3x3) in the graph and the direct convolution round differently: measured
# within 1.5e-5 of the largest output (float32).
CONV_RTOL = 1e-4


def match_detections(ref, out):
    """
    Pair each reference detection (boxes (D, 4), scores (D,), classes (D,)) with an unused one
    of ``out`` of its class and nearest box; returns the largest box and score differences.
    The order may differ where scores differ by rounding only.
    """
    (ref_boxes, ref_scores, ref_classes), (boxes, scores, classes) = ref, out
    assert len(boxes) == len(ref_boxes) and len(scores) == len(classes) == len(boxes)
    assert sorted(classes.tolist()) == sorted(ref_classes.tolist())
    unused = torch.ones(len(boxes), dtype=torch.bool)
    box_error = score_error = 0.0
    for box, score, cls in zip(ref_boxes, ref_scores, ref_classes):
        error = (boxes - box).abs().amax(dim=1)
        error[(classes != cls) | ~unused] = float("inf")
        j = int(error.argmin())
        unused[j] = False
        box_error = max(box_error, error[j].item())
        score_error = max(score_error, abs(scores[j].item() - score.item()))
    return box_error, score_error


def pytorch_detections(model, image):
    with torch.no_grad():
        instances = model([{"image": image.float()}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def varied_images(tiny_coco):
    """24 uint8 (3, H, W) BGR images of different sizes from the demo val images, + grey."""
    json_file, image_root = tiny_coco["val"]
    files = [os.path.join(image_root, x["file_name"]) for x in json.load(open(json_file))["images"]]
    images = []
    for i, path in enumerate(files):
        image = read_image(path, format="BGR")  # 320 x 320
        h, w = 129 + 23 * i, 320 - 17 * i
        resized = T.ResizeTransform(320, 320, 400 - 31 * i, 140 + 29 * i).apply_image(image)
        for variant in (
            image[:, i * 11 :],
            image[:h, 320 - w :],
            resized,
            image[i * 9 :, : 200 + i * 20],
        ):
            images.append(torch.from_numpy(np.ascontiguousarray(variant.transpose(2, 0, 1))))
    assert len({tuple(x.shape) for x in images}) >= 20
    return images


@torch.no_grad()
def recompute_batch_norm_statistics(model, images):
    """
    The batch norms' statistics averaged over ``images``, as fvcore's ``update_bn_stats``
    does. After the tiny checkpoint's 20 iterations they are far from the features', and in
    eval mode scores saturate at 1.0: equal scores make which detections NMS and the cap keep
    depend on the candidates' order, in Detectron2 too, so they would not test parity.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    for image in images:
        features = model.backbone(model.preprocess_image([{"image": image.float()}]).tensor)
        model.head([features[f] for f in model.head_in_features])
    model.eval()


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tiny_coco, tmp_path_factory):
    """
    The trained tiny model (batch-norm statistics recomputed, saved as model_final.pth), its
    ONNX file and its ExportedProgram, and the test images.
    """
    out = tmp_path_factory.mktemp("exported")
    weights = str(tiny_checkpoint / "model_final.pth")
    cfg = load_config(
        str(tiny_checkpoint / "config.yaml"), ["MODEL.WEIGHTS", weights, *TINY_MODEL_TEST]
    )
    model = load_model(cfg)
    images = varied_images(tiny_coco)
    recompute_batch_norm_statistics(model, images)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(out / "model_final.pth")
    cfg.freeze()
    torch.save({"model": model.state_dict()}, cfg.MODEL.WEIGHTS)
    example = F.interpolate(images[0][None].float(), size=WINOGRAD_EXAMPLE_SIZE)
    program = export_program(model, example[0].round().to(torch.uint8), winograd=True)
    # Each Winograd convolution lays out its output tiles by one pixel shuffle.
    assert "pixel_shuffle" in str(program.graph)
    save_program(program, str(out / "model.onnx"), "onnx")
    save_program(program, str(out / "model.pt2"), "torch_export")
    return cfg, model, out, images


def test_onnx_and_exported_program_give_the_pytorch_detections(exported):
    import onnxruntime

    cfg, model, out, images = exported
    session = onnxruntime.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    program = load_program(str(out / "model.pt2")).module()
    grey = torch.full((3, 200, 300), 128, dtype=torch.uint8)
    num_detections = 0
    errors = {"onnx": [0.0, 0.0], "pt2": [0.0, 0.0]}
    for image in images + [grey]:
        ref = pytorch_detections(model, image)
        onnx_out = [torch.from_numpy(x) for x in session.run(None, {"image": image.numpy()})]
        assert onnx_out[2].dtype == torch.int64
        for name, result in (("onnx", onnx_out), ("pt2", program(image))):
            box_error, score_error = match_detections(ref, result)
            errors[name] = [max(errors[name][0], box_error), max(errors[name][1], score_error)]
        num_detections += len(ref[0])
        assert len(ref[1].unique()) == len(ref[1])  # no equal scores
    assert len(ref[0]) == 0  # the grey image: nothing, and no error
    assert num_detections > len(images)
    for name, (box_error, score_error) in errors.items():
        print(
            f"{name}: max box difference {box_error:.2e} px, max score difference {score_error:.2e}"
        )
        assert box_error <= BOX_ATOL and score_error <= SCORE_ATOL, name


def test_onnx_predictor_gives_default_predictor_detections(exported):
    cfg, model, out, images = exported
    reference = DefaultPredictor(cfg)
    predictor = OnnxPredictor(cfg, str(out / "model.onnx"))
    num_detections = 0
    for image in images[:8]:
        bgr = image.permute(1, 2, 0).numpy()
        ref = reference(bgr)["instances"]
        ours = predictor(bgr)["instances"]
        assert ours.image_size == ref.image_size == bgr.shape[:2]
        box_error, score_error = match_detections(
            (ref.pred_boxes.tensor, ref.scores, ref.pred_classes),
            (ours.pred_boxes.tensor, ours.scores, ours.pred_classes),
        )
        assert box_error <= BOX_ATOL and score_error <= SCORE_ATOL
        num_detections += len(ref)
    assert num_detections > 0


def test_export_follows_the_head_and_loss_registries(tmp_path, tiny_coco):
    """The GroupNorm head and the softmax focal loss (K + 1 logits, softmax scores) export."""
    import onnxruntime

    cfg = load_config(
        str(REPO / "configs" / "demo.yaml"),
        ["MODEL.RETINANET.NORM", "GN", "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SoftmaxFocalLoss"],
    )
    torch.manual_seed(0)
    model = load_model(cfg)
    with torch.no_grad():
        # Background less likely than at initialisation: detections to compare.
        model.head.cls_score.bias[10::11] = 1.0
    assert model.head.cls_score.out_channels == 9 * 11
    images = varied_images(tiny_coco)[:4]
    save_program(export_program(model, images[1]), str(tmp_path / "m.onnx"), "onnx")
    session = onnxruntime.InferenceSession(
        str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
    )
    num_detections = 0
    for image in images:
        ref = pytorch_detections(model, image)
        onnx_out = [torch.from_numpy(x) for x in session.run(None, {"image": image.numpy()})]
        box_error, score_error = match_detections(ref, onnx_out)
        assert box_error <= BOX_ATOL and score_error <= SCORE_ATOL
        num_detections += len(ref[0])
    assert num_detections > 0


def test_export_cli_bad_weights_names_the_file_and_keeps_the_output(tmp_path, capsys):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"previous export")
    missing = str(tmp_path / "missing.pth")
    argv = ["--config-file", str(REPO / "configs" / "demo.yaml"), "--output", str(output)]
    assert main([*argv, "MODEL.WEIGHTS", missing]) == 2
    assert missing in capsys.readouterr().err
    assert output.read_bytes() == b"previous export"
    with pytest.raises(SystemExit):
        main([*argv, "--format", "tflite"])


def _traced_exports(monkeypatch):
    """The ``winograd`` argument of each export the CLI traces; nothing traced or written."""
    from focal_det2 import export as export_module

    traced = []
    monkeypatch.setattr(
        export_module,
        "export_program",
        lambda model, example, winograd=False: traced.append(winograd) or "program",
    )
    monkeypatch.setattr(export_module, "save_program", lambda program, output, fmt: None)
    return traced


@pytest.mark.parametrize(
    "setting, fmt, winograd",
    [("auto", "onnx", True), ("auto", "torch_export", False), ("on", "torch_export", True)]
    + [("off", "onnx", False)],
)
def test_export_cli_puts_winograd_in_the_graph_as_the_config_says(
    tmp_path, monkeypatch, setting, fmt, winograd
):
    traced = _traced_exports(monkeypatch)
    argv = ["--config-file", str(REPO / "configs" / "demo.yaml"), "--output", str(tmp_path / "m")]
    assert main([*argv, "--format", fmt, "MODEL.FOCAL_RETINANET.WINOGRAD", setting]) == 0
    assert traced == [winograd]


def test_export_cli_logs_progress_but_not_the_onnx_tools_rewrites(tmp_path, monkeypatch, capsys):
    _traced_exports(monkeypatch)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    output = str(tmp_path / "m.onnx")
    assert main(["--config-file", str(REPO / "configs" / "demo.yaml"), "--output", output]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    # onnxscript's optimiser and onnx_ir's passes log each of hundreds of rewrites at INFO.
    assert not logging.getLogger("onnxscript.optimizer").isEnabledFor(logging.INFO)
    assert not logging.getLogger("onnx_ir.passes.common").isEnabledFor(logging.INFO)
    assert logging.getLogger("focal_det2.export").isEnabledFor(logging.INFO)


def test_onnx_predictor_bad_file_names_it(tmp_path):
    bad = tmp_path / "not_a_model.onnx"
    bad.write_text("hello")
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [])
    with pytest.raises(ValueError, match="not_a_model.onnx"):
        OnnxPredictor(cfg, str(bad))


def test_predict_with_onnx_writes_the_pytorch_detections(exported, tiny_checkpoint, tiny_coco):
    from focal_det2 import predict

    cfg, model, out, images = exported
    json_file, image_root = tiny_coco["val"]
    inputs = sorted(os.path.join(image_root, x) for x in os.listdir(image_root))[:2]
    argv = [
        "--config-file",
        str(tiny_checkpoint / "config.yaml"),
        "--input",
        *inputs,
        *tiny_register_args(tiny_coco),
        "--confidence-threshold",  # the exported graph's
        "0.15",
    ]
    opts = ["MODEL.WEIGHTS", cfg.MODEL.WEIGHTS, *TINY_MODEL_TEST]
    results = {}
    for name, extra in (("eager", []), ("onnx", ["--onnx", str(out / "model.onnx")])):
        folder = out / f"predict_{name}"
        assert predict.main([*argv, *extra, "--output", str(folder), *opts]) == 0
        results[name] = json.loads((folder / "detections.json").read_text())
    assert len(results["onnx"]) == len(results["eager"]) > 0
    for path in inputs:
        ref, ours = (
            [
                torch.tensor([d["bbox"] for d in results[name] if d["file_name"] == path]),
                torch.tensor([d["score"] for d in results[name] if d["file_name"] == path]),
                torch.tensor([d["category_id"] for d in results[name] if d["file_name"] == path]),
            ]
            for name in ("eager", "onnx")
        )
        box_error, score_error = match_detections(ref, ours)
        assert box_error <= BOX_ATOL and score_error <= SCORE_ATOL


@pytest.mark.parametrize("bias", [True, False])
def test_graph_winograd_is_the_convolution_at_every_size(bias):
    torch.manual_seed(0)
    weight, b = torch.randn(24, 16, 3, 3), torch.randn(24) if bias else None
    # Maps of one tile and less (padded to 2 x 2 tiles), partial tiles, whole ones; two images.
    for shape in ((1, 16, 1, 1), (1, 16, 3, 5), (1, 16, 4, 8), (2, 16, 9, 13), (1, 16, 40, 44)):
        x = torch.randn(shape)
        out = winograd_conv2d_graph(x, weight, b)
        reference = F.conv2d(x, weight, b, padding=1)
        assert out.shape == reference.shape
        assert_close_to_largest(out, reference, CONV_RTOL)


def test_graph_winograd_takes_fitting_convolutions_on_large_maps_and_exports_any_size():
    torch.manual_seed(0)
    fits = nn.Conv2d(128, 128, 3, padding=1)
    too_few_channels = nn.Conv2d(128, 64, 3, padding=1)
    module = nn.Sequential(fits, too_few_channels)
    assert [graph_winograd_fits(m) for m in module] == [True, False]
    assert not graph_winograd_fits(nn.Conv2d(128, 128, 3, stride=2, padding=1))
    small = torch.randn(1, 128, 40, 44)  # 10 x 11 tiles, < 128
    assert use_graph_winograd(module, lambda: module(small)) == []
    large = torch.randn(1, 128, 48, 44)  # 12 x 11 tiles
    assert use_graph_winograd(module, lambda: module(large)) == [fits]
    reference = nn.Sequential(*(nn.Conv2d(m.in_channels, m.out_channels, 3) for m in module))
    for ours, theirs in zip(module, reference):
        theirs.load_state_dict(ours.state_dict())
        theirs.padding = ours.padding
    # Down to one tile: the traced graph has no guard on the number of tiles.
    dims = {2: torch.export.Dim("height", min=1, max=256), 3: torch.export.Dim("width", max=256)}
    with torch.no_grad():
        program = torch.export.export(module, (large,), dynamic_shapes=(dims,), strict=False)
        for size in ((1, 1), (5, 3), (48, 44), (130, 70)):
            x = torch.randn(1, 128, *size)
            assert_close_to_largest(program.module()(x), reference(x), CONV_RTOL)
