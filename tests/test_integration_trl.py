"""FastPrefDPOTrainer: TRL parity for DPO (loss, gradients, a full optimizer step) and other losses training."""
import copy

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
    tiny_mixtral,
    tiny_scaled_lm,
    tiny_tokenizer,
)
from trl import DPOTrainer  # noqa: E402

from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pair(tok, tmp_path, *, tied=False, fastpref_kwargs=None, make=None, **config):
    """A TRL DPOTrainer and a FastPrefDPOTrainer from identical weights; the reference differs from the policy."""
    make = make or (lambda seed: tiny_llama(seed=seed, tied=tied))
    policy, ref = make(0), make(1)
    data = preference_rows(8)
    trainers = []
    for cls, extra in ((DPOTrainer, {}), (FastPrefDPOTrainer, dict(fastpref_loss="dpo", **(fastpref_kwargs or {})))):
        trainers.append(cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                            args=dpo_config(tmp_path / cls.__name__, **config), train_dataset=data,
                            processing_class=tok, **extra))
    return trainers


def _assert_same_loss_and_grads(trl_trainer, ours, grad_atol=1e-6):
    """One batch's loss and gradients of both trainers agree (gradients to ``grad_atol`` times the largest one);
    returns their metrics (TRL's, ours)."""
    loss_t, grads_t, metrics_t = one_batch(trl_trainer)
    loss_f, grads_f, metrics_f = one_batch(ours)
    assert abs(loss_t.item() - 0.6931) > 1e-3  # policy != reference: a real margin, not the log 2 of step 0
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_t.keys() and len(grads_t) > 0
    scale = max(g.abs().max().item() for g in grads_t.values())
    for name in grads_t:
        torch.testing.assert_close(grads_f[name], grads_t[name], rtol=1e-4, atol=grad_atol * scale, msg=name)
    return metrics_t, metrics_f


@pytest.mark.parametrize("precompute,tied,label_smoothing", [(False, False, 0.0), (True, True, 0.1)])
def test_dpo_loss_grads_and_metrics_match_trl(tok, tmp_path, precompute, tied, label_smoothing):
    ours_trl, ours = _pair(tok, tmp_path, tied=tied, precompute_ref_log_probs=precompute, beta=0.5,
                           label_smoothing=label_smoothing)
    metrics_t, metrics_f = _assert_same_loss_and_grads(ours_trl, ours)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "num_tokens"):
        assert metrics_f[key] == pytest.approx(metrics_t[key], rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("family,head", [("granite", dict(temperature=4.0, softcap=None)),
                                         ("gemma2", dict(temperature=1.0, softcap=1.5))])
def test_head_temperature_and_softcap_come_from_the_model_config(tok, tmp_path, family, head):
    """The config's logit map (Granite's logits_scaling = a temperature, Gemma 2's final-logit soft-cap) is read
    from the model and passed with the head on every loss call, never to the loss's constructor: loss and
    gradients equal TRL's, which runs the model's own head."""
    ours_trl, ours = _pair(tok, tmp_path, make=lambda seed: tiny_scaled_lm(family, seed), beta=5.0)
    calls = []
    ours.fastpref_loss_fn.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: kwargs.get(k) for k in head}), with_kwargs=True)
    _assert_same_loss_and_grads(ours_trl, ours, grad_atol=1e-5)  # fp32, and beta = 5 amplifies the rounding
    assert calls == [head]


@pytest.mark.parametrize("loss,loss_kwargs,candidates", [("dpo", {}, 0), ("mcpo", dict(beta=0.5), 2)])
def test_loss_ignore_index_marks_the_labels(tok, tmp_path, loss, loss_kwargs, candidates):
    """fastpref_loss_kwargs={"ignore_index": -1}: the trainer marks unscored positions with the module's value
    (a hard-coded -100 would be an out-of-vocabulary target there), so one training step gives the default's
    loss and weights."""
    results = []
    for i, kwargs in enumerate((loss_kwargs, dict(loss_kwargs, ignore_index=-1))):
        trainer = FastPrefDPOTrainer(
            model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
            args=dpo_config(tmp_path / str(i), optim="sgd", learning_rate=0.5),
            train_dataset=preference_rows(4, candidates=candidates), processing_class=tok, fastpref_loss=loss,
            fastpref_loss_kwargs=kwargs)
        assert trainer.fastpref_loss_fn.ignore_index == kwargs.get("ignore_index", -100)
        trainer.train()
        results.append(([h["loss"] for h in trainer.state.log_history if "loss" in h],
                        {n: p.detach() for n, p in trainer.model.named_parameters()}))
    (losses, params), (losses_1, params_1) = results
    assert len(losses) == 1 and losses_1 == pytest.approx(losses, rel=1e-6)
    for name, p in params.items():
        torch.testing.assert_close(params_1[name], p, rtol=1e-6, atol=1e-7, msg=name)


def test_dpo_training_steps_match_trl(tok, tmp_path):
    """Two full optimizer steps through Trainer.train() (SGD: a plain step, so parameter deltas equal grads)."""
    trl_trainer, ours = _pair(tok, tmp_path, max_steps=2, optim="sgd", learning_rate=0.5)
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
    assert moved > 1e-3  # the step really changed the weights
    losses_t = [h["loss"] for h in trl_trainer.state.log_history if "loss" in h]
    losses_f = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(losses_f) == 2 and losses_f == pytest.approx(losses_t, rel=1e-5)
    logged = next(h for h in ours.state.log_history if "loss" in h)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= logged.keys()


def _fixed_batch_loss(trainer, batch):
    trainer.model.eval()
    torch.manual_seed(123)  # MC-PO's negative sampling
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    trainer.model.train()
    return loss


@pytest.mark.parametrize("loss,loss_kwargs,extra,candidates,expect", [
    ("var", dict(beta=1.0), {}, 0, "weights"),
    ("mcpo", dict(beta=0.5), {}, 2, "rewards/accuracies"),
    ("spo", dict(alpha=0.01, kl_coef=0.1), dict(spo_num_samples=2, spo_resample_every=3, spo_max_new_tokens=6), 0,
     "kl"),
    ("alpha_dpo", dict(beta=2.0), {}, 0, "margin"),
])
def test_other_losses_train_and_loss_decreases(tok, tmp_path, loss, loss_kwargs, extra, candidates, expect):
    base = tiny_llama(seed=0)
    trainer = FastPrefDPOTrainer(
        model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
        args=dpo_config(tmp_path, max_steps=8, learning_rate=3e-3, per_device_train_batch_size=8),
        train_dataset=preference_rows(8, candidates=candidates), processing_class=tok, fastpref_loss=loss,
        fastpref_loss_kwargs=loss_kwargs, **extra)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    start = _fixed_batch_loss(trainer, batch)
    trainer.train()
    end = _fixed_batch_loss(trainer, batch)
    assert end < start - 1e-3, (start, end)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 8 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert expect in history[-1]
    if loss == "spo":
        assert history[-1]["kl"] > 0  # the policy moved away from the reference on its own samples
        step, samples = trainer._spo_cache  # one row set per accumulation micro-batch
        assert step == 6 and len(samples) == 1 and samples[0][2].sum() > 0  # resampled every 3 steps; scored


def test_mcpo_grad_forward_only_on_preferred_and_selected_rows(tok, tmp_path):
    """MC-PO: a no-grad policy + reference pass on all K + 1 rows, then the policy's forward with grad on the
    preferred + M selected rows only; loss and gradients equal one forward with grad on every row with the same
    negatives."""
    import fastpref
    from fastpref.integrations.transformers import head_inputs, shift_labels

    k, m, prompts = 3, 2, 4
    trainer = FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=dpo_config(tmp_path),
        train_dataset=preference_rows(prompts, candidates=k), processing_class=tok, fastpref_loss="mcpo",
        fastpref_loss_kwargs=dict(beta=0.5, num_negatives=m))
    policy, ref = trainer.model, trainer.ref_model
    calls = {"policy": [], "ref": []}
    for key, module in (("policy", policy.model), ("ref", ref.model)):
        module.register_forward_hook(
            lambda mod, args, kwargs, out, key=key: calls[key].append(
                (out.last_hidden_state.shape[0], torch.is_grad_enabled())), with_kwargs=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(prompts)])
    policy.train()
    torch.manual_seed(0)
    loss, out = trainer.compute_loss(policy, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert calls == {"policy": [(prompts * (k + 1), False), (prompts * (1 + m), True)],
                     "ref": [(prompts * (k + 1), False)]}
    negatives = out.metrics["negatives"]
    assert negatives.shape == (prompts, m) and bool(((negatives >= 1) & (negatives <= k)).all())
    assert out.metrics["logps"].shape == (prompts, k + 1)

    # the full path: grad forward on all K + 1 rows, the module told the same negatives
    policy.zero_grad()
    ids, mask, completion = batch["group_input_ids"], batch["group_attention_mask"], batch["group_completion_mask"]
    labels = ids.masked_fill(completion == 0, -100)
    keep = shift_labels(labels) != -100
    pol = head_inputs(policy, policy.model(input_ids=ids, attention_mask=mask).last_hidden_state, labels,
                      logits_to_keep=keep)
    with torch.no_grad():
        ref_h = head_inputs(ref, ref.model(input_ids=ids, attention_mask=mask).last_hidden_state, labels,
                            logits_to_keep=keep)
    full = fastpref.FusedMCPOLoss(beta=0.5, num_negatives=m)(
        pol.weight, pol.hidden, pol.targets, bias=pol.bias, seq_ids=pol.seq_ids, num_seqs=pol.num_seqs,
        ref_hidden=ref_h.hidden, ref_weight=ref_h.weight.detach(), group_size=k + 1, negatives=negatives)
    full.loss.backward()
    torch.testing.assert_close(loss.detach(), full.loss.detach(), rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - torch.log(torch.tensor(1.0 + m)).item()) > 1e-4  # not the policy == reference value
    want = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert want.keys() == grads.keys() and "lm_head.weight" in want
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_bad_configurations_raise(tok, tmp_path):
    model, ref = tiny_llama(), tiny_llama()
    data = preference_rows(4)
    common = dict(model=model, ref_model=ref, processing_class=tok)
    with pytest.raises(ValueError, match="fastpref_loss"):
        FastPrefDPOTrainer(args=dpo_config(tmp_path), train_dataset=data, fastpref_loss="nope", **common)
    with pytest.raises(ValueError, match="candidates"):
        FastPrefDPOTrainer(args=dpo_config(tmp_path), train_dataset=data, fastpref_loss="mcpo", **common)
    for key in ("temperature", "softcap"):  # the head's, read from the model config
        with pytest.raises(ValueError, match=f"must not set {key}: .* come from the model config"):
            FastPrefDPOTrainer(args=dpo_config(tmp_path), train_dataset=data, fastpref_loss_kwargs={key: 2.0},
                               **common)
    with pytest.raises(ValueError, match="DPO loss family"):  # TRL's loss fields belong to fastpref_loss="dpo"
        FastPrefDPOTrainer(args=dpo_config(tmp_path, loss_type=["hinge"]), train_dataset=data, fastpref_loss="var",
                           **common)
    with pytest.raises(ValueError, match="chosen_reward"):
        FastPrefDPOTrainer(args=dpo_config(tmp_path), train_dataset=data.remove_columns(["chosen_reward"]),
                           fastpref_loss="var", fastpref_loss_kwargs=dict(beta=1.0), **common)
    # the MoE router auxiliary loss is not reproduced
    moe = dict(model=tiny_mixtral(), ref_model=tiny_mixtral(), processing_class=tok, train_dataset=data)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
        FastPrefDPOTrainer(args=dpo_config(tmp_path), **moe)  # the config's own coefficient (0.001) is used
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        FastPrefDPOTrainer(args=dpo_config(tmp_path, router_aux_loss_coef=0.1), **moe)
    trainer = FastPrefDPOTrainer(args=dpo_config(tmp_path, router_aux_loss_coef=0.0), **moe)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))  # without the aux loss it trains


# ---- two gloo processes (tests/test_distributed.py's harness): DDP through the Trainer, FSDP2 by hand ----
# One pair of processes for both (starting them and importing TRL there dominates the cost). Not exercised:
# Accelerate's FSDP plugin driving FSDP2 (the sharding here is done by hand), and GPUs.

def _ddp_training_step(rank: int, world: int, out_dir: str) -> dict:
    """One SGD step of FastPrefDPOTrainer under the Trainer's own DDP wrapping, this rank's two pairs."""
    trainer = FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
        args=dpo_config(f"{out_dir}/ddp{rank}", per_device_train_batch_size=2, optim="sgd", learning_rate=0.5),
        train_dataset=preference_rows(2 * world), processing_class=tiny_tokenizer(), fastpref_loss="dpo")
    trainer.train()
    ddp = trainer.model_wrapped
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
    return dict(find_unused=ddp.find_unused_parameters,
                params={n: p.detach().clone() for n, p in trainer.model.named_parameters()})


def _fsdp2_gradients(rank: int, world: int, out_dir: str) -> dict:
    """FastPrefDPOTrainer's loss on an FSDP2 policy whose LM head is its own fully_shard unit, this rank's pairs."""
    from torch.distributed.fsdp import fully_shard

    from fastpref.integrations.distributed import sharding_kind

    trainer = FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
        args=dpo_config(f"{out_dir}/fsdp{rank}", per_device_train_batch_size=2),
        train_dataset=preference_rows(2 * world), processing_class=tiny_tokenizer(), fastpref_loss="dpo")
    policy = trainer.model
    for unit in (policy.lm_head, policy.model, policy):
        fully_shard(unit)
    assert sharding_kind(policy.lm_head.weight) == "fsdp2"  # a DTensor outside its forward
    # The reference sharded the common way (each decoder layer, then the root): its embeddings, final norm
    # and head belong to the root unit, unsharded only around the root's forward, which the trainer must run.
    ref = trainer.ref_model
    for layer in ref.model.layers:
        fully_shard(layer)
    fully_shard(ref)
    assert sharding_kind(ref.model.embed_tokens.weight) == "fsdp2"
    policy.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (2 * rank, 2 * rank + 1)])
    trainer.compute_loss(policy, batch).backward()
    return {n: p.grad.full_tensor() for n, p in policy.named_parameters()}


def _distributed_trainer_worker(rank: int, world: int, out_dir: str) -> dict:
    import os

    # the launcher variables Accelerate reads (MULTI_CPU); the harness's process group already exists
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    return dict(ddp=_ddp_training_step(rank, world, out_dir), fsdp2=_fsdp2_gradients(rank, world, out_dir))


def test_ddp_and_fsdp2_match_single_process(tok, tmp_path):
    """Two processes with two pairs each equal one process on all four pairs.

    DDP, with the Trainer's default options (find_unused_parameters on, as without gradient checkpointing): after
    one SGD step both ranks hold the single process's weights. A head read after the wrapped forward fails in
    backward there ("marked as ready twice"); the trainer runs the fused loss inside the forward instead.

    FSDP2 with the LM head as its own fully_shard unit: every gradient equals the single process's, the head's
    included, which a full_tensor() gather of the head gets wrong on every rank (no error); the trainer runs the
    head's part inside the head's forward instead. The reference model is FSDP2-sharded too (per decoder layer and
    root, as Accelerate's FSDP2 plugin does): its root-owned embeddings are gathered only because the trainer runs the
    reference through its own forward (calling its backbone directly fails on the sharded embedding)."""
    from test_distributed import run_distributed

    results = run_distributed(_distributed_trainer_worker, str(tmp_path), tmp_path=tmp_path)

    def single(**config):
        return FastPrefDPOTrainer(
            model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
            args=dpo_config(tmp_path / "single", per_device_train_batch_size=4, **config),
            train_dataset=preference_rows(4), processing_class=tok, fastpref_loss="dpo")

    stepped = single(optim="sgd", learning_rate=0.5)
    before = {n: p.detach().clone() for n, p in stepped.model.named_parameters()}
    stepped.train()
    assert [r["ddp"]["find_unused"] for r in results] == [True, True]  # the Trainer's default, not ours
    moved = 0.0
    for name, p in stepped.model.named_parameters():
        for rank, r in enumerate(results):
            torch.testing.assert_close(r["ddp"]["params"][name], p.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"DDP rank {rank} {name}: {m}")
        moved = max(moved, (p.detach() - before[name]).abs().max().item())
    assert moved > 1e-3  # the step changed the weights

    _, want, _ = one_batch(single())
    assert "lm_head.weight" in want
    scale = max(g.abs().max().item() for g in want.values())
    for rank, r in enumerate(results):
        assert r["fsdp2"].keys() == want.keys()
        for name in want:
            torch.testing.assert_close(r["fsdp2"][name], want[name], rtol=1e-4, atol=1e-6 * scale,
                                       msg=lambda m: f"FSDP2 rank {rank} {name}: {m}")


# ---- DeepSpeed ZeRO-3 through the Trainer (CPU accelerator, gloo), where deepspeed is installed ----
# Not exercised: SPO's online sampling under ZeRO-3 (generate on a partitioned model runs, but per-rank samples
# make it incomparable to one process), ZeRO-3 CPU/NVMe offload, and GPUs.

ZERO3_CASES = {  # name: (fastpref_loss, trainer kwargs, candidates, tied embeddings)
    "dpo": ("dpo", {}, 0, False),
    "dpo-tied": ("dpo", {}, 0, True),
    "spo": ("spo", dict(fastpref_loss_kwargs=dict(alpha=0.5, kl_coef=0.5), spo_samples="dataset"), 0, False),
    "mcpo": ("mcpo", dict(fastpref_loss_kwargs=dict(beta=0.5)), 2, False),
}


def _zero3_trainer(case: str, out_dir, *, world: int = 1, zero3: bool = False):
    loss, kwargs, candidates, tied = ZERO3_CASES[case]
    config = {}
    if zero3:
        config = dict(deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                 "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9},
                      use_cpu=False, accelerator_config={"use_configured_state": True})
    torch.manual_seed(0)
    return FastPrefDPOTrainer(
        model=tiny_llama(seed=0, tied=tied), ref_model=tiny_llama(seed=1, tied=tied),
        args=dpo_config(out_dir, per_device_train_batch_size=4 // world, optim="sgd", learning_rate=0.5, **config),
        train_dataset=preference_rows(4, candidates=candidates), processing_class=tiny_tokenizer(),
        fastpref_loss=loss, **kwargs)


def _zero3_worker(rank: int, world: int, out_dir: str) -> dict:
    import os

    from test_distributed import deepspeed_cpu_env

    deepspeed_cpu_env(rank, world)
    import deepspeed
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    # Accelerate finds no backend for DeepSpeed on a machine without an accelerator; configure it (gloo) and let
    # TrainingArguments use it (use_configured_state).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    out = {}
    for case in ZERO3_CASES:
        trainer = _zero3_trainer(case, f"{out_dir}/z3{rank}{case}", world=world, zero3=True)
        assert trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        assert trainer.accelerator.num_processes == world
        trainer.train()
        params = list(trainer.model.parameters())
        assert params[0].numel() == 0  # partitioned
        with deepspeed.zero.GatheredParameters(params):
            out[case] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        AcceleratorState._reset_state()  # one DeepSpeed plugin per AcceleratorState; the PartialState stays
    return out


def test_zero3_training_step_matches_single_process(tmp_path):
    """FastPrefDPOTrainer under DeepSpeed ZeRO-3 (two CPU processes, two pairs each): after one SGD step both ranks
    hold the single process's weights, for DPO (also with tied embeddings), SPO with its reference KL (the reference
    head's gathered copy is read again in backward) and MC-PO (no-grad pass, then the selected rows)."""
    from test_distributed import run_distributed

    results = run_distributed(_zero3_worker, str(tmp_path), tmp_path=tmp_path)
    for case in ZERO3_CASES:
        single = _zero3_trainer(case, tmp_path / f"single-{case}")
        before = {n: p.detach().clone() for n, p in single.model.named_parameters()}
        single.train()
        moved = 0.0
        for name, p in single.model.named_parameters():
            for rank, r in enumerate(results):
                torch.testing.assert_close(r[case][name], p.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"ZeRO-3 {case} rank {rank} {name}: {m}")
            moved = max(moved, (p.detach() - before[name]).abs().max().item())
        assert moved > 1e-3, case
