"""Data side of :class:`fastpref.integrations.trl.FastPrefDPOTrainer`: the checks of its config and
dataset, the collator's extra columns, row padding/stacking/selection, scored labels, MC-PO candidate
tokenization and SPO's online-sample rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .transformers import shift_labels

Rows = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input_ids, attention_mask, completion_mask)
REWARD_COLUMNS = ("chosen_reward", "rejected_reward")
#: Keywords of the LM head, not of the loss: they come from the model's config (``LMHeadInputs.head_kwargs``).
HEAD_KEYWORDS = ("temperature", "softcap")


def check_loss_kwargs(kwargs: Dict[str, Any]) -> None:
    """Reject the LM head's keywords in ``fastpref_loss_kwargs``: the trainer reads them from the model."""
    given = [k for k in HEAD_KEYWORDS if k in kwargs]
    if given:
        raise ValueError(
            f"fastpref_loss_kwargs must not set {' or '.join(given)}: the LM head's temperature and softcap come "
            "from the model config (logit_scale / logits_scaling / final_logit_softcapping, see "
            "fastpref.integrations.transformers.logit_transform) and are passed with the head on every loss call. "
            "A sampling temperature for generation is unrelated")


def check_positive_int(name: str, value: Any, optional: bool = False) -> None:
    """ValueError naming the trainer option ``name`` unless ``value`` is a positive int (or None if ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def check_config(args: Any, train_dataset: Any, loss: str, *, reward_columns: bool = False,
                 candidates: bool = False) -> None:
    """Reject a dataset missing the columns the run reads (``reward_columns``: VAR's diagonal form; ``candidates``:
    offline MC-PO) and options ``loss`` does not support (TRL's loss fields: :mod:`._trl_config`)."""
    if args is None:
        return
    if train_dataset is not None and hasattr(train_dataset, "column_names"):
        columns = set(train_dataset.column_names)
        if reward_columns and not set(REWARD_COLUMNS) <= columns:
            raise ValueError(f"fastpref_loss='var' needs dataset columns {REWARD_COLUMNS} (reward-model scores)")
        if candidates and "candidates" not in columns:
            raise ValueError("fastpref_loss='mcpo' needs a dataset column 'candidates' (list of K responses)")
        if loss in ("mcpo", "spo") and args.precompute_ref_log_probs:
            raise ValueError(f"fastpref_loss={loss!r} does not support precompute_ref_log_probs")


def pad_rows(rows: Sequence[torch.Tensor], value: int, width: Optional[int] = None) -> torch.Tensor:
    """Right-pad 1-D rows with ``value`` into one ``[len(rows), width]`` int64 tensor (longer rows are cut)."""
    width = max(r.numel() for r in rows) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r[:width]
    return out


def cat_rows(a: Rows, b: Rows, pad_id: int) -> Rows:
    """Stack two (input_ids, attention_mask, completion_mask) row sets, right-padded to one width."""
    width = max(a[0].shape[1], b[0].shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return (torch.cat([widen(a[0], pad_id), widen(b[0].to(a[0].device), pad_id)]),
            torch.cat([widen(a[1], 0), widen(b[1].to(a[1].device), 0)]),
            torch.cat([widen(a[2], 0), widen(b[2].to(a[2].device), 0)]))


def select_group_rows(rows: Rows, columns: torch.Tensor) -> Rows:
    """Rows ``columns [B, C]`` of each group of grouped ``rows`` (group-major, ``rows[0].shape[0] / B`` rows
    each), group by group, with the columns that are padding in every selected row dropped."""
    num_groups = columns.shape[0]
    group_size = rows[0].shape[0] // num_groups
    offsets = torch.arange(num_groups, device=columns.device).unsqueeze(1) * group_size
    selected = (offsets + columns).reshape(-1).to(rows[0].device)
    width = int(rows[1][selected].any(dim=0).nonzero().max().item()) + 1  # last non-padding column
    return tuple(t[selected][:, :width] for t in rows)


def scored_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor,
                  ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(labels, keep)``: the completion tokens as unshifted labels (``ignore_index`` elsewhere), and the
    ``[B, T]`` mask of the positions that predict one of them (the packed ``logits_to_keep``)."""
    labels = input_ids.masked_fill(completion_mask == 0, ignore_index)
    return labels, shift_labels(labels, ignore_index) != ignore_index


@dataclass
class FastPrefCollator:
    """TRL's preference collator plus the columns fastpref losses read (rewards, MC-PO candidate groups, SPO's
    ranked / best-of-n groups).

    Groups come out as ``group_input_ids``/``group_attention_mask``/``group_completion_mask`` ``[B * G, L]``,
    row ``b * G + g``, all right-padded to one width, and ``group_size`` G. MC-PO (``candidates``): G = K + 1,
    g = 0 the chosen response, g >= 1 the candidates. SPO (``responses``): G = n, the ``response_ids`` in the
    dataset's order (rank order for ranked data), as ``input_ids``/``attention_mask``/``completion_mask``
    (replacing TRL's pair rows), plus ``group_best`` [B] int64 (the best response's g).
    """

    base: Callable[[List[Dict[str, Any]]], Dict[str, Any]]
    pad_token_id: int
    reward_columns: Tuple[str, ...] = ()
    candidates: bool = False
    max_length: Optional[int] = None
    responses: bool = False

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = self.base(examples)
        for column in self.reward_columns:
            batch[column] = torch.tensor([float(ex[column]) for ex in examples], dtype=torch.float32)
        if self.candidates:
            k = {len(ex["candidate_ids"]) for ex in examples}
            if len(k) != 1:
                raise ValueError(f"mcpo: every example of a batch needs the same number of candidates, got {sorted(k)}")
            batch.update(self._groups(examples, [[ex["chosen_ids"], *ex["candidate_ids"]] for ex in examples]))
        elif self.responses:
            n = {len(ex["response_ids"]) for ex in examples}
            if len(n) != 1:
                raise ValueError(f"spo: every example of a batch needs the same number of 'responses', got {sorted(n)}")
            groups = self._groups(examples, [list(ex["response_ids"]) for ex in examples])
            # SPO's groups are the batch's only rows: they replace the pair rows TRL built (only its preprocessing
            # needed chosen / rejected), so whatever reads input_ids (the loss, the effective-batch pass, the token
            # count) sees them
            batch.update({key: groups.pop("group_" + key) for key in ("input_ids", "attention_mask", "completion_mask")})
            batch.update(groups, group_best=torch.tensor([int(ex["spo_best"]) for ex in examples], dtype=torch.long))
        return batch

    def _groups(self, examples: List[Dict[str, Any]], groups: List[List[Sequence[int]]]) -> Dict[str, torch.Tensor]:
        """The group rows of ``groups`` (per example, its responses' token ids) after each example's prompt."""
        ids, completion = [], []
        for ex, group in zip(examples, groups):
            for response in group:
                seq = list(ex["prompt_ids"]) + list(response)
                mask = [0] * len(ex["prompt_ids"]) + [1] * len(response)
                if self.max_length is not None:
                    seq, mask = seq[: self.max_length], mask[: self.max_length]
                ids.append(torch.tensor(seq, dtype=torch.long))
                completion.append(torch.tensor(mask, dtype=torch.long))
        return dict(group_input_ids=pad_rows(ids, self.pad_token_id),
                    group_attention_mask=pad_rows([torch.ones_like(t) for t in ids], 0),
                    group_completion_mask=pad_rows(completion, 0), group_size=torch.tensor(len(groups[0])))


def tokenize_candidates(dataset, processing_class, eos: str, dataset_name: str, column: str = "candidates",
                        out_column: str = "candidate_ids", loss: str = "mcpo"):
    """Add ``out_column`` (MC-PO's ``candidate_ids``; SPO's ``response_ids`` from ``responses``): each plain-text
    response of ``column`` tokenized after the prompt and ending in ``eos``, as TRL tokenizes ``chosen``, to a
    dataset TRL already prepared."""
    from trl.data_utils import _tokenize

    def tokenize(example):
        prompt_ids = example["prompt_ids"]
        out = []
        for text in example[column]:
            if not isinstance(text, str):
                raise TypeError(f"{loss}: {column!r} must hold plain-text responses (conversational responses "
                                "are not supported)")
            text = text if text.endswith(eos) else text + eos
            ids = list(_tokenize(processing_class, example["prompt"] + text)["input_ids"])  # as TRL does
            if ids[: len(prompt_ids)] != list(prompt_ids):
                raise ValueError(f"{loss}: a response's tokenization in {column!r} changes the prompt's tokens; end "
                                 "the prompt on a token boundary")
            out.append(ids[len(prompt_ids):])
        return {out_column: out}

    return dataset.map(tokenize, desc=f"Tokenizing {dataset_name} {loss} {column}")


def left_padded_prompts(rows: Rows, count: int, pad_id: int) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The prompts of the first ``count`` rows: ``(prompts, input_ids, attention_mask)``, left-padded for
    ``generate``."""
    input_ids, attention_mask, completion_mask = rows
    prompts = [input_ids[i][(attention_mask[i] == 1) & (completion_mask[i] == 0)] for i in range(count)]
    width = max(p.numel() for p in prompts)
    left = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=input_ids.device)
    left_mask = torch.zeros_like(left)
    for i, p in enumerate(prompts):
        left[i, width - p.numel():] = p
        left_mask[i, width - p.numel():] = 1
    return prompts, left, left_mask


def sampled_rows(prompts: List[torch.Tensor], generated: torch.Tensor, pad_id: int, eos_id: Optional[int]) -> Rows:
    """Rows ``prompt + completion`` from ``generate``'s output on :func:`left_padded_prompts` (completions cut
    after their first EOS); the completion tokens are the scored ones."""
    width = max(p.numel() for p in prompts)  # generate's output starts with the left-padded prompts
    ids, completion = [], []
    for i, p in enumerate(prompts):
        new = generated[i, width:].tolist()
        if eos_id in new:
            new = new[: new.index(eos_id) + 1]
        ids.append(torch.cat([p.cpu(), torch.tensor(new, dtype=torch.long)]))
        completion.append(torch.tensor([0] * p.numel() + [1] * len(new), dtype=torch.long))
    return pad_rows(ids, pad_id), pad_rows([torch.ones_like(t) for t in ids], 0), pad_rows(completion, 0)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Padding-free model inputs for right-padded rows: every row's real tokens one after another in a single row,
    with ``position_ids`` restarting at 0 for each (how ``transformers`` marks packed sequences: with no
    ``attention_mask``, SDPA/eager attention build a block-diagonal causal mask and flash-attention's varlen kernel
    takes the boundaries from them). Returns ``(model inputs, mask)``, ``mask`` ``[R, T]`` the real tokens, for
    :func:`unpack_hidden`. Positions equal the padded forward's (``arange`` per row) for right padding."""
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("padding_free packs right-padded rows (each row's tokens first, then padding)")
    positions = (mask.long().cumsum(dim=1) - 1)[mask]
    return dict(input_ids=input_ids[mask].unsqueeze(0), position_ids=positions.unsqueeze(0)), mask


def unpack_hidden(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Hidden states ``[1, L, D]`` of :func:`pack_rows`' single row back in the rows' padded layout ``[R, T, D]``
    (zeros at padding; differentiable). ``mask=None``: ``hidden`` is already padded and returned as is."""
    if mask is None:
        return hidden
    out = hidden.new_zeros(*mask.shape, hidden.shape[-1])
    return out.masked_scatter(mask.unsqueeze(-1), hidden[0])
