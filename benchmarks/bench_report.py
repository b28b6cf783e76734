"""
Cost of the training report (``focal_det2.report.TrainingReportHook``) of a finished run, figure
by figure, as the trainer pays it at the end of training.

    .venv/bin/python benchmarks/bench_report.py --run-dir output/demo \
        [--config-file configs/demo.yaml] [--reps 5] [KEY VALUE ...]

The run folder must hold what the hook reads there: ``metrics.json``, the COCO evaluation's
arrays in ``inference/`` and ``model_final.pth`` (the model of ``val_detections.png``). The
report is written into a temporary folder, the run's own is left as it is.

Reported: the first report (what a run pays at the end of training: it also reads the
validation records; the training instances per class are counted at the start of training,
not timed) and the median of ``--reps`` later ones, figure by figure (one after the
other) and as ``write()`` (the trainer's call, which runs the model on the validation images
while the other figures are drawn), beside the time of one training iteration of the run
(median of its ``metrics.json``).
"""

import argparse
import datetime
import os
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Dict

from detectron2.modeling import build_model

from focal_det2.config import load_config
from focal_det2.report import REPORT_FILES, TrainingReportHook, read_metrics
from focal_det2.weights import WeightsError, load_weights

from common import load, machine

FIGURE_METHODS = dict(
    zip(REPORT_FILES, ("_curves", "_per_class_ap", "_pr_curves", "_val_detections"))
)


def timed_write(hook: TrainingReportHook) -> Dict[str, float]:
    """Seconds per figure of one report, as ``TrainingReportHook.write`` draws them."""
    seconds = {}
    for name, method in FIGURE_METHODS.items():
        start = time.perf_counter()
        if not getattr(hook, method)(os.path.join(hook.report_dir, name)):
            raise SystemExit(f"bench_report.py: {name} has no data in the run folder")
        seconds[name] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    return seconds


def time_call(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="OUTPUT_DIR of a finished run")
    parser.add_argument("--config-file", default="configs/demo.yaml", help="the run's config")
    parser.add_argument("--reps", type=int, default=5, help="later reports to time")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    cfg = load_config(args.config_file, [*args.opts, "OUTPUT_DIR", args.run_dir])
    model = build_model(cfg)
    weights = os.path.join(args.run_dir, "model_final.pth")
    try:
        load_weights(model, weights)  # strict: names the file and what does not fit
    except WeightsError as error:
        raise SystemExit(f"bench_report.py: {error}")
    iteration_s = statistics.median(
        r["time"] for r in read_metrics(os.path.join(args.run_dir, "metrics.json")) if "time" in r
    )

    def fresh_hook(report_dir: str) -> TrainingReportHook:
        hook = TrainingReportHook(cfg)
        hook.report_dir = report_dir
        hook.trainer = SimpleNamespace(model=model)
        hook.before_train()  # at the start of training: counts the training instances
        return hook

    load_before = load()
    with tempfile.TemporaryDirectory() as report_dir:
        # The whole write(), as the trainer calls it (the model's inference overlapped with
        # the matplotlib figures), then figure by figure, one after the other.
        hook = fresh_hook(report_dir)
        write_s = [time_call(hook.write) for _ in range(args.reps + 1)]
        hook = fresh_hook(report_dir)
        first = timed_write(hook)
        later = [timed_write(hook) for _ in range(args.reps)]

    print("# Training report cost")
    print()
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- machine: {machine('cpu')}")
    print(f"- load average before: {load_before}; after: {load()}")
    print(f"- run: {args.run_dir} ({args.config_file}), weights {weights}")
    print(f"- one training iteration of the run: {iteration_s:.2f} s (median of metrics.json)")
    print()
    print(f"| figure | first report (s) | later reports, median of {args.reps} (s) |")
    print("|---|---|---|")
    for name in first:
        later_s = statistics.median(x[name] for x in later) if later else float("nan")
        print(f"| {name} | {first[name]:.2f} | {later_s:.2f} |")
    later_write = statistics.median(write_s[1:]) if args.reps else float("nan")
    print(f"| **write()**, as the trainer calls it | **{write_s[0]:.2f}** | {later_write:.2f} |")


if __name__ == "__main__":
    main()
