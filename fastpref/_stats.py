"""The result type of :func:`fastpref.fused_logprobs`."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class LogprobStats:
    """Per-sequence and per-position log-prob statistics: float32 for fp16/bf16/fp32 inputs, float64 for
    float64 inputs (a deliberate extension of API.md's "all float32", so that fp64 gradient checks can
    be tight; nothing changes for half or single precision).

    Attributes:
        logps: [num_seqs] sum of log pi_theta(target) over non-ignored positions (differentiable).
        lengths: [num_seqs] number of non-ignored positions (float32, no grad).
        token_logps: shape of ``targets``; per-position log-prob, 0 at ignored positions.
        ref_logps: [num_seqs] reference log-probs when ``ref_hidden`` was given, else None (no grad).
        kl: [num_seqs] per-sequence sum of the full-vocabulary KL when ``kl`` was set, else None.
        token_kl: shape of ``targets``; per-position KL, 0 at ignored positions, or None.
        ref_token_logps: shape of ``targets``; per-position reference log-prob, or None (no grad).
            (An addition to the contract of API.md; handy for token-level losses.)
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    token_kl: Optional[torch.Tensor] = None
    ref_token_logps: Optional[torch.Tensor] = None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
