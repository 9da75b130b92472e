"""Offline toy parts for the README's end-to-end recipes (no download, CPU, seconds): a word-level tokenizer, a tiny
Llama policy, a tiny sequence-classification reward model and a preference dataset whose chosen response continues
the prompt's words ("w3 w4" after "w1 w2") while the rejected one is random words.

Only for examples and tests; nothing here is tuned for real training.
"""
from __future__ import annotations

import random
from typing import Any

import torch

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<unk>", "</s>"]


def toy_tokenizer() -> Any:
    """A whitespace word-level fast tokenizer over ``w0 .. w39`` (pad 0, unk 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def _llama_config(**extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, eos_token_id=2, bos_token_id=None, **extra)


def toy_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny ``LlamaForCausalLM`` (2 layers, hidden 32, vocabulary 43) with weights from ``seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config()).float()


def toy_reward_model(seed: int = 0) -> torch.nn.Module:
    """A tiny ``LlamaForSequenceClassification`` (one label) with weights from ``seed``: an untrained scorer, enough
    to run the reward-model paths (its scores are arbitrary but deterministic)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_llama_config(num_labels=1)).float().eval()


def toy_preferences(n: int = 8, seed: int = 0, candidates: int = 0) -> Any:
    """A ``datasets.Dataset`` of ``n`` rows: ``prompt``, ``chosen`` (the prompt's words shifted by one),
    ``rejected`` (random words), ``chosen_reward`` / ``rejected_reward`` and, with ``candidates`` > 0, a
    ``candidates`` list (random responses; ``rejected`` is the first)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict = {"prompt": [], "chosen": [], "rejected": [], "chosen_reward": [], "rejected_reward": []}
    if candidates:
        rows["candidates"] = []

    def text(ws):
        return " ".join(WORDS[w] for w in ws)

    for _ in range(n):
        prompt = [rng.randrange(len(WORDS)) for _ in range(rng.randint(3, 5))]
        chosen = [(w + 1) % len(WORDS) for w in prompt][: rng.randint(2, 4)]
        rows["prompt"].append(text(prompt))
        rows["chosen"].append(" " + text(chosen))
        rows["rejected"].append(" " + text([rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 4))]))
        rows["chosen_reward"].append(1.0 + rng.random())
        rows["rejected_reward"].append(rng.random() - 1.0)
        if candidates:
            cands = [" " + text([rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 4))])
                     for _ in range(candidates)]
            rows["candidates"].append(cands)
            rows["rejected"][-1] = cands[0]
    return Dataset.from_dict(rows)
