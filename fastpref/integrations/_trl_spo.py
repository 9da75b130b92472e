"""SPO for :class:`fastpref.integrations.trl.FastPrefDPOTrainer` (a mixin; docs/trainer.md, SPO): the sequences
SPO's KL term (Eq. 13) is computed on, sampled from the current policy (Alg. 1) or taken from the dataset, and the
best-of-n / ranked data path (Sec. 5, Eqs. 14-15) into the grouped modes of :class:`fastpref.FusedSPOLoss`."""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ._trl_batches import Rows, check_positive_int, left_padded_prompts, sampled_rows, tokenize_candidates

#: ``spo_mode`` values: the layout of the preference term (FusedSPOLoss's ``mode``).
SPO_MODES = ("pairs", "best_of_n", "ranked")
#: The columns the ranked / best-of-n path adds to a prepared dataset (kept by ``remove_unused_columns``).
GROUP_COLUMNS = ("response_ids", "spo_best")


def _order_key(values: Any, column: str, mode: str, n: int) -> List[float]:
    """Per response, a key that sorts it best first (``ranks``: the rank; ``scores``: minus the score), after
    checking ``values`` (a list of n ints 1..n without ties, or of n finite numbers)."""
    where = f"spo_mode={mode!r}: column {column!r}"
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"{where} must hold a list of {n} entries per example (one per response), got {values!r}")
    if column == "ranks":
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TypeError(f"{where} must hold ints (1 = best), got {values!r}")
        if len(set(values)) != n:
            raise ValueError(f"{where} has ties {values!r}: ranks must be strict (a permutation of 1..{n})")
        if sorted(values) != list(range(1, n + 1)):
            raise ValueError(f"{where} must be a permutation of 1..{n} (1 = best), got {values!r}")
        return [float(v) for v in values]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise TypeError(f"{where} must hold finite numbers (higher = better), got {values!r}")
    if mode == "ranked" and len(set(values)) != n:
        raise ValueError(f"{where} has ties {values!r}: a ranking needs distinct scores (or give strict 'ranks')")
    if mode == "best_of_n" and values.count(max(values)) > 1:
        raise ValueError(f"{where} has a tie for the best score {values!r}: best-of-n needs one best response")
    return [-float(v) for v in values]


def group_columns(example: Dict[str, Any], mode: str, column: str, n: int) -> Dict[str, Any]:
    """One example's columns for the grouped path: ``responses`` (ranked: reordered best first), ``spo_best`` (the
    best response's index in them) and, where the dataset has none, ``chosen`` / ``rejected`` (best and worst
    response: only TRL's preprocessing reads them)."""
    responses = example["responses"]
    if not isinstance(responses, (list, tuple)) or not all(isinstance(r, str) for r in responses):
        raise TypeError(f"spo_mode={mode!r}: column 'responses' must hold a list of plain-text strings per example, "
                        f"got {responses!r}")
    if len(responses) != n:
        raise ValueError(f"spo_mode={mode!r}: every example needs n = {n} 'responses' (the first training example's "
                         f"count, FusedSPOLoss's group_size), got {len(responses)}")
    key = _order_key(example[column], column, mode, n)
    order = sorted(range(n), key=key.__getitem__)
    out: Dict[str, Any] = {"responses": [responses[i] for i in order] if mode == "ranked" else list(responses),
                           "spo_best": 0 if mode == "ranked" else order[0]}
    if "chosen" not in example:
        out["chosen"], out["rejected"] = responses[order[0]], responses[order[-1]]
    return out


def _group_column(columns: List[str], mode: str) -> str:
    """``"ranks"`` or ``"scores"``: the dataset's order column, after checking the grouped path's columns."""
    missing = [c for c in ("prompt", "responses") if c not in columns]
    given = [c for c in ("ranks", "scores") if c in columns]
    if missing or len(given) != 1:
        raise ValueError(f"spo_mode={mode!r} needs dataset columns 'prompt', 'responses' (a list of n responses) and "
                         f"exactly one of 'ranks' (1 = best) or 'scores' (higher = better); got columns {columns}")
    return given[0]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """torch's CPU and ``device``'s RNG seeded with ``seed`` inside, both restored after (the run's global RNG,
    which the HF Trainer checkpoints, is left as it was)."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        generators = getattr(module, "default_generators", ())
        if index < len(generators):
            generators[index].manual_seed(seed)  # this device only: the others are not forked
        else:
            module.manual_seed(seed)
        yield


@torch.no_grad()
def generate_seeded(policy: torch.nn.Module, left: torch.Tensor, left_mask: torch.Tensor, tok: Any, *,
                    num_return_sequences: int, max_new_tokens: int, seed: int) -> torch.Tensor:
    """``policy.generate`` on left-padded prompts: pure sampling (temperature 1, no top-k / top-p), in eval mode,
    seeded by ``seed`` (:func:`_seeded`: the global RNG is left as it was); SPO's and OnMC-PO's samples."""
    was_training = policy.training
    policy.eval()
    try:
        with _seeded(seed, left.device):
            return policy.generate(
                input_ids=left, attention_mask=left_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    finally:
        policy.train(was_training)


class SPOSamples:
    """The trainer's SPO methods; reads ``fastpref_loss``, ``fastpref_loss_fn``, ``args``, ``state`` and the
    ``spo_*`` options set by :meth:`_spo_configure`."""

    def _spo_configure(self, loss_kwargs: Dict[str, Any], train_dataset: Any, samples: str, num_samples: int,
                       resample_every: int, max_new_tokens: Optional[int], mode: str) -> Dict[str, Any]:
        """Check and set the ``spo_*`` options; returns ``loss_kwargs`` with the grouped mode's ``mode`` and
        ``group_size`` (n, read from the first training example) when ``spo_mode`` is not ``"pairs"``."""
        if samples not in ("online", "dataset"):
            raise ValueError(f"spo_samples must be 'online' or 'dataset', got {samples!r}")
        check_positive_int("spo_num_samples", num_samples)
        check_positive_int("spo_resample_every", resample_every)
        check_positive_int("spo_max_new_tokens", max_new_tokens, optional=True)
        if mode not in SPO_MODES:
            raise ValueError(f"spo_mode must be one of {SPO_MODES}, got {mode!r}")
        self.spo_samples, self.spo_num_samples, self.spo_mode = samples, num_samples, mode
        self.spo_resample_every, self.spo_max_new_tokens = resample_every, max_new_tokens
        self._spo_cache: Optional[Tuple[int, Tuple[Rows, ...]]] = None
        self._spo_calls: Dict[str, Tuple[int, int]] = {"train": (-1, 0), "eval": (-1, 0)}
        self._spo_kl_index: Optional[torch.Tensor] = None
        self._spo_group: Optional[Tuple[str, int]] = None
        if self.fastpref_loss == "spo" and "mode" in loss_kwargs and loss_kwargs["mode"] != mode:
            raise ValueError(f"fastpref_loss_kwargs mode={loss_kwargs['mode']!r}: the trainer sets FusedSPOLoss's "
                             f"mode from spo_mode (got spo_mode={mode!r}); pass spo_mode instead")
        if mode == "pairs":
            return loss_kwargs
        if self.fastpref_loss != "spo":
            raise ValueError(f"spo_mode={mode!r} is for fastpref_loss='spo', got {self.fastpref_loss!r}")
        if "group_size" in loss_kwargs:
            raise ValueError("fastpref_loss_kwargs group_size: the trainer sets it to the number of 'responses' per "
                             "example; leave it out")
        if train_dataset is None:
            raise ValueError(f"spo_mode={mode!r} needs train_dataset (n, the responses per prompt, is read from it)")
        first = next(iter(train_dataset))
        column = _group_column(list(first), mode)
        n = len(first["responses"]) if isinstance(first["responses"], (list, tuple)) else 0
        if n < 2:
            raise ValueError(f"spo_mode={mode!r}: column 'responses' must hold lists of n >= 2 responses, got "
                             f"{first['responses']!r}")
        self._spo_group = (column, n)
        return {**loss_kwargs, "mode": mode, "group_size": n}

    # -- the ranked / best-of-n data ------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self._spo_group is None or "response_ids" in (dataset.column_names or []):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        column = _group_column(list(next(iter(dataset))), self.spo_mode)
        dataset = dataset.map(group_columns, fn_kwargs=dict(mode=self.spo_mode, column=column,
                                                             n=self._spo_group[1]))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return tokenize_candidates(dataset, processing_class, self._tokenizer.eos_token, dataset_name,
                                   column="responses", out_column="response_ids", loss="spo")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [c for c in GROUP_COLUMNS
                                                                   if c not in self._signature_columns]

    def _spo_call(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Keywords of FusedSPOLoss's call from the batch: best-of-n's ``best`` (the best response per group)."""
        return {"best": inputs["group_best"]} if self.spo_mode == "best_of_n" else {}

    # -- the KL term's sequences ----------------------------------------------------------------------

    def _spo_kl_rows(self, model, rows: Rows, inputs: Dict[str, Any]) -> Optional[Rows]:
        """(input_ids, attention_mask, completion_mask) of the sequences SPO's KL term is computed on: online,
        ``spo_num_samples`` samples per prompt of this micro-batch; dataset, each prompt's best response."""
        if getattr(self.fastpref_loss_fn, "kl_coef", 0.0) == 0.0:
            return None
        grouped = "group_best" in inputs  # SPO's best-of-n / ranked groups (FastPrefCollator)
        stride = int(inputs["group_size"]) if grouped else rows[0].shape[0] // 2
        num_prompts = rows[0].shape[0] // stride if grouped else stride
        first = torch.arange(num_prompts, device=rows[0].device) * (stride if grouped else 1)
        if self.spo_samples == "dataset":
            # pairs: the chosen rows (the first half); groups: each group's best response (rank 1 for ranked data)
            self._spo_kl_index = first + inputs["group_best"].to(first.device) if grouped else first
            return tuple(t[self._spo_kl_index] for t in rows)
        return self._spo_online(model, tuple(t[first] for t in rows), rows)

    def _spo_online(self, model, prompt_rows: Rows, rows: Rows) -> Rows:
        """This micro-batch's online samples. Training: at every ``spo_resample_every``-th optimizer step each
        accumulation micro-batch samples for its own prompts; at the steps in between the micro-batch at position j
        of the window reuses the samples drawn at position j (Alg. 1's intermittent batch, T =
        ``spo_resample_every``). Evaluation: fresh samples on every call, nothing cached."""
        step = self.state.global_step
        phase = "train" if self.model.training else "eval"
        last, count = self._spo_calls[phase]  # calls at this step so far: the micro-batch's window position
        micro = count if last == step else 0
        self._spo_calls[phase] = (step, micro + 1)
        if phase == "eval":
            return self._sample_online(model, prompt_rows, rows, ("eval", step, micro))
        cache = self._spo_cache
        fresh = cache is None or step - cache[0] >= self.spo_resample_every
        if not fresh and step != cache[0] and micro < len(cache[1]):
            return cache[1][micro]
        samples = self._sample_online(model, prompt_rows, rows, ("train", step, micro))
        # a window position the sampling step did not have (a longer window) draws its own and keeps it
        self._spo_cache = (step, (samples,)) if fresh else (cache[0], cache[1] + (samples,))
        return samples

    def _spo_seed(self, key: Tuple[Any, ...]) -> int:
        """A generation seed from the run's seed, this process and ``key`` (phase, step, micro-batch): the same
        run draws the same samples, whatever ran before on the global RNG."""
        text = repr((int(self.args.seed), int(self.accelerator.process_index), *key)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2 ** 63 - 1)

    def _new_tokens(self, rows: Rows, prompt_width: int, max_new_tokens: Optional[int]) -> int:
        """``max_new_tokens`` (SPO's / OnMC-PO's option), or from the data: the micro-batch's longest completion,
        capped so that prompt and sample fit ``args.max_length`` (at least 1 token)."""
        if max_new_tokens is not None:
            return max_new_tokens
        longest = int(rows[2].sum(dim=1).max().item())
        max_length = getattr(self.args, "max_length", None)
        if max_length is not None:
            longest = min(longest, max_length - prompt_width)
        return max(longest, 1)

    @torch.no_grad()
    def _sample_online(self, model, prompt_rows: Rows, rows: Rows, key: Tuple[Any, ...]) -> Rows:
        """``spo_num_samples`` completions y' ~ pi_theta(.|x') per prompt (temperature 1, no top-k / top-p), seeded
        by :meth:`_spo_seed`; rows prompt-major (prompt i's samples at rows i * k .. i * k + k - 1)."""
        tok, k = self._tokenizer, self.spo_num_samples
        prompts, left, left_mask = left_padded_prompts(prompt_rows, prompt_rows[0].shape[0], tok.pad_token_id)
        max_new = self._new_tokens(rows, left.shape[1], self.spo_max_new_tokens)
        generated = generate_seeded(self.accelerator.unwrap_model(model), left, left_mask, tok,
                                    num_return_sequences=k, max_new_tokens=max_new, seed=self._spo_seed(key))
        return sampled_rows([p for p in prompts for _ in range(k)], generated, tok.pad_token_id, tok.eos_token_id)

    def _spo_kl_inputs(self, model, hidden, input_ids, attention_mask, labels, keep, num_main, head, ref_head):
        """SPO's KL inputs: the sample rows of this step's policy forward, and the reference on them."""
        # online: the samples were appended after the main rows; dataset: rows of the main forward
        rows = slice(num_main, None) if self.spo_samples == "online" else self._spo_kl_index
        kl_labels, kl_keep = labels[rows], keep[rows]
        pol = self._head_inputs(model, hidden[rows], kl_labels, kl_keep, head)
        ref_hidden = self._reference_hidden(input_ids[rows], attention_mask[rows])
        ref = self._head_inputs(model, ref_hidden, kl_labels, kl_keep, ref_head)
        # the reference head as cast with its hidden states (the policy's autocast dtype under mixed precision)
        return dict(kl_hidden=pol.hidden, kl_ref_hidden=ref.hidden, kl_targets=pol.targets, kl_seq_ids=pol.seq_ids,
                    kl_num_seqs=pol.num_seqs, ref_weight=ref.weight, ref_bias=ref.bias)
