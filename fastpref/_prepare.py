"""``prepare``: validate the arguments of ``fused_logprobs`` and flatten them into a :class:`Prepared`.

Every backend works on the same flat view: positions ``[N, D]``, targets ``[N]`` and a sequence id per
position. Validation comes in two stages, each check raising a ``ValueError`` or ``TypeError`` naming the
offending argument:

- :func:`check_call`, *metadata* (types, shapes, dtypes, devices, scalars): traceable by ``torch.compile``
  and free of host synchronization, it runs in the op's Python wrapper. Steps: 1. ``_check_head``;
  2. ``_flatten_layout`` (padded ``[S, T, D]`` or packed ``[N, D]`` + ``seq_ids``); 3. ``_vocab_partition``
  (this rank's slice of a vocabulary-parallel head: the one collective, eager only); 5. ``_reference_head``
  (defaulting to the policy head, detached); 6. ``_resolve_backend``.
- :func:`build_prepared`, *values* (4. targets within the vocabulary, finite biases, ``seq_ids`` within
  ``[0, num_seqs)``), through :func:`fastpref._checks.check_values`: precise errors on CPU, device-side
  assertions without a sync on CUDA. It runs inside the custom op, which ``torch.compile`` does not trace.

:func:`prepare` runs both (the eager oracle and the tests use it).
"""
from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import torch

from ._checks import check_int, check_optional_positive, check_positive, check_values
from ._types import EXTRA_OUTPUTS, IGNORE_INDEX, KL_MODES, KernelOptions, Prepared

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_OPTIONS = KernelOptions()


class Call(NamedTuple):
    """One call's arguments after the metadata checks, flattened: what the custom op receives."""

    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    bias: Optional[torch.Tensor]  # [V]
    targets: torch.Tensor  # [N] int64
    seq_ids: Optional[torch.Tensor]  # [N] int64 for packed input; None for padded rows
    ref_hidden: Optional[torch.Tensor]  # [N, D_ref], detached
    ref_weight: Optional[torch.Tensor]  # [V, D_ref], detached
    ref_bias: Optional[torch.Tensor]  # [V], detached
    num_seqs: int
    kl: Optional[str]
    temperature: float
    softcap: Optional[float]
    ignore_index: int
    backend: str  # resolved: "torch" or "triton"
    vocab_offset: int
    global_vocab: int
    options: KernelOptions
    group: Optional[Any]  # the vocabulary-parallel process group
    target_shape: Tuple[int, ...]
    extra_outputs: Tuple[str, ...] = ()  # validated, in EXTRA_OUTPUTS order


def check_extra_outputs(extra_outputs: Sequence[str]) -> Tuple[str, ...]:
    """The requested optional outputs as a tuple in :data:`EXTRA_OUTPUTS` order (duplicates dropped)."""
    if isinstance(extra_outputs, str) or not isinstance(extra_outputs, (list, tuple, set, frozenset)):
        raise TypeError(f"extra_outputs must be a sequence of names from {EXTRA_OUTPUTS} (e.g. ('entropy',)), "
                        f"got {extra_outputs!r}")
    unknown = [name for name in extra_outputs if name not in EXTRA_OUTPUTS]
    if unknown:
        raise ValueError(f"extra_outputs: unknown name(s) {unknown}; choose from {EXTRA_OUTPUTS}")
    return tuple(name for name in EXTRA_OUTPUTS if name in extra_outputs)


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
    options: Optional[KernelOptions] = None,
    extra_outputs: Sequence[str] = (),
) -> Prepared:
    """Validate the arguments of ``fused_logprobs`` (see its docstring), metadata and values, and flatten them."""
    call = check_call(
        hidden, weight, targets, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, backend=backend, vocab_parallel_group=vocab_parallel_group, options=options,
        extra_outputs=extra_outputs,
    )
    return build_prepared(call)


def check_call(
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
    options: Optional[KernelOptions] = None,
    extra_outputs: Sequence[str] = (),
) -> Call:
    """The metadata checks of ``fused_logprobs`` and the flat view (no value is read, except ``seq_ids.max()``
    for a packed call without ``num_seqs``, and the slice sizes of a vocabulary-parallel head)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if options is None:
        options = DEFAULT_OPTIONS
    elif not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a fastpref.KernelOptions, got {type(options).__name__}")
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    extras = check_extra_outputs(extra_outputs)
    temperature = check_positive("temperature", temperature)
    softcap = check_optional_positive("softcap", softcap)
    ignore_index = check_int("ignore_index", ignore_index)
    if num_seqs is not None:
        num_seqs = check_int("num_seqs", num_seqs)

    _check_head(hidden, weight, bias, targets)
    flat_targets, flat_seq, num_seqs = _flatten_layout(hidden, targets, seq_ids, num_seqs)
    vocab_offset, global_vocab = 0, weight.shape[0]
    if vocab_parallel_group is not None:
        vocab_offset, global_vocab = _vocab_partition(weight.shape[0], vocab_parallel_group, hidden.device)
    r_hidden, r_weight, r_bias = _reference_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl)
    n = flat_targets.shape[0]
    return Call(
        hidden=hidden.reshape(n, weight.shape[1]), weight=weight, bias=bias, targets=flat_targets, seq_ids=flat_seq,
        ref_hidden=None if r_hidden is None else r_hidden.reshape(n, -1), ref_weight=r_weight, ref_bias=r_bias,
        num_seqs=num_seqs, kl=kl, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
        backend=_resolve_backend(backend, hidden), vocab_offset=vocab_offset, global_vocab=global_vocab,
        options=options, group=vocab_parallel_group, target_shape=tuple(targets.shape), extra_outputs=extras,
    )


def build_prepared(call: Call, *, check_values_: bool = True) -> Prepared:
    """The value checks (targets, biases, ``seq_ids``; see :func:`fastpref._checks.check_values`) and the
    :class:`Prepared` view of a checked call. Runs inside the custom op on real tensors; its backward,
    whose inputs the forward already checked, skips the checks (``check_values_=False``)."""
    valid = call.targets != call.ignore_index
    if check_values_:
        _check_targets(call.targets, valid, call.global_vocab, call.ignore_index)
        for name, b in (("bias", call.bias), ("ref_bias", call.ref_bias)):
            if b is not None:
                _check_finite(name, b)
    n = call.targets.shape[0]
    padded = call.seq_ids is None
    if padded:
        rows = call.num_seqs
        seq_ids = torch.arange(rows, device=call.hidden.device).repeat_interleave(n // rows if rows else 0)
    else:
        seq_ids = call.seq_ids
        if check_values_:
            check_values((seq_ids >= 0) & (seq_ids < call.num_seqs),
                         f"seq_ids must lie in [0, num_seqs={call.num_seqs})")
    return Prepared(
        hidden=call.hidden, weight=call.weight, bias=call.bias, targets=call.targets, valid=valid, seq_ids=seq_ids,
        num_seqs=call.num_seqs, target_shape=call.target_shape, padded=padded, ref_hidden=call.ref_hidden,
        ref_weight=call.ref_weight, ref_bias=call.ref_bias, kl=call.kl, temperature=call.temperature,
        softcap=call.softcap, backend=call.backend, vocab_parallel_group=call.group,
        vocab_offset=call.vocab_offset, options=call.options, extra_outputs=call.extra_outputs,
        global_vocab=call.global_vocab,
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
    check_values(torch.isfinite(t), f"{name} must be finite (to mask tokens use a large negative value such as "
                 "-1e4, whose exponential is exactly 0 in fp32, instead of -inf)")


def _check_bias(name: str, bias: torch.Tensor, vocab: int, head_dtype: torch.dtype, device: torch.device) -> None:
    _check_float(name, bias)
    if tuple(bias.shape) != (vocab,):
        raise ValueError(f"{name} must have shape ({vocab},) to match the head's weight, got {tuple(bias.shape)}")
    _check_device(name, bias, device)
    if bias.dtype != head_dtype:
        raise TypeError(f"{name} ({bias.dtype}) and its head's weight ({head_dtype}) must have the same dtype")


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
                    num_seqs: Optional[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """(targets [N] int64, seq_ids [N] int64 or None for padded rows, num_seqs) for padded or packed input.

    A packed call without ``num_seqs`` reads ``seq_ids.max()`` back (a host sync; pass ``num_seqs`` to
    avoid it); under ``torch.compile`` it must be given. The range of ``seq_ids`` is a value check
    (:func:`build_prepared`)."""
    flat_targets = targets.reshape(-1).long()
    n = flat_targets.shape[0]
    if hidden.dim() == 3:
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed [N, D] input; padded [S, T, D] input uses one sequence per row")
        rows = targets.shape[0]
        if num_seqs is not None and num_seqs != rows:
            raise ValueError(f"num_seqs ({num_seqs}) must equal S ({rows}) for padded input")
        return flat_targets, None, rows
    if seq_ids is None:
        raise ValueError("seq_ids is required for packed [N, D] input (one sequence id per position)")
    if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise TypeError("seq_ids must be an integer tensor")
    if tuple(seq_ids.shape) != (n,):
        raise ValueError(f"seq_ids must have shape ({n},), got {tuple(seq_ids.shape)}")
    _check_device("seq_ids", seq_ids, hidden.device)
    flat_seq = seq_ids.long()
    if num_seqs is None:
        if torch.compiler.is_compiling():
            raise ValueError("num_seqs is required for packed input under torch.compile (inferring it from "
                             "seq_ids.max() would read a value back to the host); pass num_seqs=")
        num_seqs = int(flat_seq.max()) + 1 if n > 0 else 0
    if num_seqs < 0:
        raise ValueError(f"num_seqs must be >= 0, got {num_seqs}")
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
    bad = valid & ((targets < 0) | (targets >= vocab))
    check_values(~bad, f"targets must lie in [0, V={vocab}) or equal ignore_index={ignore_index}",
                 lambda: f"; found {int(targets[bad][0])}")


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
