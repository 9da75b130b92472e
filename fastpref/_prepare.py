"""``prepare``: validate the arguments of ``fused_logprobs`` and flatten them into a :class:`Prepared`.

Every backend works on the same flat view: positions ``[N, D]``, targets ``[N]`` and a sequence id per
position. Each step below checks one thing and raises a ``ValueError`` or ``TypeError`` naming the
offending argument:

1. ``_check_head``: hidden / weight / bias / targets types, shapes, dtypes and devices;
2. ``_flatten_layout``: padded ``[S, T, D]`` or packed ``[N, D]`` + ``seq_ids`` into flat positions;
3. ``_vocab_partition``: this rank's slice of a vocabulary-parallel head (the one collective);
4. ``_check_targets``: target ids within the (global) vocabulary;
5. ``_reference_head``: the reference head, defaulting to the policy head (detached);
6. ``_resolve_backend``.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import torch

from ._checks import check_int, check_optional_positive, check_positive
from ._types import IGNORE_INDEX, KL_MODES, Prepared

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def prepare(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
    num_seqs: Optional[int] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    kl: Optional[str] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    vocab_parallel_group: Optional[Any] = None,
) -> Prepared:
    """Validate the arguments of ``fused_logprobs`` (see its docstring) and flatten them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    temperature = check_positive("temperature", temperature)
    softcap = check_optional_positive("softcap", softcap)
    ignore_index = check_int("ignore_index", ignore_index)
    if num_seqs is not None:
        num_seqs = check_int("num_seqs", num_seqs)

    _check_head(hidden, weight, bias, targets)
    flat_targets, flat_seq, num_seqs = _flatten_layout(hidden, targets, seq_ids, num_seqs)
    valid = flat_targets != ignore_index
    vocab_offset, global_vocab = 0, weight.shape[0]
    if vocab_parallel_group is not None:
        if backend == "triton":
            raise NotImplementedError(
                "vocab_parallel_group is implemented by the torch backend only; use backend='torch' "
                "(or 'auto', which picks it when a group is given)"
            )
        backend = "torch"
        vocab_offset, global_vocab = _vocab_partition(weight.shape[0], vocab_parallel_group, hidden.device)
    _check_targets(flat_targets, valid, global_vocab, ignore_index)
    r_hidden, r_weight, r_bias = _reference_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl)
    n = flat_targets.shape[0]
    return Prepared(
        hidden=hidden.reshape(n, weight.shape[1]),
        weight=weight,
        bias=bias,
        targets=flat_targets,
        valid=valid,
        seq_ids=flat_seq,
        num_seqs=num_seqs,
        target_shape=tuple(targets.shape),
        padded=hidden.dim() == 3,
        ref_hidden=None if r_hidden is None else r_hidden.reshape(n, -1),
        ref_weight=r_weight,
        ref_bias=r_bias,
        kl=kl,
        temperature=temperature,
        softcap=softcap,
        backend=_resolve_backend(backend, hidden),
        vocab_parallel_group=vocab_parallel_group,
        vocab_offset=vocab_offset,
    )


# ---------------------------------------------------------------------------------------------------
# 1. the policy head and the targets


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}: mixed devices")


def _check_finite(name: str, t: torch.Tensor) -> None:
    """A bias of -inf (a way to mask tokens) would make whole vocabulary tiles -inf, and the online
    log-sum-exp and the KL terms NaN (-inf - -inf); a large finite negative value masks just as well."""
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (to mask tokens use a large negative value such as -1e4, "
                         "whose exponential is exactly 0 in fp32, instead of -inf)")


def _check_bias(name: str, bias: torch.Tensor, vocab: int, head_dtype: torch.dtype, device: torch.device) -> None:
    _check_float(name, bias)
    if tuple(bias.shape) != (vocab,):
        raise ValueError(f"{name} must have shape ({vocab},) to match the head's weight, got {tuple(bias.shape)}")
    _check_device(name, bias, device)
    if bias.dtype != head_dtype:
        raise TypeError(f"{name} ({bias.dtype}) and its head's weight ({head_dtype}) must have the same dtype")
    _check_finite(name, bias)


def _check_not_sharded(name: str, t: Optional[torch.Tensor]) -> None:
    """Reject a head parameter that a data-parallel framework holds sharded outside its module's forward."""
    if t is None:
        return
    if hasattr(t, "ds_id") and t.numel() == 0:
        raise ValueError(
            f"{name} is a partitioned DeepSpeed ZeRO-3 parameter (empty outside its module's forward): run the "
            "loss inside the head module's forward with fastpref.integrations.distributed.forward_through, or "
            "read it without gradients under fastpref.integrations.distributed.gathered_params"
        )
    dtensor = sys.modules.get("torch.distributed.tensor")  # a DTensor exists only once this was imported
    if dtensor is not None and isinstance(t, dtensor.DTensor):
        raise TypeError(
            f"{name} is a sharded DTensor (e.g. an LM head under FSDP2 fully_shard, read outside its forward): "
            "run the loss inside the head module's forward with fastpref.integrations.distributed.forward_through "
            "(full_tensor() would skip FSDP's gradient reduce-scatter), or read it without gradients under "
            "fastpref.integrations.distributed.gathered_params"
        )


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor) -> None:
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    _check_not_sharded("weight", weight)
    _check_not_sharded("bias", bias)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [S, T, D] (padded) or [N, D] (packed), got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight's D ({dim})")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    _check_device("weight", weight, hidden.device)
    _check_device("targets", targets, hidden.device)
    if bias is not None:
        _check_bias("bias", bias, vocab, weight.dtype, hidden.device)


# ---------------------------------------------------------------------------------------------------
# 2. the sequence layout


def _flatten_layout(hidden: torch.Tensor, targets: torch.Tensor, seq_ids: Optional[torch.Tensor],
                    num_seqs: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(targets [N] int64, seq_ids [N] int64, num_seqs) for padded or packed input."""
    device = hidden.device
    flat_targets = targets.reshape(-1).long()
    n = flat_targets.shape[0]
    if hidden.dim() == 3:
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed [N, D] input; padded [S, T, D] input uses one sequence per row")
        rows, cols = targets.shape
        if num_seqs is not None and num_seqs != rows:
            raise ValueError(f"num_seqs ({num_seqs}) must equal S ({rows}) for padded input")
        return flat_targets, torch.arange(rows, device=device).repeat_interleave(cols), rows
    if seq_ids is None:
        raise ValueError("seq_ids is required for packed [N, D] input (one sequence id per position)")
    if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise TypeError("seq_ids must be an integer tensor")
    if tuple(seq_ids.shape) != (n,):
        raise ValueError(f"seq_ids must have shape ({n},), got {tuple(seq_ids.shape)}")
    _check_device("seq_ids", seq_ids, device)
    flat_seq = seq_ids.long()
    if num_seqs is None:
        num_seqs = int(flat_seq.max().item()) + 1 if n > 0 else 0
    if num_seqs < 0:
        raise ValueError(f"num_seqs must be >= 0, got {num_seqs}")
    if n > 0 and (int(flat_seq.min().item()) < 0 or int(flat_seq.max().item()) >= num_seqs):
        raise ValueError(f"seq_ids must lie in [0, num_seqs={num_seqs})")
    return flat_targets, flat_seq, num_seqs


# ---------------------------------------------------------------------------------------------------
# 3-4. the vocabulary: this rank's slice, and the target ids


def _vocab_partition(local_vocab: int, group: Any, device: torch.device) -> Tuple[int, int]:
    """(offset of this rank's slice, global V): all-gather the slice sizes, ranks in group order."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_group needs an initialized torch.distributed process group")
    if local_vocab == 0:
        raise ValueError("vocab_parallel_group: every rank must hold at least one vocabulary row of weight")
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64, device=device), group=group)
    sizes = [int(s.item()) for s in sizes]
    rank = dist.get_rank(group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def _check_targets(targets: torch.Tensor, valid: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if targets.numel() == 0:
        return
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[bad][0].item())
        raise ValueError(f"targets must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; found {first}")


# ---------------------------------------------------------------------------------------------------
# 5-6. the reference head and the backend


def _reference_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor],
                    ref_bias: Optional[torch.Tensor], kl: Optional[str]):
    """(ref_hidden, ref_weight, ref_bias), detached; the policy head (and its bias) when no
    ``ref_weight`` is given; all None without ``ref_hidden``."""
    if ref_hidden is None:
        if kl is not None:
            raise ValueError(f"kl={kl!r} needs ref_hidden (the reference model's hidden states)")
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight/ref_bias were given without ref_hidden")
        return None, None, None
    _check_float("ref_hidden", ref_hidden)
    _check_not_sharded("ref_weight", ref_weight)
    _check_not_sharded("ref_bias", ref_bias)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"ref_hidden must have the layout of hidden {tuple(hidden.shape[:-1])}+(D,), got {tuple(ref_hidden.shape)}"
        )
    _check_device("ref_hidden", ref_hidden, hidden.device)
    vocab = weight.shape[0]
    if ref_weight is None:
        # Shared head: the reference reads the policy head; its (already checked) bias too unless one is given.
        r_weight = weight.detach()
        shared_bias = bias if ref_bias is None else None
    else:
        shared_bias = None
        _check_float("ref_weight", ref_weight)
        if ref_weight.dim() != 2 or ref_weight.shape[0] != vocab:
            raise ValueError(f"ref_weight must be [V={vocab}, D_ref], got {tuple(ref_weight.shape)}")
        _check_device("ref_weight", ref_weight, hidden.device)
        r_weight = ref_weight.detach()
    if ref_hidden.shape[-1] != r_weight.shape[1]:
        raise ValueError(
            f"ref_hidden's last dim ({ref_hidden.shape[-1]}) must equal the reference head's D ({r_weight.shape[1]})"
        )
    if ref_hidden.dtype != r_weight.dtype:
        raise TypeError(f"ref_hidden ({ref_hidden.dtype}) and the reference head ({r_weight.dtype}) must share a dtype")
    if shared_bias is not None:
        return ref_hidden.detach(), r_weight, shared_bias.detach()
    if ref_bias is not None:
        _check_bias("ref_bias", ref_bias, vocab, r_weight.dtype, hidden.device)
        ref_bias = ref_bias.detach()
    return ref_hidden.detach(), r_weight, ref_bias


def _resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """"auto": the Triton kernels for CUDA tensors (they accumulate in fp32, so float64 stays on torch)."""
    if backend == "auto":
        return "triton" if hidden.device.type == "cuda" and hidden.dtype != torch.float64 else "torch"
    return backend
