"""Helpers shared by the benchmarks: the machine's description, load, and peak memory."""

import os
import platform
from typing import Callable, Dict

import torch
from torch.profiler import ProfilerActivity, profile


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(run: Callable[[], None], device: str) -> int:
    """
    Peak bytes allocated by PyTorch during ``run()`` above what was allocated before it. CUDA:
    ``torch.cuda.max_memory_allocated``. CPU: the CPU allocator reports every allocation and
    free to the profiler (``profile_memory=True``); the events are replayed in time order.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
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
