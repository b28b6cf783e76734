"""
Per-device speed choices of FocalRetinaNet: the memory format of its convolutions,
``torch.compile`` of its dense parts, and whether a CPU runs bfloat16 training natively. None
changes the parameters or their state-dict keys; the first two change the results only by
floating-point rounding.
"""

import logging
import os
import time
from typing import Optional, Tuple

import torch
from torch import nn
from torch._functorch import config as functorch_config

__all__ = [
    "CHANNELS_LAST_SETTINGS",
    "cpu_bfloat16_support",
    "choose_channels_last",
    "choose_winograd",
    "WINOGRAD_SETTINGS",
    "compile_with_fallback",
]

logger = logging.getLogger(__name__)

#: Values of ``MODEL.FOCAL_RETINANET.CHANNELS_LAST``.
CHANNELS_LAST_SETTINGS = ("auto", "on", "off")
#: Values of ``MODEL.FOCAL_RETINANET.WINOGRAD``.
WINOGRAD_SETTINGS = ("auto", "on", "off")


def _onednn_has_avx512() -> bool:
    # oneDNN's NHWC convolution kernels beat its NCHW ones with AVX-512 and lose to them with
    # AVX2 only; ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) caps the ISA that oneDNN
    # uses below what the CPU has.
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    cap = (_onednn_isa_cap()[1] or "ALL").upper()
    return cap in ("ALL", "DEFAULT") or cap.startswith("AVX512") or cap.startswith("AVX10")


def _onednn_isa_cap() -> Tuple[str, Optional[str]]:
    # The variable that caps oneDNN's ISA, and its value (None when neither is set).
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if name in os.environ:
            return name, os.environ[name]
    return "ONEDNN_MAX_CPU_ISA", None


def choose_channels_last(setting: str, device: str, *, training: bool) -> Tuple[bool, str]:
    """
    Whether to keep the convolutions in channels-last memory format on ``device``, for training
    or for inference.

    Args:
        setting: "on", "off", or "auto" (:data:`CHANNELS_LAST_SETTINGS`): channels-last on a
            CUDA device with tensor cores (compute capability >= 7.0, cuDNN's NHWC kernels); on a
            CPU, for inference always and for training where oneDNN runs AVX-512. oneDNN's
            NHWC backward kernels lose to its NCHW ones on AVX2-only CPUs, while its NHWC
            forward kernels win there as well (benchmarks/README.md).
        device: the model's device, e.g. "cpu" or "cuda:0".
        training: the choice for training (True) or for inference (False).

    Returns:
        The choice and the reason for it, for the log.
    """
    if setting != "auto":
        return setting == "on", f"MODEL.FOCAL_RETINANET.CHANNELS_LAST is {setting!r}"
    if device.startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        use = major >= 7
        return use, f"CUDA compute capability {major}.{minor} ({'>=' if use else '<'} 7.0)"
    isa = torch.backends.cpu.get_cpu_capability()
    variable, cap = _onednn_isa_cap()
    where = f"CPU capability {isa}" + (f", {variable}={cap}" if cap else "")
    if not training:
        return True, f"{where}: oneDNN inference, faster in NHWC on AVX2 and AVX-512"
    use = _onednn_has_avx512()
    return use, f"{where}: oneDNN training {'with' if use else 'without'} AVX-512"


def choose_winograd(setting: str, device: str) -> Tuple[bool, str]:
    """
    Whether the large 3x3 convolutions of the head and the FPN (>= 256 channels) run by
    Winograd's algorithms on ``device`` (:mod:`.winograd`), in training and inference: 4-5x
    fewer multiplications than oneDNN's direct convolution, the same values up to float
    rounding (relative 2e-5).

    Args:
        setting: "on", "off", or "auto" (:data:`WINOGRAD_SETTINGS`): "auto" where it pays, a CPU
            whose oneDNN runs without AVX-512, where it is 1.2-2.4x faster (benchmarks/README.md);
            with AVX-512 oneDNN's direct kernels are about as fast (R50-FPN training and
            inference end to end: -5% to +3%).
        device: the model's device, e.g. "cpu" or "cuda:0".

    Returns:
        The choice and the reason for it, for the log.
    """
    if not device.startswith("cpu"):
        return False, f"not a CPU ({device})"
    if setting != "auto":
        return setting == "on", f"MODEL.FOCAL_RETINANET.WINOGRAD is {setting!r}"
    isa = torch.backends.cpu.get_cpu_capability()
    variable, cap = _onednn_isa_cap()
    where = f"CPU capability {isa}" + (f", {variable}={cap}" if cap else "")
    use = isa.startswith("AVX") and not _onednn_has_avx512()
    return use, f"{where}: oneDNN {'without' if use else 'with'} AVX-512"


def cpu_bfloat16_support() -> Tuple[bool, str]:
    """
    Whether oneDNN runs bfloat16 convolutions on this CPU in hardware (AMX or AVX512-BF16,
    not capped by ``ONEDNN_MAX_CPU_ISA``), where they are several times faster than float32;
    elsewhere it converts to float32 and back, slower than float32 alone.

    Returns:
        The answer and the reason for it, for the log.
    """
    units = [
        name
        for name, present in (
            ("AMX", torch.cpu._is_amx_tile_supported()),
            ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
        )
        if present
    ]
    if not units:
        return False, "this CPU has neither AMX nor AVX512-BF16"
    variable, cap = _onednn_isa_cap()
    # oneDNN computes in bfloat16 from its ISA AVX512_CORE_BF16 up (..._FP16, ..._AMX, AVX10_*); a
    # cap below that (AVX2, AVX512_CORE, ...) leaves it the float32 kernels and conversions.
    if cap is not None and cap.upper() not in ("ALL", "DEFAULT"):
        if not any(mark in cap.upper() for mark in ("BF16", "FP16", "AMX", "AVX10")):
            return False, f"{variable}={cap} keeps oneDNN from this CPU's {' and '.join(units)}"
    return True, f"this CPU has {' and '.join(units)}"


def _root_cause(exc: BaseException) -> BaseException:
    # Dynamo wraps a backend's failure in BackendCompilerFailed ("backend='inductor'
    # raised:"), inductor its own in InductorError: the innermost one says what broke.
    while True:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            return exc
        exc = inner


def compile_with_fallback(module: nn.Module, name: str) -> None:
    """
    Run ``module.forward`` under ``torch.compile`` with dynamic shapes (one graph for every
    image size, in training and in inference), in place: the module, its parameters and its
    state-dict keys stay the same. The first call, which compiles (the backward graph too, when
    it needs gradients), logs its duration; if compiling fails on this platform, a one-line
    warning is logged and the module runs eagerly from then on.

    Args:
        module: the module to compile, e.g. the backbone or the head.
        name: its name in the log.
    """
    eager_forward = module.forward
    compiled_forward = torch.compile(eager_forward, dynamic=True)
    compiled_modes = set()  # training / inference: BatchNorm makes them two graphs

    def forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            # AOTAutograd otherwise compiles the backward graph lazily, at the first backward
            # call, where a failure (e.g. a truncated kernel in inductor's cache) cannot fall
            # back: this forces it into the forward call.
            with functorch_config.patch(force_non_lazy_backward_lowering=True):
                out = compiled_forward(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # not the compiler's fault: eager would not fit either
        except Exception as exc:  # compiler and toolchain failures come in many types
            cause = _root_cause(exc)
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            logger.warning(
                "torch.compile of the %s failed (%s: %s); running it eagerly.",
                name,
                type(cause).__name__,
                message,
            )
            module.forward = eager_forward
            return eager_forward(*args, **kwargs)
        if module.training not in compiled_modes:
            compiled_modes.add(module.training)
            mode = "training" if module.training else "inference"
            logger.info("Compiled the %s (%s) in %.1f s.", name, mode, time.perf_counter() - start)
        return out

    module.forward = forward
