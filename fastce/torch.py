"""fastce's losses as PyTorch operators: autograd functions and ``nn.Module`` drop-ins.

The functions take torch's signatures and defaults; the module classes subclass torch's (same
constructor arguments, buffers and ``state_dict``) and only replace ``forward``.  Each op is a
``torch.library.custom_op`` (``fastce::cross_entropy`` ...) with a registered autograd formula
and a fake (meta) implementation, so ``torch.compile`` traces it into the graph without a break.

CPU tensors reach fastce's NumPy kernels as NumPy views of the same memory (no copy for
contiguous tensors); CUDA tensors go to :mod:`fastce.cuda` on torch's current stream (that
needs NVIDIA's ``numba-cuda`` and a GPU, and says which is missing).

Gradients flow to the input (logits, log-probabilities or probabilities) only.  What torch also
differentiates and fastce does not -- second derivatives (double backward), the gradient with
respect to soft (probability) targets, class weights or ``pos_weight`` -- raises
``NotImplementedError`` instead of silently returning nothing.

Backward recomputes rather than storing: the forward op runs fastce's forward-only kernel (one
read of the logits) and saves its inputs; backward runs the fused ``*_with_grad`` kernel with
the upstream gradient folded in (one read, one write).  Storing the forward's gradient instead
would hold an N x C array as the saved logits do, but cost an extra write in forward and a
separate read-scale-write pass in backward for the upstream gradient.  ``linear_cross_entropy``
is the exception: recomputing would repeat its matmuls, so its forward computes the gradients
when they are needed and backward only scales them.

Importing this module imports torch; ``import fastce`` itself never does.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

import fastce as _fc
from . import linear as _linear
from ._validate import check_large_vocab, check_reduction

__all__ = ["cross_entropy", "nll_loss", "binary_cross_entropy",
           "binary_cross_entropy_with_logits", "log_softmax", "softmax", "logsumexp",
           "linear_cross_entropy", "CrossEntropyLoss", "NLLLoss", "BCELoss",
           "BCEWithLogitsLoss"]


# ---------------------------------------------------------------------------------------------
# tensors in and out of fastce's functions


def _np(t):
    """A NumPy view of the CPU tensor ``t`` (same memory); bfloat16, which NumPy lacks, as a
    float32 copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _tensor(a, dtype):
    """fastce's CPU result (ndarray or NumPy scalar) as a tensor of ``dtype``."""
    t = torch.from_numpy(np.asarray(a))
    return t if t.dtype == dtype else t.to(dtype)


def _run(fn, x, *args, **kwargs):
    """Call the fastce function ``fn`` with the tensors ``x``, ``args`` and any tensors in
    ``kwargs``; the results come back as tensors of ``x``'s dtype (a tuple for a tuple)."""
    if x.device.type == "cpu":
        args = [_np(a) if isinstance(a, Tensor) else a for a in args]
        kwargs = {k: _np(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        out = fn(_np(x), *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(_tensor(o, x.dtype) for o in out)
        return _tensor(out, x.dtype)
    if x.device.type == "cuda":
        # fastce's public functions send __cuda_array_interface__ tensors to fastce.cuda, which
        # launches on torch's current stream and returns tensors.
        kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        args = [a.detach() if isinstance(a, Tensor) else a for a in args]
        out = fn(x.detach(), *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(torch.as_tensor(o, device=x.device).to(x.dtype) for o in out)
        return torch.as_tensor(out, device=x.device).to(x.dtype)
    raise NotImplementedError(f"fastce.torch runs on CPU and CUDA tensors, got a tensor on "
                              f"device {x.device.type!r}")


def _legacy_reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    check_reduction(reduction)
    return reduction


def _torch_equivalent(op):
    if op == "linear_cross_entropy":
        return "torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target)"
    return f"torch.nn.functional.{op}"


def _refuse_grad(op, **tensors):
    """NotImplementedError if autograd would need a gradient fastce does not compute."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise NotImplementedError(
                f"fastce.torch.{op} computes the gradient with respect to the input only; "
                f"{name} requires grad (detach it, or use {_torch_equivalent(op)})")


def _no_double_backward(op):
    def backward(ctx, *grads):
        raise NotImplementedError(f"fastce.torch.{op}: double backward (second derivatives) "
                                  f"is not supported; use {_torch_equivalent(op)} for it")
    return backward


def _index_loss_shape(input, target):
    """The unreduced loss shape: the class axis (1, or 0 for 1-D input) dropped."""
    if input.dim() == 1:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


def _loss_fake(input, reduction, none_shape):
    return input.new_empty(none_shape if reduction == "none" else ())


def _needs_only_input(op, ctx, n_inputs):
    if any(ctx.needs_input_grad[1:n_inputs]):
        raise NotImplementedError(f"fastce.torch.{op} computes the gradient with respect to "
                                  f"the input only")


# ---------------------------------------------------------------------------------------------
# cross_entropy


@torch.library.custom_op("fastce::cross_entropy", mutates_args=())
def _cross_entropy_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                      ignore_index: int, reduction: str, label_smoothing: float,
                      softcap: Optional[float], z_loss: float) -> Tensor:
    return _run(_fc.cross_entropy, input, target, weight=weight, ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                z_loss=z_loss)


@_cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss):
    return _loss_fake(input, reduction, _index_loss_shape(input, target))


@torch.library.custom_op("fastce::cross_entropy_lse", mutates_args=())
def _cross_entropy_lse_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                          ignore_index: int, reduction: str, label_smoothing: float,
                          softcap: Optional[float], z_loss: float) -> tuple[Tensor, Tensor]:
    """The loss and the per-sample lse (``return_lse=True``); the lse is not differentiable."""
    return _run(_fc.cross_entropy, input, target, weight=weight, ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                z_loss=z_loss, return_lse=True)


@_cross_entropy_lse_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss):
    shape = _index_loss_shape(input, target)
    return _loss_fake(input, reduction, shape), input.new_empty(shape)


@torch.library.custom_op("fastce::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_loss: Tensor, input: Tensor, target: Tensor,
                               weight: Optional[Tensor], ignore_index: int, reduction: str,
                               label_smoothing: float, softcap: Optional[float],
                               z_loss: float) -> Tensor:
    return _run(_fc.cross_entropy_with_grad, input, target, weight=weight,
                ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, grad_output=grad_loss, softcap=softcap,
                z_loss=z_loss)[1]


@_cross_entropy_backward_op.register_fake
def _(grad_loss, input, target, weight, ignore_index, reduction, label_smoothing, softcap,
      z_loss):
    return torch.empty_like(input)


def _save_input_target_weight(ctx, inputs, output):
    """Setup of the losses whose backward recomputes from (input, target, weight) and the
    remaining (non-tensor) options: cross-entropy, NLL, BCE."""
    input, target, weight, *opts = inputs
    ctx.save_for_backward(input, target, weight)
    ctx.opts = opts


def _ce_backward(ctx, grad, grad_lse=None):
    # (grad_lse: the lse of cross_entropy_lse is marked non-differentiable.)
    _needs_only_input("cross_entropy", ctx, 3)
    input, target, weight = ctx.saved_tensors
    return ((_cross_entropy_backward_op(grad, input, target, weight, *ctx.opts),)
            + (None,) * (2 + len(ctx.opts)))


def _save_ce_lse(ctx, inputs, output):
    _save_input_target_weight(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_save_input_target_weight)
_cross_entropy_lse_op.register_autograd(_ce_backward, setup_context=_save_ce_lse)
_cross_entropy_backward_op.register_autograd(_no_double_backward("cross_entropy"))


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0, *, softcap=None,
                  z_loss=0.0, return_lse=False):
    """``torch.nn.functional.cross_entropy`` on fastce's fused kernels.

    Parameters
    ----------
    input : Tensor
        Logits (C,), (N, C) or (N, C, d1, ..., dk).
    target : Tensor
        Class indices (integer) or class probabilities (the input's shape and dtype).
    weight : Tensor, optional
        Per-class weight (C,).
    size_average, reduce : deprecated
        As in torch (mapped onto ``reduction``).
    ignore_index : int, optional
    reduction : {'mean', 'sum', 'none'}, optional
    label_smoothing : float, optional
    softcap : float, optional
        Logit soft-capping, ``softcap * tanh(input / softcap)`` (Gemma 2); see
        :func:`fastce.cross_entropy`.
    z_loss : float, optional
        PaLM's z-loss coefficient: ``z_loss * lse**2`` joins each non-ignored sample's loss
        (unweighted); see :func:`fastce.cross_entropy`.
    return_lse : bool, optional
        Also return the per-sample lse (not differentiable: it carries no gradient).

    Returns
    -------
    Tensor
        The loss, differentiable with respect to ``input``; with ``return_lse=True`` the
        tuple ``(loss, lse)``.

    Raises
    ------
    NotImplementedError
        When ``target`` or ``weight`` requires grad (fastce differentiates the input only).

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> x = torch.tensor([[0.3, 0.6, 0.1], [0.1, 0.2, 0.7]], requires_grad=True)
    >>> loss = ft.cross_entropy(x, torch.tensor([1, 2]))
    >>> loss.backward()
    >>> round(loss.item(), 4), tuple(x.grad.shape)
    (0.8106, (2, 3))
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _refuse_grad("cross_entropy", target=target, weight=weight)
    cap, z = check_large_vocab(softcap, z_loss, return_lse)
    args = (input, target, weight, int(ignore_index), reduction, float(label_smoothing),
            cap, z)
    if return_lse:
        return _cross_entropy_lse_op(*args)
    return _cross_entropy_op(*args)


# ---------------------------------------------------------------------------------------------
# nll_loss


@torch.library.custom_op("fastce::nll_loss", mutates_args=())
def _nll_loss_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 reduction: str) -> Tensor:
    return _run(_fc.nll_loss, input, target, weight=weight, ignore_index=ignore_index,
                reduction=reduction)


@_nll_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction):
    return _loss_fake(input, reduction, _index_loss_shape(input, target))


@torch.library.custom_op("fastce::nll_loss_backward", mutates_args=())
def _nll_loss_backward_op(grad_loss: Tensor, input: Tensor, target: Tensor,
                          weight: Optional[Tensor], ignore_index: int, reduction: str) -> Tensor:
    return _run(_fc.nll_loss_with_grad, input, target, weight=weight,
                ignore_index=ignore_index, reduction=reduction, grad_output=grad_loss)[1]


@_nll_loss_backward_op.register_fake
def _(grad_loss, input, target, weight, ignore_index, reduction):
    return torch.empty_like(input)


def _nll_backward(ctx, grad):
    _needs_only_input("nll_loss", ctx, 3)
    input, target, weight = ctx.saved_tensors
    return _nll_loss_backward_op(grad, input, target, weight, *ctx.opts), None, None, None, None


_nll_loss_op.register_autograd(_nll_backward, setup_context=_save_input_target_weight)
_nll_loss_backward_op.register_autograd(_no_double_backward("nll_loss"))


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """``torch.nn.functional.nll_loss`` (log-probabilities in) on fastce's gather kernel.

    Parameters
    ----------
    input : Tensor
        Log-probabilities (C,), (N, C) or (N, C, d1, ..., dk).
    target : Tensor
        Integer class indices.
    weight, size_average, ignore_index, reduce, reduction
        As in torch.

    Returns
    -------
    Tensor

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> lp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    >>> round(ft.nll_loss(lp, torch.tensor([0, 1])).item(), 4)
    0.4581
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _refuse_grad("nll_loss", weight=weight)
    return _nll_loss_op(input, target, weight, int(ignore_index), reduction)


# ---------------------------------------------------------------------------------------------
# binary cross-entropy (probabilities) and binary cross-entropy with logits


@torch.library.custom_op("fastce::binary_cross_entropy", mutates_args=())
def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    return _run(_fc.binary_cross_entropy, input, target, weight=weight, reduction=reduction)


@_bce_op.register_fake
def _(input, target, weight, reduction):
    return _loss_fake(input, reduction, input.shape)


@torch.library.custom_op("fastce::binary_cross_entropy_backward", mutates_args=())
def _bce_backward_op(grad_loss: Tensor, input: Tensor, target: Tensor, weight: Optional[Tensor],
                     reduction: str) -> Tensor:
    return _run(_fc.binary_cross_entropy_with_grad, input, target, weight=weight,
                reduction=reduction, grad_output=grad_loss)[1]


@_bce_backward_op.register_fake
def _(grad_loss, input, target, weight, reduction):
    return torch.empty_like(input)


def _bce_backward(ctx, grad):
    _needs_only_input("binary_cross_entropy", ctx, 3)
    input, target, weight = ctx.saved_tensors
    return _bce_backward_op(grad, input, target, weight, *ctx.opts), None, None, None


_bce_op.register_autograd(_bce_backward, setup_context=_save_input_target_weight)
_bce_backward_op.register_autograd(_no_double_backward("binary_cross_entropy"))


@torch.library.custom_op("fastce::binary_cross_entropy_with_logits", mutates_args=())
def _bce_logits_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                   pos_weight: Optional[Tensor], reduction: str) -> Tensor:
    return _run(_fc.binary_cross_entropy_with_logits, input, target, weight=weight,
                pos_weight=pos_weight, reduction=reduction)


@_bce_logits_op.register_fake
def _(input, target, weight, pos_weight, reduction):
    return _loss_fake(input, reduction, input.shape)


@torch.library.custom_op("fastce::binary_cross_entropy_with_logits_backward", mutates_args=())
def _bce_logits_backward_op(grad_loss: Tensor, input: Tensor, target: Tensor,
                            weight: Optional[Tensor], pos_weight: Optional[Tensor],
                            reduction: str) -> Tensor:
    return _run(_fc.binary_cross_entropy_with_logits_with_grad, input, target, weight=weight,
                pos_weight=pos_weight, reduction=reduction, grad_output=grad_loss)[1]


@_bce_logits_backward_op.register_fake
def _(grad_loss, input, target, weight, pos_weight, reduction):
    return torch.empty_like(input)


def _bce_logits_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.reduction = reduction


def _bce_logits_backward(ctx, grad):
    _needs_only_input("binary_cross_entropy_with_logits", ctx, 4)
    input, target, weight, pos_weight = ctx.saved_tensors
    return (_bce_logits_backward_op(grad, input, target, weight, pos_weight, ctx.reduction),
            None, None, None, None)


_bce_logits_op.register_autograd(_bce_logits_backward, setup_context=_bce_logits_setup)
_bce_logits_backward_op.register_autograd(
    _no_double_backward("binary_cross_entropy_with_logits"))


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """``torch.nn.functional.binary_cross_entropy`` (probabilities in) on fastce's kernels.

    Parameters
    ----------
    input : Tensor
        Probabilities in [0, 1].
    target : Tensor
        Targets of the input's shape.
    weight, size_average, reduce, reduction
        As in torch.

    Returns
    -------
    Tensor

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> round(ft.binary_cross_entropy(torch.tensor([0.8, 0.2]), torch.tensor([1.0, 0.0])).item(), 4)
    0.2231
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _refuse_grad("binary_cross_entropy", target=target, weight=weight)
    return _bce_op(input, target, weight, reduction)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction="mean", pos_weight=None):
    """``torch.nn.functional.binary_cross_entropy_with_logits`` on fastce's kernels.

    Parameters
    ----------
    input : Tensor
        Logits.
    target : Tensor
        Targets of the input's shape.
    weight, size_average, reduce, reduction, pos_weight
        As in torch.

    Returns
    -------
    Tensor

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> round(ft.binary_cross_entropy_with_logits(torch.zeros(2), torch.ones(2)).item(), 4)
    0.6931
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _refuse_grad("binary_cross_entropy_with_logits", target=target, weight=weight,
                 pos_weight=pos_weight)
    return _bce_logits_op(input, target, weight, pos_weight, reduction)


class BCELoss(torch.nn.BCELoss):
    """``torch.nn.BCELoss`` computed by :func:`binary_cross_entropy`."""

    def forward(self, input, target):
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`binary_cross_entropy_with_logits`."""

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, weight=self.weight,
                                                reduction=self.reduction,
                                                pos_weight=self.pos_weight)


# ---------------------------------------------------------------------------------------------
# softmax family: fastce's kernels forward; the backward is the closed-form expression on the
# saved output, in torch ops (elementwise plus one sum over ``dim``).


@torch.library.custom_op("fastce::log_softmax", mutates_args=())
def _log_softmax_op(x: Tensor, dim: int) -> Tensor:
    return _run(_fc.log_softmax, x, axis=dim)


@torch.library.custom_op("fastce::softmax", mutates_args=())
def _softmax_op(x: Tensor, dim: int) -> Tensor:
    return _run(_fc.softmax, x, axis=dim)


@torch.library.custom_op("fastce::logsumexp", mutates_args=())
def _logsumexp_op(x: Tensor, dim: int) -> Tensor:
    return _run(_fc.logsumexp, x, axis=dim)


@_log_softmax_op.register_fake
def _(x, dim):
    return torch.empty_like(x)


@_softmax_op.register_fake
def _(x, dim):
    return torch.empty_like(x)


@_logsumexp_op.register_fake
def _(x, dim):
    return x.new_empty(x.shape[:dim % x.dim()] + x.shape[dim % x.dim() + 1:])


@torch.library.custom_op("fastce::log_softmax_backward", mutates_args=())
def _log_softmax_backward_op(grad: Tensor, out: Tensor, dim: int) -> Tensor:
    return grad - out.exp() * grad.sum(dim, keepdim=True)


@torch.library.custom_op("fastce::softmax_backward", mutates_args=())
def _softmax_backward_op(grad: Tensor, out: Tensor, dim: int) -> Tensor:
    return out * (grad - (grad * out).sum(dim, keepdim=True))


@torch.library.custom_op("fastce::logsumexp_backward", mutates_args=())
def _logsumexp_backward_op(grad: Tensor, x: Tensor, out: Tensor, dim: int) -> Tensor:
    return grad.unsqueeze(dim) * (x - out.unsqueeze(dim)).exp()


for _op in (_log_softmax_backward_op, _softmax_backward_op):
    _op.register_fake(lambda grad, out, dim: torch.empty_like(out))
_logsumexp_backward_op.register_fake(lambda grad, x, out, dim: torch.empty_like(x))


def _save_output(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _save_input_output(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(inputs[0], output)


_log_softmax_op.register_autograd(
    lambda ctx, g: (_log_softmax_backward_op(g, *ctx.saved_tensors, ctx.dim), None),
    setup_context=_save_output)
_softmax_op.register_autograd(
    lambda ctx, g: (_softmax_backward_op(g, *ctx.saved_tensors, ctx.dim), None),
    setup_context=_save_output)
_logsumexp_op.register_autograd(
    lambda ctx, g: (_logsumexp_backward_op(g, *ctx.saved_tensors, ctx.dim), None),
    setup_context=_save_input_output)
for _op, _name in ((_log_softmax_backward_op, "log_softmax"),
                   (_softmax_backward_op, "softmax"), (_logsumexp_backward_op, "logsumexp")):
    _op.register_autograd(_no_double_backward(_name))


def _dim(dim, x, op):
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            raise NotImplementedError(f"fastce.torch.{op} reduces one dimension, got dim={dim}")
        dim = dim[0]
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise IndexError(f"dim {dim} is out of range for a tensor of {x.dim()} dimension(s)")
    return dim % x.dim()


def log_softmax(input, dim, dtype=None):
    """``torch.log_softmax(input, dim, dtype)`` on fastce's kernel.

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> ft.log_softmax(torch.zeros(2), 0)
    tensor([-0.6931, -0.6931])
    """
    if dtype is not None:
        input = input.to(dtype)
    return _log_softmax_op(input, _dim(dim, input, "log_softmax"))


def softmax(input, dim, dtype=None):
    """``torch.softmax(input, dim, dtype)`` on fastce's kernel.

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> ft.softmax(torch.zeros(2), 0)
    tensor([0.5000, 0.5000])
    """
    if dtype is not None:
        input = input.to(dtype)
    return _softmax_op(input, _dim(dim, input, "softmax"))


def logsumexp(input, dim, keepdim=False):
    """``torch.logsumexp(input, dim, keepdim)`` on fastce's kernel (one dimension).

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> round(ft.logsumexp(torch.tensor([1000.0, 1000.0], dtype=torch.float64), 0).item(), 4)
    1000.6931
    """
    d = _dim(dim, input, "logsumexp")
    out = _logsumexp_op(input, d)
    return out.unsqueeze(d) if keepdim else out


# ---------------------------------------------------------------------------------------------
# linear cross-entropy


@torch.library.custom_op("fastce::linear_cross_entropy", mutates_args=())
def _linear_ce_op(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                  ignore_index: int, reduction: str, label_smoothing: float,
                  softcap: Optional[float], z_loss: float) -> Tensor:
    _cpu_only(hidden, "linear_cross_entropy")
    return _run(_linear_ce_numpy, hidden, weight, target, bias, ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                z_loss=z_loss)


@_linear_ce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, z_loss):
    return _loss_fake(hidden, reduction, (hidden.shape[0],))


@torch.library.custom_op("fastce::linear_cross_entropy_with_grad", mutates_args=())
def _linear_ce_grad_op(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                       ignore_index: int, reduction: str, label_smoothing: float,
                       softcap: Optional[float], z_loss: float,
                       grad_loss: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and the gradients (hidden, weight, bias -- an empty tensor without bias)."""
    return _lce_with_grad(hidden, weight, target, bias, ignore_index, reduction,
                          label_smoothing, softcap, z_loss, grad_loss)


def _lce_with_grad(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                   softcap, z_loss, grad_loss):
    _cpu_only(hidden, "linear_cross_entropy")
    out = _run(_linear_ce_numpy, hidden, weight, target, bias, ignore_index=ignore_index,
               reduction=reduction, label_smoothing=label_smoothing, grad_output=grad_loss,
               want_grad=True, softcap=softcap, z_loss=z_loss)
    if bias is None:
        out = out + (hidden.new_empty(0),)
    return out


@_linear_ce_grad_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, z_loss,
      grad_loss):
    return (_loss_fake(hidden, reduction, (hidden.shape[0],)), torch.empty_like(hidden),
            torch.empty_like(weight),
            hidden.new_empty(0) if bias is None else torch.empty_like(bias))


def _lce_setup(ctx, inputs, output):
    bias = inputs[3]
    _, d_hidden, d_weight, d_bias = output
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias)
    ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _lce_backward(ctx, grad_loss, *unused):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[9]:
        raise NotImplementedError("fastce.torch.linear_cross_entropy differentiates hidden, "
                                  "weight and bias only")
    compiling = torch.compiler.is_compiling()
    if torch.is_grad_enabled() and not compiling:
        # create_graph=True: the saved gradients are constants here, so a second derivative
        # through them would silently be zero.
        _no_double_backward("linear_cross_entropy")(ctx)
    grads = ctx.saved_tensors
    # The usual upstream gradient of a scalar loss is 1 (loss.backward()): then the saved
    # gradients are returned as they are (never modified: autograd copies them into .grad),
    # sparing a scaled copy of d_weight (V x H).  Under torch.compile the check would be a
    # data-dependent branch: always scale there.
    if compiling or grad_loss.item() != 1.0:
        grads = tuple(g * grad_loss for g in grads)
    d_hidden, d_weight, d_bias = grads
    return (d_hidden, d_weight, None, d_bias if ctx.has_bias else None,
            None, None, None, None, None, None)


_linear_ce_grad_op.register_autograd(_lce_backward, setup_context=_lce_setup)


@torch.library.custom_op("fastce::linear_cross_entropy_backward", mutates_args=())
def _linear_ce_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                           bias: Optional[Tensor], ignore_index: int, reduction: str,
                           label_smoothing: float, softcap: Optional[float],
                           z_loss: float) -> tuple[Tensor, Tensor, Tensor]:
    _, d_hidden, d_weight, d_bias = _lce_with_grad(hidden, weight, target, bias, ignore_index,
                                                   reduction, label_smoothing, softcap, z_loss,
                                                   grad_loss)
    return d_hidden, d_weight, d_bias


@_linear_ce_backward_op.register_fake
def _(grad_loss, hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
      softcap, z_loss):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            hidden.new_empty(0) if bias is None else torch.empty_like(bias))


def _lce_none_setup(ctx, inputs, output):
    hidden, weight, target, bias, *opts = inputs
    ctx.save_for_backward(hidden, weight, target, bias)
    ctx.opts = opts


def _lce_none_backward(ctx, grad_loss):
    hidden, weight, target, bias = ctx.saved_tensors
    d_hidden, d_weight, d_bias = _linear_ce_backward_op(grad_loss, hidden, weight, target,
                                                        bias, *ctx.opts)
    return ((d_hidden, d_weight, None, (None if bias is None else d_bias))
            + (None,) * len(ctx.opts))


_linear_ce_op.register_autograd(_lce_none_backward, setup_context=_lce_none_setup)
_linear_ce_backward_op.register_autograd(_no_double_backward("linear_cross_entropy"))


class _TorchBLAS:
    """fastce.linear's matmuls through torch's BLAS on the same memory (``torch.from_numpy``
    views): ``matmul_add`` is one GEMM with beta = 1 (``addmm_``), no temporary."""

    @staticmethod
    def matmul(a, b, out):
        torch.mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))

    @staticmethod
    def matmul_add(a, b, out):
        torch.from_numpy(out).addmm_(torch.from_numpy(a), torch.from_numpy(b))


def _linear_ce_numpy(hidden, weight, target, bias, *, ignore_index, reduction,
                     label_smoothing, grad_output=None, want_grad=False, softcap=None,
                     z_loss=0.0):
    return _linear._run(hidden, weight, target, bias, ignore_index, reduction,
                        label_smoothing, grad_output, want_grad, blas=_TorchBLAS,
                        softcap=softcap, z_loss=z_loss)


def _cpu_only(x, op):
    if x.device.type != "cpu":
        raise NotImplementedError(
            f"fastce.torch.{op} runs on CPU tensors only (its chunked matmuls are NumPy/torch "
            f"CPU code), got a tensor on device {x.device.type!r}; on the GPU use "
            f"{_torch_equivalent(op)}, or fastce.torch.cross_entropy on the logits")


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0):
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` without the N x V logits.

    Parameters
    ----------
    hidden : Tensor
        (N, H) activations.
    weight : Tensor
        (V, H) output-layer weight.
    target : Tensor
        (N,) integer class indices.
    bias : Tensor, optional
        (V,).
    ignore_index, reduction, label_smoothing, softcap, z_loss
        As in :func:`cross_entropy`.

    Returns
    -------
    Tensor
        The loss, differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    Notes
    -----
    See :func:`fastce.linear_cross_entropy`.  For 'mean' and 'sum' under autograd the forward
    computes the gradients too (chunk by chunk, with the logits of one chunk at a time) and
    backward scales them by the upstream gradient: the matmuls run once.  For 'none' the
    per-row upstream gradient is known only in backward, which then recomputes.  CPU only.

    Examples
    --------
    >>> import torch, fastce.torch as ft
    >>> h = torch.randn(4, 8, requires_grad=True); w = torch.randn(10, 8, requires_grad=True)
    >>> loss = ft.linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]))
    >>> loss.backward()
    >>> tuple(h.grad.shape), tuple(w.grad.shape)
    ((4, 8), (10, 8))
    """
    check_reduction(reduction)
    _refuse_grad("linear_cross_entropy", target=target)
    cap, z = check_large_vocab(softcap, z_loss, False)
    opts = (int(ignore_index), reduction, float(label_smoothing), cap, z)
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if wants_grad and reduction != "none":
        return _linear_ce_grad_op(hidden, weight, target, bias, *opts, None)[0]
    return _linear_ce_op(hidden, weight, target, bias, *opts)


# ---------------------------------------------------------------------------------------------
# nn.Module drop-ins: torch's classes (constructor arguments, buffers, state_dict) with
# fastce's forward.


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`; the keywords
    ``softcap`` and ``z_loss`` (after torch's own) as in :func:`cross_entropy`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, softcap=None, z_loss=0.0):
        super().__init__(weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing)
        check_large_vocab(softcap, z_loss, False)
        self.softcap = softcap
        self.z_loss = z_loss

    def forward(self, input, target):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             softcap=self.softcap, z_loss=self.z_loss)


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by :func:`nll_loss`."""

    def forward(self, input, target):
        return nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                        reduction=self.reduction)
