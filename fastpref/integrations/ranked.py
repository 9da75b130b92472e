"""Ranked-completion data to MC-PO's layout (docs/losses.md §3): per prompt, a list of completions with a
rank (1 = preferred) or a score becomes ``prompt``, ``chosen`` (the best), ``rejected`` (the second best, the
pair TRL's preprocessing tokenizes) and ``candidates`` (every completion but the best, best first): the
columns :class:`fastpref.integrations.trl.FastPrefDPOTrainer` reads with ``fastpref_loss="mcpo"``.

Nectar-style rows (``{"prompt": ..., "answers": [{"answer": ..., "rank": 1.0}, ...]}``) convert with
``ranked_to_mcpo(ds, completions_column="answers", text_key="answer")``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _convert(example: Dict[str, Any], completions_column: str, text_key: str, order_key: str,
             higher_is_better: bool, drop_best: int, num_candidates: Optional[int]) -> Dict[str, Any]:
    """One example's MC-PO columns (``chosen``, ``rejected``, ``candidates``)."""
    if completions_column not in example:
        raise ValueError(f"completions_column {completions_column!r} is not a column of the example "
                         f"(columns: {sorted(example)})")
    items = example[completions_column]
    for item in items:
        if not isinstance(item, dict) or text_key not in item or order_key not in item:
            raise ValueError(f"every completion in {completions_column!r} must be a dict with keys text_key="
                             f"{text_key!r} and order_key={order_key!r}, got {item!r}")
    sign = -1.0 if higher_is_better else 1.0  # sort ascending on sign * key: best first; stable for ties
    ranked = [item[text_key] for item in sorted(items, key=lambda it: sign * float(it[order_key]))]
    candidates = ranked[1 + drop_best:]
    if num_candidates is not None:
        candidates = candidates[:num_candidates]
    needed = 1 if num_candidates is None else num_candidates
    if len(candidates) < needed:
        raise ValueError(f"an example has {len(items)} completions in {completions_column!r}: after the best and "
                         f"drop_best={drop_best}, {len(candidates)} candidates remain, MC-PO needs "
                         f"{needed} (num_candidates={num_candidates})")
    return {"chosen": ranked[0], "rejected": candidates[0], "candidates": candidates}


def ranked_to_mcpo(data: Any, *, completions_column: str = "completions", text_key: str = "text",
                   order_key: str = "rank", higher_is_better: bool = False, drop_best: int = 0,
                   num_candidates: Optional[int] = None) -> Any:
    """Turn ranked completions into MC-PO rows: ``prompt`` and the other columns kept, ``completions_column``
    replaced by ``chosen`` / ``rejected`` / ``candidates``.

    ``data``: a ``datasets.Dataset`` (returns a ``Dataset``, via ``map``) or a list of dicts (returns a new list).
    Each example's ``completions_column`` holds dicts with the text under ``text_key`` and the rank or score
    under ``order_key``: ``higher_is_better=False`` (default) for ranks (1 = preferred, the smallest wins),
    ``True`` for scores. The best completion becomes ``chosen``; the others, best first (ties keep their input
    order), become ``candidates`` (K of them) and the best of them ``rejected``.

    ``drop_best``: skip that many next-best completions after ``chosen`` (the MC-PO paper's Fig. 2 datasets of
    lower candidate quality: ``drop_best=1`` removes rank 2, ``2`` ranks 2 and 3). ``num_candidates``: keep
    the K best remaining candidates (examples with fewer raise). Without it every example must end up with
    the same K (the trainer's collator stacks groups of K + 1).
    """
    _check_count("drop_best", drop_best, 0)
    if num_candidates is not None:
        _check_count("num_candidates", num_candidates, 1)
    options = (completions_column, text_key, order_key, higher_is_better, drop_best, num_candidates)
    if hasattr(data, "column_names") and hasattr(data, "map"):
        if completions_column not in data.column_names:
            raise ValueError(f"completions_column {completions_column!r} is not a column of the dataset "
                             f"(columns: {data.column_names})")
        out = data.map(lambda ex: _convert(ex, *options), remove_columns=[completions_column],
                       desc="Ranked completions to MC-PO rows")
        counts = {len(c) for c in out["candidates"]}
    elif isinstance(data, (list, tuple)) and all(isinstance(ex, dict) for ex in data):
        out: List[Dict[str, Any]] = []
        for ex in data:
            rest = {k: v for k, v in ex.items() if k != completions_column}
            out.append({**rest, **_convert(ex, *options)})
        counts = {len(ex["candidates"]) for ex in out}
    else:
        raise TypeError(f"data must be a datasets.Dataset or a list of dicts, got {type(data).__name__}")
    if len(counts) > 1:
        raise ValueError(f"examples end up with different numbers of candidates {sorted(counts)}; pass "
                         "num_candidates=K to keep the K best of each (the collator needs one K per batch)")
    return out
