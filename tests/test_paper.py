"""The paper's Figure 4 and ablation sweeps (python -m focal_det2.paper)."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from focal_det2.config import load_config
from focal_det2.paper import (
    collect_samples,
    cumulative_loss_curve,
    expand_grid,
    parse_set,
    run_name,
)
from focal_det2.paper.__main__ import main
from focal_det2.paper.figure4 import labelled_test_loader
from focal_det2.paper.sweep import plot_sweep, write_table

from helpers import PAPER_LOSS, REPO, tiny_register_args

GAMMAS = ("0", "0.5", "1", "2")
SMALL = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.MAX_ITER", "5",
    "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN",
    "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", *PAPER_LOSS,
]  # fmt: skip
# One run trains normally, the other diverges at once: both must become rows.
GRID = ["--set", "SOLVER.BASE_LR=0.02,1e30", "--set", "MODEL.RETINANET.FOCAL_LOSS_GAMMA=2.0"]
RUNS = ("base_lr_0.02__focal_loss_gamma_2.0", "base_lr_1e30__focal_loss_gamma_2.0")


def dataset_opts():
    return ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)"]


def sweep_argv(tiny_coco, output):
    return (
        ["sweep", "--config-file", str(REPO / "configs" / "demo.yaml"), "--output", str(output)]
        + GRID
        + tiny_register_args(tiny_coco)
        + dataset_opts()
        + SMALL
    )


@pytest.fixture(scope="module")
def sweep(tiny_coco, tmp_path_factory):
    """A 2 x 1 sweep of 5-iteration runs: its folder and output."""
    output = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [sys.executable, "-m", "focal_det2.paper", *sweep_argv(tiny_coco, output)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return output, result.stdout


def test_sweep_writes_a_row_per_run(sweep):
    output, _ = sweep
    finished = json.loads((output / RUNS[0] / "results.json").read_text())
    assert finished["status"] == "finished"
    assert set(finished["bbox"]) >= {"AP", "AP50", "AP75"}
    assert finished["overrides"] == [
        ["SOLVER.BASE_LR", "0.02"],
        ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", "2.0"],
    ]
    assert (output / RUNS[0] / "model_final.pth").is_file()
    diverged = json.loads((output / RUNS[1] / "results.json").read_text())
    assert diverged["status"] == "diverged" and diverged["diverged_at_iter"] <= 5

    rows = (output / "table.md").read_text().splitlines()
    assert rows[0].startswith("| SOLVER.BASE_LR | MODEL.RETINANET.FOCAL_LOSS_GAMMA | AP | AP50 |")
    assert len(rows) == 4
    assert rows[2].startswith("| 0.02 | 2.0 | ")
    assert rows[3].startswith("| 1e30 | 2.0 | - | - | - |")
    assert f"diverged at iteration {diverged['diverged_at_iter']}" in rows[3]
    assert (output / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_rerun_keeps_finished_runs(sweep, tiny_coco, capsys):
    output, _ = sweep
    markers = [output / run / "results.json" for run in RUNS]
    before = [marker.stat().st_mtime_ns for marker in markers]
    assert main(sweep_argv(tiny_coco, output)) == 0
    printed = capsys.readouterr().out
    assert printed.count(", kept") == 2
    assert ": training (log:" not in printed
    assert [marker.stat().st_mtime_ns for marker in markers] == before
    assert len((output / "table.md").read_text().splitlines()) == 4


def test_a_run_without_detections_is_a_row_of_zero_ap(tmp_path):
    # Detectron2's COCOEvaluator gives NaN for every metric when nothing scored above the
    # threshold (Table 1a's alpha = 0.1 on the demo): the row reads AP 0 and says why.
    def finished(alpha, box):
        return {
            "overrides": [["MODEL.RETINANET.FOCAL_LOSS_ALPHA", alpha]],
            "status": "finished",
            "bbox": box,
            "train_time_s": 500.0,
            "wall_time_s": 576.2,
        }

    runs = [
        ("focal_loss_alpha_0.1", finished("0.1", dict.fromkeys(("AP", "AP50", "AP75"), math.nan))),
        ("focal_loss_alpha_0.75", finished("0.75", {"AP": 2.46, "AP50": 7.1, "AP75": 0.94})),
    ]
    rows = write_table(tmp_path, runs).splitlines()
    assert rows[2] == (
        "| 0.1 | 0.0 | 0.0 | 0.0 | 8 min 20 s | no detections above TEST.SCORE_THRESH_TEST |"
    )
    assert rows[3] == "| 0.75 | 2.5 | 7.1 | 0.9 | 8 min 20 s |  |"
    plot_sweep(tmp_path, runs)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure4_curves_and_bce_reference(sweep, tiny_coco, tmp_path, capsys):
    output, _ = sweep
    weights = str(output / RUNS[0] / "model_final.pth")
    opts = dataset_opts() + SMALL + ["MODEL.WEIGHTS", weights]
    argv = ["figure4", "--config-file", str(REPO / "configs" / "demo.yaml")]
    assert main(argv + ["--output", str(tmp_path)] + tiny_register_args(tiny_coco) + opts) == 0
    printed = capsys.readouterr().out
    for gamma in GAMMAS:
        assert f"gamma {gamma}: the hardest 20% of negatives carry" in printed

    assert (tmp_path / "figure4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "figure4.csv") as f:
        rows = list(csv.reader(f))
    header, values = rows[0], np.array(rows[1:], dtype=np.float64)
    columns = [f"{s}_gamma_{g}" for s in ("positives", "negatives") for g in GAMMAS]
    assert header == ["fraction"] + columns
    fractions = values[:, 0]
    np.testing.assert_allclose(fractions, np.linspace(0, 1, 1001), atol=1e-9)
    for curve in values[:, 1:].T:
        assert curve[0] == 0 and curve[-1] == pytest.approx(1.0)
        assert np.all(np.diff(curve) >= 0)
    # Focusing concentrates the negatives' loss on fewer samples: lower curves for higher gamma.
    negatives = values[:, 5:]
    assert np.all(negatives[500, :-1] > negatives[500, 1:])

    # gamma = 0 is plain BCE over the same samples, labelled by the model's own matcher.
    cfg = load_config(argv[2], opts)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    positives, negatives = collect_samples(model, labelled_test_loader(cfg))
    assert positives.numel() > 0 and negatives.numel() > 9 * positives.numel()
    for i, (logits, target) in enumerate(((positives, 1.0), (negatives, 0.0))):
        bce = F.binary_cross_entropy_with_logits(
            logits, torch.full_like(logits, target), reduction="none"
        )
        cumulative = np.cumsum(np.sort(bce.double().numpy()))
        counts = np.rint(fractions * bce.numel()).astype(int)
        expected = np.where(counts > 0, cumulative[np.maximum(counts - 1, 0)], 0) / cumulative[-1]
        np.testing.assert_allclose(values[:, 1 + 4 * i], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (REPO / "configs" / "paper").glob("*.yaml"))
)
def test_paper_recipes_train_as_the_paper_whatever_the_demo_adopts(recipe):
    # The README's paper tables were measured so: the paper's sigmoid losses (Table 1a's
    # alpha-balanced CE is one), one alpha, uniform sampling, one size.
    cfg = load_config(str(REPO / "configs" / "paper" / recipe))
    expected_loss = (
        "BalancedCrossEntropyLoss" if recipe == "table1a_demo.yaml" else "SigmoidFocalLoss"
    )
    assert cfg.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME == expected_loss
    assert cfg.MODEL.FOCAL_RETINANET.CLASS_ALPHA == []
    assert cfg.MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY == 0.0
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (256,)
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (
        256,
        256,
        256,
    )


def test_cumulative_loss_curve_reads_sorted_partial_sums():
    losses = torch.tensor([4.0, 1.0, 3.0, 2.0])
    curve = cumulative_loss_curve(losses, np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    np.testing.assert_allclose(curve, [0.0, 0.1, 0.3, 0.6, 1.0])
    with pytest.raises(ValueError, match="no samples"):
        cumulative_loss_curve(torch.zeros(0), np.array([0.5]))


def test_grid_and_run_names():
    assert parse_set("INPUT.MIN_SIZE_TRAIN=(128,),(160, 192)") == (
        "INPUT.MIN_SIZE_TRAIN",
        ["(128,)", "(160, 192)"],
    )
    grid = expand_grid([("A.X", ["1", "2"]), ("B.Y", ["a"])])
    assert grid == [[("A.X", "1"), ("B.Y", "a")], [("A.X", "2"), ("B.Y", "a")]]
    assert run_name(grid[0]) == "x_1__y_a"
    # Keys with the same last component keep their whole name.
    assert run_name([("A.X", "1"), ("B.X", "(1, 2)")]) == "a.x_1__b.x_1_2"
    for bad in ("MODEL.RETINANET.PRIOR_PROB", "prior=0.5", "A.B=1,,2"):
        with pytest.raises(ValueError, match="--set"):
            parse_set(bad)


def test_bad_input_names_the_key_and_starts_nothing(tmp_path):
    config = str(REPO / "configs" / "demo.yaml")
    with pytest.raises(SystemExit, match="MODEL.RETINANET.NO_SUCH_KEY"):
        main(["sweep", "--config-file", config, "--output", str(tmp_path / "s")]
             + ["--set", "MODEL.RETINANET.NO_SUCH_KEY=1,2"])  # fmt: skip
    assert not (tmp_path / "s").exists()
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS"):
        main(["figure4", "--config-file", config, "--output", str(tmp_path / "f"), *PAPER_LOSS]
             + ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")])  # fmt: skip
    assert not (tmp_path / "f").exists()
    with pytest.raises(SystemExit, match="MODEL.RETINANET.PRIOR_PROB"):
        main(["sweep", "--config-file", config, "--output", str(tmp_path / "s")]
             + ["--set", "MODEL.RETINANET.PRIOR_PROB=0.01,1.5"])  # fmt: skip
    assert not (tmp_path / "s").exists()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not a checkpoint")
    figure4 = ["figure4", "--config-file", config, "--output", str(tmp_path / "f")]
    with pytest.raises(SystemExit, match="CLS_LOSS_NAME"):
        main(figure4 + ["MODEL.FOCAL_RETINANET.CLS_LOSS_NAME", "SoftmaxFocalLoss"]
             + ["MODEL.WEIGHTS", str(weights)])  # fmt: skip
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS: cannot load .*w.pth"):
        main(figure4 + [*PAPER_LOSS, "MODEL.WEIGHTS", str(weights)])
    assert not (tmp_path / "f").exists()
