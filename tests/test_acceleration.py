"""The memory format chosen per device, and the compiled backbone and head."""

import copy
import logging

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as detectron2_build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from focal_det2.engine import FocalTrainer
from focal_det2.modeling import _fused_focal_loss, acceleration
from focal_det2.modeling.acceleration import (
    choose_channels_last,
    choose_winograd,
    cpu_bfloat16_support,
)

from helpers import demo_cfg

# Compiled (inductor) and eager float32 convolutions sum in different orders; over the demo
# model's layers that moves losses by ~1e-6 relative and boxes by ~1e-4 px at most.
COMPILED_LOSS_RTOL = 1e-4
COMPILED_BOX_ATOL = 1e-2
COMPILED_SCORE_ATOL = 1e-4


def _emulate_cpu(monkeypatch, capability, variable, isa_cap):
    """A CPU of ATen ``capability``, oneDNN capped by ``variable`` = ``isa_cap`` (None: not)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if variable is not None:
        monkeypatch.setenv(variable, isa_cap)


@pytest.mark.parametrize(
    "capability, variable, isa_cap, expected",
    [
        ("AVX512", None, None, True),
        ("AVX512", "ONEDNN_MAX_CPU_ISA", "AVX2", False),
        ("AVX512", "DNNL_MAX_CPU_ISA", "AVX2", False),
        ("AVX512", "ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
        ("AVX2", None, None, False),
        ("AVX2", "ONEDNN_MAX_CPU_ISA", "ALL", False),
        ("DEFAULT", None, None, False),
    ],
)
def test_auto_picks_channels_last_by_onednn_isa(
    monkeypatch, capability, variable, isa_cap, expected
):
    _emulate_cpu(monkeypatch, capability, variable, isa_cap)
    use, reason = choose_channels_last("auto", "cpu", training=True)
    assert use is expected
    assert capability in reason and ("with AVX-512" if expected else "without AVX-512") in reason
    # The log names the cap that decided.
    assert variable is None or f"{variable}={isa_cap}" in reason
    # NHWC forward kernels win on AVX2 as well (benchmarks/README.md).
    assert choose_channels_last("auto", "cpu", training=False)[0] is True


@pytest.mark.parametrize(
    "amx, avx512_bf16, variable, isa_cap, expected",
    [
        (True, True, None, None, True),
        (False, True, None, None, True),
        (False, False, None, None, False),
        (True, True, "ONEDNN_MAX_CPU_ISA", "AVX2", False),
        (True, True, "DNNL_MAX_CPU_ISA", "avx512_core", False),
        (True, True, "ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
        (True, True, "ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True),
        (True, True, "ONEDNN_MAX_CPU_ISA", "ALL", True),
    ],
)
def test_bfloat16_hardware_by_cpu_and_onednn_cap(
    monkeypatch, amx, avx512_bf16, variable, isa_cap, expected
):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if variable is not None:
        monkeypatch.setenv(variable, isa_cap)
    native, reason = cpu_bfloat16_support()
    assert native is expected
    if not (amx or avx512_bf16):
        assert reason == "this CPU has neither AMX nor AVX512-BF16"
    elif expected:
        assert reason.startswith("this CPU has ") and ("AMX" in reason) is amx
    else:
        # The log names the cap that decided.
        assert f"{variable}={isa_cap} keeps oneDNN from this CPU's" in reason


@pytest.mark.parametrize("setting, expected", [("on", True), ("off", False)])
def test_explicit_setting_wins(monkeypatch, setting, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for training in (True, False):
        assert choose_channels_last(setting, "cpu", training=training)[0] is expected


@pytest.mark.parametrize(
    "capability, variable, isa_cap, expected",
    [
        ("AVX512", None, None, False),
        ("AVX512", "ONEDNN_MAX_CPU_ISA", "AVX2", True),
        ("AVX512", "DNNL_MAX_CPU_ISA", "AVX2", True),
        ("AVX2", None, None, True),
        ("DEFAULT", None, None, False),
    ],
)
def test_auto_picks_winograd_where_onednn_lacks_avx512(
    monkeypatch, capability, variable, isa_cap, expected
):
    _emulate_cpu(monkeypatch, capability, variable, isa_cap)
    use, reason = choose_winograd("auto", "cpu")
    assert use is expected
    assert capability in reason
    assert variable is None or f"{variable}={isa_cap}" in reason
    assert choose_winograd("on", "cpu")[0] is True
    assert choose_winograd("off", "cpu")[0] is False
    assert choose_winograd("on", "cuda:0") == (False, "not a CPU (cuda:0)")


def _cfg(*opts):
    return demo_cfg("MODEL.RETINANET.NORM", "GN", "MODEL.RESNETS.NORM", "GN", *opts)


def _batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for size, boxes in ((128, [[10.0, 12.0, 60.0, 70.0]]), (96, [[20.0, 8.0, 80.0, 50.0]])):
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor([3])
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        batch.append({"image": image, "instances": instances})
    return batch


def test_auto_memory_format_is_logged_and_trains(caplog):
    with caplog.at_level(logging.INFO):
        model = build_model(_cfg("MODEL.FOCAL_RETINANET.CHANNELS_LAST", "auto"))
    use, reason = choose_channels_last("auto", "cpu", training=True)
    assert reason in caplog.text
    assert choose_channels_last("auto", "cpu", training=False)[1] in caplog.text
    conv = model.backbone.bottom_up.stem.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is use
    with EventStorage(0):
        losses = model(_batch())
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_memory_format_follows_the_mode_in_place():
    """eval() and train() switch the format of the same parameter objects, values unchanged."""
    model = build_model(_cfg("MODEL.FOCAL_RETINANET.CHANNELS_LAST", "auto"))
    model.channels_last = {True: False, False: True}
    model.train()
    parameters = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model.backbone.bottom_up.stem.conv1.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    model.eval()
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(
        p.is_contiguous(memory_format=torch.channels_last) for p in parameters if p.dim() == 4
    )
    with torch.no_grad():
        detections = model([{"image": _batch()[0]["image"]}])
    assert len(detections) == 1
    model.train()
    assert conv.is_contiguous() and list(model.parameters()) == parameters
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("key", ["CHANNELS_LAST", "WINOGRAD"])
def test_invalid_setting_names_key_and_values(key):
    with pytest.raises(ValueError, match=f'{key}.*"auto", "on", "off"'):
        build_model(_cfg(f"MODEL.FOCAL_RETINANET.{key}", "yes"))


def _losses_and_detections(model):
    torch.manual_seed(0)
    model.train()
    # Without autograd: the losses compare as well, and no backward graph is compiled.
    with EventStorage(0), torch.no_grad():
        losses = model(_batch())
    model.eval()
    # A low threshold so that the untrained model has detections to compare.
    model.test_score_thresh = 0.0
    with torch.no_grad():
        detections = model([{"image": x["image"]} for x in _batch()])
    return losses, [d["instances"] for d in detections]


@pytest.fixture
def fresh_dynamo():
    """Compiled modules leave dynamo state (guards, caches) that later tests must not inherit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_equals_eager_model(caplog, fresh_dynamo):
    torch.manual_seed(0)
    eager = build_model(_cfg())
    compiled = build_model(_cfg("MODEL.FOCAL_RETINANET.COMPILE", True))
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    with caplog.at_level(logging.INFO, logger=acceleration.__name__):
        compiled_losses, compiled_detections = _losses_and_detections(compiled)
    eager_losses, eager_detections = _losses_and_detections(eager)
    assert "Compiled the backbone (training)" in caplog.text, caplog.text
    assert "Compiled the head (inference)" in caplog.text, caplog.text
    assert "failed" not in caplog.text, caplog.text
    for key in eager_losses:
        torch.testing.assert_close(
            compiled_losses[key], eager_losses[key], rtol=COMPILED_LOSS_RTOL, atol=0
        )
    for ours, reference in zip(compiled_detections, eager_detections):
        assert len(reference) > 0
        assert torch.equal(ours.pred_classes, reference.pred_classes)
        torch.testing.assert_close(
            ours.pred_boxes.tensor, reference.pred_boxes.tensor, atol=COMPILED_BOX_ATOL, rtol=0
        )
        torch.testing.assert_close(ours.scores, reference.scores, atol=COMPILED_SCORE_ATOL, rtol=0)


def test_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler\nlong traceback of the toolchain")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    # The fused loss compiles through torch.compile too: its failure must not outlive this test.
    monkeypatch.setattr(_fused_focal_loss, "_COMPILED", {})
    monkeypatch.setattr(_fused_focal_loss, "_COMPILE_FAILED", set())
    torch.manual_seed(0)
    eager = build_model(_cfg())
    fallback = build_model(_cfg("MODEL.FOCAL_RETINANET.COMPILE", True))
    fallback.load_state_dict(eager.state_dict())
    with caplog.at_level(logging.WARNING, logger=acceleration.__name__):
        fallback_losses, _ = _losses_and_detections(fallback)
        _losses_and_detections(fallback)
    eager_losses, _ = _losses_and_detections(eager)
    warnings = [r for r in caplog.records if r.name == acceleration.__name__]
    assert [w.getMessage().splitlines()[0] for w in warnings] == [
        "torch.compile of the backbone failed (RuntimeError: no C++ compiler); running it "
        "eagerly.",
        "torch.compile of the head failed (RuntimeError: no C++ compiler); running it eagerly.",
    ]
    assert all(len(w.getMessage().splitlines()) == 1 for w in warnings)
    for key in eager_losses:
        torch.testing.assert_close(fallback_losses[key], eager_losses[key], rtol=0, atol=0)


def test_failing_backward_compile_falls_back_to_eager(monkeypatch, caplog, fresh_dynamo):
    # AOTAutograd compiles the backward graph apart from the forward one; its failure (seen
    # here: a kernel .so left empty in inductor's cache by a killed compile) must fall back
    # too, not crash the first backward call.
    def broken_backward(*args, **kwargs):
        raise ImportError("cxq.main.so: file too short")

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx_backward", broken_backward)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    reference = copy.deepcopy(module)
    acceleration.compile_with_fallback(module, "tiny module")
    image = torch.randn(2, 3, 9, 9)
    # Caches off: a backward cached by an earlier run would not compile at all.
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        caplog.at_level(logging.WARNING, logger=acceleration.__name__),
    ):
        module(image).sum().backward()
        module(image).sum().backward()
    warnings = [r.getMessage() for r in caplog.records if r.name == acceleration.__name__]
    assert warnings == [
        "torch.compile of the tiny module failed (ImportError: cxq.main.so: file too short); "
        "running it eagerly."
    ]
    reference(image).sum().backward()
    reference(image).sum().backward()
    for ours, expected in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, expected.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "clip_type, norm_type", [("norm", 2.0), ("norm", float("inf")), ("value", 2.0)]
)
def test_gradient_clipping_is_detectron2s(clip_type, norm_type):
    cfg = demo_cfg("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type)
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = norm_type
    ours = build_model(cfg)
    theirs = copy.deepcopy(ours)
    optimizers = FocalTrainer.build_optimizer(cfg, ours), detectron2_build_optimizer(cfg, theirs)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        sent = []
        for p, q in zip(ours.parameters(), theirs.parameters()):
            # The convolutions' gradient norms (2 and max) come out above CLIP_VALUE 10, most
            # biases' below.
            sent.append(torch.randn(p.shape, generator=generator) * 0.5)
            if p.dim() > 1:
                sent[-1].view(-1)[0] = 20.0
            p.grad, q.grad = sent[-1].clone(), sent[-1].clone()
        for optimizer in optimizers:
            optimizer.step()
        clipped = [not torch.equal(p.grad, g) for p, g in zip(ours.parameters(), sent)]
        assert 0 < sum(clipped) < len(clipped)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(p.grad, q.grad)
            assert torch.equal(p, q)
