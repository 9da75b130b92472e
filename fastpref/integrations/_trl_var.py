"""VAR in :class:`fastpref.integrations.trl.FastPrefDPOTrainer` (a mixin), and its ``reward_model=`` option.

VAR's loss (paper Eqs. 9-10, Alg. 1) weights each response's SFT term by ``exp(r(x_i, y_i) / beta) / Z(x_i)``,
with the partition function estimated over the micro-batch:
``Z(x_i) = (1/B) sum_j exp(r(x_i, y_j) / beta) pi_ref(y_j | x_i)``. Two forms (``var_pairs``):

- ``"cross"`` -- Alg. 1 as written. Per micro-batch, the reward model scores ``r(x_i, y_j)`` and the reference
  gives ``log pi_ref(y_j | x_i)`` for every prompt ``i`` and in-batch response ``j`` (the response placed after
  another row's prompt). The reference rows run through the reference's own forward (or the PEFT policy with its
  adapters off), ``var_prompts_per_chunk`` prompts at a time (each with all responses), and the fused op sums
  their response log-probs without building logits. Cost per micro-batch: ``P x S`` extra no-grad reference
  sequences (P prompts, S responses: ``B^2`` with ``var_responses="chosen"``, ``2 B^2`` with ``"both"``) and
  ``P x S`` reward-model scores.
- ``"diagonal"`` -- only ``r(x_i, y_i)``, read from the dataset columns ``chosen_reward`` / ``rejected_reward``.
  Then ``Z`` is one number shared by every prompt, and with ``normalize="self"`` the weights are
  ``S * softmax(r / beta)``: the reference drops out and no reference pass runs. Not the paper's estimator.

``var_pairs`` defaults to ``"cross"`` when a reward model is given and to ``"diagonal"`` otherwise. Which paper
setup each choice reproduces is in docs/trainer.md (VAR).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..modules.var import cross_pair_rows
from ._trl_batches import REWARD_COLUMNS, Rows, check_positive_int, scored_labels
from .reward import RewardModel
from .transformers import is_peft

Tensor = torch.Tensor
VAR_PAIRS = ("cross", "diagonal")
VAR_RESPONSES = ("both", "chosen")
_CROSS_KEY = "var_cross_pairs"  # the loss keywords' carrier of (prompts, responses) until the reference pass


def as_reward_model(reward_model: Any) -> Optional[RewardModel]:
    """``reward_model=`` as a :class:`RewardModel`: one as is, ``(model, tokenizer)`` (a sequence-classification
    model and its own tokenizer) or a callable ``(prompts, completions) -> scores`` wrapped; None stays None."""
    if reward_model is None or isinstance(reward_model, RewardModel):
        return reward_model
    if isinstance(reward_model, torch.nn.Module):  # before callable(): a module is callable too
        raise ValueError(
            f"reward_model: a {type(reward_model).__name__} module needs its own tokenizer; pass "
            "reward_model=(model, tokenizer) or reward_model=RewardModel(model, tokenizer)")
    try:
        if isinstance(reward_model, tuple):
            if len(reward_model) != 2 or not isinstance(reward_model[0], torch.nn.Module):
                raise TypeError("a tuple must be (sequence-classification model, its tokenizer)")
            if reward_model[1] is None:
                raise ValueError("the model's tokenizer is None; pass (model, tokenizer)")
            return RewardModel(*reward_model)
        if callable(reward_model):
            return RewardModel(reward_model)
    except (TypeError, ValueError) as err:
        raise type(err)(f"reward_model: {err}") from err
    raise TypeError("reward_model must be a RewardModel, (model, tokenizer) or a callable (prompts, completions) -> "
                    f"scores, got {type(reward_model).__name__}")


class VARTrainer:
    """VAR's two forms and the reward model of ``FastPrefDPOTrainer`` (see the module docstring). Reads the
    trainer's ``fastpref_loss_fn``, ``_tokenizer`` and reference helpers (``_reference_head``,
    ``_reference_hidden``, ``_head_inputs``)."""

    fastpref_reward_model: Optional[RewardModel] = None
    var_pairs: str = "diagonal"
    var_responses: str = "both"
    var_prompts_per_chunk: int = 1

    def _var_setup(self, loss: str, reward_model: Any, var_pairs: Optional[str], var_responses: str,
                   var_prompts_per_chunk: int, args: Any) -> None:
        """Check the VAR options and ``reward_model`` before TRL's set-up runs (it may precompute reference
        log-probs over the whole dataset)."""
        if var_responses not in VAR_RESPONSES:
            raise ValueError(f"var_responses must be one of {VAR_RESPONSES}, got {var_responses!r}")
        if var_pairs is not None and var_pairs not in VAR_PAIRS:
            raise ValueError(f"var_pairs must be one of {VAR_PAIRS} (or None), got {var_pairs!r}")
        check_positive_int("var_prompts_per_chunk", var_prompts_per_chunk)
        if var_pairs is not None and loss != "var":
            raise ValueError(f"var_pairs applies to fastpref_loss='var', got fastpref_loss={loss!r}")
        self.fastpref_reward_model = as_reward_model(reward_model)
        self.var_responses, self.var_prompts_per_chunk = var_responses, var_prompts_per_chunk
        if var_pairs is None:
            var_pairs = "cross" if loss == "var" and self.fastpref_reward_model is not None else "diagonal"
        self.var_pairs = var_pairs
        if loss != "var":
            return
        if var_pairs == "diagonal" and self.fastpref_reward_model is not None:
            raise ValueError("var_pairs='diagonal' reads r(x_i, y_i) from the dataset columns "
                             f"{REWARD_COLUMNS} and would not use reward_model; leave var_pairs unset (or 'cross') "
                             "to run Alg. 1 with the reward model, or drop reward_model")
        if var_pairs == "cross":
            if self.fastpref_reward_model is None:
                raise ValueError("var_pairs='cross' (VAR's Alg. 1) needs reward_model= to score r(x_i, y_j) for "
                                 "every prompt and in-batch response; or use var_pairs='diagonal' with the dataset "
                                 f"columns {REWARD_COLUMNS}")
            batch = getattr(args, "per_device_train_batch_size", 2)
            if batch < 2:
                raise ValueError(f"var_pairs='cross' needs at least 2 prompts per micro-batch (Z(x_i) is estimated "
                                 f"over the micro-batch's responses), got per_device_train_batch_size={batch}")
            if getattr(args, "precompute_ref_log_probs", False):
                raise ValueError("var_pairs='cross' needs log pi_ref(y_j | x_i) for every in-batch pair at each "
                                 "step, which precompute_ref_log_probs cannot provide: set it to False and pass "
                                 "ref_model (or a PEFT policy)")

    def _var_ready(self) -> None:
        """After TRL's set-up: the cross form has a reference, and a reward-model module sits on the trainer's
        device (each process scores its own micro-batch with its own copy)."""
        if self.fastpref_loss != "var" or self.var_pairs != "cross":
            return
        if self.ref_model is None and not is_peft(self.model):
            raise ValueError("var_pairs='cross' needs a reference model: pass ref_model (or a PEFT policy)")
        reward = self.fastpref_reward_model
        if isinstance(reward.model, torch.nn.Module):
            reward.model.to(self.accelerator.device)
            reward.device = self.accelerator.device

    def _var_loss_inputs(self, inputs: Dict[str, Any], rows: Rows, num_main: int) -> Dict[str, Any]:
        """VAR's loss keywords for the micro-batch's ``num_main`` scored rows: ``rewards`` ``[S]`` from the
        dataset columns (diagonal), or ``rewards`` ``[S, S]`` from the reward model plus the pairs whose reference
        log-probs :meth:`_var_cross_reference` adds inside the policy's forward (cross)."""
        if self.var_pairs == "diagonal":
            return {"rewards": torch.cat([inputs["chosen_reward"], inputs["rejected_reward"]])[:num_main]}
        num_prompts = inputs["input_ids"].shape[0] // 2
        prompts, responses = self._var_pairs_of(rows, num_prompts, num_main)
        # r(x_i, y_j) for each distinct prompt i and every response j; rows i and i + P share prompt i
        scores = self.fastpref_reward_model.score_token_ids(
            self._tokenizer, [p for p in prompts for _ in responses], [r for _ in prompts for r in responses],
            device=rows[0].device).view(num_prompts, num_main)
        return {"rewards": scores[self._var_prompt_of_row(num_prompts, num_main, scores.device)],
                _CROSS_KEY: (prompts, responses)}

    @staticmethod
    def _var_prompt_of_row(num_prompts: int, num_rows: int, device: torch.device) -> Tensor:
        """Row ``i``'s prompt: ``i mod P`` (TRL's layout: the chosen rows, then the rejected rows, same prompts)."""
        return torch.arange(num_rows, device=device) % num_prompts

    @staticmethod
    def _var_pairs_of(rows: Rows, num_prompts: int, num_rows: int) -> Tuple[List[Tensor], List[Tensor]]:
        """The micro-batch's P prompts and S responses as token-id tensors; raises where Alg. 1 cannot run."""
        if num_prompts < 2:
            raise ValueError("var_pairs='cross' needs at least 2 prompts per micro-batch (Z(x_i) is estimated over "
                             f"the micro-batch's responses), got {num_prompts}; with a last smaller batch set "
                             "dataloader_drop_last=True, and keep per_device_eval_batch_size >= 2")
        input_ids, attention_mask, completion_mask = rows
        real = attention_mask == 1

        def prompt(i: int) -> Tensor:
            return input_ids[i][real[i] & (completion_mask[i] == 0)]

        prompts = [prompt(i) for i in range(num_prompts)]
        for i in range(num_prompts, num_rows):  # truncation_mode="keep_end" may cut a rejected row's prompt
            if not torch.equal(prompt(i), prompts[i % num_prompts]):
                raise ValueError(f"var_pairs='cross': row {i} (a rejected response) has another prompt than its chosen "
                                 "row, as truncation (truncation_mode='keep_end' / max_length) cut into it; use "
                                 "var_responses='chosen', a larger max_length or truncation_mode='keep_start'")
        responses = [input_ids[j][real[j] & (completion_mask[j] == 1)] for j in range(num_rows)]
        if any(r.numel() == 0 for r in responses):
            raise ValueError("var_pairs='cross': a response has no tokens left after truncation (max_length)")
        return prompts, responses

    def _var_cross_reference(self, model: torch.nn.Module, extra: Dict[str, Any]) -> Dict[str, Any]:
        """``extra`` with the cross-pair ``ref_logps`` ``[S, S]`` (``log pi_ref(y_j | x_i)``) in place of the
        pairs; unchanged outside the cross form. Runs inside the policy's forward, where the reference is run
        in the other forms too (a sharded root is gathered there)."""
        if _CROSS_KEY not in extra:
            return extra
        extra = dict(extra)
        prompts, responses = extra.pop(_CROSS_KEY)
        ref = self._var_reference_logps(model, prompts, responses)
        extra["ref_logps"] = ref[self._var_prompt_of_row(len(prompts), len(responses), ref.device)]
        return extra

    def _var_reference_logps(self, model: torch.nn.Module, prompts: List[Tensor], responses: List[Tensor]) -> Tensor:
        """``[P, S]`` no-grad ``log pi_ref(y_j | x_i)``: every ``prompts[i] + responses[j]`` through the
        reference (``var_prompts_per_chunk`` prompts, i.e. that many times S sequences, per forward; the same
        number of forwards on every process) and the trainer's head path (the policy config's temperature and
        soft-cap, mixed precision, packing), summed over the response tokens by the fused op."""
        loss_fn = self.fastpref_loss_fn
        pad = self._tokenizer.pad_token_id
        rows: List[Tensor] = []
        with torch.no_grad(), self._reference_head() as ref_head:
            for i0 in range(0, len(prompts), self.var_prompts_per_chunk):
                chunk = prompts[i0: i0 + self.var_prompts_per_chunk]
                ids, mask, completion = cross_pair_rows(chunk, responses, pad, device=prompts[0].device)
                labels, keep = scored_labels(ids, completion, loss_fn.ignore_index)
                ref = self._head_inputs(model, self._reference_hidden(ids, mask), labels, keep, ref_head)
                stats = loss_fn.fused_logprobs(ref.hidden, ref.weight, ref.targets, **ref.head_kwargs(),
                                               **loss_fn.logprob_options())
                rows.append(stats.logps.view(len(chunk), len(responses)))
        return torch.cat(rows)


__all__ = ["VARTrainer", "VAR_PAIRS", "VAR_RESPONSES", "as_reward_model"]
