"""
Tests of focal_det2.modeling.losses against the paper (Lin et al., ICCV 2017: eq. 5, Appendix
A and B), transcribed directly in float64, and against fvcore / PyTorch where they are the
reference.
"""

import itertools
import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_sigmoid_focal_loss
from fvcore.nn import sigmoid_focal_loss_star as fvcore_sigmoid_focal_loss_star
from torch.nn import functional as F
from torchvision.ops import box_iou

from focal_det2.modeling.losses import focal_star_loss, sigmoid_focal_loss, softmax_focal_loss
from focal_det2.modeling.sampling import ohem_select

LOW_PRECISION = (torch.float16, torch.bfloat16)
EXTREME_LOGITS = (30.0, 100.0, 500.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _logits_and_targets(n: int = 500, scale: float = 6.0, extreme=EXTREME_LOGITS):
    """Random float64 logits (with +-extreme values appended) and binary targets."""
    x = torch.randn(n, dtype=torch.float64) * scale
    ext = torch.tensor(extreme, dtype=torch.float64)
    x = torch.cat([x, ext, -ext, ext, -ext])
    t = (torch.rand(x.numel()) < 0.3).double()
    # Each extreme logit once with each target.
    m = len(extreme)
    t[n : n + 2 * m] = 1.0
    t[n + 2 * m :] = 0.0
    return x, t


def _alpha_t(t, alpha):
    return torch.ones_like(t) if alpha < 0 else torch.where(t == 1, alpha, 1 - alpha)


# ----- direct float64 transcriptions of the paper ------------------------------------------


def paper_focal_loss(x, t, alpha, gamma):
    """Eq. (5) with p = 1 / (1 + e^-x), p_t = p if y = 1 else 1 - p; 1 - p as e^-x / (1 + e^-x)."""
    p = 1 / (1 + torch.exp(-x))
    # 1 - p written without the cancellation that rounds it to 0 for x > 37 in float64.
    one_minus_p = 1 / (1 + torch.exp(x))
    p_t = torch.where(t == 1, p, one_minus_p)
    one_minus_p_t = torch.where(t == 1, one_minus_p, p)
    return -_alpha_t(t, alpha) * one_minus_p_t**gamma * torch.log(p_t)


def paper_focal_star_loss(x, t, alpha, gamma, beta):
    """Appendix A: x_t = y x, p_t* = sigmoid(gamma x_t + beta), FL* = -log(p_t*) / gamma."""
    y = 2 * t - 1
    p_t_star = 1 / (1 + torch.exp(-(gamma * y * x + beta)))
    return -_alpha_t(t, alpha) * torch.log(p_t_star) / gamma


def paper_softmax_focal_loss(logits, labels, alpha, gamma):
    """-alpha_t (1 - p_t)^gamma log(p_t), p_t = e^{x_label} / sum_j e^{x_j}."""
    e = torch.exp(logits)
    p_t = e.gather(1, labels[:, None]).squeeze(1) / e.sum(dim=1)
    one_minus_p_t = (e.sum(dim=1) - e.gather(1, labels[:, None]).squeeze(1)) / e.sum(dim=1)
    background = logits.shape[1] - 1
    alpha_t = 1.0 if alpha < 0 else torch.where(labels == background, 1 - alpha, alpha)
    return -alpha_t * one_minus_p_t**gamma * torch.log(p_t)


# Appendix B, as functions of x, y in {-1, 1}.
def dce_dx(x, y):
    p_t = torch.sigmoid(y * x)
    return y * (p_t - 1)


def dfl_dx(x, y, gamma):
    p_t = torch.sigmoid(y * x)
    # p_t log(p_t) -> 0 as p_t -> 0; xlogy makes 0 * log(0) = 0 there.
    return y * (1 - p_t) ** gamma * (gamma * torch.xlogy(p_t, p_t) + p_t - 1)


def dfl_star_dx(x, y, gamma, beta):
    p_t_star = torch.sigmoid(gamma * y * x + beta)
    return y * (p_t_star - 1)


def _grad(loss_fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


# ----- sigmoid focal loss -------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-1.0, 0.25, 0.75])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_sigmoid_focal_loss_matches_paper_formula(alpha, gamma):
    x, t = _logits_and_targets()
    expected = paper_focal_loss(x, t, alpha, gamma)
    assert torch.isfinite(expected).all()
    # float64 in, float64 computed; float32 in: float32 accuracy.
    torch.testing.assert_close(
        sigmoid_focal_loss(x, t, alpha, gamma), expected, rtol=1e-12, atol=1e-12
    )
    actual32 = sigmoid_focal_loss(x.float(), t.float(), alpha, gamma)
    assert actual32.dtype == torch.float32
    torch.testing.assert_close(actual32.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "alpha, gamma", [(-1, 0), (-1, 2), (0.25, 2), (0.5, 0.5), (0.75, 1), (0.25, 5)]
)
def test_sigmoid_focal_loss_equals_fvcore(alpha, gamma):
    # Logits where fvcore's 1 - p_t does not round to 0 (there its gradient is NaN for gamma < 1).
    x = (torch.randn(2000) * 4).clamp(-12, 12)
    t = (torch.rand(2000) < 0.3).float()
    loss, grad = _grad(sigmoid_focal_loss, x, t, alpha, gamma)
    fv_loss, fv_grad = _grad(fvcore_sigmoid_focal_loss, x, t, alpha, gamma)
    torch.testing.assert_close(loss, fv_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, fv_grad, rtol=1e-5, atol=1e-7)
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            sigmoid_focal_loss(x, t, alpha, gamma, reduction),
            fvcore_sigmoid_focal_loss(x, t, alpha, gamma, reduction),
        )
    # Soft targets, accepted by fvcore, give its values too.
    soft = torch.rand(2000)
    torch.testing.assert_close(
        sigmoid_focal_loss(x, soft, alpha, gamma),
        fvcore_sigmoid_focal_loss(x, soft, alpha, gamma),
        rtol=1e-5,
        atol=1e-7,
    )


def test_sigmoid_focal_loss_gamma0_is_bce():
    x, t = _logits_and_targets(extreme=(30.0, 100.0, 1e4))
    x, t = x.float(), t.float()
    loss, grad = _grad(sigmoid_focal_loss, x, t, alpha=-1, gamma=0)
    bce_loss, bce_grad = _grad(F.binary_cross_entropy_with_logits, x, t, reduction="none")
    assert torch.equal(loss, bce_loss)
    assert torch.equal(grad, bce_grad)


def test_sigmoid_focal_loss_alpha_extremes():
    x, t = _logits_and_targets()
    unweighted = sigmoid_focal_loss(x, t, alpha=-1, gamma=2)
    # alpha = 1: only positives count; alpha = 0: only negatives.
    only_pos = sigmoid_focal_loss(x, t, alpha=1, gamma=2)
    only_neg = sigmoid_focal_loss(x, t, alpha=0, gamma=2)
    torch.testing.assert_close(only_pos, torch.where(t == 1, unweighted, 0.0))
    torch.testing.assert_close(only_neg, torch.where(t == 0, unweighted, 0.0))
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=0.5, gamma=2), unweighted / 2)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(x, t, alpha=1.5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_focal_loss_gradient_matches_appendix_b(gamma, dtype):
    x, t = _logits_and_targets(extreme=(30.0, 50.0))
    y = 2 * t - 1
    _, grad = _grad(sigmoid_focal_loss, x.to(dtype), t.to(dtype), alpha=-1, gamma=gamma)
    expected = dfl_dx(x, y, gamma)
    # float32: (1 - p_t)^gamma amplifies the rounding of p_t gamma-fold.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected, **tol)
    if gamma == 0:
        torch.testing.assert_close(grad.double(), dce_dx(x, y), **tol)


@pytest.mark.parametrize("target", [1.0, 0.0])
def test_paper_examples_focal_loss_down_weights_easy_examples(target):
    # Sec. 3.2: with gamma = 2, an example with p_t = 0.9 has a 100x lower loss than with CE,
    # one with p_t ~ 0.968 a ~1000x lower loss.
    y = 2 * target - 1
    for p_t, expected_ratio, rtol in ((0.9, 100.0, 1e-4), (0.968, 1000.0, 0.03)):
        x = torch.tensor([y * math.log(p_t / (1 - p_t))])
        t = torch.tensor([target])
        ce = sigmoid_focal_loss(x, t, alpha=-1, gamma=0)
        fl = sigmoid_focal_loss(x, t, alpha=-1, gamma=2)
        assert (ce / fl).item() == pytest.approx(expected_ratio, rel=rtol)
        # The exact ratio is (1 - p_t)^-2.
        assert (ce / fl).item() == pytest.approx((1 - p_t) ** -2, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_sigmoid_focal_loss_stable_for_extreme_logits(dtype, gamma, alpha):
    # Every extreme logit once as an easy (p_t = 1) and once as a hard (p_t = 0) example.
    big = torch.tensor([100.0, 1e4], dtype=dtype)
    x = torch.cat([big, -big, big, -big])
    t = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1], dtype=dtype)
    easy = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    loss, grad = _grad(sigmoid_focal_loss, x, t, alpha=alpha, gamma=gamma)
    assert loss.dtype == (torch.float32 if dtype in LOW_PRECISION else dtype)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    # Easy examples: no loss and no gradient; hard ones: alpha_t |x| and gradient -y alpha_t.
    assert (loss[easy] < 1e-30).all()
    assert (grad[easy].float().abs() < 1e-30).all()
    alpha_t = _alpha_t(t[~easy].float(), alpha)
    torch.testing.assert_close(loss[~easy], alpha_t * x[~easy].float().abs())
    torch.testing.assert_close(grad[~easy].float(), -(2 * t[~easy].float() - 1) * alpha_t)


def test_sigmoid_focal_loss_half_precision_is_computed_in_float32():
    x, t = _logits_and_targets(extreme=(30.0, 100.0))
    for dtype in LOW_PRECISION:
        x_low = x.to(dtype)
        torch.testing.assert_close(
            sigmoid_focal_loss(x_low, t.to(dtype)), sigmoid_focal_loss(x_low.float(), t.float())
        )


# ----- FL* ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, beta", [(2.0, 1.0), (4.0, 0.0), (1.0, -1.0), (0.5, 2.0)])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_focal_star_loss_matches_appendix_a(gamma, beta, alpha):
    x, t = _logits_and_targets(extreme=(30.0, 100.0))
    expected = paper_focal_star_loss(x, t, alpha, gamma, beta)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(focal_star_loss(x, t, alpha, gamma, beta), expected)
    actual32 = focal_star_loss(x.float(), t.float(), alpha, gamma, beta)
    torch.testing.assert_close(actual32.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma, beta", [(2.0, 1.0), (4.0, 0.0), (1.0, -1.0)])
def test_focal_star_loss_gradient_matches_appendix_b(gamma, beta):
    x, t = _logits_and_targets(extreme=(30.0, 100.0))
    _, grad = _grad(focal_star_loss, x, t, -1.0, gamma, beta)
    torch.testing.assert_close(grad, dfl_star_dx(x, 2 * t - 1, gamma, beta))


@pytest.mark.parametrize("gamma", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_focal_star_loss_beta0_equals_fvcore_star(gamma, alpha):
    x, t = _logits_and_targets(extreme=(30.0, 100.0))
    x, t = x.float(), t.float()
    loss, grad = _grad(focal_star_loss, x, t, alpha, gamma, 0.0)
    fv_loss, fv_grad = _grad(fvcore_sigmoid_focal_loss_star, x, t, alpha, gamma)
    torch.testing.assert_close(loss, fv_loss)
    torch.testing.assert_close(grad, fv_grad)


def test_focal_star_loss_gamma1_beta0_is_cross_entropy():
    # Appendix A: FL* with gamma = 1, beta = 0 is CE.
    x, t = _logits_and_targets()
    torch.testing.assert_close(
        focal_star_loss(x, t, alpha=-1, gamma=1.0, beta=0.0),
        F.binary_cross_entropy_with_logits(x, t, reduction="none"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_focal_star_loss_stable_for_extreme_logits(dtype):
    big = torch.tensor([100.0, 1e4], dtype=dtype)
    x = torch.cat([big, -big, big, -big])
    t = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1], dtype=dtype)
    for gamma, beta in ((2.0, 1.0), (4.0, 0.0)):
        loss, grad = _grad(focal_star_loss, x, t, 0.25, gamma, beta)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_focal_star_loss_rejects_bad_arguments():
    x, t = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="gamma"):
        focal_star_loss(x, t, gamma=0.0, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        focal_star_loss(x, torch.ones(1), gamma=1.0, beta=0.0)


# ----- softmax focal loss -------------------------------------------------------------------


def _softmax_inputs(n: int = 400, num_classes: int = 5, dtype=torch.float64):
    logits = torch.randn(n, num_classes + 1, dtype=dtype) * 4
    # A few rows with extreme logits, for the true class and against it.
    logits[:6] = 0
    logits[0, 0], logits[1, 0], logits[2, 0] = 100.0, -100.0, 300.0
    logits[3, -1], logits[4, -1], logits[5, -1] = -300.0, 100.0, -100.0
    labels = torch.randint(0, num_classes + 1, (n,))
    labels[:3] = 0
    labels[3:6] = num_classes
    return logits, labels


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.25, 0.75])
def test_softmax_focal_loss_matches_paper_formula(gamma, alpha):
    logits, labels = _softmax_inputs()
    expected = paper_softmax_focal_loss(logits, labels, alpha, gamma)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(softmax_focal_loss(logits, labels, alpha, gamma), expected)
    actual32 = softmax_focal_loss(logits.float(), labels, alpha, gamma)
    assert actual32.dtype == torch.float32
    torch.testing.assert_close(actual32.double(), expected, rtol=1e-5, atol=1e-6)


def test_softmax_focal_loss_gamma0_is_cross_entropy():
    logits, labels = _softmax_inputs(dtype=torch.float32)
    loss, grad = _grad(softmax_focal_loss, logits, labels, alpha=-1, gamma=0.0)
    ce_loss, ce_grad = _grad(F.cross_entropy, logits, labels, reduction="none")
    torch.testing.assert_close(loss, ce_loss)
    torch.testing.assert_close(grad, ce_grad)
    torch.testing.assert_close(
        softmax_focal_loss(logits, labels, alpha=-1, gamma=0.0, reduction="mean"),
        F.cross_entropy(logits, labels),
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_softmax_focal_loss_with_two_logits_is_sigmoid_focal_loss(gamma, alpha):
    # One class plus background: softmax over (a, b) is a sigmoid of a - b, label 0 a positive.
    logits, labels = _softmax_inputs(num_classes=1)
    loss, grad = _grad(softmax_focal_loss, logits, labels, alpha, gamma)
    margin = (logits[:, 0] - logits[:, 1]).detach().requires_grad_(True)
    targets = (labels == 0).double()
    sigmoid_loss = sigmoid_focal_loss(margin, targets, alpha, gamma)
    (margin_grad,) = torch.autograd.grad(sigmoid_loss.sum(), margin)
    torch.testing.assert_close(loss, sigmoid_loss.detach())
    torch.testing.assert_close(grad, torch.stack([margin_grad, -margin_grad], dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 2.0])
def test_softmax_focal_loss_stable_for_extreme_logits(dtype, gamma):
    logits = torch.zeros(4, 3, dtype=dtype)
    logits[0, 0] = logits[1, 2] = 1e4  # easy: p_t = 1
    logits[2, 1] = logits[3, 0] = 1e4  # hard: p_t = 0
    labels = torch.tensor([0, 2, 0, 2])
    loss, grad = _grad(softmax_focal_loss, logits, labels, 0.25, gamma)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss[:2] == 0).all() and (grad[:2] == 0).all()
    torch.testing.assert_close(loss[2:], torch.tensor([0.25 * 1e4, 0.75 * 1e4]), rtol=1e-2, atol=0)


def test_softmax_focal_loss_rejects_bad_labels():
    logits = torch.zeros(3, 4)
    for bad in ([0, -1, 3], [0, 4, 1]):
        with pytest.raises(ValueError, match="labels"):
            softmax_focal_loss(logits, torch.tensor(bad))
    with pytest.raises(ValueError, match="labels"):
        softmax_focal_loss(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="alpha"):
        softmax_focal_loss(logits, torch.tensor([0, 1, 2]), alpha=1.5)


def test_losses_of_no_examples():
    empty = torch.zeros(0)
    assert sigmoid_focal_loss(empty, empty).shape == (0,)
    assert sigmoid_focal_loss(empty, empty, reduction="sum").item() == 0
    assert focal_star_loss(empty, empty, 0.25, 2.0, 1.0, reduction="sum").item() == 0
    no_rows = softmax_focal_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert no_rows.shape == (0,)


# ----- reductions ---------------------------------------------------------------------------

LOSS_CALLS = {
    "sigmoid_focal_loss": lambda x, t, **kw: sigmoid_focal_loss(x, t, 0.25, 2.0, **kw),
    "focal_star_loss": lambda x, t, **kw: focal_star_loss(x, t, 0.25, 2.0, 1.0, **kw),
    "softmax_focal_loss": lambda x, t, **kw: softmax_focal_loss(
        x.view(-1, 4), (t.view(-1, 4)[:, 0] * 3).long(), 0.25, 2.0, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(LOSS_CALLS))
def test_reductions(name):
    loss_fn = LOSS_CALLS[name]
    x = torch.randn(40, 4)
    t = (torch.rand(40, 4) < 0.5).float()
    none = loss_fn(x, t, reduction="none")
    torch.testing.assert_close(loss_fn(x, t, reduction="mean"), none.mean())
    torch.testing.assert_close(loss_fn(x, t, reduction="sum"), none.sum())
    # The default is no reduction.
    torch.testing.assert_close(loss_fn(x, t), none)
    with pytest.raises(ValueError, match="reduction.*'none', 'mean', 'sum'"):
        loss_fn(x, t, reduction="avg")


# ----- OHEM ---------------------------------------------------------------------------------


def reference_ohem(losses, boxes, labels, num_classes, batch_size, nms_thresh, fg_fraction):
    """Brute force: greedy NMS in Python over non-ignored anchors by loss, then the quotas."""
    order = sorted((i for i in range(len(labels)) if labels[i] >= 0), key=lambda i: -losses[i])
    iou = box_iou(boxes, boxes).tolist()
    kept = []
    for i in order:
        if all(iou[i][j] <= nms_thresh for j in kept):
            kept.append(i)
    if fg_fraction is None:
        return kept[:batch_size]
    fg = [i for i in kept if labels[i] < num_classes]
    bg = [i for i in kept if labels[i] == num_classes]
    fg = fg[: int(fg_fraction * batch_size)]
    bg = bg[: batch_size - len(fg)]
    chosen = set(fg + bg)
    return [i for i in kept if i in chosen]


def _random_anchors(num: int, num_classes: int, fg_share: float = 0.2, ignored_share: float = 0.1):
    """Clustered boxes (so that NMS suppresses), distinct losses, labels in {-1, 0..K}."""
    centers = torch.rand(max(num // 8, 1), 2) * 200
    xy = centers[torch.randint(0, centers.shape[0], (num,))] + torch.randn(num, 2) * 6
    wh = 10 + torch.rand(num, 2) * 30
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    u = torch.rand(num)
    labels = torch.full((num,), num_classes)
    fg = u < fg_share
    labels[fg] = torch.randint(0, num_classes, (int(fg.sum()),))
    labels[u > 1 - ignored_share] = -1
    return torch.rand(num), boxes, labels


@pytest.mark.parametrize("nms_thresh", [0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("fg_fraction", [None, 0.25, 0.5])
@pytest.mark.parametrize("batch_size", [1, 3, 16, 64, 500])
def test_ohem_select_matches_brute_force(nms_thresh, fg_fraction, batch_size):
    for trial in range(3):
        losses, boxes, labels = _random_anchors(150, num_classes=3, fg_share=0.05 + 0.2 * trial)
        selected = ohem_select(
            losses,
            boxes,
            labels,
            num_classes=3,
            batch_size_per_image=batch_size,
            nms_thresh=nms_thresh,
            fg_fraction=fg_fraction,
        )
        assert selected.dtype == torch.int64
        expected = reference_ohem(
            losses.tolist(), boxes, labels.tolist(), 3, batch_size, nms_thresh, fg_fraction
        )
        assert selected.tolist() == expected


def test_ohem_select_count_and_no_ignored():
    losses, boxes, labels = _random_anchors(300, num_classes=2)
    iou = box_iou(boxes, boxes)
    for batch_size, nms_thresh in itertools.product((8, 128, 1000), (0.5, 0.7, 1.0)):
        selected = ohem_select(
            losses,
            boxes,
            labels,
            num_classes=2,
            batch_size_per_image=batch_size,
            nms_thresh=nms_thresh,
        )
        eligible_after_nms = len(
            reference_ohem(losses.tolist(), boxes, labels.tolist(), 2, 10**9, nms_thresh, None)
        )
        assert selected.numel() == min(batch_size, eligible_after_nms)
        assert len(set(selected.tolist())) == selected.numel()
        assert (labels[selected] >= 0).all()
        # Survivors of NMS do not overlap each other above the threshold.
        pairwise = iou[selected][:, selected] - 2 * torch.eye(selected.numel())
        assert (pairwise <= nms_thresh).all()


def test_ohem_select_without_nms_takes_highest_losses():
    losses, boxes, labels = _random_anchors(500, num_classes=4)
    eligible = torch.nonzero(labels >= 0).squeeze(1)
    selected = ohem_select(
        losses, boxes, labels, num_classes=4, batch_size_per_image=64, nms_thresh=1.0
    )
    expected = eligible[losses[eligible].topk(64).indices]
    assert selected.tolist() == expected.tolist()


def test_ohem_select_respects_fg_fraction():
    # Plenty of both: exactly 1:3, the hardest of each kind.
    losses, boxes, labels = _random_anchors(2000, num_classes=4, fg_share=0.3)
    selected = ohem_select(
        losses,
        boxes,
        labels,
        num_classes=4,
        batch_size_per_image=128,
        nms_thresh=1.0,
        fg_fraction=0.25,
    )
    is_fg = labels[selected] < 4
    assert selected.numel() == 128 and int(is_fg.sum()) == 32
    for kind in ((labels >= 0) & (labels < 4), labels == 4):
        candidates = torch.nonzero(kind).squeeze(1)
        chosen = selected[kind[selected]]
        expected = candidates[losses[candidates].topk(chosen.numel()).indices]
        assert sorted(chosen.tolist()) == sorted(expected.tolist())
    # Foreground runs short: all of it, and background fills up to the batch size.
    labels[labels < 4] = 4
    labels[:5] = 0
    selected = ohem_select(
        losses,
        boxes,
        labels,
        num_classes=4,
        batch_size_per_image=128,
        nms_thresh=1.0,
        fg_fraction=0.25,
    )
    assert selected.numel() == 128 and int((labels[selected] < 4).sum()) == 5


def test_ohem_select_nms_suppresses_overlapping_lower_loss_anchors():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 0.0, 11.0, 10.0],  # IoU 9/11 = 0.82 with box 0
            [50.0, 50.0, 60.0, 60.0],  # apart
            [0.0, 0.0, 10.0, 10.0],  # identical to box 0, but ignored
        ]
    )
    losses = torch.tensor([2.0, 1.0, 0.5, 5.0])
    labels = torch.tensor([0, 1, 1, -1])

    def select(nms_thresh):
        return ohem_select(
            losses, boxes, labels, num_classes=1, batch_size_per_image=4, nms_thresh=nms_thresh
        ).tolist()

    # The ignored anchor suppresses nothing; box 1 falls to box 0 at IoU 0.82.
    assert select(0.5) == [0, 2]
    assert select(0.85) == [0, 1, 2]
    assert select(1.0) == [0, 1, 2]
    # The higher-loss box survives whichever index it has.
    losses[:2] = torch.tensor([1.0, 2.0])
    assert select(0.5) == [1, 2]


def test_ohem_select_edge_cases():
    losses, boxes, labels = _random_anchors(50, num_classes=2)
    kwargs = dict(num_classes=2, nms_thresh=0.5)
    assert ohem_select(losses, boxes, labels, batch_size_per_image=0, **kwargs).numel() == 0
    none = torch.zeros(0, dtype=torch.int64)
    empty = ohem_select(torch.zeros(0), torch.zeros(0, 4), none, batch_size_per_image=8, **kwargs)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    all_ignored = torch.full_like(labels, -1)
    assert ohem_select(losses, boxes, all_ignored, batch_size_per_image=8, **kwargs).numel() == 0
    # Losses that require grad are fine (selection runs without grad).
    grad_losses = losses.clone().requires_grad_(True)
    assert ohem_select(grad_losses, boxes, labels, batch_size_per_image=8, **kwargs).numel() > 0
    with pytest.raises(ValueError, match="labels"):
        ohem_select(losses, boxes, labels + 2, batch_size_per_image=8, **kwargs)
    with pytest.raises(ValueError, match="fg_fraction"):
        ohem_select(losses, boxes, labels, batch_size_per_image=8, fg_fraction=1.5, **kwargs)
    with pytest.raises(ValueError, match="shapes"):
        ohem_select(losses, boxes[:, :2], labels, batch_size_per_image=8, **kwargs)


# ----- the deprecated module ----------------------------------------------------------------


def test_deprecated_module_keeps_earlier_signatures_and_warns():
    from focal_det2 import losses as old

    x, t = _logits_and_targets()
    logits, labels = _softmax_inputs()
    with pytest.warns(DeprecationWarning, match="focal_det2.modeling.losses.focal_star_loss"):
        star = old.focal_star_loss(x, t, 2.0, 1.0, alpha=0.25)
    torch.testing.assert_close(star, focal_star_loss(x, t, 0.25, 2.0, 1.0))
    with pytest.warns(DeprecationWarning):
        softmax = old.softmax_focal_loss(logits, labels, 2.0, None)
    torch.testing.assert_close(softmax, softmax_focal_loss(logits, labels, -1.0, 2.0))
    with pytest.warns(DeprecationWarning):
        summed = old.sigmoid_focal_loss_with_labels(logits[:, :-1], labels)
    torch.testing.assert_close(
        summed,
        sigmoid_focal_loss(logits[:, :-1], F.one_hot(labels)[:, :-1].double(), reduction="sum"),
    )


# ----- per-class alpha ----------------------------------------------------------------------

PER_CLASS_ALPHA = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)


def _per_class_inputs(k=6, n=300):
    x = torch.randn(n, k, dtype=torch.float64) * 4
    t = (torch.rand(n, k) < 0.3).double()
    return x, t


def _per_class_alpha_t(t, alpha):
    return torch.where(t == 1, alpha[None, :], 1 - alpha[None, :])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_focal_loss_per_class_alpha_matches_paper_formula(gamma):
    x, t = _per_class_inputs()
    loss, grad = _grad(sigmoid_focal_loss, x, t, PER_CLASS_ALPHA, gamma)
    ref_loss, ref_grad = _grad(
        lambda x: _per_class_alpha_t(t, PER_CLASS_ALPHA) * paper_focal_loss(x, t, -1, gamma), x
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0)])
def test_focal_star_loss_per_class_alpha_matches_appendix_a(gamma, beta):
    x, t = _per_class_inputs()
    loss, grad = _grad(focal_star_loss, x, t, PER_CLASS_ALPHA, gamma, beta)
    ref_loss, ref_grad = _grad(
        lambda x: _per_class_alpha_t(t, PER_CLASS_ALPHA)
        * paper_focal_star_loss(x, t, -1, gamma, beta),
        x,
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_focal_loss_per_class_alpha_matches_paper_formula(gamma):
    logits, labels = _softmax_inputs(num_classes=6)
    alpha = PER_CLASS_ALPHA
    loss, grad = _grad(softmax_focal_loss, logits, labels, alpha, gamma)
    # Label k < K: alpha_k; background: 1 - mean(alpha).
    alpha_t = torch.where(labels == 6, 1 - alpha.mean(), alpha[labels.clamp(max=5)])
    ref_loss, ref_grad = _grad(
        lambda x: alpha_t * paper_softmax_focal_loss(x, labels, -1, gamma), logits
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_per_class_alpha_of_equal_values_is_the_scalar_alpha():
    x, t = _per_class_inputs()
    same = torch.full((6,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(sigmoid_focal_loss(x, t, same), sigmoid_focal_loss(x, t, 0.25))
    torch.testing.assert_close(
        focal_star_loss(x, t, same, 2.0, 1.0), focal_star_loss(x, t, 0.25, 2.0, 1.0)
    )
    logits, labels = _softmax_inputs(num_classes=6)
    torch.testing.assert_close(
        softmax_focal_loss(logits, labels, same), softmax_focal_loss(logits, labels, 0.25)
    )


def test_per_class_alpha_of_the_wrong_length_or_range_is_an_error():
    x, t = _per_class_inputs()
    logits, labels = _softmax_inputs(num_classes=6)
    calls = [
        lambda a: sigmoid_focal_loss(x, t, a),
        lambda a: focal_star_loss(x, t, a, 2.0, 1.0),
        lambda a: softmax_focal_loss(logits, labels, a),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="6 classes, got 5 alphas"):
            call(torch.full((5,), 0.25))
        with pytest.raises(ValueError, match="alpha must be in"):
            call(torch.tensor([0.25] * 5 + [1.5]))
