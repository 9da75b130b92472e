"""The fastpref TRL trainers with a PEFT (LoRA) policy and ref_model=None, against TRL's own trainers on the same
setup: the reference is the adapter-disabled base model. An adapter on the LM head is refused (the fused head
reads the head's weight, which a LoRA layer leaves at the frozen base weight)."""
import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from _trl_fixtures import (  # noqa: E402,F401
    dpo_config,
    kto_config,
    one_batch,
    one_thread,
    preference_rows,
    tiny_llama,
    tiny_tokenizer,
    unpaired_rows,
)
from trl import DPOTrainer, KTOTrainer  # noqa: E402

from fastpref.integrations._trl_reference import check_peft_head, reference_head  # noqa: E402
from fastpref.integrations.kto import FastPrefKTOTrainer  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402

#: TRL metrics that need the op's vocabulary reductions (compared only where both trainers log them).
VOCAB_METRICS = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
DPO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "num_tokens"}
KTO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
               "num_tokens"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def lora(**overrides):
    """LoRA on the attention projections, with random (not zero) B so the adapted policy differs from the
    adapter-disabled reference from the first step on."""
    options = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                   task_type="CAUSAL_LM")
    options.update(overrides)
    return peft.LoraConfig(**options)


def _pair(kind, tok, tmp_path, peft_config, **config):
    """TRL's trainer and ours, each on a fresh copy of one base model with ``peft_config`` and no ref_model (TRL
    seeds the adapter's initialisation with ``args.seed``, so both adapters start equal)."""
    base = tiny_llama(seed=0)
    if kind == "dpo":
        classes, make_args, data = (DPOTrainer, FastPrefDPOTrainer), dpo_config, preference_rows(8)
        extra = dict(fastpref_loss="dpo")
    else:
        classes, make_args, data = (KTOTrainer, FastPrefKTOTrainer), kto_config, unpaired_rows(8)
        extra = {}
    return [cls(model=copy.deepcopy(base), ref_model=None, args=make_args(tmp_path / cls.__name__, **config),
                train_dataset=data, processing_class=tok, peft_config=copy.deepcopy(peft_config),
                **({} if cls in (DPOTrainer, KTOTrainer) else extra))
            for cls in classes]


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_same_batch(trl_trainer, ours, expected_metrics):
    loss_t, grads_t, metrics_t = one_batch(trl_trainer)
    loss_f, grads_f, metrics_f = one_batch(ours)
    assert abs(loss_t.item() - 0.6931) > 1e-3  # the adapter moved the policy off the reference
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-5, atol=1e-7)
    assert grads_f.keys() == grads_t.keys() and len(grads_t) > 0
    assert all("lora_" in n or "modules_to_save" in n for n in grads_t)  # only the adapter trains
    scale = max(g.abs().max().item() for g in grads_t.values())
    for name in grads_t:
        torch.testing.assert_close(grads_f[name], grads_t[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert expected_metrics <= metrics_f.keys() and expected_metrics <= metrics_t.keys()
    assert set(metrics_t) - VOCAB_METRICS <= set(metrics_f)
    for key in set(metrics_t) & set(metrics_f):
        assert metrics_f[key] == pytest.approx(metrics_t[key], rel=1e-5, abs=1e-6), key


def assert_same_training(trl_trainer, ours):
    """Two SGD steps through Trainer.train(): the same adapter parameters and logged losses; the base frozen."""
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    trl_trainer.train()
    ours.train()
    params_t, params_f = _trainable(trl_trainer), _trainable(ours)
    assert params_f.keys() == params_t.keys() and len(params_t) > 0
    for name in params_t:
        torch.testing.assert_close(params_f[name], params_t[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max((params_f[n] - before[n]).abs().max().item() for n in params_f) > 1e-3  # the adapter moved
    for name, p in ours.model.named_parameters():
        if name not in params_f:
            assert torch.equal(p, before[name]), name  # the base model stays frozen
    losses_t = [h["loss"] for h in trl_trainer.state.log_history if "loss" in h]
    losses_f = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(losses_f) == 2 and losses_f == pytest.approx(losses_t, rel=1e-5)


def test_dpo_lora_matches_trl(tok, tmp_path):
    trl_trainer, ours = _pair("dpo", tok, tmp_path, lora(), beta=0.5, max_steps=2, optim="sgd", learning_rate=0.5)
    assert ours.ref_model is None
    assert_same_batch(trl_trainer, ours, DPO_METRICS)
    assert_same_training(trl_trainer, ours)


def test_dpo_lora_with_a_trained_head_copy_matches_trl(tok, tmp_path):
    trl_trainer, ours = _pair("dpo", tok, tmp_path, lora(modules_to_save=["lm_head"]), beta=0.5, max_steps=2,
                              optim="sgd", learning_rate=0.5)
    assert_same_batch(trl_trainer, ours, DPO_METRICS)
    assert_same_training(trl_trainer, ours)


def test_reference_head_reads_the_original_of_a_trained_head_copy():
    """reference_head: with modules_to_save=["lm_head"] and no ref_model, the original head (not the trained copy),
    and the copy still requires grad once it is yielded."""
    model = peft.get_peft_model(tiny_llama(seed=0), lora(modules_to_save=["lm_head"]))
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    with reference_head(model, None) as (weight, bias):
        assert torch.equal(weight, head.original_module.weight) and bias is None
        assert not torch.equal(weight, head.modules_to_save["default"].weight)
        assert head.modules_to_save["default"].weight.requires_grad and not weight.requires_grad
    ref = tiny_llama(seed=1)
    with reference_head(model, ref) as (weight, _):
        assert torch.equal(weight, ref.lm_head.weight)


@pytest.mark.parametrize("peft_config", [lora(), lora(modules_to_save=["lm_head"])], ids=["lora", "lora+head_copy"])
def test_kto_lora_matches_trl(tok, tmp_path, peft_config):
    """KTO with LoRA and no ref_model; with modules_to_save=["lm_head"] the trained head copy is the policy's head
    and the original head the reference's (read with the adapter off), so the steps after the first still match."""
    trl_trainer, ours = _pair("kto", tok, tmp_path, peft_config, beta=0.5, max_steps=2, optim="sgd", learning_rate=0.5)
    assert ours.ref_model is None
    assert_same_batch(trl_trainer, ours, KTO_METRICS)
    assert_same_training(trl_trainer, ours)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_lora_on_the_lm_head_is_refused(tok, tmp_path, kind):
    """LoRA targeting lm_head: the fused head would read the frozen base weight and ignore the adapter. TRL's
    trainers refuse it in their constructor, and so do ours (they inherit it)."""
    with pytest.raises(ValueError, match="lm_head"):
        _pair(kind, tok, tmp_path, lora(target_modules=["q_proj", "v_proj", "lm_head"]))


def test_kto_refuses_prompt_learning(tok, tmp_path):
    """Prompt tuning prepends virtual tokens: the trainer refuses it at construction."""
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(NotImplementedError, match="FastPrefKTOTrainer does not support prompt-learning"):
        FastPrefKTOTrainer(model=tiny_llama(seed=0), args=kto_config(tmp_path), train_dataset=unpaired_rows(8),
                           processing_class=tok, peft_config=config)


def test_check_peft_head():
    """The fastpref check itself (independent of TRL's): an adapter on the head and prompt learning raise; LoRA
    elsewhere, modules_to_save=["lm_head"] and a plain model pass."""
    check_peft_head(tiny_llama(seed=0), "T")
    check_peft_head(peft.get_peft_model(tiny_llama(seed=0), lora()), "T")
    check_peft_head(peft.get_peft_model(tiny_llama(seed=0), lora(modules_to_save=["lm_head"])), "T")
    head_lora = peft.get_peft_model(tiny_llama(seed=0), lora(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="T does not support a PEFT adapter on the LM head"):
        check_peft_head(head_lora, "T")
    prompt = peft.get_peft_model(tiny_llama(seed=0), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    with pytest.raises(NotImplementedError, match="prompt-learning"):
        check_peft_head(prompt, "T")
