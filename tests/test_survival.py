"""Surviving a cluster: preemption, a full disk, images that fail to decode mid-run, bad weights,
mixed precision."""

import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.data import DatasetMapper
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from focal_det2.config import load_config
from focal_det2.data import register_coco_datasets, validate_coco_dataset
from focal_det2.engine import FocalTrainer
from focal_det2.weights import WeightsError, load_initial_weights

from helpers import REPO, SIZE_128, demo_cfg, run_train_net, tiny_args

# 128 px images (SIZE_128), training only.
SMALL = (
    *SIZE_128,
    "TEST.EVAL_PERIOD",
    "0",
    "DATASETS.TEST",
    "()",
)


def small_args(tiny_coco, output_dir, *opts):
    return tiny_args(tiny_coco, output_dir, *SMALL, *opts)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def start_train_net(args, log_path, **kwargs):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train_net.py"), *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            **kwargs,
        )


def wait_for(log_path, pattern, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log_path.read_text()):
            return
        assert process.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {log_path}")


def temporary_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


def limit_file_size():
    # SIGXFSZ would kill the process; ignored, the write fails with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # 16 MiB: the logs and metrics fit, a checkpoint of the demo model (95 MB) does not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, 2**24))


def test_sigterm_full_disk_and_resume_lose_no_iteration(tiny_coco, tmp_path):
    args = small_args(tiny_coco, tmp_path, "SOLVER.MAX_ITER", "60", "DATALOADER.NUM_WORKERS", "1")
    log = tmp_path / "first.log"
    process = start_train_net(args, log, start_new_session=True)
    wait_for(log, r"Starting training from iteration 0", process)
    # A random moment of the first iterations (the first one compiles the loss: seconds).
    time.sleep(random.uniform(0.0, 3.0))
    # To every process, data-loader worker included, as SLURM and a terminal's Ctrl-C do.
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    stop = re.search(
        r"SIGTERM received, training stopped at iteration (\d+): checkpoint (\S+)", output
    )
    assert stop and "Traceback" not in output, output[-3000:]
    stopped = int(stop.group(1))
    name = f"model_{stopped:07d}.pth"
    assert stop.group(2) == str(tmp_path / name)
    assert (tmp_path / "last_checkpoint").read_text() == name
    assert load_checkpoint(tmp_path / name)["iteration"] == stopped
    assert not temporary_files(tmp_path)

    # Resumed on a full disk (a file-size limit): the next checkpoint cannot be written.
    resumed = ["--resume", *args, "SOLVER.MAX_ITER", str(stopped + 3)]
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pth")}
    log = tmp_path / "full_disk.log"
    process = start_train_net(
        [*resumed, "SOLVER.CHECKPOINT_PERIOD", "1"], log, preexec_fn=limit_file_size
    )
    assert process.wait(timeout=300) == 1, log.read_text()[-3000:]
    output = log.read_text()
    assert "Traceback" not in output
    assert re.search(
        rf"train_net.py: training stopped at iteration {stopped + 1}: could not write the "
        rf"checkpoint {re.escape(str(tmp_path / f'model_{stopped + 1:07d}'))}.pth \(OSError: "
        r"\[Errno 27\] File too large\); the earlier checkpoints and last_checkpoint are "
        "unchanged",
        output,
    ), output[-3000:]
    assert not temporary_files(tmp_path)
    assert (tmp_path / "last_checkpoint").read_text() == name
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pth")} == before

    # Resumed with space: from the iteration after the SIGTERM, to the end.
    result = run_train_net(*resumed)
    assert result.returncode == 0, result.stdout[-3000:]
    starts = re.findall(r"Starting training from iteration (\d+)", result.stdout)
    assert starts == [str(stopped + 1)]
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == stopped + 2


def test_stop_signal_as_the_loader_workers_start_kills_none(tiny_coco):
    register_coco_datasets([("survival_tiny_train", *tiny_coco["train"])])
    cfg = load_config(
        str(REPO / "configs" / "demo.yaml"),
        ["DATASETS.TRAIN", "('survival_tiny_train',)", "DATALOADER.NUM_WORKERS", "2"],
    )
    loader = FocalTrainer.build_train_loader(cfg)
    # SIGTERM to each worker the moment it is forked, before any of its init has run: the
    # earliest a scheduler's SIGTERM to the whole job can reach it.
    armed = [True]
    os.register_at_fork(after_in_child=lambda: armed and os.kill(os.getpid(), signal.SIGTERM))
    try:
        with EventStorage():
            batches = list(itertools.islice(loader, 4))
    finally:
        armed.clear()
        loader.close()
    assert len(batches) == 4


def child_pids(pid):
    """The training processes ``launch`` started from ``pid``."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_iteration(tiny_coco, tmp_path):
    args = ["--num-gpus", "2", "--dist-url", "auto"]
    args += small_args(tiny_coco, tmp_path, "SOLVER.MAX_ITER", "60")
    log = tmp_path / "train.log"
    process = start_train_net(args, log)
    wait_for(log, r"Starting training from iteration 0", process)
    workers = child_pids(process.pid)
    assert len(workers) == 2, workers
    time.sleep(random.uniform(0.0, 3.0))
    # One process only: the other learns it through the per-iteration all-reduce.
    os.kill(int(workers[1]), signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    stops = re.findall(r"SIGTERM received, training stopped at iteration (\d+)", output)
    assert len(stops) == 2 and stops[0] == stops[1], output[-3000:]
    assert "Traceback" not in output
    checkpoints = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert checkpoints == [f"model_{int(stops[0]):07d}.pth"]


def truncated_copy(tiny_coco, root, count):
    """The tiny training set, its first ``count`` images cut to half their bytes: the header
    check passes, decoding fails."""
    json_file, image_root = tiny_coco["train"]
    shutil.copytree(image_root, root / "images")
    dataset = json.loads(Path(json_file).read_text())
    names = [image["file_name"] for image in dataset["images"][:count]]
    for name in names:
        path = root / "images" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(Path(json_file)), str(root / "images"), names


def bad_data_args(tiny_coco, tmp_path, policy, count):
    json_file, image_root, names = truncated_copy(tiny_coco, tmp_path, count)
    args = ["--register-coco", "damaged_train", json_file, image_root]
    args += small_args(
        tiny_coco,
        tmp_path / "out",
        "DATASETS.TRAIN",
        "('damaged_train',)",
        "DATASETS.INVALID_POLICY",
        policy,
        "DATALOADER.NUM_WORKERS",
        "1",
        # One pass over the 16 images (one aspect-ratio group): every image is mapped once.
        "SOLVER.MAX_ITER",
        "4",
    )
    return args, [str(Path(image_root) / n) for n in names]


def test_truncated_image_error_policy_stops_naming_file_and_dataset(tiny_coco, tmp_path):
    args, files = bad_data_args(tiny_coco, tmp_path, "error", 1)
    result = run_train_net(*args)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert re.search(
        rf"train_net.py: training stopped at iteration \d+: image {re.escape(files[0])} of "
        r"dataset 'damaged_train' cannot be decoded \(OSError",
        result.stdout,
    ), result.stdout[-3000:]
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_truncated_images_skip_policy_warns_and_counts(tiny_coco, tmp_path):
    args, files = bad_data_args(tiny_coco, tmp_path, "skip", 2)
    result = run_train_net(*args)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    for file in files:
        assert f"image {file} of dataset 'damaged_train' cannot be decoded" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").open()]
    (last,) = [r for r in records if r["iteration"] == 3 and "data/skipped_samples" in r]
    assert last["data/skipped_samples"] == 2


def test_full_decode_validation_finds_truncated_image(tiny_coco, tmp_path):
    json_file, image_root, names = truncated_copy(tiny_coco, tmp_path, 1)
    assert validate_coco_dataset(json_file, image_root).ok  # the header is intact
    report = validate_coco_dataset(json_file, image_root, full_decode=True)
    assert report.counts == {"unreadable_image": 1}
    assert report.examples["unreadable_image"][0].file_name == names[0]


def state_dict_file(path, model):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """
    Weights files: good, truncated, not a checkpoint, another architecture, 3 classes, the
    softmax classifier.
    """
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    good = state_dict_file(folder / "good.pth", build_model(demo_cfg()))
    truncated = folder / "truncated.pth"
    truncated.write_bytes(Path(good).read_bytes()[:100000])
    text = folder / "notes.pth"
    text.write_text("not a checkpoint\n")
    return {
        "good": good,
        "truncated": str(truncated),
        "text": str(text),
        "resnet": state_dict_file(folder / "resnet.pth", torchvision.models.resnet18()),
        "three_classes": state_dict_file(
            folder / "three.pth", build_model(demo_cfg("MODEL.RETINANET.NUM_CLASSES", 3))
        ),
        "softmax": state_dict_file(
            folder / "softmax.pth",
            build_model(demo_cfg("MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SoftmaxFocalLoss")),
        ),
        "missing": str(folder / "missing.pth"),
    }


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "weights file not found"),
        ("truncated", "not a readable checkpoint (truncated or another kind of file?)"),
        ("text", "not a readable checkpoint"),
        ("resnet", "weights is one of the model's (weights of another architecture?)"),
        ("three_classes", "a classifier of another number of classes"),
    ],
)
def test_bad_initial_weights_are_refused(weights_files, case, message):
    model = build_model(demo_cfg())
    with pytest.raises(WeightsError) as error:
        load_initial_weights(model, weights_files[case])
    assert str(error.value).startswith(weights_files[case] + ": ")
    assert message in str(error.value)
    if case == "three_classes":
        assert "head.cls_score.weight (27, 64, 3, 3) in the file" in str(error.value)
        assert "MODEL.FOCAL_RETINANET.WEIGHTS_DROP_CLASSIFIER True" in str(error.value)


def test_weights_of_the_other_classifier_loss_name_the_loss_key(weights_files):
    # The demo trains SoftmaxFocalLoss (10 digits + background); its checkpoint does not fit
    # a model of the paper's sigmoid loss (10 logits per anchor): 99 against 90 channels.
    with pytest.raises(WeightsError) as error:
        load_initial_weights(build_model(demo_cfg()), weights_files["softmax"])
    assert "head.cls_score.weight (99, 64, 3, 3) in the file, (90, 64, 3, 3)" in str(error.value)
    assert "MODEL.FOCAL_RETINANET.CLS_LOSS_NAME to the loss it was trained with" in str(error.value)


def test_classifier_dropped_on_request(weights_files):
    model = build_model(demo_cfg())
    prior_bias = model.head.cls_score.bias.detach().clone()
    load_initial_weights(model, weights_files["three_classes"], drop_classifier=True)
    source = load_checkpoint(weights_files["three_classes"])["model"]
    torch.testing.assert_close(model.head.cls_score.bias, prior_bias)
    torch.testing.assert_close(model.head.bbox_pred.weight, source["head.bbox_pred.weight"])
    load_initial_weights(model, weights_files["good"])  # weights of the same model load


def test_train_net_refuses_bad_weights_in_one_line(tiny_coco, tmp_path, weights_files):
    for extra, case, message in (
        (["--eval-only"], "truncated", "not a readable checkpoint"),
        ([], "three_classes", "a classifier of another number of classes"),
    ):
        path = weights_files[case]
        result = run_train_net(
            *extra, *small_args(tiny_coco, tmp_path / case, "MODEL.WEIGHTS", path)
        )
        assert result.returncode == 1, result.stdout[-3000:]
        assert f"train_net.py: {path}: " in result.stdout and message in result.stdout
        assert "Traceback" not in result.stdout


def test_amp_on_cpu_trains_in_bfloat16_with_float32_losses_and_gradients(tiny_coco):
    models = {}
    for amp in (False, True):
        cfg = demo_cfg(*SMALL[:8], "MODEL.RETINANET.NUM_CLASSES", 10, "SOLVER.AMP.ENABLED", amp)
        torch.manual_seed(0)
        models[amp] = build_model(cfg)
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in load_coco_json(*tiny_coco["train"], "tiny_amp")[:2]]
    head_dtypes = []
    models[True].head.register_forward_hook(lambda m, i, out: head_dtypes.append(out[0][0].dtype))
    losses = {}
    with EventStorage():
        for amp, model in models.items():
            losses[amp] = model(batch)
            sum(losses[amp].values()).backward()
    assert head_dtypes == [torch.bfloat16]
    for name in ("loss_cls", "loss_box_reg"):
        assert losses[True][name].dtype == torch.float32
        # bfloat16 features (8-bit mantissa) through the whole network: percent-level agreement.
        torch.testing.assert_close(losses[True][name], losses[False][name], rtol=0.05, atol=0)
    assert models[True].last_loss_stats["max_abs_logit"].dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in models[True].parameters())


def test_amp_on_cpu_trains_and_is_refused_for_detectron2_retinanet(tiny_coco, tmp_path):
    args = small_args(tiny_coco, tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.AMP.ENABLED", "True")
    result = run_train_net(*args)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "SOLVER.AMP.ENABLED: training forward in bfloat16 autocast" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.json").open()]
    losses = {r["iteration"]: r["total_loss"] for r in records if "total_loss" in r}
    assert 2 in losses and all(math.isfinite(v) for v in losses.values())

    result = run_train_net(*args, "MODEL.META_ARCHITECTURE", "RetinaNet")
    assert result.returncode == 1
    assert "SOLVER.AMP.ENABLED needs CUDA" in result.stdout
    assert "not MODEL.DEVICE cpu with RetinaNet" in result.stdout
    assert "Traceback" not in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Detectron2's AMPTrainer needs CUDA")
def test_amp_trains_on_cuda(tiny_coco, tmp_path):
    args = small_args(tiny_coco, tmp_path, "SOLVER.MAX_ITER", "3", "MODEL.DEVICE", "cuda")
    result = run_train_net(*args, "SOLVER.AMP.ENABLED", "True")
    assert result.returncode == 0, result.stdout[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.json").open()]
    assert records and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
