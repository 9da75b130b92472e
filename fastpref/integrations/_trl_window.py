"""Batch statistics over the effective batch for :class:`fastpref.integrations.trl.FastPrefDPOTrainer` (a mixin).

alpha-DPO's margin statistics and SPO's weight baseline (Eq. 12's E) are statistics of the *batch* the papers
train on: one optimizer step's batch, i.e. every accumulation micro-batch on every rank. Computed per micro-batch
they would depend on how that batch is split (SPO with per-device batch 1 would get mu = 1 on every micro-batch,
alpha-DPO's EMA would move once per micro-batch). Both statistics are stop-gradient quantities, so they can be
computed before the step's backward passes without changing any gradient:

1. The HF Trainer fetches all micro-batches of an optimizer step before running them (``get_batch_samples``).
   When there are two or more, this mixin runs one no-grad pass over them: the policy's (and, for alpha-DPO,
   the reference's) per-sequence log-probs through the fused op, no logits.
2. From those it makes the step's statistic once: alpha-DPO updates its EMA once from the margins of every pair of
   the step (gathered over the ranks by the module) and then uses it unchanged on each micro-batch
   (``update_in_forward = False``); SPO's baseline is the mean over every pair of the step and, through the
   module's ``stats_group``, over the ranks, passed to each micro-batch as ``weight_baseline``.
3. The micro-batches then run as usual; their losses and gradients are those of the whole batch with the
   statistic of the whole batch, so one optimizer step is the same for (batch 4, accumulation 1),
   (batch 1, accumulation 4) and (batch 2, 2 ranks) (tests/test_effective_batch.py).

Cost: one extra no-grad forward of the policy (and of the reference for alpha-DPO, unless its log-probs are
precomputed) over the step's rows, only when gradient accumulation is on. With one micro-batch per step the
modules compute the statistic in their forward (over the ranks too), which is already the step's batch.
Under dropout the no-grad pass draws its own masks, so its statistic is that of another dropout sample.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import losses
from ..modules.base import split_pairs
from ._trl_batches import scored_labels, unpack_hidden
from ._trl_reference import reference_head, reference_hidden, reference_scope
from .transformers import gather_lm_head

Tensor = torch.Tensor


class EffectiveBatchStatistics:
    """The trainer's effective-batch statistics; reads ``fastpref_loss``, ``fastpref_loss_fn`` and the trainer's
    head / reference helpers (``_head_inputs``, ``_reference_head``, ``_reference_hidden``, ``_model_inputs``)."""

    _window_call: Dict[str, Any] = {}

    def window_call(self) -> Dict[str, Any]:
        """Keywords of this micro-batch's loss call from the step's statistic (training only; see the module)."""
        return self._window_call if self.fastpref_loss_fn.training else {}

    def _window_statistic(self) -> Optional[str]:
        """Which batch statistic the loss couples its micro-batches through, or None."""
        loss_fn = self.fastpref_loss_fn
        if self.fastpref_loss == "alpha_dpo":
            return "margin"
        if self.fastpref_loss == "spo" and getattr(loss_fn, "gamma", 0.0) > 0.0:
            return "weight_baseline"  # gamma = 0 gives mu = 1 whatever the baseline
        return None

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> Tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        statistic = self._window_statistic()
        window = statistic is not None and len(batch_samples) > 1  # only the training loop calls this
        if hasattr(self.fastpref_loss_fn, "update_in_forward"):
            self.fastpref_loss_fn.update_in_forward = not window
        self._window_call = {}
        if window:
            logps = [self._window_logps(self._prepare_inputs(inputs), statistic == "margin")
                     for inputs in batch_samples]
            self._window_call = self._window_statistics(statistic, logps)
        return batch_samples, num_items_in_batch

    def _window_statistics(self, statistic: str, logps: List[Tuple[Tensor, Optional[Tensor], Tensor]]
                           ) -> Dict[str, Any]:
        """Make the step's statistic from every micro-batch's ``(logps, ref_logps, lengths)``; returns the
        keywords each micro-batch's loss call gets."""
        loss_fn = self.fastpref_loss_fn
        if statistic == "margin":
            margins = torch.cat([losses.alpha_dpo_margin(*split_pairs(s), *split_pairs(r), *split_pairs(n))
                                 for s, r, n in logps])
            loss_fn.update_statistics(margins)  # gathered over the ranks by the module: one EMA step per step
            return {}
        grouped = torch.cat([self._spo_grouped(s) for s, _, _ in logps])
        local = losses.spo_weight_baseline(grouped, gamma=loss_fn.gamma, ranked=loss_fn.mode == "ranked")
        return {"weight_baseline": loss_fn.mean_statistic(local, grouped.shape[0])}

    def _spo_grouped(self, logps: Tensor) -> Tensor:
        """``[B, n]`` log-probs in FusedSPOLoss's layout (pairs: chosen, rejected; grouped: rows of n)."""
        loss_fn = self.fastpref_loss_fn
        if loss_fn.mode == "pairs":
            return torch.stack(split_pairs(logps), dim=1)
        return logps.view(-1, loss_fn.group_size)

    @torch.no_grad()
    def _window_logps(self, inputs: Dict[str, Any], with_reference: bool
                      ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """``(logps, ref_logps, lengths)`` per sequence of one micro-batch's main rows, without grad: the policy
        through its wrapped forward, the reference as the loss call would get it (precomputed or a forward)."""
        model, loss_fn = self.model_wrapped, self.fastpref_loss_fn
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        labels, keep = scored_labels(input_ids, inputs["completion_mask"], loss_fn.ignore_index)
        ref_forward = with_reference and not self.precompute_ref_logps

        def statistics(hidden: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor]:
            hidden = unpack_hidden(hidden, packed)
            with contextlib.ExitStack() as stack:
                pol = self._head_inputs(model, hidden, labels, keep, stack.enter_context(gather_lm_head(model, detach=True)))
                ref: Dict[str, Any] = {}
                if ref_forward:
                    ref_head = stack.enter_context(self._reference_head())
                    r = self._head_inputs(model, self._reference_hidden(input_ids, attention_mask), labels, keep,
                                          ref_head)
                    ref = dict(ref_hidden=r.hidden, ref_weight=r.weight, ref_bias=r.bias)
                stats = loss_fn.fused_logprobs(pol.hidden, pol.weight, pol.targets, **ref, **pol.head_kwargs(),
                                               **loss_fn.logprob_options())
            return stats.logps, stats.ref_logps, stats.lengths

        model_inputs, packed = self._model_inputs(input_ids, attention_mask)
        logps, ref_logps, lengths = model(**model_inputs, fastpref_head_fn=statistics)
        if with_reference and not ref_forward:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps)
        return logps, ref_logps, lengths


class KTOEffectiveBatch:
    """KTO's reference point z0 = max(0, mean(S' - R')) over the mismatched pairs of the whole optimizer step (every
    accumulation micro-batch, every rank) for :class:`fastpref.integrations.kto.FastPrefKTOTrainer`.

    With two or more micro-batches per step, the mismatched pairs of all of them go through one no-grad pass when the
    step's batches are fetched (policy and reference, fused, no logits), z0 is made once (gathered over the ranks by
    the module's ``stats_group``) and each micro-batch's loss gets it as ``z0`` without a KL pass of its own: the
    same forwards as before, moved, so no extra cost. TRL's KTOTrainer estimates z0 per micro-batch instead."""

    _window_z0: Optional[Tensor] = None

    def window_z0(self) -> Optional[Tensor]:
        """The step's z0 while training with accumulation (None: the micro-batch estimates its own)."""
        return self._window_z0 if self.fastpref_loss_fn.training else None

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> Tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_z0 = None
        if self.calculate_KL and len(batch_samples) > 1:
            diffs = torch.cat([self._mismatched_diffs(self._prepare_inputs(b)) for b in batch_samples])
            gathered = self.fastpref_loss_fn.gather_statistic(diffs)
            self._window_z0 = losses.kto_z0(gathered, torch.zeros_like(gathered))
        return batch_samples, num_items_in_batch

    @torch.no_grad()
    def _mismatched_diffs(self, batch: Dict[str, Any]) -> Tensor:
        """S' - R' (or per token with ``average_log_prob``) of one micro-batch's mismatched pairs."""
        model, loss_fn, ref_model = self.model_wrapped, self.fastpref_loss_fn, self.ref_model
        input_ids, attention_mask, completion_mask = (batch["KL_input_ids"], batch["KL_attention_mask"],
                                                      batch["KL_completion_mask"])

        def statistics(hidden: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor]:
            with contextlib.ExitStack() as stack:
                head = stack.enter_context(gather_lm_head(model, detach=True))
                pol = self._head_inputs(model, hidden, input_ids, completion_mask, head)
                ref: Dict[str, Any] = {}
                if not self.precompute_ref_logps:
                    ref_head = stack.enter_context(reference_head(model, ref_model))
                    with reference_scope(model, ref_model), self.accelerator.autocast():
                        ref_hidden = reference_hidden(model, ref_model, input_ids=input_ids,
                                                      attention_mask=attention_mask)
                    r = self._head_inputs(model, ref_hidden, input_ids, completion_mask, ref_head)
                    ref = dict(ref_hidden=r.hidden, ref_weight=r.weight, ref_bias=r.bias)
                stats = loss_fn.fused_logprobs(pol.hidden, pol.weight, pol.targets, **ref, **pol.head_kwargs(),
                                               **loss_fn.logprob_options())
            return stats.logps, stats.ref_logps, stats.lengths

        logps, ref_logps, lengths = model(input_ids=input_ids, attention_mask=attention_mask,
                                          fastpref_head_fn=statistics)
        if self.precompute_ref_logps:
            ref_logps = batch["ref_KL_logps"].to(logps)
        diffs = logps - ref_logps
        return diffs / lengths if loss_fn.average_log_prob else diffs
