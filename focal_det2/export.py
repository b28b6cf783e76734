"""
Export a trained FocalRetinaNet as one graph, and run the ONNX file like Detectron2's
``DefaultPredictor``.

    python -m focal_det2.export --config-file configs/demo.yaml --output model.onnx \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python -m focal_det2.export --config-file configs/demo.yaml --output model.pt2 \\
        --format torch_export MODEL.WEIGHTS output/demo/model_final.pth

The graph is the whole detector on one image: input ``image``, a (3, H, W) uint8 tensor in the
config's ``INPUT.FORMAT`` channel order, H and W dynamic (padded inside the graph to the
backbone's ``size_divisibility``); then the pixel normalisation, backbone, FPN, head, anchors,
and :func:`~focal_det2.modeling.postprocess.dense_detections` (score threshold, per-level top-k,
box decoding, per-class NMS, ``TEST.DETECTIONS_PER_IMAGE``), the boxes clipped to the image and
empty ones dropped as Detectron2's ``detector_postprocess`` does. Outputs: ``boxes`` (D, 4)
XYXY in the input's pixels, ``scores`` (D,) and ``classes`` (D,) int64, by descending score.
Resizing to the test size stays outside the graph: :class:`OnnxPredictor` resizes as
``DefaultPredictor`` does and maps the boxes back to the original image.
"""

import argparse
import copy
import logging
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn
from torch.nn import functional as F

from .config import load_config
from .file_io import atomic_write
from .modeling.folding import inference_copy
from .modeling.meta_arch import FocalRetinaNet
from .modeling.winograd import use_graph_winograd
from .weights import WeightsError, load_weights

__all__ = [
    "FORMATS",
    "DeployableRetinaNet",
    "OnnxPredictor",
    "export",
    "export_program",
    "load_model",
    "load_program",
    "main",
    "save_program",
]

logger = logging.getLogger(__name__)

#: Export formats and what they write.
FORMATS = {"onnx": "ONNX (torch.onnx.export, dynamo)", "torch_export": "ExportedProgram (.pt2)"}
OUTPUT_NAMES = ("boxes", "scores", "classes")
# The range of image sides the exported graph accepts.
MIN_SIDE, MAX_SIDE = 129, 4096


class DeployableRetinaNet(nn.Module):
    """
    A :class:`FocalRetinaNet` as a function of one image tensor, for ``torch.export``: it
    computes what ``model([{"image": image}])`` returns, as plain tensors.
    """

    def __init__(self, model: FocalRetinaNet):
        """
        Args:
            model: the detector, in eval mode.
        """
        super().__init__()
        if model.backbone.padding_constraints.get("square_size", 0):
            raise ValueError("export: backbones that pad to a square are not supported")
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            image: (3, H, W) uint8 in the model's input format (``INPUT.FORMAT``).

        Returns:
            boxes (D, 4) XYXY in the image's pixels, scores (D,), classes (D,) int64.
        """
        model = self.model
        height, width = image.shape[-2:]
        x = (image.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        # Detectron2's ImageList pads the normalised image with zeros at the bottom and right.
        div = max(model.backbone.size_divisibility, 1)
        # Written as a multiple of div minus the size, so that torch.export can prove the
        # feature maps of the FPN levels align.
        x = F.pad(
            x,
            (
                0,
                div * ((width + div - 1) // div) - width,
                0,
                div * ((height + div - 1) // div) - height,
            ),
        )
        features = model.backbone(x[None])
        features = [features[f] for f in model.head_in_features]
        boxes, scores, classes, _ = model.detect(features, model.head(features))
        # detector_postprocess to the input's own size: clip, drop empty boxes.
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(min=0, max=width),
                boxes[:, 1].clamp(min=0, max=height),
                boxes[:, 2].clamp(min=0, max=width),
                boxes[:, 3].clamp(min=0, max=height),
            ],
            dim=1,
        )
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        keep = nonempty.nonzero().squeeze(1)
        return boxes[keep], scores[keep], classes[keep]


def load_model(cfg: CfgNode) -> FocalRetinaNet:
    """
    The config's detector on CPU in eval mode, with ``MODEL.WEIGHTS`` loaded strictly
    (random weights, with a warning, when it is empty).

    Raises:
        WeightsError: naming the file, when the weights are missing or do not fit.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    if not isinstance(model, FocalRetinaNet):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}: only FocalRetinaNet exports"
        )
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights")
    return model.eval()


def _example_image(cfg: CfgNode) -> Tensor:
    side = cfg.INPUT.MIN_SIZE_TEST
    g = torch.Generator().manual_seed(0)
    # Not square, so that height and width get separate symbols.
    return torch.randint(0, 256, (3, side, side + 32), generator=g, dtype=torch.uint8)


def _nms_fake(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    # torchvision's fake kernel declares at least 2 kept boxes (a deprecated API's default
    # minimum), which the ExportedProgram then asserts at run time: an image with 0 or 1
    # detections would fail. Any number can be kept.
    return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


def export_program(
    model: FocalRetinaNet, example: Tensor, winograd: bool = False
) -> torch.export.ExportedProgram:
    """
    ``torch.export`` of :class:`DeployableRetinaNet` around ``model`` (eval mode).

    Args:
        model: the detector.
        example: a (3, H, W) uint8 image to trace with; the program accepts any H, W in
            [MIN_SIDE, MAX_SIDE].
        winograd: run the 3x3 convolutions of >= 128 channels (backbone, FPN, head) on maps of
            >= 128 4 x 4 tiles at the example's size by Winograd's F(4x4, 3x3) in the graph
            (:func:`~focal_det2.modeling.winograd.use_graph_winograd`), with the backbone's
            batch norms folded into its convolutions first.
    """
    dims = {
        1: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
        2: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE),
    }
    torch.library.register_fake("torchvision::nms", _nms_fake, allow_override=True)
    # Traced in NCHW: ONNX has no memory format (onnxruntime picks its own), and channels-last
    # parameters make the tracer specialise the width through stride checks. A copy: the
    # program holds the parameters it was traced with, which model.train() would convert.
    model = copy.deepcopy(model)
    model.channels_last = {True: False, False: False}
    module = DeployableRetinaNet(model).eval()
    if winograd:
        # Folded, a batch norm is part of the Winograd products: onnxruntime folds one into a
        # convolution node, not into the graph's matrix products.
        with torch.no_grad():
            model.backbone = inference_copy(model.backbone, pack_weights=False) or model.backbone
        use_graph_winograd(model, lambda: module(example))
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=(dims,), strict=False)


def save_program(program: torch.export.ExportedProgram, output: str, fmt: str) -> None:
    """
    Write ``program`` to ``output`` atomically: as ONNX (``torch.onnx.export``, dynamo) for
    "onnx", with ``torch.export.save`` for "torch_export".
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if fmt == "torch_export":
        atomic_write(output, lambda f: torch.export.save(program, f), "wb")
        return
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            program,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamo=True,
            verbose=False,
        )
    proto = onnx_program.model_proto
    atomic_write(output, lambda f: f.write(proto.SerializeToString()), "wb")


def load_program(path: str) -> torch.export.ExportedProgram:
    """
    Load a ``.pt2`` written by :func:`save_program`. The program calls torchvision's NMS
    operator, registered by importing torchvision (as this module does): a bare
    ``torch.export.load`` in a process without torchvision fails.

    Raises:
        ValueError: naming the file, when it is missing or not an ExportedProgram.
    """
    try:
        return torch.export.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable ExportedProgram: {e}") from e


def export(
    model: FocalRetinaNet,
    output: str,
    fmt: str,
    example: Tensor,
    winograd: Optional[bool] = None,
) -> None:
    """
    :func:`export_program` and :func:`save_program`: ``model`` to ``output`` as ``fmt``.
    ``winograd`` (see :func:`export_program`), None: for ONNX (measured faster in onnxruntime),
    not for an ExportedProgram.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if winograd is None:
        winograd = fmt == "onnx"
    save_program(export_program(model, example, winograd), output, fmt)


class OnnxPredictor:
    """
    Detectron2's ``DefaultPredictor`` on an ONNX file exported by :func:`export`, run by
    onnxruntime on CPU: one BGR image in, ``{"instances": Instances}`` out, with
    "pred_boxes", "scores" and "pred_classes" in the original image's pixels.
    """

    def __init__(self, cfg: CfgNode, onnx_path: str):
        """
        Args:
            cfg: the config the model was exported with (input format and test size).
            onnx_path: the exported file.

        Raises:
            ValueError: naming the file, when it is missing or not an exported detector.
        """
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(
                onnx_path, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ValueError(f"{onnx_path}: not a readable ONNX model: {e}") from e
        outputs = tuple(o.name for o in self.session.get_outputs())
        if outputs != OUTPUT_NAMES:
            raise ValueError(f"{onnx_path}: outputs {outputs}, expected {OUTPUT_NAMES}")
        self.input_name = self.session.get_inputs()[0].name
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT {self.input_format!r}: allowed: RGB, BGR")

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        """
        Args:
            original_image: (H, W, 3) uint8 in BGR order.

        Returns:
            {"instances": Instances} of the image's (H, W).
        """
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        boxes, scores, classes = self.session.run(None, {self.input_name: chw})
        results = Instances(
            image.shape[:2],
            pred_boxes=Boxes(torch.from_numpy(boxes)),
            scores=torch.from_numpy(scores),
            pred_classes=torch.from_numpy(classes),
        )
        return {"instances": detector_postprocess(results, height, width)}


def argument_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m focal_det2.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m focal_det2.export", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--format", default="onnx", choices=list(FORMATS))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs of the config")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m focal_det2.export``: the exit status."""
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # The ONNX tools log each of their hundreds of graph rewrites at INFO.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config_file, args.opts)
        model = load_model(cfg)
    except (WeightsError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    winograd = {"auto": None, "on": True, "off": False}[cfg.MODEL.FOCAL_RETINANET.WINOGRAD]
    start = time.perf_counter()
    export(model, args.output, args.format, _example_image(cfg), winograd)
    print(f"wrote {args.output} ({FORMATS[args.format]}) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
