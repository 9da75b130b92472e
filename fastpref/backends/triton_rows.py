"""Launchers of the row-wise softmax kernels (``fastpref.kernels.logits_rows``) over a dense logits buffer.

For a loss that holds the logits of a group of rows, ``z [R, V]`` (fp32 or fp64, rows contiguous), and forms
their gradient in the forward:

- ``row_softmax_stats(z, targets)`` -> ``(lse, target_logit)``, each ``[R]`` in z's dtype;
- ``softmax_grad_(z, lse, row_scale, targets)`` overwrites ``z`` with ``row_scale[i] * (onehot(targets[i]) -
  softmax(z[i]))`` and returns it.

No autograd: these are raw kernels for a caller that manages its own gradients (``softmax_grad_`` refuses a ``z``
that requires grad, and bumps ``z``'s version counter so a graph that saved ``z`` notices the overwrite). No host
synchronisation either: ``targets`` are not range-checked on the host; an out-of-range target gives a NaN
``target_logit`` and no one-hot column in the gradient, and reads no memory.

On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` before ``fastpref.kernels`` is first
imported), with a small BLOCK_V so that tests cover several blocks and a ragged tail cheaply.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .triton_backend import INTERPRET_BLOCKS, _device_of, interpreting

FLOAT_DTYPES = (torch.float32, torch.float64)


def row_softmax_stats(z: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and target logit of ``z``.

    Args:
        z: ``[R, V]`` float32 or float64 logits with contiguous rows (unit column stride), on CUDA (or on CPU under
            ``TRITON_INTERPRET=1``). Not modified.
        targets: ``[R]`` int64 column indices in ``[0, V)`` (not checked on the host; see the module docstring).

    Returns:
        ``(lse, target_logit)``, new ``[R]`` tensors in z's dtype: ``lse[i] = logsumexp(z[i])`` (numerically stable:
        an online max / sum-exp over column blocks) and ``target_logit[i] = z[i, targets[i]]``.
    """
    _check_logits(z)
    targets = _check_row_vector("targets", targets, z, torch.int64)
    _check_device(z)
    lse = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    target_logit = torch.empty_like(lse)
    _launch("stats", z, targets, lse, target_logit)
    return lse, target_logit


def softmax_grad_(z: torch.Tensor, lse: torch.Tensor, row_scale: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Overwrite ``z`` with the gradient of ``row_scale[i] * log_softmax(z[i])[targets[i]]``, in place.

    ``z[i, v] <- row_scale[i] * ((v == targets[i]) - exp(z[i, v] - lse[i]))``.

    Args:
        z: ``[R, V]`` float32 or float64 logits with contiguous, non-overlapping rows, on CUDA (or on CPU under
            ``TRITON_INTERPRET=1``); must not require grad (the write bypasses autograd).
        lse: ``[R]`` per-row log-sum-exp of ``z`` (``row_softmax_stats``), in z's dtype.
        row_scale: ``[R]`` per-row factor (the upstream gradient of each row's target log-prob), in z's dtype.
        targets: ``[R]`` int64 column indices in ``[0, V)``.

    Returns:
        ``z`` itself, now holding the gradient.
    """
    _check_logits(z)
    if z.shape[0] > 1 and z.stride(0) < z.shape[1]:
        raise ValueError(f"z's rows overlap in memory (stride {tuple(z.stride())} for shape {tuple(z.shape)}): the "
                         "in-place update needs distinct rows, e.g. z.contiguous()")
    if z.requires_grad:
        raise RuntimeError("softmax_grad_ writes z in place outside autograd, but z requires grad: pass z.detach() "
                           "(or a buffer that does not require grad)")
    lse = _check_row_vector("lse", lse, z, z.dtype)
    row_scale = _check_row_vector("row_scale", row_scale, z, z.dtype)
    targets = _check_row_vector("targets", targets, z, torch.int64)
    _check_device(z)
    _launch("grad", z, targets, lse, row_scale)
    torch.autograd.graph.increment_version(z)
    return z


def _check_logits(z: torch.Tensor) -> None:
    """Raise a clear error unless ``z`` is a 2-D float32/float64 tensor with unit column stride."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [rows, vocab], got shape {tuple(z.shape)}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"z must be float32 or float64, got {z.dtype}")
    if z.shape[1] == 0:
        raise ValueError(f"z has no vocabulary columns (shape {tuple(z.shape)})")
    if z.shape[1] > 1 and z.stride(1) != 1:
        raise ValueError(f"z must have contiguous rows (unit stride along the vocabulary), got strides "
                         f"{tuple(z.stride())}: pass z.contiguous()")


def _check_device(z: torch.Tensor) -> None:
    """Raise unless the kernels can run on z's device (checked last, so that shape and dtype errors come first)."""
    if z.device.type != "cuda" and not interpreting():
        raise ValueError(f"z is on {z.device}: the Triton row kernels need a CUDA tensor, or TRITON_INTERPRET=1 "
                         "set before importing fastpref to run them in Triton's interpreter on CPU")


def _check_row_vector(name: str, t: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` checked to be ``[R]`` of ``dtype`` on z's device; a strided vector becomes a contiguous copy (tiny)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (z.shape[0],):
        raise ValueError(f"{name} must have shape [{z.shape[0]}] (one entry per row of z), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (" + ("column indices" if dtype == torch.int64 else "z's dtype")
                        + f"), got {t.dtype}")
    if t.device != z.device:
        raise ValueError(f"{name} is on {t.device} but z is on {z.device}: all arguments must be on one device")
    return t.contiguous()


def _launch(which: str, z: torch.Tensor, targets: torch.Tensor, vec_a: torch.Tensor, vec_b: torch.Tensor) -> None:
    """One program per row of ``z``: the fixed configuration for the GPU and dtype, or the interpreter's block."""
    from ..kernels import logits_rows

    rows, vocab = z.shape
    if rows == 0:
        return
    kernel = logits_rows.row_softmax_stats_kernel if which == "stats" else logits_rows.softmax_grad_kernel
    args = (z, targets, vec_a, vec_b, vocab, z.stride(0))
    if interpreting():
        kernel[(rows,)](*args, BLOCK_V=INTERPRET_BLOCKS["BLOCK_V"])
        return
    from ..kernels.configs import device_arch

    with _device_of(z):
        cfg = logits_rows.ROWS_CONFIGS[(device_arch(), "fp64" if z.dtype == torch.float64 else "fp32")][0]
        kernel[(rows,)](*args, BLOCK_V=cfg.kwargs["BLOCK_V"], num_warps=cfg.num_warps, num_stages=cfg.num_stages)
