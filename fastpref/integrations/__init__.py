"""Integrations with training stacks.

- :mod:`fastpref.integrations.transformers`: hidden states and LM-head parameters of a Hugging Face causal LM,
  without computing its logits (imports ``transformers`` lazily; the helpers only need ``torch``); the one
  unwrapping of a wrapped model (:func:`hf_model`) and reader of a backbone's output (:func:`backbone_hidden`).
- :mod:`fastpref.integrations.trl`: ``FastPrefDPOTrainer``, a TRL ``DPOTrainer`` whose loss is a fastpref
  fused loss (needs ``trl``; import it explicitly).
- :mod:`fastpref.integrations.kto`: ``FastPrefKTOTrainer``, TRL's ``KTOTrainer`` with the fused KTO loss (needs
  ``trl``); also importable from here (``from fastpref.integrations import FastPrefKTOTrainer``), loaded on first
  access so that importing this package does not import ``trl``.
"""
from typing import Any

from .transformers import (
                           LMHeadInputs,
                           backbone_hidden,
                           enable_hidden_forward,
                           gather_lm_head,
                           head_inputs,
                           hf_model,
                           lm_head_inputs,
                           logit_transform,
                           shift_labels,
)


def __getattr__(name: str) -> Any:
    """Lazy exports of the trainers that need ``trl``."""
    if name == "FastPrefKTOTrainer":
        from .kto import FastPrefKTOTrainer

        return FastPrefKTOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FastPrefKTOTrainer", "LMHeadInputs", "backbone_hidden", "enable_hidden_forward", "gather_lm_head",
           "head_inputs", "hf_model", "lm_head_inputs", "logit_transform", "shift_labels"]
