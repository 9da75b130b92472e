"""``RewardModel``: scores (prompt, completion) pairs for the trainer's paper recipes.

The recipes that need a reward (VAR's ``r(x_i, y_j)``, OnMC-PO's ranking, SPO's best-of-n) call
:meth:`RewardModel.score` with the pairs as strings, or :meth:`RewardModel.score_token_ids` with the policy's
token ids, which it decodes with the policy tokenizer first (the reward model may use another tokenizer).

Two kinds of scorer are accepted:

- a ``transformers`` sequence-classification model (``AutoModelForSequenceClassification``-style, one label)
  with its own tokenizer. Each text is ``format_pair(prompt, completion)`` (by default ``prompt + completion``)
  tokenized with the reward tokenizer; the texts are sorted by length and cut into chunks whose padded size
  (``rows * longest row``) stays within ``max_batch_tokens``; each chunk runs the model's own forward under
  ``torch.no_grad`` and eval mode, padded on the tokenizer's ``padding_side`` with ``model.config.pad_token_id``
  (the id the model's classification head reads to find each row's last real token), with an attention mask and,
  where the forward takes them, position ids counted from each row's first real token, so that a padded row
  scores as it would alone.
- any callable ``(prompts: list[str], completions: list[str]) -> scores`` (a list or tensor of ``n`` numbers).

Truncation: a text longer than ``max_length`` tokens (by default the smaller of the tokenizer's
``model_max_length`` and the config's ``max_position_embeddings``) keeps its last ``max_length`` tokens -- the
end of the completion, which the head reads -- and its first token if that is the tokenizer's BOS token. It is
done silently (the tokenizer's too-long warning is switched off), as documented here.

Distributed training: each rank scores its own pairs with its own copy of the reward model; nothing is
communicated.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

ScoreFn = Callable[[List[str], List[str]], Any]
_HUGE = 1_000_000  # tokenizers without a limit report int(1e30) as model_max_length


def concatenate(prompt: str, completion: str) -> str:
    """The default text of a pair: the prompt followed by the completion, as the policy saw them."""
    return prompt + completion


class RewardModel:
    """Scores (prompt, completion) pairs; see the module docstring.

    Args:
        model: a sequence-classification ``torch.nn.Module`` (``config.num_labels == 1``) or a callable
            ``(prompts, completions) -> scores``.
        tokenizer: the reward model's tokenizer (required for a module, not allowed with a callable).
        max_batch_tokens: at most this many (padded) tokens go through the model at once; a single text longer
            than that runs alone.
        max_length: truncation length in tokens (default: the tokenizer's and the config's limit).
        device: where the model's inputs go (default: the device of the model's first parameter).
        format_pair: ``(prompt, completion) -> text`` for the reward tokenizer (default :func:`concatenate`).
    """

    def __init__(self, model: Union[torch.nn.Module, ScoreFn], tokenizer: Any = None, *,
                 max_batch_tokens: int = 8192, max_length: Optional[int] = None,
                 device: Union[str, torch.device, None] = None,
                 format_pair: Callable[[str, str], str] = concatenate) -> None:
        """Checks the arguments; see the class docstring."""
        if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
            raise ValueError(f"RewardModel: max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_tokens, self.format_pair = max_batch_tokens, format_pair
        if isinstance(model, torch.nn.Module):
            self._check_module(model, tokenizer)
            self.max_length = self._default_max_length(model, tokenizer) if max_length is None else max_length
            if not isinstance(self.max_length, int) or self.max_length < 1:
                raise ValueError(f"RewardModel: max_length must be a positive int, got {max_length!r}")
            first = next(model.parameters(), None)
            self.device = torch.device(device) if device is not None else (
                first.device if first is not None else torch.device("cpu"))
            self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        elif callable(model):
            if tokenizer is not None:
                raise ValueError("RewardModel: a callable scorer takes strings, so tokenizer must be None")
            self.max_length, self.device = max_length, None
        else:
            raise TypeError(f"RewardModel: model must be a torch.nn.Module or a callable (prompts, completions) -> "
                            f"scores, got {type(model).__name__}")

    @staticmethod
    def _check_module(model: torch.nn.Module, tokenizer: Any) -> None:
        """A module needs a tokenizer, one label and a pad id its classification head reads."""
        if tokenizer is None:
            raise ValueError("RewardModel: a sequence-classification model needs its tokenizer (tokenizer=...)")
        config = getattr(model, "config", None)
        labels = getattr(config, "num_labels", None)
        if labels != 1:
            raise ValueError(f"RewardModel: model.config.num_labels must be 1 (one scalar reward), got {labels}")
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "pad_token_id", None) is None:
            raise ValueError("RewardModel: model.config.pad_token_id is None; the classification head needs it to "
                             "find each padded row's last token (set it, e.g. to the tokenizer's pad_token_id)")

    @staticmethod
    def _default_max_length(model: torch.nn.Module, tokenizer: Any) -> int:
        """The smaller of the tokenizer's ``model_max_length`` and the config's ``max_position_embeddings``."""
        limits = [getattr(tokenizer, "model_max_length", None)]
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limits.append(getattr(config, "max_position_embeddings", None))
        limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < _HUGE]
        return min(limits) if limits else _HUGE

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Float32 scores ``[n]`` of the pairs ``(prompts[i], completions[i])``, on ``device`` (default CPU)."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"RewardModel.score: {len(prompts)} prompts but {len(completions)} completions")
        for name, texts in (("prompts", prompts), ("completions", completions)):
            bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
            if bad:
                raise TypeError(f"RewardModel.score: {name}[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str")
        out = torch.device("cpu") if device is None else torch.device(device)
        if not prompts:
            return torch.zeros(0, dtype=torch.float32, device=out)
        if isinstance(self.model, torch.nn.Module):
            scores = self._score_module([self.format_pair(p, c) for p, c in zip(prompts, completions)])
        else:
            scores = self._score_callable(prompts, completions)
        return scores.to(device=out, dtype=torch.float32)

    def _score_callable(self, prompts: List[str], completions: List[str]) -> torch.Tensor:
        """The callable's scores as a float32 tensor, checked to be ``[n]``."""
        name = getattr(self.model, "__name__", type(self.model).__name__)
        with torch.no_grad():
            raw = self.model(prompts, completions)
        try:
            scores = torch.as_tensor(raw.detach() if isinstance(raw, torch.Tensor) else raw, dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise TypeError(f"RewardModel: the scorer {name} returned {type(raw).__name__}, not a list or tensor "
                            f"of {len(prompts)} numbers") from err
        if scores.shape != (len(prompts),):
            raise ValueError(f"RewardModel: the scorer {name} returned shape {tuple(scores.shape)} for "
                             f"{len(prompts)} pairs; expected ({len(prompts)},)")
        return scores

    def _tokenize(self, texts: List[str]) -> List[List[int]]:
        """Token ids of each text, truncated to ``max_length`` from the left (keeping a leading BOS)."""
        ids = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        bos, limit = getattr(self.tokenizer, "bos_token_id", None), self.max_length
        out = []
        for row in ids:
            row = list(row)
            if len(row) > limit:
                row = ([row[0]] + row[len(row) - limit + 1:]) if bos is not None and row[0] == bos and limit > 1 \
                    else row[len(row) - limit:]
            if not row:
                raise ValueError("RewardModel: a pair tokenized to no tokens with the reward tokenizer")
            out.append(row)
        return out

    def _chunks(self, lengths: List[int]) -> List[List[int]]:
        """Indices grouped, longest first, so that ``rows * longest row <= max_batch_tokens`` per group."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: List[List[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.max_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _score_module(self, texts: List[str]) -> torch.Tensor:
        """Run the sequence-classification model chunk by chunk; scores in the texts' order."""
        ids = self._tokenize(texts)
        scores = torch.empty(len(ids), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for group in self._chunks([len(r) for r in ids]):
                    scores[group] = self._forward([ids[i] for i in group]).float().cpu()
        finally:
            self.model.train(was_training)
        return scores

    def _forward(self, rows: List[List[int]]) -> torch.Tensor:
        """One padded chunk through the model: its ``[rows]`` logits."""
        config = self.model.config
        pad = (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id
        width = max(len(r) for r in rows)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            mask[b, span] = 1
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._takes_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        logits = self.model(**kwargs).logits
        if logits.shape != (len(rows), 1):
            raise ValueError(f"RewardModel: the model returned logits of shape {tuple(logits.shape)} for "
                             f"{len(rows)} rows; expected ({len(rows)}, 1)")
        return logits[:, 0]

    def score_token_ids(self, policy_tokenizer: Any, prompt_ids: Sequence[Any], completion_ids: Sequence[Any],
                        device: Union[str, torch.device, None] = None,
                        skip_special_tokens: bool = True) -> torch.Tensor:
        """Decode the policy's token ids (each a list or 1-D tensor) with ``policy_tokenizer`` and score them.

        ``device`` defaults to that of the first id tensor (CPU for lists). The completion's text is what decoding
        ``prompt + completion`` adds after the decoded prompt (so word boundaries come out as the policy saw them),
        or the completion decoded alone where that is not a continuation; with ``skip_special_tokens`` (default)
        pads and other special tokens are dropped.
        """
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"RewardModel.score_token_ids: {len(prompt_ids)} prompt_ids but "
                             f"{len(completion_ids)} completion_ids")
        if device is None:
            tensors = [t for t in (*prompt_ids, *completion_ids) if isinstance(t, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")

        def decode(ids: List[int]) -> str:
            return policy_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        prompts, completions = [], []
        for p, c in zip(prompt_ids, completion_ids):
            p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            c = c.tolist() if isinstance(c, torch.Tensor) else list(c)
            prompt, full = decode(p), decode(p + c)
            prompts.append(prompt)
            completions.append(full[len(prompt):] if full.startswith(prompt) else decode(c))
        return self.score(prompts, completions, device=device)
