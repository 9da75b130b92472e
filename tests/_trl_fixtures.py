"""Offline tiny model, tokenizer and preference data for the integration tests (no downloads)."""
from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (and stalls on a busy machine).
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

from fastpref.integrations.toy import SPECIALS, WORDS, toy_preferences, toy_tokenizer  # noqa: E402

#: the word-level tokenizer the README's recipes use (fastpref.integrations.toy)
tiny_tokenizer = toy_tokenizer


def tiny_llama(seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0, eos_token_id=2,
                         bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def tiny_scaled_lm(family: str, seed: int = 0):
    """A tiny causal LM whose config maps its logits elementwise: ``"granite"`` divides them by
    ``logits_scaling`` (a temperature), ``"gemma2"`` soft-caps them (``final_logit_softcapping``)."""
    import transformers

    common = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=2, bos_token_id=None)
    if family == "granite":
        config, cls = transformers.GraniteConfig(logits_scaling=4.0, **common), transformers.GraniteForCausalLM
    elif family == "gemma2":
        config = transformers.Gemma2Config(final_logit_softcapping=1.5, head_dim=8, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(config).float()


def tiny_mixtral(seed: int = 0):
    """A tiny Mixture-of-Experts causal LM (its config declares a router auxiliary loss coefficient)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                           num_experts_per_tok=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
                           bos_token_id=None)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).float()


def preference_rows(n: int = 8, seed: int = 0, candidates: int = 0):
    """Prompts of 3-5 words; chosen = the prompt's words shifted by one, rejected = random words
    (:func:`fastpref.integrations.toy.toy_preferences`)."""
    return toy_preferences(n, seed, candidates)


def dpo_config(tmp_path, **overrides):
    from trl import DPOConfig

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                   report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                   logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0, beta=0.1,
                   disable_dropout=True, lr_scheduler_type="constant", warmup_steps=0)
    options.update(overrides)
    return DPOConfig(**options)


def unpaired_rows(n: int = 8, seed: int = 0, desirable_every: int = 3):
    """Unpaired KTO data (prompt, completion, label): prompts of 3-5 words; a desirable completion is the prompt's
    words shifted by one, an undesirable one random words. Every ``desirable_every``-th row is undesirable, so the
    labels are unbalanced and batches mix both."""
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "label": []}
    text = lambda ws: " ".join(WORDS[w] for w in ws)  # noqa: E731
    for i in range(n):
        prompt = [rng.randrange(len(WORDS)) for _ in range(rng.randint(3, 5))]
        desirable = i % desirable_every != desirable_every - 1
        if desirable:
            completion = [(w + 1) % len(WORDS) for w in prompt][: rng.randint(2, 4)]
        else:
            completion = [rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 4))]
        rows["prompt"].append(text(prompt))
        rows["completion"].append(" " + text(completion))
        rows["label"].append(desirable)
    from datasets import Dataset

    return Dataset.from_dict(rows)


def kto_config(tmp_path, **overrides):
    from trl import KTOConfig

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                   report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                   logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0, beta=0.1,
                   disable_dropout=True, lr_scheduler_type="constant", warmup_steps=0)
    options.update(overrides)
    return KTOConfig(**options)


def one_batch(trainer, rows: int = 4, seed=None):
    """``(loss, gradients by parameter name, last logged metrics)`` of one training-mode ``compute_loss`` on the
    first ``rows`` examples of ``trainer.train_dataset``; gradients are cleared again afterwards. ``seed`` fixes
    torch's global RNG first (MC-PO's negative sampling)."""
    trainer.model.train()
    trainer.model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    if seed is not None:
        torch.manual_seed(seed)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}
