"""FastPrefDPOTrainer is a drop-in for TRL 1.16's DPOTrainer: for every DPOConfig loss option (loss_type, lists
with loss_weights, f_divergence_type, label_smoothing, ld_alpha, use_weighting, beta), one batch gives TRL's
loss, gradients and every logged metric (entropy, logits/*, mean_token_accuracy, rewards/*, logps/*), and two
SGD steps give TRL's parameters; under bf16 mixed precision, the reference and the heads run under the policy's
autocast like TRL's. Tiny offline Llama, CPU, fp32 tolerance."""
import copy
import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import (  # noqa: E402,F401
    dpo_config,
    one_batch,
    one_thread,
    preference_rows,
    tiny_llama,
    tiny_tokenizer,
)
from trl import DPOTrainer  # noqa: E402

from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402

TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# the metrics TRL's DPOTrainer logs for every loss type (MoE aux_loss aside)
TRL_METRICS = {"entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
               "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _trainers(tok, tmp_path, trl_config=None, ours_config=None, ours_kwargs=None, **config):
    """TRL's DPOTrainer and ours from identical weights (the reference differs from the policy)."""
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    data = preference_rows(8)
    made = []
    for cls, extra, own in ((DPOTrainer, {}, trl_config), (FastPrefDPOTrainer, ours_kwargs or {}, ours_config)):
        args = dpo_config(tmp_path / cls.__name__, **{**config, **(own or {})})
        made.append(cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=data,
                        processing_class=tok, **extra))
    return made


def _assert_same_batch(trl_trainer, ours, rtol=1e-5):
    loss_t, grads_t, metrics_t = one_batch(trl_trainer)
    loss_f, grads_f, metrics_f = one_batch(ours)
    torch.testing.assert_close(loss_f, loss_t, rtol=rtol, atol=1e-6)
    assert grads_f.keys() == grads_t.keys() and grads_t
    scale = max(g.abs().max().item() for g in grads_t.values())
    assert scale > 0
    for name in grads_t:
        torch.testing.assert_close(grads_f[name], grads_t[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert TRL_METRICS <= metrics_t.keys()
    assert metrics_t.keys() <= metrics_f.keys(), metrics_t.keys() - metrics_f.keys()
    for key in metrics_t:
        assert metrics_f[key] == pytest.approx(metrics_t[key], rel=rtol, abs=1e-6), key
    return loss_t


# TRL refuses exo_pair without label smoothing (log 0); the EXO paper's 1e-3
CASES = [pytest.param(dict(loss_type=t, **(dict(label_smoothing=1e-3) if t == "exo_pair" else {})), id=t)
         for t in TRL_LOSS_TYPES] + [
    pytest.param(dict(loss_type=t, label_smoothing=0.2), id=f"{t}-smoothed")
    for t in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")] + [
    pytest.param(dict(f_divergence_type="forward_kl"), id="forward_kl"),
    pytest.param(dict(f_divergence_type="js_divergence"), id="js_divergence"),
    pytest.param(dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3), id="alpha_divergence"),
    pytest.param(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), id="mpo-list"),
    pytest.param(dict(ld_alpha=0.4), id="ld_alpha"),
    pytest.param(dict(ld_alpha=0.4, precompute_ref_log_probs=True), id="ld_alpha-precomputed"),
    pytest.param(dict(use_weighting=True), id="wpo"),
    pytest.param(dict(loss_type="discopop", discopop_tau=0.3), id="discopop-tau"),
]


@pytest.mark.parametrize("options", CASES)
def test_every_loss_option_matches_trl(tok, tmp_path, options):
    trl_trainer, ours = _trainers(tok, tmp_path, beta=0.5, **options)
    loss = _assert_same_batch(trl_trainer, ours)
    assert abs(loss.item() - math.log(2)) > 1e-4  # a real margin: the reference differs from the policy


def test_fastpref_ipo_logs_trl_rewards(tok, tmp_path):
    """fastpref_loss="ipo" (tau from DPOConfig.beta) is TRL's loss_type="ipo": loss, gradients and rewards/*."""
    trl_trainer, ours = _trainers(tok, tmp_path, beta=0.5, trl_config=dict(loss_type="ipo"),
                                  ours_kwargs=dict(fastpref_loss="ipo"))
    _assert_same_batch(trl_trainer, ours)


@pytest.mark.parametrize("options", [dict(), dict(loss_type=["sigmoid", "bco_pair", "sft"],
                                                  loss_weights=[0.8, 0.2, 1.0]), dict(use_weighting=True)],
                         ids=["sigmoid", "mpo-list", "wpo"])
def test_two_sgd_steps_match_trl(tok, tmp_path, options):
    trl_trainer, ours = _trainers(tok, tmp_path, beta=0.5, max_steps=2, optim="sgd", learning_rate=0.5, **options)
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    trl_trainer.train()
    ours.train()
    moved = 0.0
    for (name, p_t), (_, p_f) in zip(trl_trainer.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p_f, p_t, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (p_f - before[name]).abs().max().item())
    assert moved > 1e-4
    logs_t = [h for h in trl_trainer.state.log_history if "loss" in h]
    logs_f = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs_f) == len(logs_t) == 2
    for log_t, log_f in zip(logs_t, logs_f):
        for key in TRL_METRICS | {"loss"}:
            assert log_f[key] == pytest.approx(log_t[key], rel=1e-4, abs=1e-6), key


def test_eval_metrics_match_trl(tok, tmp_path):
    trl_trainer, ours = _trainers(tok, tmp_path, beta=0.5, per_device_eval_batch_size=4)
    data = preference_rows(4, seed=3)
    results = [t.evaluate(eval_dataset=data) for t in (trl_trainer, ours)]
    expected = {f"eval_{k}" for k in TRL_METRICS - {"num_tokens"}} | {"eval_loss"}
    assert expected <= results[0].keys() and expected <= results[1].keys()
    for key in expected:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-6), key


def _first_log(tok, tmp_path, cls, model, ref_model, bf16, **extra):
    args = dpo_config(tmp_path / f"{cls.__name__}-{bf16}", bf16=bf16, learning_rate=0.0)
    trainer = cls(model=model, ref_model=ref_model, args=args, train_dataset=preference_rows(8),
                  processing_class=tok, **extra)
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


def test_bf16_autocast_reference_without_ref_model_gives_log2(tok, tmp_path):
    """ref_model=None: TRL loads the reference from the policy's path; at step 1 policy and reference are the
    same model under the same bf16 autocast, so the loss is log 2 and no reward is positive."""
    path = tmp_path / "model"
    tiny_llama(seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    log = _first_log(tok, tmp_path, FastPrefDPOTrainer, str(path), None, True, fastpref_loss="dpo")
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log["rewards/accuracies"] == 0.0 and log["rewards/margins"] == 0.0


def test_bf16_error_no_worse_than_trl(tok, tmp_path):
    """Against each trainer's own fp32 run, the bf16-autocast loss and gradient norm of FastPrefDPOTrainer are no
    further off than TRL's (plus a bf16-sized slack)."""
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    errors = {}
    for cls, extra in ((DPOTrainer, {}), (FastPrefDPOTrainer, dict(fastpref_loss="dpo"))):
        logs = {bf16: _first_log(tok, tmp_path, cls, copy.deepcopy(policy), copy.deepcopy(ref), bf16, **extra)
                for bf16 in (False, True)}
        errors[cls] = {k: abs(logs[True][k] - logs[False][k]) for k in ("loss", "grad_norm", "logps/chosen")}
    for key, trl_error in errors[DPOTrainer].items():
        ours = errors[FastPrefDPOTrainer][key]
        assert ours <= trl_error + 2e-3 * (1 + abs(trl_error)), (key, ours, trl_error)


@pytest.mark.parametrize("loss,argument", [("simpo", "beta"), ("cpo", "beta"), ("dpop", "beta"), ("orpo", "orpo_lambda"),
                                           ("alpha_dpo", "beta"), ("mcpo", "beta"), ("var", "beta")])
def test_dpo_config_beta_reaches_every_loss_with_a_beta(tok, tmp_path, loss, argument):
    data = preference_rows(4, candidates=2 if loss == "mcpo" else 0)
    trainer = FastPrefDPOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
                                 args=dpo_config(tmp_path, beta=0.37), train_dataset=data, processing_class=tok,
                                 fastpref_loss=loss)
    assert getattr(trainer.fastpref_loss_fn, argument) == 0.37
    trainer = FastPrefDPOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
                                 args=dpo_config(tmp_path, beta=0.37), train_dataset=data, processing_class=tok,
                                 fastpref_loss=loss, fastpref_loss_kwargs={argument: 0.5})
    assert getattr(trainer.fastpref_loss_fn, argument) == 0.5  # fastpref_loss_kwargs win


@pytest.mark.parametrize("loss,config,match", [
    ("slic", dict(beta=0.3), "has no beta"),
    ("spo", dict(beta=0.3), "SPO has no beta"),
    ("simpo", dict(loss_type="hinge"), "DPO loss family"),
    ("cpo", dict(use_weighting=True), "use_weighting"),
    ("orpo", dict(ld_alpha=0.5), "ld_alpha"),
    ("ipo", dict(loss_type="hinge"), "loss_type='ipo'"),
    ("dpo", dict(loss_type="exo_pair"), "(?i)label.smoothing"),
])
def test_options_a_loss_cannot_honour_raise(tok, tmp_path, loss, config, match):
    with pytest.raises(ValueError, match=match):
        FastPrefDPOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=dpo_config(tmp_path, **config),
                           train_dataset=preference_rows(4), processing_class=tok, fastpref_loss=loss)
