"""SPO's online samples for :class:`fastpref.integrations.trl.FastPrefDPOTrainer` (a mixin): the sequences SPO's
KL term is computed on, sampled from the current policy or taken from the dataset."""
from __future__ import annotations

from typing import Optional

import torch

from ._trl_batches import Rows, left_padded_prompts, sampled_rows


class SPOSamples:
    """The trainer's SPO methods; reads ``spo_samples``, ``spo_num_samples``, ``spo_resample_every``,
    ``spo_max_new_tokens`` and ``_spo_cache`` of the trainer."""

    def _spo_kl_rows(self, model, rows: Rows, num_pairs: int) -> Optional[Rows]:
        """(input_ids, attention_mask, completion_mask) of the sequences SPO's KL term is computed on."""
        if getattr(self.fastpref_loss_fn, "kl_coef", 0.0) == 0.0:
            return None
        if self.spo_samples == "dataset":
            return tuple(t[:num_pairs] for t in rows)
        step = self.state.global_step
        if self._spo_cache is None or step - self._spo_cache[0] >= self.spo_resample_every:
            self._spo_cache = (step, self._sample_online(model, rows, num_pairs))
        return self._spo_cache[1]

    @torch.no_grad()
    def _sample_online(self, model, rows: Rows, num_pairs: int) -> Rows:
        """Sample completions y' ~ pi_theta(.|x') for the first ``spo_num_samples`` prompts of the batch."""
        tok = self._tokenizer
        prompts, left, left_mask = left_padded_prompts(rows, min(self.spo_num_samples, num_pairs), tok.pad_token_id)
        policy = self.accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()
        try:
            generated = policy.generate(
                input_ids=left, attention_mask=left_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=self.spo_max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        finally:
            policy.train(was_training)
        return sampled_rows(prompts, generated, tok.pad_token_id, tok.eos_token_id)

    def _spo_kl_inputs(self, model, hidden, input_ids, attention_mask, labels, keep, num_main, head, ref_head):
        """SPO's KL inputs: the sample rows of this step's policy forward, and the reference on them."""
        # online: the samples were appended after the main rows; dataset: the chosen rows (first half)
        rows = slice(num_main, None) if self.spo_samples == "online" else slice(0, num_main // 2)
        kl_labels, kl_keep = labels[rows], keep[rows]
        pol = self._head_inputs(model, hidden[rows], kl_labels, kl_keep, head)
        ref_hidden = self._reference_hidden(input_ids[rows], attention_mask[rows])
        ref = self._head_inputs(model, ref_hidden, kl_labels, kl_keep, ref_head)
        return dict(kl_hidden=pol.hidden, kl_ref_hidden=ref.hidden, kl_targets=pol.targets, kl_seq_ids=pol.seq_ids,
                    kl_num_seqs=pol.num_seqs)

