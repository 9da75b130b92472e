"""Integrations with training stacks.

- :mod:`fastpref.integrations.transformers`: hidden states and LM-head parameters of a Hugging Face causal LM,
  without computing its logits (imports ``transformers`` lazily; the helpers only need ``torch``); the one
  unwrapping of a wrapped model (:func:`hf_model`) and reader of a backbone's output (:func:`backbone_hidden`).
- :mod:`fastpref.integrations.trl`: ``FastPrefDPOTrainer``, a TRL ``DPOTrainer`` whose loss is a fastpref
  fused loss (needs ``trl``; import it explicitly).
- :mod:`fastpref.integrations.kto`: ``FastPrefKTOTrainer``, TRL's ``KTOTrainer`` with the fused KTO loss (needs
  ``trl``); also importable from here (``from fastpref.integrations import FastPrefKTOTrainer``), loaded on first
  access so that importing this package does not import ``trl``.
- :mod:`fastpref.integrations.reward`: :class:`RewardModel`, a sequence-classification model (with its own
  tokenizer) or a callable scoring (prompt, completion) pairs, batched to a token budget, for the paper recipes.
- :mod:`fastpref.integrations.ranked`: :func:`ranked_to_mcpo`, ranked completions into MC-PO's dataset layout.
- :mod:`fastpref.integrations.transformers` also exports :class:`UnsupportedHeadError`, raised for a model whose
  LM head the fused op cannot reproduce.
"""
from typing import Any

from .ranked import ranked_to_mcpo
from .reward import RewardModel
from .transformers import (
                           LMHeadInputs,
                           UnsupportedHeadError,
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


__all__ = ["FastPrefKTOTrainer", "RewardModel", "ranked_to_mcpo", "UnsupportedHeadError", "LMHeadInputs",
           "backbone_hidden", "enable_hidden_forward", "gather_lm_head", "head_inputs", "hf_model", "lm_head_inputs",
           "logit_transform", "shift_labels"]
