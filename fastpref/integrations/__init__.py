"""Integrations with training stacks.

- :mod:`fastpref.integrations.transformers`: hidden states and LM-head parameters of a Hugging Face causal LM,
  without computing its logits (imports ``transformers`` lazily; the helpers only need ``torch``).
- :mod:`fastpref.integrations.trl`: ``FastPrefDPOTrainer``, a TRL ``DPOTrainer`` whose loss is a fastpref
  fused loss (needs ``trl``; import it explicitly).
"""
from .transformers import (LMHeadInputs, enable_hidden_forward, gather_lm_head, head_inputs, lm_head_inputs,
                           logit_transform, shift_labels)

__all__ = ["LMHeadInputs", "enable_hidden_forward", "gather_lm_head", "head_inputs", "lm_head_inputs",
           "logit_transform", "shift_labels"]
