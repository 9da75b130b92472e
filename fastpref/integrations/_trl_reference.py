"""The reference side of the fastpref TRL trainers, and the PEFT setups their fused head can or cannot run.

Shared by :class:`fastpref.integrations.kto.FastPrefKTOTrainer` (and usable by ``FastPrefDPOTrainer``):

- :func:`reference_scope`: the context in which the reference is read. With a separate ``ref_model`` nothing
  changes; with PEFT and no ``ref_model`` the policy's adapters are switched off (or to TRL's frozen ``"ref"``
  adapter) for the whole scope, so the reference *head* is read there too -- a head that PEFT wraps with
  ``modules_to_save`` reads its trained copy while the adapter is on and the original weight while it is off.
- :func:`reference_head`: the reference's LM head, read inside that scope, which closes before it is used.
- :func:`reference_hidden`: final hidden states of the reference, no grad, without its head.
- :func:`autocast_dtype`: the mixed-precision dtype the policy's forward runs under (the head follows it).
- :func:`check_peft_head`: refuse what the fused head cannot reproduce (an adapter on the LM head, prompt-learning
  adapters that prepend virtual tokens).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch

from .transformers import _inside_holders, backbone, backbone_hidden, gather_lm_head, hf_model, is_peft


@contextlib.contextmanager
def reference_scope(model: torch.nn.Module, ref_model: Optional[torch.nn.Module]) -> Iterator[None]:
    """Within it, ``model`` (the policy, possibly wrapped) *is* the reference when ``ref_model`` is None and
    ``model`` is a PEFT model: its adapters are off, or TRL's ``"ref"`` adapter (a frozen copy of a pretrained
    adapter) is active. Otherwise a no-op. Only no-grad reads belong inside it (the policy's own forward and head
    must be taken before it opens)."""
    if ref_model is not None or not is_peft(model):
        yield
        return
    from trl.trainer.utils import use_adapter

    peft_model = _inside_holders(model)
    name = "ref" if "ref" in getattr(peft_model, "peft_config", {}) else None
    with use_adapter(peft_model, adapter_name=name):
        yield


@contextlib.contextmanager
def reference_head(model: torch.nn.Module, ref_model: Optional[torch.nn.Module]
                   ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The reference's LM head ``(weight, bias)``, detached (gathered when sharded, for the whole context).

    With PEFT and no ``ref_model`` the head is read inside :func:`reference_scope`, which is closed again before
    this yields: a ``modules_to_save=["lm_head"]`` head gives its original weight there (its trained copy
    otherwise), and PEFT's adapter switch also clears the copy's ``requires_grad`` while it is open, so a policy
    loss run inside the scope would leave the trained copy without a gradient.
    """
    with contextlib.ExitStack() as stack:
        with reference_scope(model, ref_model):
            head = stack.enter_context(gather_lm_head(ref_model if ref_model is not None else model, detach=True))
        yield head


def reference_hidden(model: torch.nn.Module, ref_model: Optional[torch.nn.Module],
                     **model_inputs: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, T, D]`` of the reference, no grad.

    A separate ``ref_model`` runs through its own (wrapped) forward with ``fastpref_hidden=True`` (see
    :func:`fastpref.integrations.transformers.enable_hidden_forward`), so the hooks of whatever shards it run.
    Without one, the reference is the PEFT policy inside :func:`reference_scope`; its backbone is called directly,
    which is meant for calls from inside the policy's own forward (where a sharded root is already gathered).
    ``model_inputs``: ``input_ids`` with ``attention_mask`` (padded rows) or ``position_ids`` (packed rows).
    """
    with torch.no_grad():
        if ref_model is not None:
            out = ref_model(**model_inputs, fastpref_hidden=True)
        else:
            out = backbone(model)(**model_inputs, use_cache=False)
    return backbone_hidden(out)


def autocast_dtype(accelerator: Any) -> Optional[torch.dtype]:
    """The dtype of the autocast ``accelerator`` runs the policy's forward under (its mixed precision), or None."""
    device = accelerator.device.type
    with accelerator.autocast():
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def head_in_autocast(accelerator: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(hidden, weight, bias)`` as the model's own head (and TRL's fused head) sees them under the policy's
    mixed precision: cast to the autocast dtype (the op's softmax stays fp32); unchanged without autocast."""
    dtype = autocast_dtype(accelerator)
    if dtype is None:
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def check_peft_head(model: torch.nn.Module, trainer: str) -> None:
    """Raise for PEFT setups the fused head cannot run exactly.

    - An adapter on the LM head (``target_modules`` including ``lm_head``): the head module becomes a PEFT tuner
      layer whose ``weight`` is the frozen base weight, not the effective one, so the fused head would ignore the
      adapter (and never train it). ``modules_to_save=["lm_head"]`` is fine: its ``weight`` is the active copy.
    - Prompt-learning adapters (prefix/prompt tuning, P-tuning): they prepend virtual tokens, which the
      backbone-only forward and its per-position targets do not account for.
    """
    if not is_peft(model):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = hf_model(model).get_output_embeddings()
    if isinstance(head, BaseTunerLayer):
        raise ValueError(
            f"{trainer} does not support a PEFT adapter on the LM head ({type(head).__name__} on "
            "get_output_embeddings()): the fused head reads the head's weight, which is the frozen base weight, "
            "so the adapter would be ignored and never trained. Remove 'lm_head' from target_modules (use "
            "modules_to_save=['lm_head'] to train the head itself)")
    peft_model = _inside_holders(model)
    for name, config in getattr(peft_model, "peft_config", {}).items():
        if getattr(config, "is_prompt_learning", False):
            raise NotImplementedError(
                f"{trainer} does not support prompt-learning PEFT adapters ({type(config).__name__} {name!r}): "
                "their virtual tokens shift the positions the fused head scores")


__all__ = ["autocast_dtype", "check_peft_head", "head_in_autocast", "reference_head", "reference_hidden", "reference_scope"]
