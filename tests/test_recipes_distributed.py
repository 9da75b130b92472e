"""The paper recipes of FastPrefDPOTrainer under DDP: two gloo processes (tests/test_distributed.py's harness), the
Trainer's own DDP wrapping, each rank its own shard of the data, a reward model on every rank (a transformers
sequence-classification model with its own tokenizer, fastpref.integrations.toy):

- VAR's Alg. 1 cross pairs (``var_pairs="cross"``): each rank forms the B x B pairs of its own micro-batch, so one
  DDP step is the average of the two per-shard gradients -- not one process on all 2B prompts (whose Z(x_i) would
  also range over the other rank's responses); both are checked.
- OnMC-PO (``mcpo_online``): generation with the current policy, ranking by the reward model, two steps.
- SPO with ranked responses (``spo_mode="ranked"``, App. E.3's decay): Eq. 12's baseline is gathered over the
  ranks, so with equal shares one DDP step equals one process on the concatenated batch.

One pair of processes runs all three (starting them and importing TRL there dominates the cost)."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import WORDS, dpo_config, one_thread  # noqa: E402,F401

from fastpref.integrations.toy import toy_llama, toy_preferences, toy_reward_model, toy_tokenizer  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402

B = 3  # prompts per rank (VAR: 6 responses with var_responses="both", so S x S = 6 x 6 reference log-probs)
LR = 0.5
SPO_KWARGS = dict(alpha=0.5, kl_coef=0.3, gamma=0.4, rank_decay=0.5)


def ranked_rows(num: int, n: int = 3, seed: int = 0):
    """``prompt``, ``responses`` (n distinct texts) and ``ranks`` (a permutation of 1..n) per example."""
    from datasets import Dataset

    rng = random.Random(seed)
    text = lambda k: " ".join(WORDS[rng.randrange(len(WORDS))] for _ in range(k))  # noqa: E731
    rows = {"prompt": [], "responses": [], "ranks": []}
    for _ in range(num):
        rows["prompt"].append(text(rng.randint(2, 4)))
        rows["responses"].append([" " + text(k) for k in range(1, n + 1)])  # distinct lengths: distinct texts
        ranks = list(range(1, n + 1))
        rng.shuffle(ranks)
        rows["ranks"].append(ranks)
    return Dataset.from_dict(rows)


def _reward():
    return toy_reward_model(seed=2), toy_tokenizer()


def make_trainer(recipe: str, out: str, batch: int, **config) -> FastPrefDPOTrainer:
    """The same trainer on every rank and in the parent (SGD, no clipping: a step is p - LR * gradient)."""
    common = dict(model=toy_llama(seed=0), ref_model=toy_llama(seed=1), processing_class=toy_tokenizer())
    if recipe == "var":
        args = dpo_config(out, per_device_train_batch_size=batch, optim="sgd", learning_rate=LR, max_grad_norm=0.0,
                          **config)
        return FastPrefDPOTrainer(**common, args=args, train_dataset=toy_preferences(2 * B, seed=4),
                                  fastpref_loss="var", fastpref_loss_kwargs=dict(beta=0.5), reward_model=_reward(),
                                  var_pairs="cross", var_responses="both")
    if recipe == "onmcpo":
        args = dpo_config(out, per_device_train_batch_size=batch, optim="sgd", learning_rate=0.1, max_steps=2,
                          **config)
        return FastPrefDPOTrainer(**common, args=args, train_dataset=toy_preferences(4, seed=5), fastpref_loss="mcpo",
                                  fastpref_loss_kwargs=dict(beta=0.5, num_negatives=1), mcpo_online=True,
                                  mcpo_num_generations=3, mcpo_regenerate_every=2, mcpo_max_new_tokens=4,
                                  reward_model=_reward())
    args = dpo_config(out, per_device_train_batch_size=batch, optim="sgd", learning_rate=LR, max_grad_norm=0.0,
                      **config)
    return FastPrefDPOTrainer(**common, args=args, train_dataset=ranked_rows(4, seed=6), fastpref_loss="spo",
                              fastpref_loss_kwargs=SPO_KWARGS, spo_mode="ranked", spo_samples="dataset")


def params_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_recorded(trainer) -> dict:
    """``trainer.train()``, recording the examples each micro-batch was collated from and the step losses."""
    features = []
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: (features.append(list(rows)), collate(rows))[1]
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(features=features, losses=losses, params=params_of(trainer.model))


def _var_worker(out: str) -> dict:
    trainer = make_trainer("var", out, B)
    shapes = []
    cross = trainer._var_cross_reference

    def spy(model, extra):
        extra = cross(model, extra)
        shapes.append(tuple(extra["ref_logps"].shape))
        return extra

    trainer._var_cross_reference = spy
    assert trainer.fastpref_reward_model.device == trainer.accelerator.device  # moved by the trainer
    return dict(_train_recorded(trainer), ref_shapes=shapes)


def _onmcpo_worker(out: str) -> dict:
    trainer = make_trainer("onmcpo", out, 2)
    generated = []
    generate = trainer._generate_ranked
    trainer._generate_ranked = lambda model, prompts, *a: (generated.append(len(prompts)), generate(model, prompts, *a))[1]
    before = params_of(trainer.model)
    result = _train_recorded(trainer)
    moved = max((result["params"][n] - p).abs().max().item() for n, p in before.items())
    return dict(result, generated=generated, cached=len(trainer._onmcpo_cache), moved=moved)


def _worker(rank: int, world: int, out_dir: str) -> dict:
    # the launcher variables Accelerate reads (MULTI_CPU); the harness's process group already exists
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    return dict(var=_var_worker(f"{out_dir}/var{rank}"), onmcpo=_onmcpo_worker(f"{out_dir}/onmcpo{rank}"),
                spo=_train_recorded(make_trainer("spo", f"{out_dir}/spo{rank}", 2)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from test_distributed import run_distributed

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built")
    tmp = tmp_path_factory.mktemp("recipes")
    return run_distributed(_worker, str(tmp), tmp_path=tmp)


def gradients(trainer, features) -> dict:
    """Gradients of one training-mode loss on the micro-batch collated from ``features`` (one process)."""
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, trainer.data_collator(features)).backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return grads


def sgd(params: dict, grads: dict, lr: float) -> dict:
    return {n: p - lr * grads[n] if n in grads else p for n, p in params.items()}


def assert_params(got: dict, want: dict, what: str) -> None:
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")


def _shards(results, recipe: str):
    """Each rank's micro-batches (lists of examples), checked to be distinct shards of the data at every step."""
    shards = [r[recipe]["features"] for r in results]
    assert len(shards[0]) == len(shards[1]) > 0
    for step, (a, b) in enumerate(zip(*shards)):
        prompts = [{tuple(ex["prompt_ids"]) for ex in batch} for batch in (a, b)]
        assert not prompts[0] & prompts[1], f"step {step}: each rank must get its own prompts"
    return shards


def test_var_cross_pairs_average_the_per_rank_alg1_gradients(ranks, tmp_path):
    shards = _shards(ranks, "var")
    assert [len(s) for s in shards] == [1, 1] and all(len(s[0]) == B for s in shards)
    for r in ranks:
        # each rank's reference pass covers its own B prompts x 2B responses, read per row: [S, S] = [2B, 2B]
        assert r["var"]["ref_shapes"] == [(2 * B, 2 * B)]
        assert len(r["var"]["losses"]) == 1 and math.isfinite(r["var"]["losses"][0])
    # all-reduce happened: the ranks trained on different prompts and hold the same weights
    for name, p in ranks[0]["var"]["params"].items():
        torch.testing.assert_close(ranks[1]["var"]["params"][name], p, rtol=0, atol=0, msg=name)
        assert torch.isfinite(p).all(), name

    trainer = make_trainer("var", str(tmp_path / "single"), B)
    before = params_of(trainer.model)
    per_rank = [gradients(trainer, s[0]) for s in shards]
    # DDP averages the gradients of the per-rank losses, each Alg. 1 over its own micro-batch's B x B pairs
    mean = {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in per_rank[0]}
    assert_params(ranks[0]["var"]["params"], sgd(before, mean, LR), "DDP vs mean of per-shard Alg. 1 steps")
    # ... which is not Alg. 1 over all 2B prompts in one micro-batch (Z(x_i) over 4B responses): non-vacuous
    whole = sgd(before, gradients(trainer, shards[0][0] + shards[1][0]), LR)
    diff = max((whole[n] - p).abs().max().item() for n, p in ranks[0]["var"]["params"].items())
    assert diff > 1e-4
    moved = max((ranks[0]["var"]["params"][n] - p).abs().max().item() for n, p in before.items())
    assert moved > 1e-3


def test_onmcpo_trains_under_ddp(ranks):
    shards = _shards(ranks, "onmcpo")
    for rank, r in enumerate(ranks):
        res = r["onmcpo"]
        # steps 0 and 1 are one regeneration segment (every=2): each rank generates for every prompt it meets
        # first there, and only for those (the epochs reshuffle, so a rank may meet new prompts at step 1)
        seen = {tuple(ex["prompt_ids"]) for batch in shards[rank] for ex in batch}
        assert sum(res["generated"]) == res["cached"] == len(seen) >= 2, (rank, res["generated"], res["cached"])
        assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"])
        assert res["moved"] > 1e-4
    for name, p in ranks[0]["onmcpo"]["params"].items():
        torch.testing.assert_close(ranks[1]["onmcpo"]["params"][name], p, rtol=0, atol=0, msg=name)
        assert torch.isfinite(p).all(), name


def test_spo_ranked_ddp_step_equals_one_process_on_both_shards(ranks, tmp_path):
    shards = _shards(ranks, "spo")
    for name, p in ranks[0]["spo"]["params"].items():
        torch.testing.assert_close(ranks[1]["spo"]["params"][name], p, rtol=0, atol=0, msg=name)
    assert all(math.isfinite(r["spo"]["losses"][0]) for r in ranks)
    trainer = make_trainer("spo", str(tmp_path / "single"), 4)
    before = params_of(trainer.model)
    want = sgd(before, gradients(trainer, shards[0][0] + shards[1][0]), LR)
    assert_params(ranks[0]["spo"]["params"], want, "DDP vs one process on the concatenated batch")
    # non-vacuous: Eq. 12's baseline over one shard only gives another step
    local = [gradients(trainer, s[0]) for s in shards]
    mean = sgd(before, {n: (local[0][n] + local[1][n]) / 2 for n in local[0]}, LR)
    diff = max((mean[n] - p).abs().max().item() for n, p in ranks[0]["spo"]["params"].items())
    assert diff > 1e-5
