"""FastPrefKTOTrainer against TRL's own KTOTrainer: one batch's loss, gradients and every logged metric, and the
parameters after two SGD steps, at fp32 tolerance; the options it refuses."""
import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import kto_config, one_thread, tiny_llama, tiny_mixtral, tiny_tokenizer, unpaired_rows  # noqa: E402,F401,I001
from trl import KTOTrainer  # noqa: E402

from fastpref.integrations.kto import FastPrefKTOTrainer  # noqa: E402

#: TRL's metrics that need full-vocabulary reductions of the logits (the op's extra outputs).
VOCAB_METRICS = {"entropy", "logits/chosen", "logits/rejected"}
#: Log entries that are not the loss's (timing, schedule).
NOT_LOSS_KEYS = {"grad_norm", "epoch", "step", "learning_rate", "eval_runtime", "eval_samples_per_second",
                 "eval_steps_per_second"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sharp_reference(seed: int = 0, scale: float = 3.0):
    """The policy's weights with a sharper LM head: its log-probs of the (random-looking) mismatched completions
    are lower than the policy's, so TRL's clamped KL estimate z0 is positive and enters the loss."""
    ref = tiny_llama(seed=seed)
    with torch.no_grad():
        ref.lm_head.weight.mul_(scale)
    return ref


def _pair(tok, tmp_path, *, ref="sharp", data=None, fastpref_kwargs=None, **config):
    """A TRL KTOTrainer and a FastPrefKTOTrainer from identical weights and data. ``ref``: ``"sharp"``
    (:func:`sharp_reference`), ``"other"`` (another random model) or ``None`` (no ref_model)."""
    policy = tiny_llama(seed=0)
    reference = {"sharp": sharp_reference, "other": lambda: tiny_llama(seed=1), None: lambda: None}[ref]()
    data = unpaired_rows(8) if data is None else data
    trainers = []
    for cls, extra in ((KTOTrainer, {}), (FastPrefKTOTrainer, dict(fastpref_kwargs or {}))):
        trainers.append(cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                            args=kto_config(tmp_path / cls.__name__, **config), train_dataset=data,
                            processing_class=tok, **extra))
    return trainers


def _loss_grads_metrics(trainer, rows=range(4)):
    trainer.model.train()
    trainer.model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same_step(trl_trainer, ours, rows=range(4)):
    """One batch: same loss, gradients (to 1e-6 of the largest) and every metric TRL logs; returns TRL's metrics."""
    loss_t, grads_t, metrics_t = _loss_grads_metrics(trl_trainer, rows)
    loss_f, grads_f, metrics_f = _loss_grads_metrics(ours, rows)
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-5, atol=1e-7)
    assert grads_f.keys() == grads_t.keys() and len(grads_t) > 0
    scale = max(g.abs().max().item() for g in grads_t.values())
    assert scale > 0
    for name in grads_t:
        torch.testing.assert_close(grads_f[name], grads_t[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert set(metrics_t) == set(metrics_f), f"TRL logs {sorted(metrics_t)}, we log {sorted(metrics_f)}"
    for key in metrics_f:
        assert metrics_f[key] == pytest.approx(metrics_t[key], rel=1e-5, abs=1e-6), key
    return metrics_t


@pytest.mark.parametrize("ref,config,ours", [
    ("sharp", dict(beta=0.5), {}),
    ("sharp", dict(beta=0.5, undesirable_weight=1.5), dict(fastpref_eager=True)),
    ("other", dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.6, max_length=7,
                   gradient_checkpointing=True), {}),
    ("sharp", dict(precompute_ref_log_probs=True, beta=0.5, undesirable_weight=2.0), {}),
    (None, dict(precompute_ref_log_probs=True, beta=0.5), {}),
    ("other", dict(loss_type="apo_zero_unpaired", beta=0.5, desirable_weight=0.8), {}),
])
def test_loss_grads_and_metrics_match_trl(tok, tmp_path, ref, config, ours):
    """``ours``: the trainer's own options (``fastpref_eager``: the eager twin, full logits)."""
    trl_trainer, ours = _pair(tok, tmp_path, ref=ref, fastpref_kwargs=ours, **config)
    metrics = assert_same_step(trl_trainer, ours)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
            "num_tokens"} | VOCAB_METRICS <= metrics.keys()
    if config.get("loss_type") == "apo_zero_unpaired":
        assert "KL_input_ids" not in ours.data_collator([ours.train_dataset[0], ours.train_dataset[1]])
        assert metrics["kl"] == 0.0
    elif ref == "sharp":
        assert metrics["kl"] > 1e-3  # the clamped estimate is positive: z0 really shifts the loss
    if ref is None:
        assert ours.ref_model is None  # precomputed from the initial policy


def test_one_sided_batch_matches_trl(tok, tmp_path):
    """A batch of desirable examples only: no rejected metrics, no margin (as TRL)."""
    trl_trainer, ours = _pair(tok, tmp_path, beta=0.5)
    labels = trl_trainer.train_dataset["label"]
    rows = [i for i, label in enumerate(labels) if label][:2]
    metrics = assert_same_step(trl_trainer, ours, rows)
    assert "rewards/chosen" in metrics and "rewards/rejected" not in metrics and "rewards/margins" not in metrics


@pytest.mark.parametrize("config", [dict(), dict(precompute_ref_log_probs=True, desirable_weight=1.5)])
def test_two_sgd_steps_match_trl(tok, tmp_path, config):
    """Two full optimizer steps through Trainer.train() (SGD): same parameters, logged losses and metrics."""
    trl_trainer, ours = _pair(tok, tmp_path, max_steps=2, optim="sgd", learning_rate=0.5, beta=0.5, **config)
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    head_calls = []
    ours.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    trl_trainer.train()
    ours.train()
    assert head_calls == []  # the LM head module never ran: no [tokens x vocab] logits
    moved = 0.0
    for (name, p_t), (_, p_f) in zip(trl_trainer.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p_f, p_t, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (p_f - before[name]).abs().max().item())
    assert moved > 1e-3  # the steps really changed the weights
    logs_t = [h for h in trl_trainer.state.log_history if "loss" in h]
    logs_f = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs_f) == 2
    for h_t, h_f in zip(logs_t, logs_f):
        assert set(h_f) == set(h_t)
        for key in set(h_t) - NOT_LOSS_KEYS:
            assert h_f[key] == pytest.approx(h_t[key], rel=1e-5, abs=1e-6), key


def test_bf16_mixed_precision_follows_trl(tok, tmp_path):
    """bf16 autocast: the head runs in bf16 like TRL's (and the model's), the reference forward under the same
    autocast; two steps agree with TRL to bf16 rounding."""
    trl_trainer, ours = _pair(tok, tmp_path, max_steps=2, optim="sgd", learning_rate=0.5, beta=0.5, bf16=True)
    trl_trainer.train()
    ours.train()
    logs_t = [h for h in trl_trainer.state.log_history if "loss" in h]
    logs_f = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs_f) == 2
    for h_t, h_f in zip(logs_t, logs_f):
        assert h_f["loss"] == pytest.approx(h_t["loss"], rel=1e-3)
        assert h_f["kl"] == pytest.approx(h_t["kl"], rel=1e-2) and h_t["kl"] > 0.1


def test_eval_matches_trl(tok, tmp_path):
    """evaluate() runs the same loss and metrics (eval_ prefix)."""
    trl_trainer, ours = _pair(tok, tmp_path, beta=0.5, per_device_eval_batch_size=4)
    eval_data = unpaired_rows(4, seed=3)
    out_t = trl_trainer.evaluate(eval_dataset=eval_data)
    out_f = ours.evaluate(eval_dataset=eval_data)
    assert set(out_f) == set(out_t)
    for key in set(out_t) - NOT_LOSS_KEYS:
        assert out_f[key] == pytest.approx(out_t[key], rel=1e-5, abs=1e-6), key
    assert "eval_kl" in out_f and "eval_loss" in out_f


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("config,kwargs,match", [
    (dict(loss_type="bco"), {}, "loss_type"),
    (dict(), dict(fastpref_loss_kwargs={"beta": 0.2}), "KTOConfig"),
    (dict(), dict(fastpref_loss_kwargs={"softcap": 2.0}), "softcap"),
])
def test_unsupported_options_raise(tok, tmp_path, config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastPrefKTOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=kto_config(tmp_path, **config),
                           train_dataset=unpaired_rows(8), processing_class=tok, **kwargs)


def test_moe_router_aux_loss_raises(tok, tmp_path):
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        FastPrefKTOTrainer(model=tiny_mixtral(seed=0), ref_model=tiny_mixtral(seed=1),
                           args=kto_config(tmp_path, router_aux_loss_coef=0.01), train_dataset=unpaired_rows(8),
                           processing_class=tok)
