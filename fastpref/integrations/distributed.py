"""Distributed training with the fused losses: DDP, FSDP2 (``fully_shard``), DeepSpeed ZeRO-3.

The fused losses read the LM head directly -- ``loss_fn(model.lm_head.weight, hidden, targets)`` --
usually *outside* the model's forward, because the model's own forward would build the logits. Every
data-parallel wrapper ties its gradient synchronisation to its forward, so it matters how that call is
made. What each wrapper does:

DDP (``DistributedDataParallel``): the gradient all-reduce runs from autograd hooks that the wrapper's
forward arms.

- ``hidden = ddp_model(x)`` and the head read outside, ``find_unused_parameters=False`` (the default):
  correct. The head's gradient is all-reduced like every other parameter's.
- the backbone called on the unwrapped module (``ddp_model.module.model(x)``): the wrapper's forward
  never runs, **no gradient is all-reduced and the ranks silently diverge**.
- ``find_unused_parameters=True`` (the Hugging Face Trainer's default without gradient checkpointing):
  the head is not reachable from the forward's output, DDP marks it unused, then its gradient arrives
  and backward fails ("marked as ready twice").

FSDP2 (``fully_shard``):

- the head in the root's parameter group (``fully_shard(model)`` only): the root keeps its parameters
  unsharded after forward, so ``model.lm_head.weight`` read after ``hidden = model(x)`` is the unsharded
  parameter and its gradient is reduce-scattered with the root's: correct.
- the head sharded on its own (``fully_shard(model.lm_head)``): outside its forward the head is a
  sharded ``DTensor``; ``fused_logprobs`` rejects it with a ``TypeError``. Gathering it with
  ``weight.full_tensor()`` does *not* help a trainable head: the backward of that all-gather only keeps
  each rank's own slice of its own gradient, without the reduce-scatter, so **the head's gradient is
  wrong on every rank**.

DeepSpeed ZeRO-3: a parameter is partitioned (empty) outside its module's forward; ZeRO-3 gathers it
in a forward pre-hook and again for backward. ``fused_logprobs`` rejects an empty partitioned
parameter with a ``ValueError``. A ``GatheredParameters`` context around the loss call gives the
right values, but the torch backend recomputes logit tiles in backward, so backward would have to run
inside the context too (and the gradient would bypass ZeRO's reduce-scatter hooks).

One fix for all of these: run the loss computation *as the forward* of the wrapper (DDP) or of the
sharded module (FSDP2 / ZeRO-3) with :func:`forward_through`, so the framework's own hooks gather the
head, keep it for backward and synchronise its gradient::

    def step(input_ids, targets):
        hidden = model.model(input_ids).last_hidden_state          # the unwrapped modules inside
        return loss_fn(model.lm_head.weight, hidden, targets, ref_logps=ref).loss

    loss = forward_through(ddp_model, step, input_ids, targets)    # DDP, any find_unused_parameters
    loss.backward()

For a head sharded on its own (FSDP2 ``fully_shard(model.lm_head)``, ZeRO-3), route the head's part
through the head module as well::

    def step(input_ids, targets):
        hidden = model.model(input_ids).last_hidden_state
        return forward_through(model.lm_head, lambda: loss_fn(model.lm_head.weight, hidden, targets,
                                                              ref_logps=ref).loss)

    loss = forward_through(model, step, input_ids, targets)

:func:`through_sharded` does the inner step only when the head is sharded at that point (and calls
``fn`` directly otherwise, e.g. for a head in the root's parameter group), so one code path serves
every layout.

For no-grad reads of a sharded head (a reference model's head, a no-grad scoring pass) use
:func:`gathered_params`. :func:`assert_replicas_in_sync` checks, while debugging, that parameters or
gradients are equal on every rank.

This module is the one place that detects and gathers sharded parameters; the Hugging Face helpers
build on it: :func:`fastpref.integrations.transformers.gather_lm_head` refuses a trainable
FSDP-sharded head (pointing here) and gathers no-grad ones with :func:`gathered_params`;
:func:`~fastpref.integrations.transformers.enable_hidden_forward` lets a loss run inside a
``transformers`` model's forward (``model(..., fastpref_head_fn=fn)``), which is how
``FastPrefDPOTrainer`` stays correct under the Trainer's DDP (``find_unused_parameters=True`` by
default) and FSDP2 with a head sharded on its own.

Vocabulary parallelism (each rank of a group holds a contiguous slice of the head's rows, see
``vocab_parallel_group`` in :func:`fastpref.fused_logprobs` and the fused modules)::

    lo, hi = vocab_range(vocab_size, group)                 # this rank's rows of the head
    head_slice = nn.Parameter(full_weight[lo:hi].clone())   # what this rank keeps
    stats = fastpref.fused_logprobs(hidden, head_slice, targets, vocab_parallel_group=group)
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "forward_through",
    "through_sharded",
    "vocab_range",
    "unwrap_model",
    "sharding_kind",
    "gathered_params",
    "fsdp1_summoned",
    "assert_replicas_in_sync",
]


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside DDP / ``DataParallel`` wrappers (``.module``, repeatedly); others unchanged.

    Strips only the data-parallel replication wrappers, matched by type, so the result holds the same
    parameters under the names of the module the user built (what :func:`assert_replicas_in_sync`
    compares). It is not :func:`fastpref.integrations.transformers.hf_model`, which also strips any
    ``.module`` holder (DeepSpeed engines, FSDP1 units) and a PEFT wrapper to reach the ``transformers``
    model itself.
    """
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def forward_through(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` as the forward of ``module``, with all of ``module``'s hooks around it.

    ``module(*args, **kwargs)`` runs with the forward of the wrapped module (DDP: ``module.module``;
    otherwise ``module`` itself) temporarily replaced by ``fn``. The wrapper's machinery therefore runs
    around the loss computation:

    - DDP: inputs moved to the device, parameters synchronised when needed, and after ``fn`` the
      gradient hooks are armed for the outputs, with the head reachable from them (so
      ``find_unused_parameters=True`` sees it used).
    - FSDP2 ``fully_shard`` modules and DeepSpeed ZeRO-3: the module's parameters are gathered before
      ``fn`` and its backward hooks gather them again and reduce-scatter their gradients. ``fn`` must
      return its tensors as a tensor, tuple, list or dict (what these hooks look into), not another
      object: FSDP2 arms its backward on the tensors it finds there.

    Inside ``fn`` the module's own forward is back in place (an instance-level forward, e.g. one that
    Accelerate's autocast or :func:`~fastpref.integrations.transformers.enable_hidden_forward` set,
    included), so ``fn`` may call the unwrapped module or its submodules normally (for a sharded head,
    call the head's loss through ``forward_through(head, ...)`` from within the outer ``fn``). ``fn``'s
    return value is returned (e.g. the loss tensor).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    own = vars(inner)
    if getattr(own.get("forward"), "_fastpref_redirect", False):
        raise RuntimeError(f"forward_through is already redirecting the forward of {type(inner).__name__} "
                           "(nested forward_through on the same module)")
    missing = object()
    previous = own.get("forward", missing)  # an instance-level forward is put back, not dropped

    def restore() -> None:
        if previous is missing:
            own.pop("forward", None)
        else:
            own["forward"] = previous

    def redirected(*a: Any, **k: Any) -> Any:
        restore()  # before fn runs: fn may call the module itself
        return fn(*a, **k)

    redirected._fastpref_redirect = True  # type: ignore[attr-defined]
    own["forward"] = redirected
    try:
        return module(*args, **kwargs)
    finally:
        if own.get("forward") is redirected:  # the wrapper never called forward (or raised first)
            restore()


def through_sharded(module: nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()``, run as ``module``'s forward (:func:`forward_through`) when ``module``'s own parameters
    are sharded at this point, directly otherwise.

    For the head part of a fused loss: a head that FSDP2 sharded on its own (``fully_shard(head)``) is
    a ``DTensor`` outside its forward, and only its forward's hooks gather it correctly for a
    trainable loss (a ``full_tensor()`` all-gather's backward returns each rank's slice of its *own*
    gradient, without the reduction: wrong on every rank). Inside the forward of a parent that holds
    the head in its own parameter group the head is already unsharded, and ``fn`` runs directly.
    DeepSpeed ZeRO-3 parameters are routed the same way. FSDP1 flat parameters raise
    ``NotImplementedError``. ``fn`` must return tensors in a tensor, tuple, list or
    dict (see :func:`forward_through`).
    """
    kinds = {sharding_kind(p) for p in module.parameters(recurse=False)} - {None}
    if "fsdp1" in kinds:
        raise NotImplementedError(f"through_sharded: {type(module).__name__} has FSDP1 flat parameters; "
                                  "use FSDP2 (fully_shard) for a trainable fused head")
    return forward_through(module, fn) if kinds else fn()


def vocab_range(vocab_size: int, group: Any = None) -> Tuple[int, int]:
    """``(start, end)`` rows of a ``vocab_size``-row head kept by this rank of ``group`` (default: world).

    Contiguous, in rank order, sizes differing by at most one (the first ``vocab_size % world`` ranks
    get one more row): the layout ``vocab_parallel_group`` expects. Any other contiguous split in rank
    order works too.
    """
    import torch.distributed as dist

    if int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if vocab_size < world:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least the group size ({world})")
    base, extra = divmod(int(vocab_size), world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# --------------------------------------------------------------------------------------------------
# sharded parameters


def _is_dtensor(t: Any) -> bool:
    # A DTensor can only exist once torch.distributed.tensor was imported: no import cost otherwise.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def sharding_kind(param: Any) -> Optional[str]:
    """How ``param`` is sharded: ``"zero3"`` (DeepSpeed ZeRO-3: ``ds_id``/``ds_status`` attributes),
    ``"fsdp2"`` (a ``DTensor``, as ``fully_shard`` makes), ``"fsdp1"`` (flattened by FSDP1) or ``None``.

    Reads only the attributes and types the frameworks attach; imports neither framework.
    """
    if param is None:
        return None
    if hasattr(param, "ds_id") and hasattr(param, "ds_status"):
        return "zero3"
    if _is_dtensor(param):
        return "fsdp2"
    if getattr(param, "_fsdp_flattened", False):
        return "fsdp1"
    return None


def _zero3_gather(params: List[torch.Tensor]) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.GatheredParameters`` over the partitioned ones (read-only: modifier_rank=None)."""
    import deepspeed  # only reached when DeepSpeed created these parameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # A parameter already gathered (inside its module's forward, or tied to one) must not be gathered twice.
    todo = [p for p in params if getattr(p, "ds_status", None) != ZeroParamStatus.AVAILABLE]
    if not todo:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(todo, modifier_rank=None)


@contextlib.contextmanager
def gathered_params(*params: Optional[torch.Tensor]) -> Iterator[Tuple[Optional[torch.Tensor], ...]]:
    """Full, detached copies (or views) of possibly sharded parameters, for reading without gradients.

    Yields one tensor per argument (``None`` stays ``None``):

    - plain tensors: ``p.detach()`` (no copy, no communication);
    - DeepSpeed ZeRO-3 parameters (``ds_id``): gathered with ``deepspeed.zero.GatheredParameters``
      (``modifier_rank=None``), released on exit, so the yielded views are valid inside the block only
      (clone to keep them); ``deepspeed`` is imported only in this case;
    - ``DTensor`` parameters (FSDP2): ``full_tensor()`` (an all-gather; every rank must call);
    - FSDP1 flat parameters: ``NotImplementedError`` (use :func:`fsdp1_summoned` on the owning unit).

    Meant for reference heads and no-grad passes. A gradient through a gathered copy would bypass the
    framework's gradient reduction, so the yielded tensors are detached; for a trainable head use
    :func:`forward_through` / :func:`through_sharded`. Grad mode inside the ``with`` block is the
    caller's (only the gather itself runs without grad). Every rank of the sharding group must enter
    the context.
    """
    kinds = [sharding_kind(p) for p in params]
    if "fsdp1" in kinds:
        raise NotImplementedError("gathered_params: FSDP1 flat parameters are gathered with "
                                  "FullyShardedDataParallel.summon_full_params on the owning unit "
                                  "(fastpref.integrations.distributed.fsdp1_summoned)")
    zero3 = [p for p, k in zip(params, kinds) if k == "zero3"]
    with _zero3_gather(zero3) if zero3 else contextlib.nullcontext():
        with torch.no_grad():
            full = tuple(None if p is None else (p.full_tensor() if k == "fsdp2" else p.detach())
                         for p, k in zip(params, kinds))
        yield full  # outside no_grad: the caller's body keeps its own grad mode


@contextlib.contextmanager
def fsdp1_summoned(root: nn.Module, module: nn.Module) -> Iterator[nn.Module]:
    """``FullyShardedDataParallel.summon_full_params`` (no writeback) on the innermost FSDP1 unit of
    ``root`` that contains ``module``; yields ``module``, whose parameters are full inside the context.
    FSDP1 does not return gradients taken there to the shards: for no-grad use only."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owner = None
    for unit in root.modules():
        if isinstance(unit, FSDP) and any(m is module for m in unit.modules()):
            owner = unit  # modules() walks outer to inner: keep the last (innermost) match
    if owner is None:
        raise TypeError(f"{type(module).__name__} is FSDP-flattened but no FullyShardedDataParallel unit "
                        "contains it")
    with FSDP.summon_full_params(owner, recurse=False, writeback=False):
        yield module


# --------------------------------------------------------------------------------------------------
# debugging


def assert_replicas_in_sync(
    module: nn.Module,
    *,
    grads: bool = True,
    group: Any = None,
    rtol: float = 1e-6,
    names: Optional[Sequence[str]] = None,
) -> None:
    """Raise ``RuntimeError`` naming the parameters whose values (``grads=False``) or gradients
    (``grads=True``) differ across the ranks of ``group`` (default: the world).

    A cheap check for data-parallel setups where every rank must hold the same parameters and, after the
    gradient reduction, the same gradients: compares a per-parameter fingerprint (sum and sum of squares,
    in fp64) with an all-gather. Sharded (``DTensor``) parameters are compared by their local shards, so
    use it on replicated parameters (DDP, or the replicated parts of a model). A collective: every rank
    must call it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    module = unwrap_model(module)
    items = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
    prints, labels = [], []
    for name, p in items:
        t = p.grad if grads else p
        if t is None:  # a missing gradient is a fingerprint too (and keeps the shapes equal across ranks)
            prints.append(torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64, device=p.device))
        else:
            t = (t.to_local() if _is_dtensor(t) else t).detach().double()
            prints.append(torch.stack([torch.ones((), dtype=torch.float64, device=t.device), t.sum(),
                                       t.square().sum()]))
        labels.append(name)
    if not prints:
        return
    local = torch.stack(prints)
    world = dist.get_world_size(group)
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local, group=group)
    stacked = torch.stack(every)  # [world, params, 3]
    spread = (stacked - stacked[0]).abs().amax(dim=(0, 2))
    scale = stacked.abs().amax(dim=(0, 2)).clamp_min(1e-30)
    bad = [labels[i] for i in (spread > rtol * scale).nonzero().flatten().tolist()]
    if bad:
        what = "gradients" if grads else "values"
        raise RuntimeError(
            f"parameter {what} differ across ranks for: {', '.join(bad)}. Under DDP this usually means the "
            "backbone ran outside the DDP wrapper's forward (e.g. ddp_model.module...), so nothing was "
            "all-reduced; use fastpref.integrations.distributed.forward_through"
        )
