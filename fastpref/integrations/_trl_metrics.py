"""Logging side of :class:`fastpref.integrations.trl.FastPrefDPOTrainer`: TRL's metric names, computed from the
fused pass (per-sequence statistics and the op's full-vocabulary reductions), never from logits.

TRL 1.16's ``DPOTrainer`` logs, in train and eval (``eval_`` prefix added by ``log``):

- ``entropy``: the policy's next-token entropy, averaged over every scored token of the batch (chosen and
  rejected), weighted by tokens across processes;
- ``logits/chosen``, ``logits/rejected``: the vocabulary-mean logit (after the head's logit map), averaged
  over the chosen (rejected) scored tokens;
- ``mean_token_accuracy``: the fraction of chosen scored tokens whose target is the policy's top-1;
- ``rewards/*``, ``logps/*``: per-pair values, gathered and averaged;
- ``num_tokens``: the running count of attention-mask tokens seen in training.

The first three come from ``fused_logprobs(..., extra_outputs=...)`` through the loss module's metrics
(per-sequence sums ``entropy``, ``mean_logits``, ``is_top1``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, MutableMapping

import torch

#: The op's extra outputs the trainer asks its loss module for (TRL's vocabulary metrics).
VOCAB_METRIC_OUTPUTS = ("entropy", "mean_logits", "is_top1")
# fastpref metric key -> TRL's logging name
TRL_METRIC_NAMES = {
    "chosen_rewards": "rewards/chosen", "rejected_rewards": "rewards/rejected",
    "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
    "chosen_logps": "logps/chosen", "rejected_logps": "logps/rejected",
}

Gather = Callable[[torch.Tensor], torch.Tensor]


def vocab_metrics(metrics: Dict[str, torch.Tensor], token_counts: torch.Tensor, pairwise: bool,
                  gather: Gather) -> Dict[str, float]:
    """TRL's ``entropy``, ``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy`` from per-sequence
    sums over scored tokens (``metrics[name]`` ``[S]``) and the scored-token count of each sequence
    (``token_counts`` ``[S]``), token-weighted over every process. Without the pairwise layout only
    ``entropy`` is defined. Missing sums (a module built without the extra outputs) log nothing."""
    if "entropy" not in metrics:
        return {}
    counts = token_counts.to(metrics["entropy"].device, torch.float64)
    parts: List[torch.Tensor] = [metrics["entropy"].double().sum(), counts.sum()]
    names = ["entropy"]
    if pairwise and "mean_logits" in metrics and "is_top1" in metrics:
        half = counts.shape[0] // 2
        mean_logits, top1 = metrics["mean_logits"].double(), metrics["is_top1"].double()
        parts += [mean_logits[:half].sum(), counts[:half].sum(), mean_logits[half:].sum(), counts[half:].sum(),
                  top1[:half].sum(), counts[:half].sum()]
        names += ["logits/chosen", "logits/rejected", "mean_token_accuracy"]
    totals = gather(torch.stack(parts).reshape(1, -1)).reshape(-1, len(parts)).sum(dim=0).tolist()
    # TRL logs 0.0 when a quantity has no token
    return {name: (totals[2 * i] / totals[2 * i + 1] if totals[2 * i + 1] > 0 else 0.0)
            for i, name in enumerate(names)}


def store_metrics(store: MutableMapping[str, list], metrics: Dict[str, torch.Tensor], token_counts: torch.Tensor,
                  pairwise: bool, gather: Gather) -> None:
    """Append one batch's metrics to the trainer's ``_metrics[mode]`` under TRL's names.

    Per-sequence and per-pair tensors are gathered (``gather``, not ``gather_for_metrics``: the latter trims
    the last eval batch to the dataset's remainder, counted in examples, while these hold one value per
    sequence) and averaged; the vocabulary metrics are token-weighted (:func:`vocab_metrics`).
    """
    metrics = dict(metrics)
    for name, value in vocab_metrics(metrics, token_counts, pairwise, gather).items():
        store[name].append(value)
    if pairwise and "logps" in metrics and "chosen_logps" not in metrics:
        metrics["chosen_logps"], metrics["rejected_logps"] = metrics["logps"].chunk(2)
    for key, value in metrics.items():
        if key in VOCAB_METRIC_OUTPUTS or (key == "logps" and pairwise):
            continue  # logged above (vocabulary sums; logps as logps/chosen and logps/rejected)
        if not torch.is_tensor(value) or not value.is_floating_point() or value.numel() == 0:
            continue
        store[TRL_METRIC_NAMES.get(key, key)].append(gather(value.detach().float().reshape(-1)).mean().item())
