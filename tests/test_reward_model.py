"""``RewardModel`` (fastpref.integrations.reward): batched, chunked scoring equals a tiny sequence-classification
model's own one-pair-at-a-time scores; the callable path; truncation; the errors."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from _trl_fixtures import SPECIALS, WORDS, one_thread, tiny_tokenizer  # noqa: F401 (autouse fixture)

from fastpref.integrations.reward import RewardModel

PROMPTS = ["w1 w2 ", "w3 ", "w4 w5 w6 w7 w8 ", "w9 w10 ", "w11 ", "w12 w13 w14 "]
COMPLETIONS = ["w20", "w21 w22 w23 w24 w25 w26", "w27", "w28 w29 w30", "w31 w32", "w33 w34 w35 w36 w37"]


def tiny_classifier(dtype=torch.float64, num_labels=1, pad_token_id=0, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=pad_token_id, eos_token_id=2, bos_token_id=None,
                         num_labels=num_labels)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).to(dtype)


def alone(model, tokenizer, text, keep=None):
    """The model's own score of one text, unbatched and unpadded (its last ``keep`` tokens if given)."""
    ids = tokenizer(text)["input_ids"]
    ids = ids if keep is None else ids[-keep:]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0]


def record_batches(model):
    shapes = []
    model.register_forward_hook(lambda mod, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                with_kwargs=True)
    return shapes


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_batch_tokens", [1, 13, 20, 10_000])
def test_scores_equal_unbatched_fp64(side, max_batch_tokens):
    model, tok = tiny_classifier(), tiny_tokenizer()
    tok.padding_side = side
    shapes = record_batches(model)
    reward = RewardModel(model, tok, max_batch_tokens=max_batch_tokens)
    scores = reward.score(PROMPTS, COMPLETIONS)
    shapes = list(shapes)  # the reward model's batches only
    ref = torch.stack([alone(model, tok, p + c) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert scores.dtype == torch.float32 and scores.shape == (len(PROMPTS),) and not scores.requires_grad
    torch.testing.assert_close(scores, ref.float(), rtol=0, atol=1e-6)
    assert sum(rows for rows, _ in shapes) == len(PROMPTS)
    assert all(rows == 1 or rows * width <= max_batch_tokens for rows, width in shapes)
    if max_batch_tokens in (13, 20):  # groups of uneven size, padded rows included
        assert len({rows for rows, _ in shapes}) > 1 and any(rows > 1 for rows, _ in shapes)
    assert (len(shapes) == 1) == (max_batch_tokens == 10_000)


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_equal_unbatched_fp32(side):
    model, tok = tiny_classifier(torch.float32, seed=3), tiny_tokenizer()
    tok.padding_side = side
    scores = RewardModel(model, tok, max_batch_tokens=16).score(PROMPTS, COMPLETIONS)
    ref = torch.stack([alone(model, tok, p + c) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores, scores.mean().expand_as(scores))  # the pairs score differently


def test_eval_mode_restored_and_device():
    model, tok = tiny_classifier(), tiny_tokenizer()
    model.train()
    modes = []
    model.register_forward_hook(lambda mod, args, out: modes.append(mod.training))
    out = RewardModel(model, tok, device="cpu").score(PROMPTS[:2], COMPLETIONS[:2], device="cpu")
    assert modes and not any(modes) and model.training
    assert out.device == torch.device("cpu")


def test_truncation_keeps_the_end_silently(caplog):
    model, tok = tiny_classifier(), tiny_tokenizer()
    tok.model_max_length = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            scores = RewardModel(model, tok, max_batch_tokens=9).score(PROMPTS, COMPLETIONS)
    assert not caplog.records
    ref = torch.stack([alone(model, tok, p + c, keep=4) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(scores, ref.float(), rtol=0, atol=1e-6)
    full = torch.stack([alone(model, tok, p + c) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert not torch.allclose(scores, full.float(), atol=1e-4)  # truncation changed the long texts' scores
    assert RewardModel(model, tiny_tokenizer()).max_length == 64  # config.max_position_embeddings
    assert RewardModel(model, tok, max_length=2).max_length == 2


def test_empty_and_format_pair():
    model, tok = tiny_classifier(), tiny_tokenizer()
    empty = RewardModel(model, tok).score([], [], device="cpu")
    assert empty.shape == (0,) and empty.dtype == torch.float32
    swapped = RewardModel(model, tok, format_pair=lambda p, c: c + " " + p).score(PROMPTS[:3], COMPLETIONS[:3])
    ref = torch.stack([alone(model, tok, c + " " + p) for p, c in zip(PROMPTS[:3], COMPLETIONS[:3])])
    torch.testing.assert_close(swapped, ref.float(), rtol=0, atol=1e-6)


def test_score_token_ids_decodes_with_the_policy_tokenizer():
    model, tok = tiny_classifier(), tiny_tokenizer()
    policy_tok = tiny_tokenizer()
    prompt_ids = [torch.tensor(policy_tok(p.strip())["input_ids"]) for p in PROMPTS]
    completion_ids = [policy_tok(c)["input_ids"] + [policy_tok.pad_token_id] for c in COMPLETIONS]
    reward = RewardModel(model, tok, max_batch_tokens=12)
    scores = reward.score_token_ids(policy_tok, prompt_ids, completion_ids)
    torch.testing.assert_close(scores, reward.score(PROMPTS, COMPLETIONS), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 prompt_ids but 1 completion_ids"):
        reward.score_token_ids(policy_tok, prompt_ids[:2], completion_ids[:1])


def test_callable_scorer():
    def length_score(prompts, completions):
        return [float(len(c.split())) for c in completions]

    out = RewardModel(length_score).score(PROMPTS, COMPLETIONS)
    assert out.dtype == torch.float32
    assert out.tolist() == [float(len(c.split())) for c in COMPLETIONS]
    as_tensor = RewardModel(lambda p, c: torch.arange(len(p), dtype=torch.float64, requires_grad=True))
    assert as_tensor.score(PROMPTS, COMPLETIONS).tolist() == list(range(len(PROMPTS)))
    assert RewardModel(length_score).score([], []).shape == (0,)

    def wrong_shape(prompts, completions):
        return torch.zeros(len(prompts), 1)

    with pytest.raises(ValueError, match=r"wrong_shape returned shape \(6, 1\) for 6 pairs; expected \(6,\)"):
        RewardModel(wrong_shape).score(PROMPTS, COMPLETIONS)

    def not_numbers(prompts, completions):
        return {"a": 1}

    with pytest.raises(TypeError, match="not_numbers returned dict"):
        RewardModel(not_numbers).score(PROMPTS, COMPLETIONS)


def test_errors():
    model, tok = tiny_classifier(), tiny_tokenizer()
    with pytest.raises(ValueError, match="num_labels must be 1"):
        RewardModel(tiny_classifier(num_labels=2), tok)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        RewardModel(tiny_classifier(pad_token_id=None), tok)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        RewardModel(model)
    with pytest.raises(ValueError, match="tokenizer must be None"):
        RewardModel(lambda p, c: [0.0] * len(p), tok)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        RewardModel(model, tok, max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        RewardModel(model, tok, max_length=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or a callable"):
        RewardModel("not a model")
    reward = RewardModel(model, tok)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward.score(PROMPTS[:2], COMPLETIONS[:1])
    with pytest.raises(TypeError, match=r"completions\[1\] is int, not str"):
        reward.score(PROMPTS[:2], ["w1", 3])


def test_left_padding_with_absolute_positions():
    """GPT-2 adds learned absolute position embeddings: left-padded rows must count positions from their
    first real token (the position ids the reward model passes) to score as they would alone."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=len(SPECIALS) + len(WORDS), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                        pad_token_id=0, num_labels=1)
    torch.manual_seed(1)
    model, tok = GPT2ForSequenceClassification(config).double().eval(), tiny_tokenizer()
    tok.padding_side = "left"
    scores = RewardModel(model, tok, max_batch_tokens=10_000).score(PROMPTS, COMPLETIONS)
    ref = torch.stack([alone(model, tok, p + c) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(scores, ref.float(), rtol=0, atol=1e-6)
