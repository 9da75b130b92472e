"""VAR in ``FastPrefDPOTrainer`` as the paper's Alg. 1 (cross pairs with a reward model, fastpref/integrations/_trl_var.py):
one trainer step (loss, head and backbone gradients) equals a hand-written Alg. 1 with full-logits reference
log-probs, in float64; the reward model's transformers path; the errors."""
from __future__ import annotations

import math

import pytest
import torch
from _trl_fixtures import SPECIALS, WORDS, dpo_config, one_batch, one_thread, preference_rows, tiny_llama, tiny_tokenizer  # noqa: F401

from fastpref.integrations.reward import RewardModel
from fastpref.integrations.trl import FastPrefDPOTrainer

HEAD, BACKBONE = "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"


def word_reward(prompts, completions):
    """A reward that depends on the prompt and the completion, so that r(x_i, y_j) varies with i and j."""
    out = []
    for p, c in zip(prompts, completions):
        pw, cw = [int(w[1:]) for w in p.split()], [int(w[1:]) for w in c.split()]
        out.append(0.4 * sum((a - b) % 5 for a in pw for b in cw) / (len(pw) * len(cw)) + 0.2 * len(cw))
    return out


def tiny_classifier(seed=5):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=None, num_labels=1)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).double().eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_trainer(tmp_path, tok, data, loss_kwargs, **options):
    config = options.pop("config", {})
    policy, ref = tiny_llama(seed=0).double(), tiny_llama(seed=1).double()
    return FastPrefDPOTrainer(model=policy, ref_model=ref, args=dpo_config(tmp_path, **config), train_dataset=data,
                              processing_class=tok, fastpref_loss="var", fastpref_loss_kwargs=loss_kwargs, **options)


def sequence_logp(model, prompt_ids, response_ids):
    """log pi(response | prompt) from the model's full logits, one unpadded sequence."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    p = len(prompt_ids)
    return sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1]))


def algorithm_1(policy, ref, pairs, rewards, beta, normalize):
    """Alg. 1 / Eqs. 9-10 by hand: pairs (prompt_ids, response_ids) i = 1..S, rewards [S, S] = r(x_i, y_j)."""
    s = len(pairs)
    with torch.no_grad():
        ref_logps = torch.stack([torch.stack([sequence_logp(ref, pairs[i][0], pairs[j][1]) for j in range(s)])
                                 for i in range(s)])
    logps = torch.stack([sequence_logp(policy, p, r) for p, r in pairs])
    log_z = torch.logsumexp(rewards / beta + ref_logps, dim=1) - math.log(s)  # Eq. 9, line 5
    log_w = torch.diagonal(rewards) / beta - log_z
    w = (s * torch.softmax(log_w, dim=0) if normalize == "self" else torch.exp(log_w)).detach()
    return -(w * logps).mean(), w  # line 8 (minimized)


def batch_pairs(trainer, data, rows, responses):
    """The S (prompt ids, response ids) of the first ``rows`` examples and their texts from the raw dataset."""
    ex = [trainer.train_dataset[i] for i in range(rows)]
    keys = ["chosen"] + (["rejected"] if responses == "both" else [])
    pairs = [(e["prompt_ids"], e[f"{k}_ids"]) for k in keys for e in ex]
    texts = [(data[i]["prompt"], data[i][k]) for k in keys for i in range(rows)]
    return pairs, texts


def hand_step(trainer, data, rows, responses, score, beta, normalize):
    """(loss, {HEAD, BACKBONE} gradients, rewards, weights) of the hand-written Alg. 1 on the trainer's first
    batch."""
    pairs, texts = batch_pairs(trainer, data, rows, responses)
    s = len(pairs)
    flat = [(texts[i][0], texts[j][1]) for i in range(s) for j in range(s)]
    rewards = score([p for p, _ in flat], [c for _, c in flat]).view(s, s).double()
    policy = tiny_llama().double()  # a plain copy (the trainer's model has its forward patched in place)
    policy.load_state_dict(trainer.model.state_dict())
    loss, weights = algorithm_1(policy, trainer.ref_model, pairs, rewards, beta, normalize)
    loss.backward()
    params = dict(policy.named_parameters())
    return loss.detach(), {n: params[n].grad for n in (HEAD, BACKBONE)}, rewards, weights


def float32_scores(fn):
    return lambda p, c: torch.tensor(fn(p, c), dtype=torch.float32)  # RewardModel returns float32 scores


@pytest.mark.parametrize("responses,normalize,chunk,padding_free,eager", [
    ("chosen", "self", 1, False, False),
    ("both", "none", 2, True, False),
    ("both", "self", 3, False, True),
])
def test_cross_pair_step_equals_algorithm_1(tmp_path, tok, responses, normalize, chunk, padding_free, eager):
    beta, rows = 0.5, 4
    data = preference_rows(6, seed=3)
    calls = []

    def reward(prompts, completions):
        calls.append(len(prompts))
        return word_reward(prompts, completions)

    trainer = make_trainer(tmp_path, tok, data.remove_columns(["chosen_reward", "rejected_reward"]),
                           dict(beta=beta, normalize=normalize), reward_model=reward, var_responses=responses,
                           var_prompts_per_chunk=chunk, fastpref_eager=eager, config=dict(padding_free=padding_free))
    assert trainer.var_pairs == "cross" and isinstance(trainer.fastpref_reward_model, RewardModel)
    ref_calls = []
    trainer.ref_model.model.register_forward_hook(lambda mod, args, kwargs, out: ref_calls.append(
        out.last_hidden_state.shape[:2]), with_kwargs=True)
    loss, grads, metrics = one_batch(trainer, rows)

    s = rows * (2 if responses == "both" else 1)
    assert calls == [rows * s]  # r(x_i, y_j) once per distinct prompt i and response j
    assert len(ref_calls) == math.ceil(rows / chunk)  # the P x S reference sequences, chunk prompts per forward
    if not padding_free:
        assert [n for n, _ in ref_calls] == [min(chunk, rows - i) * s for i in range(0, rows, chunk)]
    want_loss, want_grads, rewards, weights = hand_step(trainer, data, rows, responses, float32_scores(word_reward),
                                                        beta, normalize)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    for name in (HEAD, BACKBONE):
        assert want_grads[name].abs().max() > 0
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    ess = float(weights.sum() ** 2 / (weights ** 2).sum())  # logged as in the diagonal form
    assert metrics["weights"] == pytest.approx(float(weights.mean()), rel=1e-6)
    assert metrics["effective_sample_size"] == pytest.approx(ess, rel=1e-6) and 1.05 < ess < s - 0.05
    # the cross pairs matter: the diagonal form's weights (r_ii only) give another loss on this batch
    diag = make_trainer(tmp_path / "d", tok, data.map(lambda e, i: {"chosen_reward": 0.0, "rejected_reward": 0.0},
                                                      with_indices=True), dict(beta=beta, normalize="self"),
                        var_responses=responses)
    assert not torch.isclose(rewards[0], rewards[1]).all()
    assert diag.var_pairs == "diagonal" and abs(float(one_batch(diag, rows)[0]) - float(loss)) > 1e-3


@pytest.mark.parametrize("max_batch_tokens", [None, 24])
def test_sequence_classification_reward_model(tmp_path, tok, max_batch_tokens):
    """reward_model=(model, tokenizer), or a RewardModel that scores in small chunks: the same step as Alg. 1
    with the classifier's own scores of each (prompt, response) text."""
    beta, rows = 1.0, 3
    data = preference_rows(4, seed=5)
    clf = tiny_classifier()
    reward = (clf, tiny_tokenizer()) if max_batch_tokens is None else \
        RewardModel(clf, tiny_tokenizer(), max_batch_tokens=max_batch_tokens)
    trainer = make_trainer(tmp_path, tok, data, dict(beta=beta), reward_model=reward, var_responses="chosen")
    assert trainer.fastpref_reward_model.model is clf and trainer.var_pairs == "cross"
    loss, grads, _ = one_batch(trainer, rows)

    def own_scores(prompts, completions):
        with torch.no_grad():
            return torch.stack([clf(input_ids=torch.tensor([tok(p + c)["input_ids"]])).logits[0, 0]
                                for p, c in zip(prompts, completions)]).float()

    want_loss, want_grads, rewards, _ = hand_step(trainer, data, rows, "chosen", own_scores, beta, "self")
    assert rewards.std() > 1e-3
    torch.testing.assert_close(loss, want_loss, rtol=1e-7, atol=1e-9)  # the scores are float32
    for name in (HEAD, BACKBONE):
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-6, atol=1e-9, msg=name)


def test_errors(tmp_path, tok):
    data = preference_rows(4)
    plain = data.remove_columns(["chosen_reward", "rejected_reward"])
    clf = tiny_classifier()

    def build(dataset=plain, loss_kwargs=None, **options):
        return make_trainer(tmp_path, tok, dataset, loss_kwargs or dict(beta=1.0), **options)

    with pytest.raises(ValueError, match=r"reward_model: a LlamaForSequenceClassification module needs its own "
                                         r"tokenizer; pass reward_model=\(model, tokenizer\)"):
        build(reward_model=clf)
    with pytest.raises(ValueError, match="reward_model: the model's tokenizer is None"):
        build(reward_model=(clf, None))
    with pytest.raises(TypeError, match="reward_model: a tuple must be"):
        build(reward_model=(clf, tok, 1))
    with pytest.raises(TypeError, match="reward_model must be a RewardModel"):
        build(reward_model="rm")
    clf2 = tiny_classifier()
    clf2.config.num_labels = 2
    with pytest.raises(ValueError, match="reward_model: RewardModel: model.config.num_labels must be 1"):
        build(reward_model=(clf2, tok))
    with pytest.raises(ValueError, match=r"var_pairs='cross' \(VAR's Alg. 1\) needs reward_model="):
        build(var_pairs="cross")
    with pytest.raises(ValueError, match="var_pairs must be one of"):
        build(var_pairs="full", reward_model=word_reward)
    with pytest.raises(ValueError, match="var_responses must be one of"):
        build(var_responses="rejected", reward_model=word_reward)
    with pytest.raises(ValueError, match="var_prompts_per_chunk must be a positive int"):
        build(var_prompts_per_chunk=0, reward_model=word_reward)
    with pytest.raises(ValueError, match="at least 2 prompts per micro-batch.*per_device_train_batch_size=1"):
        build(reward_model=word_reward, config=dict(per_device_train_batch_size=1))
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        build(reward_model=word_reward, config=dict(precompute_ref_log_probs=True))
    with pytest.raises(ValueError, match="var_pairs='diagonal' .* would not use reward_model"):
        build(data, var_pairs="diagonal", reward_model=word_reward)
    with pytest.raises(ValueError, match="chosen_reward"):  # the diagonal form still needs its columns
        build()
    with pytest.raises(ValueError, match="var_pairs applies to fastpref_loss='var'"):
        FastPrefDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=dpo_config(tmp_path), train_dataset=data,
                           processing_class=tok, fastpref_loss="dpo", var_pairs="cross")

    trainer = build(reward_model=word_reward)
    one = trainer.data_collator([trainer.train_dataset[0]])
    with pytest.raises(ValueError, match="at least 2 prompts per micro-batch .* got 1; .*dataloader_drop_last=True"):
        trainer.compute_loss(trainer.model, one)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch["input_ids"][2, 0] = (batch["input_ids"][0, 0] + 1) % len(WORDS)  # a rejected row's prompt cut differently
    with pytest.raises(ValueError, match="row 2 .* has another prompt than its chosen row"):
        trainer.compute_loss(trainer.model, batch)
    # with another loss the reward model is only stored (for other recipes)
    dpo = FastPrefDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=dpo_config(tmp_path), train_dataset=data,
                             processing_class=tok, fastpref_loss="dpo", reward_model=word_reward)
    assert dpo.fastpref_reward_model.score(["w1"], [" w2"]).shape == (1,) and dpo.var_pairs == "diagonal"
