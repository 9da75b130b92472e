"""Eager ``fused_logprobs``: materializes the full logits, plain autograd. The test oracle."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .._prepare import prepare
from .._types import IGNORE_INDEX, LogprobStats, Prepared, assemble


def eager_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 temperature: float, softcap: Optional[float]) -> torch.Tensor:
    """Full [N, V] logits the usual way: projection in the input dtype, the rest in fp32 (fp64 kept)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def eager_token_stats(prep: Prepared, extras: Optional[Dict[str, torch.Tensor]] = None):
    """Per-position (token_logps, ref_token_logps, token_kl) with full logits; ``extras``, when given, is
    filled with the per-position values of ``prep.extra_outputs`` (:func:`eager_extras`)."""
    mask = prep.valid
    safe_targets = torch.where(mask, prep.targets, torch.zeros_like(prep.targets)).unsqueeze(1)
    # Ignored rows are zeroed before the projection, so that a non-finite hidden state there (padding)
    # reaches neither the outputs nor, through the softmax backward, the gradients.
    hidden = torch.where(mask.unsqueeze(1), prep.hidden, torch.zeros((), dtype=prep.hidden.dtype))
    logits = eager_logits(hidden, prep.weight, prep.bias, prep.temperature, prep.softcap)
    logp = torch.log_softmax(logits, -1)
    # torch.where, not "* mask": a non-finite value at an ignored position must not leak into the sums.
    def masked(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, torch.zeros((), dtype=values.dtype))

    token_logps = masked(logp.gather(1, safe_targets).squeeze(1))
    if extras is not None:
        extras.update({name: masked(v) for name, v in eager_extras(prep, logits, logp, safe_targets).items()})
    ref_token_logps = token_kl = None
    if prep.ref_hidden is not None:
        with torch.no_grad():
            ref_hidden = torch.where(mask.unsqueeze(1), prep.ref_hidden, torch.zeros((), dtype=prep.ref_hidden.dtype))
            logq = torch.log_softmax(
                eager_logits(ref_hidden, prep.ref_weight, prep.ref_bias, prep.temperature, prep.softcap), -1
            ).to(logp.dtype)
        ref_token_logps = masked(logq.gather(1, safe_targets).squeeze(1))
        if prep.kl == "forward":
            token_kl = masked((logp.exp() * (logp - logq)).sum(-1))
        elif prep.kl == "reverse":
            token_kl = masked((logq.exp() * (logq - logp)).sum(-1))
    return token_logps, ref_token_logps, token_kl


def eager_extras(prep: Prepared, logits: torch.Tensor, logp: torch.Tensor,
                 targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The requested extras of every position from the full logits ``[N, V]`` and log-softmax: entropy
    (with its autograd graph), mean logit, target-is-top-1 (0/1) and ``log sum_v p_v^2``."""
    out = {}
    for name in prep.extra_outputs:
        if name == "entropy":
            out[name] = -(logp.exp() * logp).sum(-1)
        elif name == "mean_logits":
            out[name] = logits.detach().mean(-1)
        elif name == "is_top1":
            top = logits.detach().gather(1, targets).squeeze(1) >= logits.detach().amax(-1)
            out[name] = top.to(logits.dtype)
        else:
            out[name] = torch.logsumexp(2 * logp.detach(), -1)
    return out


def fused_logprobs(hidden, weight, targets, *, bias=None, seq_ids=None, num_seqs=None, ref_hidden=None,
                   ref_weight=None, ref_bias=None, kl=None, temperature=1.0, softcap=None, ignore_index=IGNORE_INDEX,
                   backend="auto", vocab_parallel_group=None, options=None, extra_outputs=()) -> LogprobStats:
    """Eager twin of :func:`fastpref.fused_logprobs` (same signature and outputs; ``backend`` ignored, ``options``
    validated and ignored: plain autograd has no kernel options).

    ``vocab_parallel_group`` is not supported here: the oracle for a vocabulary-parallel call is this
    function on the full (gathered) head, which is what the tests compare against.
    """
    if vocab_parallel_group is not None:
        raise NotImplementedError(
            "fastpref.reference.fused_logprobs has no vocabulary-parallel mode; call it with the full head"
        )
    prep = prepare(
        hidden, weight, targets, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, backend="torch" if backend == "auto" else backend, options=options,
        extra_outputs=extra_outputs,
    )
    extras: Dict[str, torch.Tensor] = {}
    return assemble(prep, *eager_token_stats(prep, extras), extras=extras)
