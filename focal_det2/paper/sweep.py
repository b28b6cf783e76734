"""
Ablation sweeps: one ``train_net.py`` run per point of a grid of config values, each in its own
folder, collected into a table and a bar chart.

A run is complete once its ``results.json`` says "finished" (COCO box AP read from its
``metrics.json``) or "diverged" (training stopped at a non-finite loss). The file is written
atomically after ``train_net.py`` returns, so a complete run is skipped on a re-run, and any
other run starts again with ``--resume``: from its last checkpoint, or from scratch without one.
"""

import io
import itertools
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import load_config
from ..file_io import atomic_write
from ..modeling import check_focal_config

__all__ = [
    "TRAIN_NET",
    "collect_results",
    "expand_grid",
    "parse_set",
    "plot_sweep",
    "run_name",
    "run_one",
    "run_sweep",
    "write_table",
]

TRAIN_NET = Path(__file__).resolve().parents[2] / "train_net.py"
RESULTS = "results.json"
COMPLETE = ("finished", "diverged")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

Override = Tuple[str, str]


def _split_top_level(text: str) -> List[str]:
    # Commas inside brackets or quotes belong to one value, e.g. "(0.5, 1.0)".
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_set(spec: str) -> Tuple[str, List[str]]:
    """
    Parse one ``--set KEY=v1,v2,...``: commas inside brackets or quotes stay in their value.

    Returns:
        (KEY, [v1, v2, ...]).
    Raises:
        ValueError: naming the argument when it is not of that form.
    """
    key, sep, values = spec.partition("=")
    key = key.strip()
    parsed = _split_top_level(values)
    if not sep or not re.fullmatch(r"[A-Z0-9_]+(\.[A-Z0-9_]+)*", key) or "" in parsed:
        raise ValueError(f"--set {spec!r}: expected KEY=v1,v2,... with a config KEY")
    return key, parsed


def expand_grid(sets: Sequence[Tuple[str, Sequence[str]]]) -> List[List[Override]]:
    """
    The Cartesian product of the ``--set`` lists, the last key varying fastest.

    Returns:
        one list of (KEY, value) overrides per run.
    """
    keys = [key for key, _ in sets]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--set: a key is given twice: {keys}")
    return [list(zip(keys, combo)) for combo in itertools.product(*(v for _, v in sets))]


def _short_keys(keys: Sequence[str]) -> Dict[str, str]:
    short = {key: key.rsplit(".", 1)[-1].lower() for key in keys}
    if len(set(short.values())) < len(keys):
        short = {key: key.lower() for key in keys}
    return short


def run_name(overrides: Sequence[Override]) -> str:
    """
    The folder name of a run, e.g. ``focal_loss_alpha_0.25__focal_loss_gamma_2`` (the last
    component of each key, or the whole key where two would collide).
    """
    short = _short_keys([key for key, _ in overrides])
    values = [re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") for _, value in overrides]
    parts = [f"{short[key]}_{value}" for (key, _), value in zip(overrides, values)]
    return "__".join(parts) or "default"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _coco_box_results(metrics_file: Path) -> Optional[Dict[str, float]]:
    # The trainer's EvalHook writes the final evaluation into metrics.json, one json line, at
    # an iteration past the last training step: the last line with box AP is the final one.
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        prefixes = [k[: -len("bbox/AP")] for k in record if k.endswith("bbox/AP")]
        if prefixes:
            prefix = min(prefixes)  # "" for one test set; else the first dataset's
            return {m: record.get(f"{prefix}bbox/{m}", math.nan) for m in METRICS}
    return None


def _training_time(run_dir: Path) -> Optional[float]:
    # Detectron2's IterationTimer ends each training attempt with "Total training time: 0:03:12
    # (0:00:02 on hooks)" in OUTPUT_DIR/log.txt, which every attempt appends to: the sum is the
    # time spent over all attempts that ended (a resumed run only trains its remaining steps).
    try:
        text = (run_dir / "log.txt").read_text(errors="replace")
    except OSError:
        return None
    pattern = r"Total training time: (?:(\d+) days?, )?(\d+):(\d\d):(\d\d)"
    durations = [
        ((int(d or 0) * 24 + int(h)) * 60 + int(m)) * 60 + int(sec)
        for d, h, m, sec in re.findall(pattern, text)
    ]
    return float(sum(durations)) if durations else None


def _divergence_iteration(output: str) -> Optional[int]:
    # train_net.py: "training stopped, the last checkpoint is intact: Loss became infinite or
    # NaN at iteration=N!" (Detectron2's check of the loss, before the optimizer step).
    for line in output.splitlines():
        if "training stopped" in line and re.search(r"NaN|infinite|non-finite", line):
            match = re.search(r"iteration\W{0,3}(\d+)", line)
            if match:
                return int(match.group(1))
    return None


def _train(command: List[str], log_file: Path) -> Tuple[int, str, float]:
    start = time.monotonic()
    with open(log_file, "w") as log:
        # The child's output goes to the log as it comes: a long run can be followed there.
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return returncode, log_file.read_text(errors="replace"), time.monotonic() - start


def run_one(
    config_file: str,
    overrides: Sequence[Override],
    run_dir: Path,
    *,
    opts: Sequence[str] = (),
    train_args: Sequence[str] = (),
) -> dict:
    """
    Train and evaluate one run with ``train_net.py`` in a subprocess and write its
    ``results.json``.

    Args:
        config_file: the config of every run.
        overrides: this run's (KEY, value) pairs, applied after ``opts``.
        run_dir: the run's OUTPUT_DIR.
        opts: KEY VALUE pairs of every run.
        train_args: further ``train_net.py`` options (e.g. ``--register-coco ...``).

    Returns:
        The results: "status" ("finished", "diverged" or "failed"), "bbox" (COCO box AP etc.,
        finished runs), "diverged_at_iter", "returncode", "train_time_s", "wall_time_s".
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    flat = [x for pair in overrides for x in pair]
    command = [sys.executable, str(TRAIN_NET), "--config-file", config_file, "--resume"]
    command += [*train_args, *opts, *flat, "OUTPUT_DIR", str(run_dir)]
    returncode, output, wall_time = _train(command, run_dir / "train_net.log")

    results = {
        "config_file": config_file,
        "opts": list(opts),
        "overrides": [list(pair) for pair in overrides],
        "returncode": returncode,
        "train_time_s": _training_time(run_dir),
        "wall_time_s": round(wall_time, 1),
    }
    box = _coco_box_results(run_dir / "metrics.json") if returncode == 0 else None
    diverged_at = _divergence_iteration(output) if returncode != 0 else None
    if box is not None:
        results.update(status="finished", bbox=box)
    elif diverged_at is not None:
        results.update(status="diverged", diverged_at_iter=diverged_at)
    else:
        results["status"] = "failed"
    atomic_write(str(run_dir / RESULTS), lambda f: json.dump(results, f, indent=2), "w")
    return results


def collect_results(output_dir: Path) -> List[Tuple[str, dict]]:
    """
    Every run with a ``results.json`` in ``output_dir``, so that several sweeps into one folder
    (e.g. Table 1b's gamma/alpha pairs) make one table; sorted by their override values,
    numbers numerically.

    Returns:
        [(run folder name, results)].
    """
    runs = []
    for path in sorted(output_dir.glob(f"*/{RESULTS}")):
        results = _read_json(path)
        if results is not None:
            runs.append((path.parent.name, results))

    def sort_key(run):
        key = []
        for name, value in run[1]["overrides"]:
            try:
                key.append((name, 0, float(value), ""))
            except ValueError:
                key.append((name, 1, 0.0, value))
        return key

    return sorted(runs, key=sort_key)


def _format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"


def _keys(runs: List[Tuple[str, dict]]) -> List[str]:
    keys: List[str] = []
    for _, results in runs:
        keys += [k for k, _ in results["overrides"] if k not in keys]
    return keys


def _no_detections(results: dict) -> bool:
    # Detectron2's COCOEvaluator reports NaN for every metric when the model made no
    # detection above TEST.SCORE_THRESH_TEST (e.g. a classifier that never scores a class up):
    # COCO's AP of an empty detection set is 0.
    return results["status"] == "finished" and not math.isfinite(results["bbox"]["AP"])


def _box_cells(results: dict) -> List[str]:
    box = results.get("bbox", {})
    if _no_detections(results):
        return ["0.0"] * 3
    return [f"{box[m]:.1f}" if m in box else "-" for m in ("AP", "AP50", "AP75")]


def _note(name: str, results: dict) -> str:
    if _no_detections(results):
        return "no detections above TEST.SCORE_THRESH_TEST"
    if results["status"] == "diverged":
        return f"diverged at iteration {results['diverged_at_iter']}"
    if results["status"] == "failed":
        return f"failed (exit code {results['returncode']}), see {name}/train_net.log"
    return ""


def write_table(output_dir: Path, runs: List[Tuple[str, dict]]) -> str:
    """
    Write ``table.md``: one row per run, its override values, box AP, AP50, AP75, training time
    (Detectron2's "Total training time" summed over the run's attempts; the last attempt's wall
    time where none was logged) and a note for diverged or failed runs. Returns the table.
    """
    keys = _keys(runs)
    header = keys + ["AP", "AP50", "AP75", "training time", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "--|" * len(header)]
    for name, results in runs:
        values = dict(results["overrides"])
        cells = [values.get(k, "-") for k in keys] + _box_cells(results)
        train_time = results["train_time_s"]
        cells.append(_format_time(results["wall_time_s"] if train_time is None else train_time))
        cells.append(_note(name, results))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write(str(output_dir / "table.md"), lambda f: f.write(table), "w")
    return table


def plot_sweep(output_dir: Path, runs: List[Tuple[str, dict]]) -> None:
    """Write ``sweep.png``: AP, AP50 and AP75 of each run as grouped bars, notes in place."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    short = _short_keys(_keys(runs))
    labels = ["\n".join(f"{short[k]}={v}" for k, v in results["overrides"]) for _, results in runs]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(runs) + 2), 4.5))
    width = 0.27
    top = 1.0
    for i, metric in enumerate(("AP", "AP50", "AP75")):
        heights = [
            0.0 if _no_detections(results) else results.get("bbox", {}).get(metric, math.nan)
            for _, results in runs
        ]
        ax.bar([x + (i - 1) * width for x in range(len(runs))], heights, width, label=metric)
        top = max([top] + [h for h in heights if math.isfinite(h)])
    for x, (name, results) in enumerate(runs):
        note = _note(name, results).split(",")[0]
        if note:
            # x in data, y in axes coordinates: the note stands at the bottom of any scale.
            ax.text(x, 0.03, note, rotation=90, ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.3 * top)
    ax.set_ylabel("COCO box AP")
    ax.set_title(f"sweep: {output_dir.name}")
    ax.legend(loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(str(output_dir / "sweep.png"), lambda f: f.write(buffer.getvalue()), "wb")


def run_sweep(
    config_file: str,
    sets: Sequence[Tuple[str, Sequence[str]]],
    output_dir: str,
    *,
    opts: Sequence[str] = (),
    train_args: Sequence[str] = (),
    log=print,
) -> List[Tuple[str, dict]]:
    """
    Run every grid point of ``sets`` (see :func:`expand_grid`) that is not complete, one after
    the other, then write ``table.md`` and ``sweep.png`` over all runs in ``output_dir``.

    Raises:
        ValueError: naming the file or key when a run's config does not merge; no run starts.

    Returns:
        the runs of the table (see :func:`collect_results`).
    """
    grid = expand_grid(sets)
    for overrides in grid:
        check_focal_config(
            load_config(config_file, [*opts, *(x for pair in overrides for x in pair)])
        )
    names = [run_name(overrides) for overrides in grid]
    if len(set(names)) != len(names):
        raise ValueError(f"--set: two grid points have the same folder name: {names}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, overrides) in enumerate(zip(names, grid), 1):
        previous = _read_json(root / name / RESULTS)
        if previous is not None and previous.get("status") in COMPLETE:
            log(f"[{i}/{len(grid)}] {name}: {previous['status']}, kept")
            continue
        log(f"[{i}/{len(grid)}] {name}: training (log: {root / name / 'train_net.log'})")
        results = run_one(config_file, overrides, root / name, opts=opts, train_args=train_args)
        log(f"[{i}/{len(grid)}] {name}: {results['status']} {_note(name, results)}".rstrip())
    runs = collect_results(root)
    log(write_table(root, runs))
    plot_sweep(root, runs)
    return runs
