"""FastPrefDPOTrainer resume: 2 steps + checkpoint + a new trainer resumed for 2 more steps equals 4 straight steps
(parameters and logged metrics), the loss state (alpha-DPO's EMA buffers, MC-PO's generator, SPO's online samples,
OnMC-PO's generated groups)
being saved with the checkpoint; without it the alpha-DPO run differs."""
import os

import pytest
import torch
from transformers import TrainerCallback

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import dpo_config, one_thread, preference_rows, tiny_llama, tiny_tokenizer  # noqa: E402,F401

from fastpref.integrations._trl_state import STATE_NAME  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402

CASES = {
    "alpha_dpo": dict(fastpref_loss_kwargs=dict(beta=2.0)),
    "mcpo": dict(fastpref_loss_kwargs=dict(beta=0.5)),
    "mcpo-global-rng": dict(fastpref_loss_kwargs=dict(beta=0.5)),  # draws from torch's RNG, which HF restores
    "spo": dict(fastpref_loss_kwargs=dict(alpha=0.01, kl_coef=0.1), spo_num_samples=2, spo_resample_every=3,
                spo_max_new_tokens=4),
    # OnMC-PO over 8 prompts: steps 2 and 3 meet the prompts of steps 0 and 1 again within the one segment, so they
    # train on the cached groups, which the checkpoint must carry
    "mcpo-online": dict(fastpref_loss_kwargs=dict(beta=0.5), mcpo_online=True, mcpo_num_generations=3,
                        mcpo_regenerate_every=4, mcpo_max_new_tokens=4),
}
# per-run wall-clock entries of the log, not training quantities
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class _StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (the checkpoint of that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _trainer(tok, out, case, stop_at=None):
    """A trainer built from scratch (fresh models, data, loss module); SGD, fixed data seed, checkpoint at step 2."""
    extra, loss = dict(CASES[case]), case.split("-")[0]
    if case == "mcpo":  # a loss-owned generator: its state must travel with the checkpoint
        extra["fastpref_loss_kwargs"] = dict(extra["fastpref_loss_kwargs"], generator=torch.Generator().manual_seed(3))
    rows, candidates = 16, 2 if case in ("mcpo", "mcpo-global-rng") else 0
    if case == "mcpo-online":
        rows, extra["reward_model"] = 8, _reward
    args = dpo_config(out, max_steps=4, optim="sgd", learning_rate=0.05, per_device_train_batch_size=4,
                      save_strategy="steps", save_steps=2, data_seed=0)
    return FastPrefDPOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=args,
                              train_dataset=preference_rows(rows, candidates=candidates),
                              processing_class=tok, fastpref_loss=loss,
                              callbacks=None if stop_at is None else [_StopAt(stop_at)], **extra)


def _reward(prompts, completions):
    """A deterministic reward (OnMC-PO ranks its generations with it): longer completions score lower."""
    return [-float(len(c.split())) + 0.01 * sum(map(len, c.split())) for c in completions]


def _logs(trainer):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in trainer.state.log_history if "loss" in h]


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _resumed(tok, tmp_path, loss, drop_state=False):
    first = _trainer(tok, tmp_path / "split", loss, stop_at=2)
    first.train()
    ckpt = tmp_path / "split" / "checkpoint-2"
    assert (ckpt / STATE_NAME).is_file()
    if drop_state:
        os.remove(ckpt / STATE_NAME)
    second = _trainer(tok, tmp_path / "split", loss)
    if drop_state:
        with pytest.warns(UserWarning, match=STATE_NAME):
            second.train(resume_from_checkpoint=str(ckpt))
    else:
        second.train(resume_from_checkpoint=str(ckpt))
    return second


@pytest.mark.parametrize("loss", sorted(CASES))
def test_resume_equals_uninterrupted_run(tok, tmp_path, loss):
    straight = _trainer(tok, tmp_path / "straight", loss)
    straight.train()
    resumed = _resumed(tok, tmp_path, loss)
    logs, logs_resumed = _logs(straight), _logs(resumed)
    assert [h["step"] for h in logs] == [h["step"] for h in logs_resumed] == [1, 2, 3, 4]
    for h, r in zip(logs, logs_resumed):
        assert h.keys() == r.keys()
        for key in h:
            assert r[key] == pytest.approx(h[key], rel=1e-6, abs=1e-7), (h["step"], key)
    params = _params(resumed)
    for name, p in _params(straight).items():
        torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-7, msg=name)
    if loss == "alpha_dpo":
        assert int(resumed.fastpref_loss_fn.num_updates) == int(straight.fastpref_loss_fn.num_updates) == 4
    if loss == "mcpo-online":
        assert resumed._onmcpo_cache.keys() == straight._onmcpo_cache.keys() and len(straight._onmcpo_cache) == 8
        for key, (segment, group) in straight._onmcpo_cache.items():
            assert resumed._onmcpo_cache[key][0] == segment == 0
            assert all(torch.equal(a, b) for a, b in zip(resumed._onmcpo_cache[key][1], group))
    if loss == "spo":
        assert resumed._spo_cache[0] == straight._spo_cache[0] == 3  # drawn at step 0, resampled at step 3
        assert len(resumed._spo_cache[1]) == len(straight._spo_cache[1]) == 1  # one row set per micro-batch
        for a, b in zip(resumed._spo_cache[1][0], straight._spo_cache[1][0]):
            assert torch.equal(a, b)


def test_resume_without_loss_state_differs(tok, tmp_path):
    """The test above can fail: without the saved state alpha-DPO's running statistics restart and the run moves."""
    straight = _trainer(tok, tmp_path / "straight", "alpha_dpo")
    straight.train()
    resumed = _resumed(tok, tmp_path, "alpha_dpo", drop_state=True)
    assert int(resumed.fastpref_loss_fn.num_updates) == 2  # restarted at step 2
    diff = max((p - q).abs().max().item() for p, q in zip(_params(resumed).values(), _params(straight).values()))
    assert diff > 1e-5
    assert _logs(resumed)[-1]["loss"] != pytest.approx(_logs(straight)[-1]["loss"], rel=1e-6, abs=1e-7)


def test_state_round_trip_rejects_other_loss(tok, tmp_path):
    """A state file of another loss (other buffers) is refused with a message naming the file."""
    alpha = _trainer(tok, tmp_path / "a", "alpha_dpo")
    mcpo = _trainer(tok, tmp_path / "m", "mcpo")
    with pytest.raises(ValueError, match="loss buffers"):
        mcpo.load_fastpref_state_dict(alpha.fastpref_state_dict())
