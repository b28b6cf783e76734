"""
CPU inference latency, batch 1: Detectron2's RetinaNet, FocalRetinaNet eager and FocalRetinaNet
exported to ONNX in onnxruntime, side by side in one run, on the same weights.

    .venv/bin/python benchmarks/bench_inference.py [--settings demo r50] [--reps N]

Settings: "demo", the demo model (``configs/demo.yaml``), and "r50", R50-FPN
(``configs/retinanet_R50_FPN.yaml``), each at its config's test size S (``INPUT.MIN_SIZE_TEST``).
Weights are random (identical in the three models), with the classifier bias set so that about
0.3% of the (anchor, class) pairs of the benchmark image score above
``TEST.SCORE_THRESH_TEST``: the post-processing sees thousands of candidates, as with a trained
model on a busy image. The image, 3 x S x 1.33S, is blurred random noise (features that vary
as on a photograph), given to each model as ``DefaultPredictor`` gives it after resizing (float
pixels for the eager models, uint8 for the ONNX graph).

Per model: the median latency over the repetitions (in rounds of ``--block`` calls per model,
each block after one untimed call, the models' order rotated per round, after warm-up), the
speed-up over Detectron2 (median over the rounds of the ratio of the blocks' medians, which
cancels the machine's drift) and, for the eager models, the
share of the latency after the head (anchors, scoring, top-k, decoding, NMS, resizing the
boxes), timed in a separate call split at the head. The ONNX graph runs as one call: its share
is the median time of its part after the head run alone (the graph cut at the head's outputs)
over the whole graph's median latency.
"""

import argparse
import datetime
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import onnx
import onnxruntime
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess

from focal_det2 import FocalRetinaNet, add_focal_config
from focal_det2.export import OnnxPredictor, export

from common import load, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"demo": "configs/demo.yaml", "r50": "configs/retinanet_R50_FPN.yaml"}
# Repetitions by default: a demo repetition is ~40x shorter than an R50 one, and short calls
# vary more.
DEFAULT_REPS = {"demo": 100, "r50": 20}
MODELS = ("Detectron2 RetinaNet", "FocalRetinaNet eager", "FocalRetinaNet onnxruntime")
CANDIDATE_SHARE = 0.003


def build_cfg(config: str):
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    # Detectron2's RetinaNet scores classes by sigmoid only: the same weights in all three
    # models need the paper's sigmoid classifier (the demo config trains a softmax one).
    cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME = "SigmoidFocalLoss"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    # The benchmark image (S x 1.33S) as it is: the long side not capped.
    cfg.INPUT.MAX_SIZE_TEST = 1333
    return cfg


def make_image(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Smooth random structure: blurred noise, so that features vary as on a photograph.
    noise = torch.rand(1, 3, size // 8, size * 4 // 24, generator=g)
    image = torch.nn.functional.interpolate(noise, size=(size, size * 4 // 3), mode="bilinear")
    return (image[0] * 255).round().to(torch.uint8)


@torch.no_grad()
def set_candidate_share(model, image: torch.Tensor, share: float) -> None:
    """Shift the classifier bias so that ``share`` of the (anchor, class) scores pass."""
    images = model.preprocess_image([{"image": image.float()}])
    features = model.backbone(images.tensor)
    logits, _ = model.head([features[f] for f in model.head_in_features])
    values = torch.cat([x.flatten() for x in logits])
    threshold = torch.logit(torch.tensor(model.test_score_thresh))
    bias_shift = threshold - torch.quantile(values[:: max(1, len(values) // 1_000_000)], 1 - share)
    model.head.cls_score.bias += bias_shift


def eager_call(model, image: torch.Tensor) -> Callable[[], None]:
    inputs = [{"image": image.float(), "height": image.shape[1], "width": image.shape[2]}]

    def run():
        with torch.no_grad():
            model(inputs)

    return run


@torch.no_grad()
def post_share(model, image: torch.Tensor, reps: int) -> float:
    """Median share of the latency after the head, over ``reps`` calls split at the head."""
    inputs = [{"image": image.float(), "height": image.shape[1], "width": image.shape[2]}]
    shares = []
    # What the model's forward runs: FocalRetinaNet's copies with folded batch norms, if any.
    backbone, head = (
        model.inference_modules()
        if isinstance(model, FocalRetinaNet)
        else (model.backbone, model.head)
    )
    for _ in range(reps):
        start = time.perf_counter()
        images = model.preprocess_image(inputs)
        features = backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = head(features)
        middle = time.perf_counter()
        results = model.forward_inference(images, features, predictions)
        detector_postprocess(results[0], image.shape[1], image.shape[2])
        end = time.perf_counter()
        shares.append((end - middle) / (end - start))
    return statistics.median(shares)


def onnx_post_share(
    onnx_path: str, feed: Dict[str, np.ndarray], reps: int, warmup: int, latency: float
) -> float:
    """
    Share of the ONNX graph's ``latency`` (seconds, the whole graph's median) after the head:
    the graph cut where the head's outputs are, its part after the head (anchors, scoring,
    top-k, decoding, NMS, clipping) run alone in onnxruntime on them, its median over ``reps``
    calls. The head ends at the convolutions: Conv nodes and, by Winograd
    (:mod:`focal_det2.modeling.winograd`), the nodes up to a pixel shuffle (DepthToSpace) and
    the crop (Pad) and bias (Add) after it. onnxruntime's profiler would time each node, but
    adds more to the time of many small nodes than they take (README: Deploy). The part after
    the head runs in a loop of its own, right after the rounds that timed the whole graph.
    """
    graph = onnx.load(onnx_path).graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ends = []
    for node in graph.node:
        if node.op_type == "DepthToSpace":
            while True:
                ends.append(node)
                following = consumers.get(node.output[0], [])
                if len(following) != 1 or following[0].op_type not in ("Pad", "Add"):
                    break
                node = following[0]
    up_to_head, pending = set(), [n for n in graph.node if n.op_type == "Conv"] + ends
    while pending:
        node = pending.pop()
        if node.name not in up_to_head:
            up_to_head.add(node.name)
            pending.extend(producers[i] for i in node.input if i in producers)
    head_outputs = list(
        dict.fromkeys(
            name
            for node in graph.node
            if node.name not in up_to_head
            for name in node.input
            if name in producers and producers[name].name in up_to_head
        )
    )
    input_names = [x.name for x in graph.input]
    with tempfile.TemporaryDirectory() as workdir:
        head_path, post_path = (os.path.join(workdir, f"{x}.onnx") for x in ("head", "post"))
        onnx.utils.extract_model(onnx_path, head_path, input_names, head_outputs)
        onnx.utils.extract_model(
            onnx_path, post_path, input_names + head_outputs, [x.name for x in graph.output]
        )
        head = onnxruntime.InferenceSession(head_path, providers=["CPUExecutionProvider"])
        post = onnxruntime.InferenceSession(post_path, providers=["CPUExecutionProvider"])
    post_feed = {**feed, **dict(zip(head_outputs, head.run(head_outputs, feed)))}
    post_feed = {x.name: post_feed[x.name] for x in post.get_inputs()}
    for _ in range(warmup):
        post.run(None, post_feed)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        post.run(None, post_feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / latency


def bench_setting(name: str, reps: int, block: int, warmup: int, workdir: str) -> List[str]:
    config = SETTINGS[name]
    cfg = build_cfg(config)
    image = make_image(cfg.INPUT.MIN_SIZE_TEST)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    set_candidate_share(ours, image, CANDIDATE_SHARE)
    d2_cfg = cfg.clone()
    d2_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    reference = build_model(d2_cfg).eval()
    # Detectron2's model as it builds it (NCHW), ours with its configured memory format.
    reference.load_state_dict(ours.state_dict())

    onnx_path = os.path.join(workdir, f"{name}.onnx")
    start = time.perf_counter()
    export(ours, onnx_path, "onnx", image)
    export_s = time.perf_counter() - start
    predictor = OnnxPredictor(cfg, onnx_path)
    feed = {predictor.input_name: image.numpy()}
    runs: Dict[str, Callable[[], None]] = {
        MODELS[0]: eager_call(reference, image),
        MODELS[1]: eager_call(ours, image),
        MODELS[2]: lambda: predictor.session.run(None, feed),
    }
    detections = len(predictor.session.run(None, feed)[1])
    for _ in range(warmup):
        for run in runs.values():
            run()
    # Blocks of `block` calls per model, the models' order rotated per round; the first call of
    # a block, slowed by the previous model's thread pool still spinning (onnxruntime's threads
    # spin after a call, competing with torch's for the cores), is not timed.
    times: Dict[str, List[float]] = {m: [] for m in MODELS}
    rounds: Dict[str, List[float]] = {m: [] for m in MODELS}
    for round_index in range(max(1, reps // block)):
        shift = round_index % 3
        for model_name in MODELS[shift:] + MODELS[:shift]:
            runs[model_name]()
            block_times = []
            for _ in range(block):
                start = time.perf_counter()
                runs[model_name]()
                block_times.append(time.perf_counter() - start)
            times[model_name].extend(block_times)
            rounds[model_name].append(statistics.median(block_times))
    shares = {
        MODELS[0]: post_share(reference, image, max(3, reps // 2)),
        MODELS[1]: post_share(ours, image, max(3, reps // 2)),
        MODELS[2]: onnx_post_share(
            onnx_path, feed, 5 * reps, warmup, statistics.median(times[MODELS[2]])
        ),
    }
    lines = [
        f"## {name}: {config}, image {image.shape[1]}x{image.shape[2]}, {detections} detections"
        f" (ONNX export {export_s:.0f} s)",
        "",
        "| model | median (ms) | min-max (ms) | speed-up vs Detectron2 | after the head |",
        "|---|---|---|---|---|",
    ]
    for model_name in MODELS:
        values = times[model_name]
        ratio = statistics.median(r / v for r, v in zip(rounds[MODELS[0]], rounds[model_name]))
        share = f"{100 * shares[model_name]:.1f}%"
        lines.append(
            f"| {model_name} | {1000 * statistics.median(values):.1f} | "
            f"{1000 * min(values):.1f}-{1000 * max(values):.1f} | {ratio:.2f}x | {share} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--reps", type=int, help="repetitions (default: demo 100, r50 20)")
    parser.add_argument("--block", type=int, default=5, help="timed calls per model in a row")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    reps = {s: args.reps or DEFAULT_REPS[s] for s in args.settings}
    load_before = load()
    with tempfile.TemporaryDirectory() as workdir:
        tables = [
            bench_setting(s, reps[s], args.block, args.warmup, workdir) for s in args.settings
        ]
    print("# CPU inference latency, batch 1")
    print()
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- machine: {machine('cpu')}")
    print(f"- CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"- onnxruntime {onnxruntime.__version__}, numpy {np.__version__}")
    print(f"- load average before: {load_before}; after: {load()}")
    print(
        f"- repetitions: {', '.join(f'{s} {n}' for s, n in reps.items())}, in blocks of "
        f"{args.block} per model, order rotated, after {args.warmup} warm-up calls of each"
    )
    print()
    for lines in tables:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
