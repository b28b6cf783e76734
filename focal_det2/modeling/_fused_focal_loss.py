"""
Private backend of :func:`focal_det2.modeling.losses.sigmoid_focal_loss_with_labels`: the
sigmoid focal loss taken from integer labels, fused with its gradient. Arguments are checked by
that function, not here.

Detectron2's RetinaNet builds a float one-hot target of the logits' size and runs
``fvcore.nn.sigmoid_focal_loss_jit`` on it; autograd then keeps about a dozen (N, K) tensors
for the backward pass. Here one elementwise pass computes the loss and the closed-form gradient
of Appendix B of the paper, only the gradient is kept for backward, and the target of element
(i, k) is the comparison ``labels[i] == k``, evaluated inside that pass.

The pass is compiled with ``torch.compile`` (inductor, ``dynamic=True``, so a new number of
anchors never recompiles) on the first call, and falls back to an eager implementation of the
same formula, in chunks of rows, where compilation is unavailable or fails (once, with a
warning) or when the environment variable ``FOCAL_DET2_DISABLE_COMPILE=1`` is set.
"""

import logging
import os
from typing import Callable, Dict, Optional, Set, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["DISABLE_COMPILE_ENV", "fused_sigmoid_focal_loss"]

logger = logging.getLogger(__name__)

#: Environment variable that forces the eager implementation (e.g. for tests or debugging).
DISABLE_COMPILE_ENV = "FOCAL_DET2_DISABLE_COMPILE"

# Elements per chunk of the eager implementation, by device type: its ~20 live temporaries
# are of this size instead of (N, K), while chunks stay few, as each elementwise op of a chunk
# pays a parallel region on a CPU (costly when the cores are oversubscribed) or a launch on a
# GPU.
_EAGER_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_EAGER_CHUNK_ELEMENTS_DEFAULT = 1 << 22


def _focal_terms(
    logits: Tensor,
    labels: Tensor,
    alpha_pos: Tensor,
    alpha_neg: Tensor,
    gamma: float,
    with_grad: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    Elementwise focal loss and its derivative with respect to the logits.

    With z = x for a positive and -x for a negative, p_t = sigmoid(z) and q = 1 - p_t =
    sigmoid(-z), the loss is FL = -alpha_t q^gamma log(p_t) and, as dp_t/dz = p_t q,

        dFL/dz = alpha_t q^gamma (gamma p_t log(p_t) - q),    dFL/dx = sign * dFL/dz,

    which is Appendix B of the paper: alpha (1-p)^gamma (gamma p log p + p - 1) for a positive
    and (1-alpha) p^gamma (p - gamma (1-p) log(1-p)) for a negative. Every logarithm is a
    softplus of the one e = exp(-|z|): -log(p_t) = relu(-z) + log1p(e) and
    log(q) = -(relu(z) + log1p(e)), so no term overflows or loses its relative precision for
    any finite logit.

    Args:
        logits: (N, K) floating logits; half precision is computed in float32.
        labels: (N,) integer labels: k in [0, K) is a positive of class k, K is background,
            a negative value ignores the row.
        alpha_pos, alpha_neg: (K,) the weights alpha_t of positives and negatives of each
            class (column), in the compute dtype.
        gamma: focusing parameter >= 0.
        with_grad: whether to compute the gradient.

    Returns:
        loss (N, K) and grad (N, K) (None without ``with_grad``), both in the compute dtype;
        ignored rows are 0 in both.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    is_pos = labels[:, None] == torch.arange(x.shape[1], device=labels.device)
    valid = (labels >= 0)[:, None]
    z = torch.where(is_pos, x, -x)
    e = torch.exp(-z.abs())
    u = 1.0 + e
    r = 1.0 / u
    # log1p(e) from log(1 + e), corrected for the rounding of 1 + e (Goldberg): as accurate as
    # log1p, and several times cheaper in inductor's vectorised CPU code.
    log1p_e = torch.log(u) - ((u - 1.0) - e) * r
    ce = torch.clamp_min(-z, 0.0) + log1p_e  # -log(p_t)
    # Per column: one (K,) load each, broadcast over the rows.
    alpha_t = torch.where(is_pos, alpha_pos, alpha_neg)
    weight = alpha_t * torch.exp(-gamma * (torch.clamp_min(z, 0.0) + log1p_e))  # alpha_t q^gamma
    # torch.where, not a product with the mask: an ignored row adds exactly 0 whatever its logits.
    loss = torch.where(valid, weight * ce, 0.0)
    if not with_grad:
        return loss, None
    nonneg = z >= 0
    er = e * r
    p_t = torch.where(nonneg, r, er)
    q = torch.where(nonneg, er, r)
    dz = weight * (gamma * p_t * ce + q)  # -dFL/dz
    grad = torch.where(valid, torch.where(is_pos, -dz, dz), 0.0)
    return loss, grad


# The four kernels are distinct functions so that each has its own dynamo cache (8 entries
# each: one per dtype and device in practice).
def _kernel_rows_and_grad(logits, labels, alpha_pos, alpha_neg, gamma):
    loss, grad = _focal_terms(logits, labels, alpha_pos, alpha_neg, gamma, True)
    return loss.sum(dim=1), grad.to(logits.dtype)


def _kernel_elems_and_grad(logits, labels, alpha_pos, alpha_neg, gamma):
    loss, grad = _focal_terms(logits, labels, alpha_pos, alpha_neg, gamma, True)
    return loss, grad.to(logits.dtype)


def _kernel_rows(logits, labels, alpha_pos, alpha_neg, gamma):
    loss, _ = _focal_terms(logits, labels, alpha_pos, alpha_neg, gamma, False)
    return loss.sum(dim=1), None


def _kernel_elems(logits, labels, alpha_pos, alpha_neg, gamma):
    loss, _ = _focal_terms(logits, labels, alpha_pos, alpha_neg, gamma, False)
    return loss, None


_KERNELS: Dict[Tuple[bool, bool], Callable] = {
    (True, True): _kernel_rows_and_grad,
    (False, True): _kernel_elems_and_grad,
    (True, False): _kernel_rows,
    (False, False): _kernel_elems,
}

# Compiled kernels of this process, built on first use; device types where compiling failed.
_COMPILED: Dict[Tuple[bool, bool], Callable] = {}
_COMPILE_FAILED: Set[str] = set()


def _compile_enabled(device: torch.device) -> bool:
    if os.environ.get(DISABLE_COMPILE_ENV, "0") not in ("", "0"):
        return False
    return device.type not in _COMPILE_FAILED


def _compiled_kernel(rows: bool, with_grad: bool) -> Callable:
    key = (rows, with_grad)
    if key not in _COMPILED:
        # fullgraph: a graph break would silently run most of the pass eagerly and unfused.
        _COMPILED[key] = torch.compile(_KERNELS[key], dynamic=True, fullgraph=True)
    return _COMPILED[key]


def _run_eager(
    logits: Tensor,
    labels: Tensor,
    alpha_pos: Tensor,
    alpha_neg: Tensor,
    gamma: float,
    rows: bool,
    with_grad: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    n, k = logits.shape
    acc_dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = logits.new_empty((n,) if rows else (n, k), dtype=acc_dtype)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if with_grad else None
    chunk = _EAGER_CHUNK_ELEMENTS.get(logits.device.type, _EAGER_CHUNK_ELEMENTS_DEFAULT)
    step = max(1, chunk // max(k, 1))
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk_loss, chunk_grad = _focal_terms(
            logits[start:stop], labels[start:stop], alpha_pos, alpha_neg, gamma, with_grad
        )
        loss[start:stop] = chunk_loss.sum(dim=1) if rows else chunk_loss
        if grad is not None:
            grad[start:stop] = chunk_grad
    return loss, grad


def _class_weights(logits: Tensor, alpha: Union[float, Tensor]) -> Tuple[Tensor, Tensor]:
    """
    The (K,) weights alpha_t of positives and of negatives of each class, in the compute dtype
    on the logits' device: alpha_k and 1 - alpha_k, or 1 and 1 for a scalar alpha < 0. Tensors
    even for a scalar alpha, so that dynamo compiles one graph for every alpha, scalar or per
    class, instead of specialising on its value.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    num_classes = logits.shape[1]
    if isinstance(alpha, Tensor):
        alpha_pos = alpha.detach().to(device=logits.device, dtype=dtype)
        return alpha_pos, 1.0 - alpha_pos
    value = float(alpha)
    pos, neg = (value, 1.0 - value) if value >= 0 else (1.0, 1.0)
    return (
        torch.full((num_classes,), pos, dtype=dtype, device=logits.device),
        torch.full((num_classes,), neg, dtype=dtype, device=logits.device),
    )


def _run(
    logits: Tensor,
    labels: Tensor,
    alpha: Union[float, Tensor],
    gamma: float,
    rows: bool,
    with_grad: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    Returns the per-row (``rows``) or elementwise loss in the compute dtype and, with
    ``with_grad``, the elementwise gradient of the summed loss in the dtype of ``logits``.
    """
    alpha_pos, alpha_neg = _class_weights(logits, alpha)
    gamma = float(gamma)
    if torch.compiler.is_compiling():
        # Traced by an outer torch.compile: hand it the plain formula to fuse in its own graph.
        return _KERNELS[(rows, with_grad)](logits, labels, alpha_pos, alpha_neg, gamma)
    # N < 2 goes eagerly: dynamo specialises sizes 0 and 1, which would cost a recompilation.
    if logits.shape[0] >= 2 and logits.shape[1] > 0 and _compile_enabled(logits.device):
        try:
            kernel = _compiled_kernel(rows, with_grad)
            return kernel(logits, labels, alpha_pos, alpha_neg, gamma)
        except torch.OutOfMemoryError:
            raise  # not the compiler's fault: the eager implementation would not fit either
        except Exception as exc:  # compiler and toolchain failures come in many types
            _COMPILE_FAILED.add(logits.device.type)
            logger.warning(
                "torch.compile of the fused focal loss failed on %s (%s: %s); using the eager "
                "implementation in this process from now on.",
                logits.device.type,
                type(exc).__name__,
                exc,
            )
    return _run_eager(logits, labels, alpha_pos, alpha_neg, gamma, rows, with_grad)


def _mean_denominator(labels: Tensor, num_classes: int) -> Tensor:
    # fvcore's mean is over the (valid rows, K) one-hot targets; a tensor, so no device sync.
    return (labels >= 0).sum() * num_classes


def _reduce(loss: Tensor, labels: Tensor, num_classes: int, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / _mean_denominator(labels, num_classes)  # NaN without valid rows, as fvcore


class _SigmoidFocalLossWithLabels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, alpha, gamma, reduction):
        loss, grad = _run(
            logits.detach(), labels, alpha, gamma, reduction != "none", with_grad=True
        )
        if reduction == "mean":
            ctx.save_for_backward(grad, _mean_denominator(labels, logits.shape[1]).clamp_min(1))
        else:
            ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return _reduce(loss, labels, logits.shape[1], reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad, *denom = ctx.saved_tensors
        if ctx.reduction == "mean":
            # Clamped: with no valid row every saved gradient is 0, and so is the result.
            grad_output = grad_output / denom[0]
        if not torch.compiler.is_compiling() and _graph_is_freed_after_backward():
            # The saved gradient is never read again: scale it in place, which spares an (N, K)
            # allocation (and lets AccumulateGrad take it as .grad without a copy). A compiler
            # tracing this backward plans its buffers itself.
            scaled = grad.mul_(grad_output)
        else:
            scaled = (grad_output * grad).to(grad.dtype)
        return _flush_subnormals_(scaled), None, None, None, None


def _flush_subnormals_(grad: Tensor) -> Tensor:
    """
    ``grad`` with its subnormal values set to 0, in place, on a CPU. The gradient of a far
    negative (~p^3 at gamma 2: a logit below about -29 in float32) underflows to subnormal
    numbers, which some CPUs handle in microcode: the backward of the classifier's convolution
    then ran 26x slower on an Intel Xeon (R50-FPN training step 8.7 s instead of 3.3 s).
    Detectron2's loss gives 0 there (from 1 - p rounding to 1), and no float32 weight gradient
    can hold such a term.
    GPUs take subnormals at full speed, and float16's (below 6e-5) still count: both kept.
    """
    if grad.device.type != "cpu" or grad.dtype == torch.float16:
        return grad
    return grad.masked_fill_(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0)


def _graph_is_freed_after_backward() -> bool:
    # What AOTAutograd asks before reusing saved tensors in place (private API; assume
    # retain_graph=True when it is missing).
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def fused_sigmoid_focal_loss(
    logits: Tensor, labels: Tensor, alpha: Union[float, Tensor], gamma: float, reduction: str
) -> Tensor:
    """
    :func:`focal_det2.modeling.losses.sigmoid_focal_loss_with_labels` on checked arguments:
    ``logits`` (N, K) floating, ``labels`` (N,) integer on the same device, labels in
    [0, K] or negative (ignored), alpha in [0, 1] or < 0 or a (K,) tensor of per-class alphas
    in [0, 1], gamma >= 0, a known reduction.
    """
    # Contiguous inputs without autograd history: dynamo guards on strides and requires_grad.
    labels = labels.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SigmoidFocalLossWithLabels.apply(
            logits.contiguous(), labels, alpha, gamma, reduction
        )
    loss, _ = _run(logits.detach().contiguous(), labels, alpha, gamma, reduction != "none", False)
    return _reduce(loss, labels, logits.shape[1], reduction)
