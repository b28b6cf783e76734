"""
Tests of the fused focal loss from labels against Detectron2's RetinaNet path (one-hot targets
and fvcore's ``sigmoid_focal_loss_jit``), the paper's formula in float64, and its own eager
implementation. Most checks run the eager implementation (``FOCAL_DET2_DISABLE_COMPILE=1``);
the ``compiled`` tests run the torch.compile'd kernel.
"""

import logging

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss_jit
from torch._inductor.cpp_builder import get_cpp_compiler
from torch._inductor.exc import InvalidCxxCompiler
from torch.nn import functional as F

from focal_det2.modeling import _fused_focal_loss as fused_focal_loss
from focal_det2.modeling._fused_focal_loss import DISABLE_COMPILE_ENV
from focal_det2.modeling.losses import sigmoid_focal_loss_with_labels

ALPHA_GAMMA = [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5), (0.75, 0.5), (0.0, 3.0)]


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """Run the eager implementation unless a test opts into the compiled one."""
    monkeypatch.setenv(DISABLE_COMPILE_ENV, "1")


@pytest.fixture
def compiled(monkeypatch, caplog):
    """
    Run the compiled kernel. Where inductor finds a C++ compiler, compiling must work: a
    fallback to the eager implementation (what users would then run, with only a warning)
    fails the test. Skips only without a C++ compiler.
    """
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        pytest.skip("no C++ compiler found (CXX, g++): torch.compile cannot build CPU kernels")
    monkeypatch.delenv(DISABLE_COMPILE_ENV)

    def eager_forbidden(*args, **kwargs):
        raise AssertionError(f"the eager implementation ran instead of the kernel: {caplog.text}")

    x, labels = _batch(64, 5, torch.float32, seed=0)
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(fused_focal_loss, "_run_eager", eager_forbidden)
        sigmoid_focal_loss_with_labels(x.requires_grad_(), labels).backward()
    assert "cpu" not in fused_focal_loss._COMPILE_FAILED, caplog.text


def _batch(n, k, dtype, seed, scale=3.0, ignored=0.1, positives=0.3, device="cpu"):
    """(n, k) logits and (n,) labels with the given fractions of ignored and positive rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    labels = torch.full((n,), k, dtype=torch.int64)
    u = torch.rand(n, generator=g)
    pos = u < positives
    labels[pos] = torch.randint(0, max(k, 1), (int(pos.sum()),), generator=g)
    labels[u > 1 - ignored] = -1
    return logits.to(dtype).to(device), labels.to(device)


def _detectron2(logits, labels, alpha, gamma, reduction):
    """Detectron2's RetinaNet classification loss (``losses`` of ``meta_arch/retinanet.py``)."""
    valid = labels >= 0
    targets = F.one_hot(labels[valid], logits.shape[1] + 1)[:, :-1].to(logits.dtype)
    return sigmoid_focal_loss_jit(logits[valid], targets, alpha, gamma, reduction)


def _paper_fp64(logits, labels, alpha, gamma):
    """Eq. 5 of the paper elementwise in float64 (fvcore's formula without its float32 cast)."""
    x = logits.double()
    targets = F.one_hot(labels.clamp_min(0), x.shape[1] + 1)[:, :-1].double()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss * (labels >= 0)[:, None]


def _value_and_grad(fn, logits, *args, grad_output=None):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, *args)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), x.grad


def _assert_grad_close(actual, expected, rtol=1e-5):
    # fvcore forms 1 - p_t by subtraction in float32, so its gradients of well-classified
    # elements (|grad| << max |grad|) carry absolute errors of ~1e-7 of the largest ones.
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=2e-6 * max(scale, 1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
@pytest.mark.parametrize("seed", range(3))
def test_sum_matches_detectron2(dtype, alpha, gamma, seed):
    n = int(torch.randint(2, 3000, (1,), generator=torch.Generator().manual_seed(seed)))
    k = (1, 7, 80)[seed]
    logits, labels = _batch(n, k, dtype, seed)
    value, grad = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, alpha, gamma)
    ref_value, ref_grad = _value_and_grad(_detectron2, logits, labels, alpha, gamma, "sum")
    assert value.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(value, ref_value.to(dtype), rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad, ref_grad)


@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
def test_fp64_matches_paper_formula(alpha, gamma):
    # Detectron2's path computes in float32 whatever the input; float64 is exact to ~1e-12.
    logits, labels = _batch(700, 9, torch.float64, seed=1)
    value, grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, alpha, gamma, "none"
    )
    ref_value, ref_grad = _value_and_grad(_paper_fp64, logits, labels, alpha, gamma)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


def test_gamma_zero_no_alpha_is_bce():
    logits, labels = _batch(300, 6, torch.float64, seed=2, ignored=0.0)
    targets = F.one_hot(labels, 7)[:, :-1].double()
    value, grad = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, -1, 0.0)
    ref_value, ref_grad = _value_and_grad(
        lambda x: F.binary_cross_entropy_with_logits(x, targets, reduction="sum"), logits
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("case", ["all_ignored", "no_positive", "empty"])
def test_degenerate_batches_match_detectron2(case, reduction):
    n = 0 if case == "empty" else 50
    ignored, positives = (1.0, 0.0) if case == "all_ignored" else (0.2, 0.0)
    logits, labels = _batch(n, 4, torch.float32, seed=3, ignored=ignored, positives=positives)
    if case == "all_ignored":
        assert (labels < 0).all()
    value, grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, reduction
    )
    if reduction == "none":
        ref_value = _paper_fp64(logits, labels, 0.25, 2.0).float()
        assert value.shape == (n, 4)
    else:
        ref_value = _detectron2(logits, labels, 0.25, 2.0, reduction)
    # "mean" of no valid row is NaN, as fvcore's mean over the empty masked targets.
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isfinite(grad).all() and grad.shape == (n, 4)
    assert (grad[labels < 0] == 0).all()
    if case != "no_positive":
        assert (grad == 0).all()


def test_reductions():
    logits, labels = _batch(1000, 11, torch.float32, seed=4)
    valid = labels >= 0
    grad_output = torch.rand(1000, 11, generator=torch.Generator().manual_seed(0))
    elems, grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, "none", grad_output=grad_output
    )
    ref_elems, ref_grad = _value_and_grad(
        _detectron2, logits, labels, 0.25, 2.0, "none", grad_output=grad_output[valid]
    )
    assert elems.shape == (1000, 11) and (elems[~valid] == 0).all() and (grad[~valid] == 0).all()
    torch.testing.assert_close(elems[valid], ref_elems, rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad, ref_grad)

    total = sigmoid_focal_loss_with_labels(logits, labels, reduction="sum")
    mean, mean_grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, "mean"
    )
    ref_mean, ref_mean_grad = _value_and_grad(_detectron2, logits, labels, 0.25, 2.0, "mean")
    torch.testing.assert_close(total, elems.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, total / (valid.sum() * 11), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=0)
    _assert_grad_close(mean_grad, ref_mean_grad)


def test_eager_chunks(monkeypatch):
    # Many chunks, the last one partial, give the same result as a single one.
    logits, labels = _batch(103, 5, torch.float32, seed=5)
    whole = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, "none")
    monkeypatch.setattr(fused_focal_loss, "_EAGER_CHUNK_ELEMENTS", {"cpu": 5 * 10})
    chunked = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, "none")
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_grad_output_scales_and_graph_can_be_retained():
    logits, labels = _batch(200, 3, torch.float32, seed=6)
    x = logits.clone().requires_grad_()
    loss = sigmoid_focal_loss_with_labels(x, labels)
    (3 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, first * 4 / 3)
    with torch.no_grad():
        torch.testing.assert_close(sigmoid_focal_loss_with_labels(x, labels), loss.detach())


def test_saves_only_the_gradient():
    logits, labels = _batch(300, 7, torch.float32, seed=12)
    x = logits.clone().requires_grad_()
    for reduction in ("sum", "none"):
        saved = sigmoid_focal_loss_with_labels(x, labels, reduction=reduction).grad_fn.saved_tensors
        assert [(t.shape, t.dtype) for t in saved] == [(x.shape, x.dtype)]


def test_labels_above_num_classes_are_an_error_naming_the_label():
    logits, labels = _batch(300, 7, torch.float32, seed=13)
    labels[5] = 9
    with pytest.raises(ValueError, match="label 9 is out of range for 7 classes"):
        sigmoid_focal_loss_with_labels(logits.requires_grad_(), labels)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_half_precision_close_to_float32(dtype, tol, reduction):
    logits, labels = _batch(2000, 20, torch.float32, seed=7)
    half = logits.to(dtype)
    value, grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, half, labels, 0.25, 2.0, reduction
    )
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    # The same rounded logits in float32: computed alike, only the gradient is rounded.
    rounded = _value_and_grad(
        sigmoid_focal_loss_with_labels, half.float(), labels, 0.25, 2.0, reduction
    )
    torch.testing.assert_close(value, rounded[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), rounded[1], rtol=tol, atol=1e-3 * tol)
    # The float32 logits: within the rounding of the logits to half precision.
    full = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, reduction)
    torch.testing.assert_close(value, full[0], rtol=tol, atol=tol * full[0].abs().max().item())
    torch.testing.assert_close(grad.float(), full[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_extreme_logits_are_finite(dtype):
    big = torch.finfo(dtype).max
    values = torch.tensor(
        [-big, -1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4, big], dtype=torch.float64
    )
    logits = values.repeat(4, 1).to(dtype)
    labels = torch.tensor([-1, 0, 8, 9])  # ignored, class 0, class 8, background
    value, grad = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, "none")
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    # Confidently wrong: loss = alpha_t |x|, grad = -+alpha_t; confidently right: 0 and 0.
    assert value[1, 0].item() == pytest.approx(0.25 * big, rel=1e-6)
    assert value[3, -1].item() == pytest.approx(0.75 * big, rel=1e-6)
    assert grad[1, 0] == -0.25 and grad[3, -1] == 0.75
    assert value[2, -1] == 0 and grad[2, -1] == 0 and value[3, 0] == 0 and grad[3, 0] == 0
    assert (value[0] == 0).all() and (grad[0] == 0).all()
    # The columns of moderate logits are all negatives (the positives are at -big and big).
    moderate = values.abs() <= 100
    background = torch.where(labels >= 0, int(moderate.sum()), -1)
    ref = _paper_fp64(logits[:, moderate], background, 0.25, 2.0)
    torch.testing.assert_close(value[:, moderate].double(), ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_of_far_negatives_have_no_subnormal_values(dtype):
    # Background logits from -10 down to -50: the exact gradient, (1 - alpha) p^gamma (p -
    # gamma (1 - p) log(1 - p)) ~ 3 (1 - alpha) p^3, crosses float32's smallest normal number
    # near -29.
    logits = torch.linspace(-10.0, -50.0, 401)[:, None]
    labels = torch.ones(401, dtype=torch.long)
    _, grad = _value_and_grad(sigmoid_focal_loss_with_labels, logits.to(dtype), labels)
    _, exact = _value_and_grad(sigmoid_focal_loss_with_labels, logits.to(dtype).double(), labels)
    tiny = torch.finfo(torch.float32).tiny
    grad = grad.double()
    assert not ((grad != 0) & (grad.abs() < tiny)).any()
    assert (grad[exact.abs() < tiny / 2] == 0).all()
    normal = exact.abs() > 2 * tiny
    assert 150 < normal.sum() < 250
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: an 8-bit mantissa
    torch.testing.assert_close(grad[normal], exact[normal], rtol=rtol, atol=0)


def test_bad_arguments():
    logits, labels = _batch(10, 3, torch.float32, seed=8)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss_with_labels(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss_with_labels(logits, labels, alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss_with_labels(logits, labels, gamma=-1.0)
    with pytest.raises(ValueError, match="labels"):
        sigmoid_focal_loss_with_labels(logits, labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        sigmoid_focal_loss_with_labels(logits[0], labels[:1])
    with pytest.raises(TypeError, match="labels"):
        sigmoid_focal_loss_with_labels(logits, labels.float())
    with pytest.raises(TypeError, match="logits"):
        sigmoid_focal_loss_with_labels(labels[:, None].repeat(1, 3), labels)


def test_compiled_matches_eager_without_recompiling(compiled, monkeypatch):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for n, (alpha, gamma) in zip([1000, 2333, 57, 2], ALPHA_GAMMA):
        logits, labels = _batch(n, 80, torch.float32, seed=n)
        for reduction in ("sum", "mean"):
            monkeypatch.delenv(DISABLE_COMPILE_ENV, raising=False)
            fused = _value_and_grad(
                sigmoid_focal_loss_with_labels, logits, labels, alpha, gamma, reduction
            )
            monkeypatch.setenv(DISABLE_COMPILE_ENV, "1")
            eager = _value_and_grad(
                sigmoid_focal_loss_with_labels, logits, labels, alpha, gamma, reduction
            )
            torch.testing.assert_close(fused, eager, rtol=2e-6, atol=1e-7)
    # The warm-up of the fixture compiled the kernel: new N, alpha and gamma reuse it.
    assert counters["stats"]["unique_graphs"] == graphs
    assert "cpu" not in fused_focal_loss._COMPILE_FAILED


def test_compiled_elementwise_matches_detectron2(compiled):
    logits, labels = _batch(1500, 80, torch.float32, seed=9)
    grad_output = torch.rand(1500, 80, generator=torch.Generator().manual_seed(1))
    valid = labels >= 0
    elems, grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, "none", grad_output=grad_output
    )
    ref_elems, ref_grad = _value_and_grad(
        _detectron2, logits, labels, 0.25, 2.0, "none", grad_output=grad_output[valid]
    )
    torch.testing.assert_close(elems[valid], ref_elems, rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad, ref_grad)
    assert (elems[~valid] == 0).all() and (grad[~valid] == 0).all()


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv(DISABLE_COMPILE_ENV)
    monkeypatch.setattr(fused_focal_loss, "_COMPILED", {})
    monkeypatch.setattr(fused_focal_loss, "_COMPILE_FAILED", set())
    monkeypatch.setattr(torch, "compile", broken_compile)
    logits, labels = _batch(100, 4, torch.float32, seed=10)
    with caplog.at_level(logging.WARNING, logger=fused_focal_loss.__name__):
        first = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels)
        second = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels)
    assert len(caplog.records) == 1 and "no compiler here" in caplog.text
    assert fused_focal_loss._COMPILE_FAILED == {"cpu"}
    monkeypatch.setenv(DISABLE_COMPILE_ENV, "1")
    eager = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_matches_cpu(monkeypatch, dtype, reduction):
    monkeypatch.delenv(DISABLE_COMPILE_ENV)
    logits, labels = _batch(5000, 80, dtype, seed=11)
    on_cpu = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, reduction)
    on_gpu = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits.cuda(), labels.cuda(), 0.25, 2.0, reduction
    )
    rtol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], rtol=rtol, atol=1e-6)
    torch.testing.assert_close(on_gpu[1].cpu(), on_cpu[1], rtol=rtol, atol=1e-5)


# ----- per-class alpha ----------------------------------------------------------------------


def _paper_fp64_per_class(logits, labels, alpha, gamma):
    """Eq. 5 in float64, alpha_k per column: alpha_k for a positive of class k, else 1 - alpha_k."""
    x = logits.double()
    a = alpha.double()[None, :]
    targets = F.one_hot(labels.clamp_min(0), x.shape[1] + 1)[:, :-1].double()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = torch.where(targets == 1, a, 1 - a)
    return alpha_t * (1 - p_t) ** gamma * ce * (labels >= 0)[:, None]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_per_class_alpha_fp64_matches_paper_formula(gamma):
    logits, labels = _batch(700, 9, torch.float64, seed=12)
    alpha = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0], dtype=torch.float64)
    value, grad = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, alpha, gamma, "none"
    )
    ref_value, ref_grad = _value_and_grad(_paper_fp64_per_class, logits, labels, alpha, gamma)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    # Negatives of class k are weighted by 1 - alpha_k: alpha_8 = 1 leaves its negatives no loss.
    negatives_of_8 = (labels >= 0) & (labels != 8)
    assert (value[negatives_of_8, 8] == 0).all() and (value[negatives_of_8, 7] > 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_per_class_alpha_of_equal_values_is_the_scalar_alpha(reduction):
    logits, labels = _batch(500, 7, torch.float32, seed=13)
    scalar = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, 0.25, 2.0, reduction)
    per_class = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits, labels, torch.full((7,), 0.25), 2.0, reduction
    )
    torch.testing.assert_close(per_class, scalar, rtol=0, atol=0)


def test_per_class_alpha_sum_matches_detectron2_per_class():
    # Summing Detectron2's loss over columns, each with its scalar alpha, is the per-class loss.
    logits, labels = _batch(900, 5, torch.float32, seed=14)
    alpha = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    value, grad = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, alpha, 2.0)
    valid = labels >= 0
    targets = F.one_hot(labels[valid], 6)[:, :-1].float()
    x = logits[valid].detach().clone().requires_grad_()
    ref = sum(
        sigmoid_focal_loss_jit(x[:, k], targets[:, k], float(alpha[k]), 2.0, "sum")
        for k in range(5)
    )
    ref.backward()
    torch.testing.assert_close(value, ref.detach(), rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad[valid], x.grad)


def test_per_class_alpha_bad_values_are_errors():
    logits, labels = _batch(10, 3, torch.float32, seed=15)
    for bad, match in [
        (torch.tensor([0.25, 0.5]), "3 classes, got 2 alphas"),
        (torch.tensor([0.25, 1.5, 0.5]), "alpha must be in"),
        (torch.tensor([0.25, -0.5, 0.5]), "alpha must be in"),
        (torch.tensor([0.25, float("nan"), 0.5]), "alpha must be in"),
        (torch.full((1, 3), 0.25), "alpha must be in"),
        (torch.tensor([0, 1, 0]), "alpha must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            sigmoid_focal_loss_with_labels(logits, labels, bad)


def test_compiled_per_class_alpha_matches_eager_without_recompiling(compiled, monkeypatch):
    from torch._dynamo.utils import counters

    graphs = None
    for seed, (n, alpha) in enumerate([(1000, None), (57, None), (333, 0.25)]):
        if seed == 1:
            # Both kernels ("sum": rows, "none": elements) are compiled by now.
            graphs = counters["stats"]["unique_graphs"]
        logits, labels = _batch(n, 80, torch.float32, seed=20 + seed)
        if alpha is None:
            alpha = torch.rand(80, generator=torch.Generator().manual_seed(seed))
        for reduction in ("sum", "none"):
            monkeypatch.delenv(DISABLE_COMPILE_ENV, raising=False)
            fused = _value_and_grad(
                sigmoid_focal_loss_with_labels, logits, labels, alpha, 2.0, reduction
            )
            monkeypatch.setenv(DISABLE_COMPILE_ENV, "1")
            eager = _value_and_grad(
                sigmoid_focal_loss_with_labels, logits, labels, alpha, 2.0, reduction
            )
            torch.testing.assert_close(fused, eager, rtol=2e-6, atol=1e-7)
    # New sizes, new per-class values and a scalar alpha reuse the compiled graphs.
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_per_class_alpha_matches_cpu(monkeypatch):
    monkeypatch.delenv(DISABLE_COMPILE_ENV)
    logits, labels = _batch(5000, 80, torch.float32, seed=16)
    alpha = torch.rand(80, generator=torch.Generator().manual_seed(3))
    on_cpu = _value_and_grad(sigmoid_focal_loss_with_labels, logits, labels, alpha, 2.0, "sum")
    # The alpha may stay on the CPU: the op moves it to the logits' device.
    on_gpu = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits.cuda(), labels.cuda(), alpha, 2.0, "sum"
    )
    on_gpu_alpha = _value_and_grad(
        sigmoid_focal_loss_with_labels, logits.cuda(), labels.cuda(), alpha.cuda(), 2.0, "sum"
    )
    for result in (on_gpu, on_gpu_alpha):
        torch.testing.assert_close(result[0].cpu(), on_cpu[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result[1].cpu(), on_cpu[1], rtol=1e-5, atol=1e-5)
