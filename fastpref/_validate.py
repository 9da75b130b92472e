"""Input validation and normalisation shared by every backend of ``fused_logprobs``.

Every backend works on the same flat view of the inputs: positions ``[N, D]``, targets ``[N]``,
and a sequence id per position. ``prepare`` checks the user's arguments, raises a ``ValueError`` or
``TypeError`` naming the offending argument, and returns that flat view.
"""
from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

KL_MODES = (None, "forward", "reverse")
BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Prepared:
    """The flat, validated view of one ``fused_logprobs`` call."""

    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    bias: Optional[torch.Tensor]  # [V]
    targets: torch.Tensor  # [N] int64, ignore_index kept as is
    valid: torch.Tensor  # [N] bool, False where targets == ignore_index
    seq_ids: torch.Tensor  # [N] int64 in [0, num_seqs)
    num_seqs: int
    target_shape: Tuple[int, ...]
    padded: bool
    ref_hidden: Optional[torch.Tensor]  # [N, D], detached
    ref_weight: Optional[torch.Tensor]  # [V, D], detached
    ref_bias: Optional[torch.Tensor]
    kl: Optional[str]
    temperature: float
    softcap: Optional[float]
    ignore_index: int
    backend: str  # resolved: "torch" or "triton"
    # Vocabulary parallelism: ``weight``/``bias`` hold rows [vocab_offset, vocab_offset + V) of a
    # vocabulary of ``global_vocab_size`` split across ``vocab_parallel_group``; targets are global ids.
    vocab_parallel_group: Optional[Any] = None
    vocab_offset: int = 0
    global_vocab_size: Optional[int] = None

    @property
    def num_positions(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        """This rank's vocabulary size (the whole vocabulary without a vocab-parallel group)."""
        return self.weight.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp64 stays fp64; everything else computes in fp32 blocks."""
        return torch.float64 if self.hidden.dtype == torch.float64 else torch.float32


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _check_scalar(name: str, value, allow_none: bool) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a positive finite number, got None")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return v


def _check_int(name: str, value) -> int:
    """An integer (Python, NumPy or 0-d integer tensor); floats such as 2.7 are refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_finite(name: str, t: torch.Tensor) -> None:
    """A bias of -inf (a way to mask tokens) would make whole vocabulary tiles -inf, and the online
    log-sum-exp and the KL terms NaN (-inf - -inf); a large finite negative value masks just as well."""
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (to mask tokens use a large negative value such as -1e4, "
                         "whose exponential is exactly 0 in fp32, instead of -inf)")


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
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_parallel_group: Optional[Any] = None,
) -> Prepared:
    """Validate the arguments of ``fused_logprobs`` and flatten them. See that function's docs."""
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    for name, param in (("weight", weight), ("bias", bias), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        _check_not_sharded(name, param)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    temperature = _check_scalar("temperature", temperature, allow_none=False)
    softcap = _check_scalar("softcap", softcap, allow_none=True)
    ignore_index = _check_int("ignore_index", ignore_index)
    if num_seqs is not None:
        num_seqs = _check_int("num_seqs", num_seqs)

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
    device = hidden.device
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {device}: mixed devices")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {device}: mixed devices")

    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},) to match weight, got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {device}: mixed devices")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
        _check_finite("bias", bias)

    padded = hidden.dim() == 3
    target_shape = tuple(targets.shape)
    flat_targets = targets.reshape(-1).long()
    n = flat_targets.shape[0]

    if padded:
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed [N, D] input; padded [S, T, D] input uses one sequence per row")
        rows, cols = targets.shape
        if num_seqs is None:
            num_seqs = rows
        elif int(num_seqs) != rows:
            raise ValueError(f"num_seqs ({num_seqs}) must equal S ({rows}) for padded input")
        flat_seq = torch.arange(rows, device=device).repeat_interleave(cols)
    else:
        if seq_ids is None:
            raise ValueError("seq_ids is required for packed [N, D] input (one sequence id per position)")
        if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
            raise TypeError("seq_ids must be an integer tensor")
        if tuple(seq_ids.shape) != (n,):
            raise ValueError(f"seq_ids must have shape ({n},), got {tuple(seq_ids.shape)}")
        if seq_ids.device != device:
            raise ValueError(f"seq_ids is on {seq_ids.device} but hidden is on {device}: mixed devices")
        flat_seq = seq_ids.long()
        if num_seqs is None:
            num_seqs = int(flat_seq.max().item()) + 1 if n > 0 else 0
        num_seqs = int(num_seqs)
        if num_seqs < 0:
            raise ValueError(f"num_seqs must be >= 0, got {num_seqs}")
        if n > 0 and (int(flat_seq.min().item()) < 0 or int(flat_seq.max().item()) >= num_seqs):
            raise ValueError(f"seq_ids must lie in [0, num_seqs={num_seqs})")

    valid = flat_targets != ignore_index
    vocab_offset, global_vocab = 0, vocab
    if vocab_parallel_group is not None:
        if backend == "triton":
            raise NotImplementedError(
                "vocab_parallel_group is implemented by the torch backend only; use backend='torch' "
                "(or 'auto', which picks it when a group is given)"
            )
        backend = "torch"
        vocab_offset, global_vocab = _vocab_slice(vocab, vocab_parallel_group, device)
    if n > 0:
        bad = valid & ((flat_targets < 0) | (flat_targets >= global_vocab))
        if bool(bad.any()):
            first = int(flat_targets[bad][0].item())
            raise ValueError(
                f"targets must lie in [0, V={global_vocab}) or equal ignore_index={ignore_index}; found {first}"
            )

    if ref_hidden is None:
        if kl is not None:
            raise ValueError(f"kl={kl!r} needs ref_hidden (the reference model's hidden states)")
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight/ref_bias were given without ref_hidden")
        r_hidden = r_weight = r_bias = None
    else:
        _check_float("ref_hidden", ref_hidden)
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"ref_hidden must have the layout of hidden {tuple(hidden.shape[:-1])}+(D,), "
                f"got {tuple(ref_hidden.shape)}"
            )
        if ref_hidden.device != device:
            raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {device}: mixed devices")
        if ref_weight is None:
            # Shared head: the reference reads the policy head (detached); its bias too.
            r_weight = weight.detach()
            r_bias = bias.detach() if (bias is not None and ref_bias is None) else ref_bias
        else:
            _check_float("ref_weight", ref_weight)
            if ref_weight.dim() != 2 or ref_weight.shape[0] != vocab:
                raise ValueError(f"ref_weight must be [V={vocab}, D_ref], got {tuple(ref_weight.shape)}")
            if ref_weight.device != device:
                raise ValueError(f"ref_weight is on {ref_weight.device} but hidden is on {device}: mixed devices")
            r_weight = ref_weight.detach()
            r_bias = ref_bias
        if ref_hidden.shape[-1] != r_weight.shape[1]:
            raise ValueError(
                f"ref_hidden's last dim ({ref_hidden.shape[-1]}) must equal the reference head's D ({r_weight.shape[1]})"
            )
        if ref_hidden.dtype != r_weight.dtype:
            raise TypeError(f"ref_hidden ({ref_hidden.dtype}) and the reference head ({r_weight.dtype}) must share a dtype")
        if r_bias is not None:
            _check_float("ref_bias", r_bias)
            if tuple(r_bias.shape) != (vocab,):
                raise ValueError(f"ref_bias must have shape ({vocab},), got {tuple(r_bias.shape)}")
            if r_bias.device != device:
                raise ValueError(f"ref_bias is on {r_bias.device} but hidden is on {device}: mixed devices")
            if r_bias.dtype != r_weight.dtype:
                raise TypeError(f"ref_bias ({r_bias.dtype}) and the reference head ({r_weight.dtype}) must "
                                "have the same dtype")
            if ref_bias is not None:
                _check_finite("ref_bias", r_bias)
            r_bias = r_bias.detach()
        r_hidden = ref_hidden.detach().reshape(n, -1)

    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"

    return Prepared(
        hidden=hidden.reshape(n, dim),
        weight=weight,
        bias=bias,
        targets=flat_targets,
        valid=valid,
        seq_ids=flat_seq,
        num_seqs=int(num_seqs),
        target_shape=target_shape,
        padded=padded,
        ref_hidden=r_hidden,
        ref_weight=r_weight,
        ref_bias=r_bias,
        kl=kl,
        temperature=temperature,
        softcap=softcap,
        ignore_index=int(ignore_index),
        backend=backend,
        vocab_parallel_group=vocab_parallel_group,
        vocab_offset=vocab_offset,
        global_vocab_size=global_vocab,
    )


def _vocab_slice(local_vocab: int, group: Any, device: torch.device) -> Tuple[int, int]:
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
