"""Integrations with training stacks.

- :mod:`fastpref.integrations.transformers`: hidden states and LM-head parameters of a Hugging Face causal LM,
  without computing its logits (imports ``transformers`` lazily; the helpers only need ``torch``); the one
  unwrapping of a wrapped model (:func:`hf_model`) and reader of a backbone's output (:func:`backbone_hidden`).
- :mod:`fastpref.integrations.trl`: ``FastPrefDPOTrainer``, a TRL ``DPOTrainer`` whose loss is a fastpref
  fused loss (needs ``trl``; import it explicitly).
"""
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

__all__ = ["LMHeadInputs", "backbone_hidden", "enable_hidden_forward", "gather_lm_head", "head_inputs", "hf_model",
           "lm_head_inputs", "logit_transform", "shift_labels"]
