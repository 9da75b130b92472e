"""Feed a Hugging Face causal LM to the fused losses without ever computing its logits.

A causal LM is ``logits = head(backbone(input_ids))``, where ``head`` is one ``nn.Linear`` (optionally tied to
the input embeddings) followed, for some families, by a fixed elementwise map of the logits. The fused
losses need exactly the head's *inputs*: the final hidden states, the targets each position predicts, the head
weight/bias and that elementwise map. This module extracts them:

- the backbone is called directly (``model.base_model``, e.g. ``LlamaForCausalLM.model``), so the
  ``[tokens x vocab]`` logits are never built;
- the label shift is done here: position ``t`` predicts ``labels[t + 1]``, the last position predicts nothing
  (``ignore_index``), so ``fused_logprobs(hidden, weight, targets)`` scores the same tokens as
  ``log_softmax(model(...).logits)[:, :-1]`` gathered at ``labels[:, 1:]``;
- ``logits_to_keep`` slices hidden states and the *already shifted* targets together, exactly like the model
  slices its hidden states before its head;
- logit maps: what each model class's forward does to ``lm_head(hidden)`` (a soft-cap, a multiplier or divisor of
  the logits or of the hidden states) becomes ``softcap``/``temperature`` (:mod:`fastpref.integrations._heads`
  lists every class); a head the op cannot express raises ``UnsupportedHeadError``. Both values belong to the
  head: read once (:func:`head_inputs`), they travel with it (:meth:`LMHeadInputs.head_kwargs`) into each loss call;
- unwrapping: :func:`hf_model` is the one way to the ``transformers`` model inside DDP / DeepSpeed / PEFT
  wrappers, and :func:`backbone_hidden` (from ``fastpref._hf``) the one reader of a backbone's output;
- tied embeddings need nothing special: the head weight *is* the embedding parameter, so its gradient
  accumulates once into that one parameter;
- sharded heads: :func:`gather_lm_head` gathers a DeepSpeed ZeRO-3 or FSDP-sharded head weight with that
  framework's own mechanism (through :mod:`fastpref.integrations.distributed`, which owns the detection), and is
  a no-op when neither is in use (``deepspeed`` is imported only then). A *trainable* FSDP-sharded head cannot be
  gathered correctly outside its forward; it raises and points to ``distributed.through_sharded``.
"""
from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from .._hf import backbone_hidden
from .._types import IGNORE_INDEX
from . import distributed as _dist
from ._heads import HeadMap, UnsupportedHeadError, head_map  # noqa: F401  (UnsupportedHeadError: re-exported)
from .distributed import sharding_kind  # re-exported: one detection for every integration

LogitsToKeep = Union[int, torch.Tensor]


@dataclass
class LMHeadInputs:
    """Everything ``fastpref.fused_logprobs`` (or a fused loss module) needs in place of the logits.

    Attributes:
        hidden: ``[B, T', D]`` final hidden states (``T' = T`` unless ``logits_to_keep`` sliced them), or
            ``[N, D]`` packed positions when ``logits_to_keep`` was a boolean mask.
        targets: ``[B, T']`` (or ``[N]``) next-token ids, ``ignore_index`` where nothing is scored.
        weight: ``[V, D]`` LM-head weight (the embedding matrix when tied).
        bias: ``[V]`` LM-head bias or None.
        softcap: final-logit soft-capping value (Gemma 2) or None.
        temperature: logits are divided by it (1.0 unless the config scales its logits).
        seq_ids: ``[N]`` row of each packed position (boolean ``logits_to_keep`` only), else None.
        num_seqs: number of rows (packed input only), else None.
        ignore_index: the value marking unscored targets.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float] = None
    temperature: float = 1.0
    seq_ids: Optional[torch.Tensor] = None
    num_seqs: Optional[int] = None
    ignore_index: int = IGNORE_INDEX

    def head_kwargs(self) -> Dict[str, Any]:
        """The head and the packing as call keywords: ``bias``, ``temperature``, ``softcap`` (from the model's
        config) and, for packed inputs, ``seq_ids``/``num_seqs``.

        Pass them to a fused loss module's call, ``loss_fn(out.weight, out.hidden, out.targets,
        **out.head_kwargs(), ...)``, or to :func:`fastpref.fused_logprobs` (with ``ignore_index=out.ignore_index``,
        or use :meth:`logprobs`). ``ignore_index`` is not among them: it marks the targets, and a loss module
        fixes it in its constructor (build the inputs with ``ignore_index=loss_fn.ignore_index``).
        """
        kwargs: Dict[str, Any] = {"bias": self.bias, "temperature": self.temperature, "softcap": self.softcap}
        if self.seq_ids is not None:
            kwargs.update(seq_ids=self.seq_ids, num_seqs=self.num_seqs)
        return kwargs

    def logprobs(self, **kwargs: Any):
        """``fastpref.fused_logprobs`` on these inputs; extra kwargs (``ref_hidden``, ``kl``...) pass through."""
        from ..ops import fused_logprobs

        call = {**self.head_kwargs(), "ignore_index": self.ignore_index, **kwargs}
        return fused_logprobs(self.hidden, self.weight, self.targets, **call)


def _inside_holders(model: torch.nn.Module) -> torch.nn.Module:
    """Strip every wrapper that holds the model as ``.module`` (DDP, a DeepSpeed engine, an FSDP1 unit)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_peft(model: torch.nn.Module) -> bool:
    """Whether a PEFT model sits inside ``model``'s wrappers (see :func:`hf_model`)."""
    model = _inside_holders(model)
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside every wrapper: anything holding it as ``.module`` (DDP,
    ``DataParallel``, a DeepSpeed engine, an FSDP1 unit), then a PEFT model's ``get_base_model()`` (whose
    LoRA layers live inside the returned model).

    This is the one unwrapping of the Hugging Face helpers and ``FastPrefDPOTrainer``: it reaches the
    object that owns ``config``, ``get_output_embeddings()`` and the backbone. It differs from
    :func:`fastpref.integrations.distributed.unwrap_model`, which strips only the data-parallel wrappers
    (``DistributedDataParallel``/``DataParallel``, matched by type) and keeps a PEFT model, so parameter
    names stay those of the module the user built.
    """
    model = _inside_holders(model)
    return model.get_base_model() if is_peft(model) else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps ``input_ids`` to final hidden states, i.e. the model minus its LM head."""
    model = hf_model(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for base in (getattr(model, "base_model", None), decoder, getattr(model, "model", None)):  # Llama 4: .model
        if isinstance(base, torch.nn.Module) and base is not model:
            return base
    raise TypeError(
        f"model ({type(model).__name__}) has no backbone (base_model / get_decoder()): expected a *ForCausalLM model"
    )


def enable_hidden_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Let ``model(..., fastpref_hidden=True)`` return the backbone's output (final hidden states, no logits), and
    ``model(..., fastpref_head_fn=fn)`` return ``fn(hidden_states)`` computed inside the model's forward.

    Calling the backbone directly skips whatever hooks sit on the model's own forward: DDP's, or FSDP2's root
    unit, which unshards the parameters it owns (e.g. the embeddings) only around ``model.forward``. After this
    call, :func:`lm_head_inputs` (and ``FastPrefDPOTrainer``) go through ``model(...)`` -- so through every
    wrapper -- and only the head is skipped.

    ``fastpref_head_fn`` puts the fused loss itself inside the forward, which is what DDP needs when it looks for
    unused parameters (``find_unused_parameters=True``, the Hugging Face Trainer's default without gradient
    checkpointing): DDP marks every parameter that the forward's outputs do not reach as unused, so a head read
    *after* the forward gets its gradient reduced twice and backward fails ("marked as ready twice"). Return
    tensors in a tensor, tuple, list or dict (what DDP and FSDP2 look into), e.g. ``(loss, metrics)``. ``fn`` runs
    with autocast disabled, as it would after the forward returned (the fused op wants one dtype; the head's inputs
    are cast to the head's dtype by :func:`head_inputs`).

    Without either flag the model's forward runs unchanged (generation, other trainers' paths). Patches the inner
    ``transformers`` model in place and returns ``model``.
    """
    inner = hf_model(model)
    if getattr(inner, "_fastpref_hidden_forward", False):
        return model
    previous = inner.forward

    @functools.wraps(type(inner).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fastpref_hidden: bool = False,
                fastpref_head_fn: Optional[Callable[[torch.Tensor], Any]] = None, **kwargs):
        if not fastpref_hidden and fastpref_head_fn is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        outputs = backbone(self)(*args, **kwargs)
        if fastpref_head_fn is None:
            return outputs
        hidden = backbone_hidden(outputs)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return fastpref_head_fn(hidden)

    inner.forward = types.MethodType(forward, inner)
    inner._fastpref_hidden_forward = True
    return model


def head_parameters(model: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, D], bias [V] or None)`` of the output embeddings, without gathering anything."""
    model = hf_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"model ({type(model).__name__}) has no output embeddings (get_output_embeddings())")
    return head.weight, getattr(head, "bias", None)


def logit_transform(config_or_model: Any) -> Tuple[Optional[float], float]:
    """``(softcap, temperature)`` reproducing the elementwise map a model's forward applies to its head's output:
    that of the model's class (possibly wrapped), or of the causal-LM class of a config's ``model_type``, per
    :data:`fastpref.integrations._heads.RULES` (e.g. Gemma 2's soft-cap is ``softcap``, Cohere's ``logits *
    logit_scale`` is ``temperature = 1 / logit_scale``, Granite's ``logits / logits_scaling`` is ``temperature =
    logits_scaling``). Raises ``UnsupportedHeadError`` naming the class for a head the fused op cannot reproduce."""
    hm = _head_map(config_or_model)
    return hm.softcap, hm.temperature


def _head_map(config_or_model: Any) -> HeadMap:
    if isinstance(config_or_model, torch.nn.Module):
        model = hf_model(config_or_model)
        return head_map(model.config, type(model).__name__, model)
    return head_map(config_or_model)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: ``out[:, t] = labels[:, t + 1]``, ``out[:, -1] = ignore_index``.

    Keeping the length ``T`` (rather than slicing hidden states to ``T - 1``) keeps the hidden states
    contiguous; the last position simply scores nothing.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def _default_labels(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], ignore_index: int):
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, ignore_index)


def _keep(hidden: torch.Tensor, targets: torch.Tensor, logits_to_keep: LogitsToKeep):
    """Slice hidden [B, T, D] and targets [B, T] the way ``transformers`` slices hidden states."""
    if isinstance(logits_to_keep, bool):
        raise TypeError("logits_to_keep must be an int or a tensor, got bool")
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        if logits_to_keep == 0:
            return hidden, targets, None, None
        return hidden[:, -logits_to_keep:], targets[:, -logits_to_keep:], None, None
    if not isinstance(logits_to_keep, torch.Tensor):
        raise TypeError(f"logits_to_keep must be an int or a tensor, got {type(logits_to_keep).__name__}")
    keep = logits_to_keep.to(hidden.device)
    if keep.dtype == torch.bool:
        if tuple(keep.shape) != tuple(targets.shape):
            raise ValueError(f"a boolean logits_to_keep must have shape {tuple(targets.shape)}, "
                             f"got {tuple(keep.shape)}")
        rows = torch.arange(targets.shape[0], device=hidden.device).unsqueeze(1).expand_as(keep)
        return hidden[keep], targets[keep], rows[keep], targets.shape[0]
    if keep.dim() == 1:
        return hidden[:, keep], targets[:, keep], None, None
    if keep.dim() == 2:
        index = keep.long()
        return (torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])),
                torch.gather(targets, 1, index), None, None)
    raise ValueError(f"logits_to_keep tensor must be 1-D, 2-D int or 2-D bool, got shape {tuple(keep.shape)}")


def head_inputs(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    *,
    logits_to_keep: LogitsToKeep = 0,
    ignore_index: int = IGNORE_INDEX,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> LMHeadInputs:
    """Build :class:`LMHeadInputs` from backbone output ``hidden_states [B, T, D]`` and unshifted ``labels [B, T]``.

    ``labels`` follow the ``transformers`` convention (same positions as ``input_ids``, ``ignore_index`` where
    no loss); they are shifted here. ``weight``/``bias`` default to the model's head (for a sharded head, pass
    the one :func:`gather_lm_head` yields, or build the inputs inside the head's forward with
    ``fastpref.integrations.distributed.through_sharded`` when the head is trainable under FSDP). Hidden states
    are cast to the head's dtype when they differ (e.g. bf16 autocast output with an fp32 head), since the fused
    op wants one dtype.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, T, D], got shape {tuple(hidden_states.shape)}")
    if tuple(labels.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"labels must have shape {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}")
    hm = _head_map(model)
    if weight is None:
        weight, bias = head_parameters(model)
    weight, bias = hm.fit(weight, bias, type(hf_model(model)).__name__)
    softcap, temperature = hm.softcap, hm.temperature
    if hidden_states.dtype != weight.dtype:
        hidden_states = hidden_states.to(weight.dtype)
    targets = shift_labels(labels.to(hidden_states.device).long(), ignore_index)
    hidden, targets, seq_ids, num_seqs = _keep(hidden_states, targets, logits_to_keep)
    return LMHeadInputs(hidden=hidden, targets=targets, weight=weight, bias=bias, softcap=softcap,
                        temperature=temperature, seq_ids=seq_ids, num_seqs=num_seqs, ignore_index=ignore_index)


def lm_head_inputs(
    model: torch.nn.Module,
    input_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    logits_to_keep: LogitsToKeep = 0,
    ignore_index: int = IGNORE_INDEX,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    **backbone_kwargs: Any,
) -> LMHeadInputs:
    """Run a causal LM's backbone (not its head) and return the inputs of the fused losses.

    ``out.logprobs()`` (``fused_logprobs`` on ``out.hidden, out.weight, out.targets`` with
    ``out.head_kwargs()``) equals ``log_softmax(model(input_ids, attention_mask).logits)`` gathered at the next
    tokens, summed over the positions where ``labels[t + 1] != ignore_index`` -- without the ``[B, T, V]``
    logits. A fused loss module takes the same inputs: ``loss_fn(out.weight, out.hidden, out.targets,
    **out.head_kwargs(), ...)``, with ``ignore_index=loss_fn.ignore_index`` here.

    Args:
        model: a ``transformers`` ``*ForCausalLM``, possibly inside DDP / DeepSpeed / PEFT wrappers. The backbone
            is called directly unless :func:`enable_hidden_forward` was applied, in which case the call goes
            through ``model(...)`` and its wrappers (needed for DDP, and for FSDP2 unless the backbone is its
            own ``fully_shard`` unit).
        input_ids: ``[B, T]`` token ids (or pass ``inputs_embeds`` in ``backbone_kwargs``).
        attention_mask: ``[B, T]``; padding positions are not scored when ``labels`` is None.
        labels: ``[B, T]`` unshifted labels, ``ignore_index`` where nothing is scored; defaults to
            ``input_ids`` with padding ignored.
        logits_to_keep: as in ``transformers``: ``0`` keeps every position, ``k > 0`` the last ``k``, a 1-D
            tensor those positions, a ``[B, T]`` bool mask those positions packed to ``[N, D]`` (with
            ``seq_ids``). Targets are shifted before slicing, so kept position t still predicts token t + 1.
        ignore_index: marks unscored labels.
        weight, bias: a gathered head to use instead of the model's own parameters (see :func:`gather_lm_head`).
        **backbone_kwargs: passed to the backbone (``position_ids``, ``inputs_embeds``...).
    """
    _head_map(model)  # an unsupported head raises before the backbone runs
    if labels is None:
        if input_ids is None:
            raise ValueError("labels is required when input_ids is not given (inputs_embeds)")
        labels = _default_labels(input_ids, attention_mask, ignore_index)
    backbone_kwargs.setdefault("use_cache", False)
    if getattr(hf_model(model), "_fastpref_hidden_forward", False):  # through the wrappers' forward
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, fastpref_hidden=True, **backbone_kwargs)
    else:
        outputs = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)
    hidden_states = backbone_hidden(outputs)
    return head_inputs(model, hidden_states, labels, logits_to_keep=logits_to_keep, ignore_index=ignore_index,
                       weight=weight, bias=bias)


# ----------------------------------------------------------------------------------------------------------
# Sharded heads
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def gather_lm_head(model: torch.nn.Module, *, detach: bool = False
                   ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Context manager yielding the full ``(weight, bias)`` of the LM head, gathered only if sharded.

    Detection and gathering are :mod:`fastpref.integrations.distributed`'s (``sharding_kind``,
    ``gathered_params``); this picks the head and applies the rule for gradients:

    - Not sharded (plain, DDP, ZeRO-1/2, or FSDP2 inside a forward that unsharded the head): yields the
      parameters themselves (detached copies with ``detach=True``); nothing is imported.
    - DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` over the head parameters that are not already
      available (with tied embeddings the embedding's own gather may have made the weight available; gathering it
      twice would corrupt ZeRO's bookkeeping). The torch backend recomputes logit tiles in backward, so a
      *trainable* head's loss must run inside the head's forward, whose hooks gather the head again for backward
      and reduce-scatter its gradient (:func:`fastpref.integrations.distributed.through_sharded`); there the head is
      already available and is yielded as is. With ``detach=True`` (a reference head) the yield is a *copy*, valid
      after the context closes, e.g. for a backward that recomputes reference logit tiles.
    - FSDP2 (``fully_shard``, DTensor parameters): for no-grad use only -- ``detach=True``, grad mode off, or a
      frozen head -- yields ``full_tensor()`` copies. A *trainable* FSDP2 head raises ``RuntimeError``: the
      backward of ``full_tensor()`` keeps each rank's slice of its own gradient without the reduce-scatter, so the
      head's gradient would be silently wrong on every rank with more than one rank. Compute the head's loss
      inside the head's forward instead
      (``fastpref.integrations.distributed.through_sharded(head, fn)``), where FSDP unshards it and reduces its
      gradient; ``FastPrefDPOTrainer`` does so.
    - FSDP1: ``FullyShardedDataParallel.summon_full_params`` on the unit that owns the head, for no-grad use only
      (FSDP1 does not route gradients taken there back to the shards); a trainable head raises.
    """
    weight, bias = head_parameters(model)
    kind = sharding_kind(weight)
    trainable = not detach and torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (weight, bias))
    if kind in ("fsdp1", "fsdp2") and trainable:
        framework = "an FSDP1" if kind == "fsdp1" else "an FSDP2 (fully_shard)"
        raise RuntimeError(
            f"gather_lm_head: {framework}-sharded LM head cannot be gathered for a trainable loss: the gathered "
            "copy's gradient would not be reduced across ranks (wrong head gradients, no error). Run the head's "
            "loss inside the head's forward with fastpref.integrations.distributed.through_sharded(head, fn) "
            "(or forward_through), or gather with detach=True / under torch.no_grad() for no-grad use"
        )
    if kind is None:
        yield _detached(weight, bias) if detach else (weight, bias)
    elif kind == "zero3":
        with _dist._zero3_gather([p for p in (weight, bias) if p is not None]):
            # a copy: ZeRO-3 re-partitions the parameters (and may reuse their buffers) when the context closes
            yield tuple(None if t is None else t.clone() for t in _detached(weight, bias)) if detach else (weight, bias)
    elif kind == "fsdp2":
        with _dist.gathered_params(weight, bias) as full:
            yield full
    else:  # fsdp1: no-grad only (checked above)
        with _dist.fsdp1_summoned(model, hf_model(model).get_output_embeddings()) as head:
            yield _detached(head.weight, getattr(head, "bias", None))


def _detached(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return weight.detach(), (None if bias is None else bias.detach())
