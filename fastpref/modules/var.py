"""VAR, fused (docs/api.md §3, docs/losses.md §1), and its data utility: the B x B cross-pair reference
log-probs that the paper's partition estimate reads."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import losses
from .._checks import check_int, check_positive
from .._hf import backbone_hidden
from .._types import IGNORE_INDEX, LogprobStats
from ..losses.var import NORMALIZE, POLICY_REDUCTIONS, REF_REDUCTIONS
from ..ops import fused_logprobs as _fused_logprobs
from .base import FusedLossBase, Metrics, SequenceBatch, Tensor, as_stat


class FusedVARLoss(FusedLossBase):
    r"""VAR, variational alignment with re-weighting, fused: Du, Li, Cheng et al., "RLHF in an SFT Way: From
    Optimal Solution to Reward-Weighted Alignment" (Eqs. 9-10, Alg. 1).

    B prompts with one response each (S = B). With rewards r_ij = r(x_i, y_j) and cross-pair reference
    log-probs L_ij = log pi_ref(y_j | x_i):
    ``log Z_i = LSE_j(r_ij / beta + L_ij) - log B``, ``w_i = sg(exp(r_ii / beta - log Z_i))``,
    ``loss = -(1/B) sum_i w_i S_i`` (``normalize="self"``, the default, rescales w to sum to B).

    Call keywords: ``rewards`` [B] (diagonal r_ii) or [B, B]. The reference: ``ref_logps`` [B] (diagonal)
    or [B, B] (cross pairs, e.g. from :func:`var_cross_pair_ref_logps`), or ``ref_hidden`` for the
    diagonal (same fused pass), or nothing (then, with self-normalization, w = B softmax(r / beta)).
    ``beta`` has no default (the paper reports none).

    Options (see :func:`fastpref.losses.var`; the response lengths n_j come from the fused op):
    ``policy_reduction`` "sum" (default, the paper) or "mean" (S_i / n_i, token-mean SFT style);
    ``ref_reduction`` "sum" (default, the paper's Eq. 9) or "mean" (L_ij / n_j inside Z, a documented
    deviation from the paper that tames the weights' preference for short responses).
    """

    reference_mode = "optional"

    def __init__(self, beta: float, normalize: str = "self", policy_reduction: str = "sum",
                 ref_reduction: str = "sum", **options) -> None:
        super().__init__(**options)
        self.beta = check_positive("beta", beta)
        for name, value, allowed in (("normalize", normalize, NORMALIZE),
                                     ("policy_reduction", policy_reduction, POLICY_REDUCTIONS),
                                     ("ref_reduction", ref_reduction, REF_REDUCTIONS)):
            if value not in allowed:  # fail at construction, not at the first batch
                raise ValueError(f"FusedVARLoss: {name} must be one of {allowed}, got {value!r}")
        self.normalize, self.policy_reduction, self.ref_reduction = normalize, policy_reduction, ref_reduction

    def ref_logps_shapes(self, num_seqs: int) -> List[Tuple[int, ...]]:
        return [(num_seqs,), (num_seqs, num_seqs)]

    def compute_loss(self, batch: SequenceBatch, rewards: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        b = batch.num_seqs
        if rewards is None:
            raise ValueError("FusedVARLoss needs rewards: [B] (r(x_i, y_i)) or [B, B] (r(x_i, y_j))")
        rewards = as_stat("rewards", rewards, batch.logps, [(b,), (b, b)])
        return losses.var(batch.logps, rewards, beta=self.beta, ref_logps=batch.ref_logps,
                          normalize=self.normalize, lengths=batch.lengths, policy_reduction=self.policy_reduction,
                          ref_reduction=self.ref_reduction)


def var_cross_pair_ref_logps(
    prompts: Sequence[Tensor],
    responses: Sequence[Tensor],
    ref_backbone: Callable[[Tensor, Tensor], object],
    ref_weight: Tensor,
    *,
    ref_bias: Optional[Tensor] = None,
    pad_token_id: int = 0,
    prompts_per_chunk: int = 1,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    logprobs_fn: Optional[Callable[..., LogprobStats]] = None,
) -> Tensor:
    """VAR's B x B cross-pair reference log-probs: ``out[i, j] = log pi_ref(y_j | x_i)``, no grad.

    Builds every sequence ``prompts[i] + responses[j]`` (right-padded with ``pad_token_id``), runs the
    reference backbone on them, ``prompts_per_chunk`` prompts (B sequences each) per call, and sums the
    log-probs of the response tokens with the fused op (position t predicts token t + 1; prompt and
    padding positions are ignored).

    Args:
        prompts: B 1-D int64 tensors of prompt token ids.
        responses: B 1-D int64 tensors of response token ids (response j answers prompt j).
        ref_backbone: ``ref_backbone(input_ids [n, L], attention_mask [n, L])`` -> hidden states
            ``[n, L, D]`` before the LM head (a tensor, a tuple whose first item is one, or an object with
            ``last_hidden_state``, e.g. a Hugging Face base model).
        ref_weight: ``[V, D]`` reference LM-head weight; ``ref_bias`` its optional bias.
        logprobs_fn: the log-prob op (default :func:`fastpref.fused_logprobs`; the eager twin in
            ``fastpref.reference`` passes the eager one).

    Returns:
        ``[B, B]`` float32 (float64 for float64 heads) tensor, to pass as ``ref_logps`` to
        :class:`FusedVARLoss`.
    """
    fn = logprobs_fn or _fused_logprobs
    b = _check_token_lists(prompts, responses)
    prompts_per_chunk = check_int("prompts_per_chunk", prompts_per_chunk, minimum=1)
    device = ref_weight.device
    out = torch.empty(b, b, dtype=torch.float64 if ref_weight.dtype == torch.float64 else torch.float32,
                      device=device)
    with torch.no_grad():
        for i0 in range(0, b, prompts_per_chunk):
            rows = list(range(i0, min(i0 + prompts_per_chunk, b)))
            ids, mask, targets = _chunk_inputs([prompts[i] for i in rows], responses, pad_token_id, device)
            hidden = backbone_hidden(ref_backbone(ids, mask), what="ref_backbone").to(ref_weight.dtype)
            stats = fn(hidden, ref_weight, targets, bias=ref_bias, temperature=temperature, softcap=softcap,
                       ignore_index=IGNORE_INDEX, backend=backend)
            out[rows[0]: rows[-1] + 1] = stats.logps.view(len(rows), b).to(out.dtype)
    return out


def _check_token_lists(prompts: Sequence[Tensor], responses: Sequence[Tensor], same_count: bool = True) -> int:
    """B, after checking that prompts and responses are non-empty lists (of equal length unless ``same_count`` is
    False) of non-empty 1-D integer tensors."""
    b = len(prompts)
    if b == 0 or len(responses) == 0 or (same_count and len(responses) != b):
        kind = "non-empty lists of equal length" if same_count else "non-empty lists"
        raise ValueError(f"prompts and responses must be {kind}, got {len(prompts)} and {len(responses)}")
    for name, seqs in (("prompts", prompts), ("responses", responses)):
        for t in seqs:
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
                raise TypeError(f"{name} must hold 1-D integer tensors of token ids")
    if any(r.numel() == 0 for r in responses):
        raise ValueError("responses must be non-empty")
    if any(p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be non-empty (the first response token needs a context)")
    return b


def cross_pair_rows(prompts: Sequence[Tensor], responses: Sequence[Tensor], pad_token_id: int = 0,
                    device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, completion_mask)`` ``[P * R, L]`` of every ``prompts[i] + responses[j]``
    (P prompts, R responses, row ``i * R + j``), right-padded with ``pad_token_id``; ``completion_mask`` marks
    the response tokens at their own positions (unshifted, like TRL's collator). ``device``: that of the first
    prompt unless given."""
    _check_token_lists(prompts, responses, same_count=False)
    device = prompts[0].device if device is None else device
    pairs = [(p, r) for p in prompts for r in responses]
    lengths = [p.numel() + r.numel() for p, r in pairs]
    shape = (len(pairs), max(lengths))
    ids = torch.full(shape, pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(shape, dtype=torch.long, device=device)
    completion = torch.zeros(shape, dtype=torch.long, device=device)
    for row, ((p, r), n) in enumerate(zip(pairs, lengths)):
        ids[row, : p.numel()] = p.to(device)
        ids[row, p.numel(): n] = r.to(device)
        mask[row, :n] = 1
        completion[row, p.numel(): n] = 1
    return ids, mask, completion


def _chunk_inputs(prompts: Sequence[Tensor], responses: Sequence[Tensor], pad_token_id: int,
                  device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, targets)`` of every ``prompts[i] + responses[j]``, row ``i * B + j``,
    right-padded; targets score the response tokens only (position t predicts token t + 1)."""
    ids, mask, completion = cross_pair_rows(prompts, responses, pad_token_id, device)
    targets = torch.full_like(ids, IGNORE_INDEX)
    # The response tokens sit at positions p-1 .. n-2 (each predicted by the position before it).
    targets[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)
    return ids, mask, targets
