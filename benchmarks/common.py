"""Helpers shared by the benchmarks: the machine's description, load, and peak memory."""

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, List

import torch
from torch.profiler import ProfilerActivity, profile


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(run: Callable[[], None], device: str, repeated: bool = False) -> int:
    """
    Peak bytes allocated by PyTorch during ``run()`` above what was allocated before it. CUDA:
    ``torch.cuda.max_memory_allocated``. CPU: the CPU allocator reports every allocation and
    free to the profiler (``profile_memory=True``); the events are replayed in time order. It
    reports the free of a block only if it saw its allocation while profiling: for a
    ``repeated`` run (a training step), ``run`` goes once profiled before the measured run, so
    that the tensors a run leaves alive and the next one frees (the parameters' gradients, by
    ``zero_grad``) count as freed there, as they are in training.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if repeated:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            run()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def machine(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    parts = [
        f"CPU: {cpu} ({os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()})",
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}"
        + (
            f", ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
            if "ONEDNN_MAX_CPU_ISA" in os.environ
            else ""
        ),
        f"torch {torch.__version__}",
        f"device: {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""),
    ]
    return "; ".join(parts)


def isa_environment(isa: str) -> Dict[str, str]:
    """This process's environment for a child limited to oneDNN's ``isa`` ("native": no limit)."""
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return env


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def add_isa_argument(parser: argparse.ArgumentParser) -> None:
    """``--isa`` (measured in one child process each) and the children's hidden ``--child``."""
    parser.add_argument(
        "--isa",
        default="native,AVX2",
        help="comma-separated ONEDNN_MAX_CPU_ISA values, one child process each (CPU only)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run_isa_child(script: str, arguments: List[str], isa: str) -> dict:
    """The JSON that ``script --child ARGUMENTS`` prints last, run limited to oneDNN's ``isa``."""
    out = subprocess.run(
        [sys.executable, script, "--child", *arguments],
        env=isa_environment(isa),
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
