"""Reading a Hugging Face-style backbone's output, for every layer (no ``transformers`` import).

The modules layer (``var_cross_pair_ref_logps``) and the integrations (``fastpref.integrations``) both call
a backbone -- the model minus its LM head -- and need its final hidden states; this is the one place that
knows where they sit in the output.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["backbone_hidden"]


def backbone_hidden(output: Any, *, what: str = "the backbone") -> torch.Tensor:
    """Final hidden states of a backbone's output: the tensor itself, ``output.last_hidden_state`` (a
    ``transformers`` ``BaseModelOutput*``) or the first item of a tuple/list (``return_dict=False``).

    ``what`` names the callable in the ``TypeError`` raised for anything else.
    """
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"{what} must return hidden states [n, L, D] (a tensor, a tuple starting with one, or an object "
                    f"with last_hidden_state), got {type(output).__name__}")
