"""Batch statistics over the effective batch (fastpref/integrations/_trl_window.py): one optimizer step of
FastPrefDPOTrainer is the same for (batch 4, accumulation 1), (batch 1, accumulation 4), (batch 2, accumulation 2)
and two DDP ranks with (batch 2, accumulation 1) or (batch 1, accumulation 2), for the losses whose statistic couples
the batch: alpha-DPO (margin EMA, one update per optimizer step) and SPO with gamma > 0 (Eq. 12's baseline)."""
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import dpo_config, one_thread, preference_rows, tiny_llama, tiny_tokenizer  # noqa: E402,F401

from fastpref.integrations import _trl_window  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402

CASES = {
    "alpha_dpo": dict(beta=2.0, alpha=0.5),
    "spo": dict(alpha=0.5, gamma=0.07, kl_coef=0.0),  # mu != 1: the baseline matters
}
ROWS, STEPS = 4, 2  # every step sees the whole dataset, so the data order cannot matter


def _train(loss: str, out, batch: int, accumulation: int) -> dict:
    """Parameters and loss state after STEPS SGD steps on the 4-pair dataset."""
    trainer = FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
        args=dpo_config(out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        max_steps=STEPS, optim="sgd", learning_rate=0.5),
        train_dataset=preference_rows(ROWS), processing_class=tiny_tokenizer(), fastpref_loss=loss,
        fastpref_loss_kwargs=CASES[loss])
    trainer.train()
    return dict(params={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                buffers={n: b.detach().clone() for n, b in trainer.fastpref_loss_fn.named_buffers()})


def _assert_same(got: dict, want: dict, what: str) -> None:
    """fp32 training: the micro-batches pad and sum differently, so equal up to fp32 rounding."""
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")
    for name, b in want["buffers"].items():
        torch.testing.assert_close(got["buffers"][name], b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what} {name}: {m}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference runs: the whole batch in one micro-batch on one process."""
    return {loss: _train(loss, tmp_path_factory.mktemp(loss), ROWS, 1) for loss in CASES}


@pytest.mark.parametrize("loss", sorted(CASES))
@pytest.mark.parametrize("batch,accumulation", [(1, 4), (2, 2)])
def test_accumulation_gives_the_whole_batch_step(single, loss, batch, accumulation, tmp_path):
    got = _train(loss, tmp_path, batch, accumulation)
    _assert_same(got, single[loss], f"{loss} batch {batch} x accumulation {accumulation}")
    moved = max((got["params"][n] - p).abs().max().item() for n, p in tiny_llama(seed=0).named_parameters())
    assert moved > 1e-3
    if loss == "alpha_dpo":
        assert int(got["buffers"]["num_updates"]) == STEPS  # one EMA update per optimizer step


def test_without_the_window_pass_the_split_changes_the_step(single, monkeypatch, tmp_path):
    """Non-vacuous: the per-micro-batch statistics (the module on its own) give another step for both losses."""
    monkeypatch.setattr(_trl_window.EffectiveBatchStatistics, "_window_statistic", lambda self: None)
    for loss in CASES:
        got = _train(loss, tmp_path / loss, 2, 2)
        diff = max((got["params"][n] - p).abs().max().item() for n, p in single[loss]["params"].items())
        assert diff > 1e-4, loss
    with pytest.raises(ValueError, match="at least 2 pairs"):  # a one-pair micro-batch has no margin std
        _train("alpha_dpo", tmp_path / "one", 1, 4)


def _ranks_worker(rank: int, world: int, out_dir: str) -> dict:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    return {(loss, batch, acc): _train(loss, f"{out_dir}/{loss}{batch}{acc}r{rank}", batch, acc)
            for loss in CASES for batch, acc in ((2, 1), (1, 2))}


def test_two_ranks_give_the_whole_batch_step(single, tmp_path):
    from test_distributed import run_distributed

    results = run_distributed(_ranks_worker, str(tmp_path), tmp_path=tmp_path)
    for rank, result in enumerate(results):
        for (loss, batch, acc), got in result.items():
            _assert_same(got, single[loss], f"rank {rank} {loss} batch {batch} x accumulation {acc}")


def _eager_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Summed log-probs of the completion tokens from the model's own full logits."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    token = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (token * completion_mask[:, 1:]).sum(dim=1)


def test_kto_reference_point_is_the_steps(tmp_path):
    """KTO under accumulation: every micro-batch of the step uses z0 = max(0, mean(S' - R')) over the mismatched
    pairs of *all* its micro-batches, computed here from the models' own logits (fp64)."""
    from _trl_fixtures import kto_config, unpaired_rows

    from fastpref.integrations.kto import FastPrefKTOTrainer

    policy, ref = tiny_llama(seed=1), tiny_llama(seed=0)  # seeds for which mean(S' - R') > 0 here
    trainer = FastPrefKTOTrainer(
        model=policy, ref_model=ref, train_dataset=unpaired_rows(8), processing_class=tiny_tokenizer(),
        args=kto_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1))
    seen, z0s = [], []
    compute_loss, log_metrics = trainer.compute_loss, trainer._log_metrics
    trainer.compute_loss = lambda model, inputs, *a, **k: (seen.append(inputs), compute_loss(model, inputs, *a, **k))[1]
    trainer._log_metrics = lambda mode, metrics, batch: (z0s.append(metrics["z0"].detach()),
                                                         log_metrics(mode, metrics, batch))[1]
    fresh, fresh_ref = tiny_llama(seed=1), tiny_llama(seed=0)  # the weights every micro-batch of step 1 sees
    trainer.train()
    assert len(seen) == len(z0s) == 4
    diffs = torch.cat([_eager_logps(fresh, *(b[k] for k in ("KL_input_ids", "KL_attention_mask", "KL_completion_mask")))
                       - _eager_logps(fresh_ref, *(b[k] for k in ("KL_input_ids", "KL_attention_mask",
                                                                   "KL_completion_mask"))) for b in seen])
    want = diffs.mean().clamp(min=0.0)
    assert want > 1e-3  # the clamp is not what makes them equal
    per_micro_batch = diffs.view(4, 2).mean(dim=1).clamp(min=0.0)
    assert (per_micro_batch - want).abs().max() > 1e-3  # non-vacuous: the micro-batches' own estimates differ
    for z0 in z0s:
        torch.testing.assert_close(z0.double(), want, rtol=1e-5, atol=1e-6)
