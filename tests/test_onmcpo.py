"""OnMC-PO (MC-PO paper Sec. 3.2, batched online setup) in FastPrefDPOTrainer: the current policy's completions,
ranked by the reward model, are the MC-PO groups (best first), regenerated on schedule, reproducibly."""
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import dpo_config, one_thread, preference_rows, tiny_llama, tiny_tokenizer  # noqa: E402,F401

from fastpref.integrations import _trl_onmcpo  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402


def reward(prompts, completions):
    """A deterministic score that separates completions: the sum of the word indices, minus the length."""
    return [sum(int(w[1:]) for w in c.split() if w.startswith("w")) - 3.0 * len(c.split()) for c in completions]


def _trainer(tmp_path, **kwargs):
    options = dict(mcpo_online=True, mcpo_num_generations=3, mcpo_regenerate_every=2, mcpo_max_new_tokens=4,
                   reward_model=reward)
    options.update(kwargs)
    return FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
        args=dpo_config(tmp_path, per_device_train_batch_size=2, max_steps=4, optim="sgd", learning_rate=0.1),
        train_dataset=preference_rows(4), processing_class=tiny_tokenizer(), fastpref_loss="mcpo",
        fastpref_loss_kwargs=dict(beta=0.5, num_negatives=1), **options)


@pytest.mark.parametrize("every,steps,segments", [(2, [0, 1, 2, 3], {1}), (4, [0, 1], {0})])
def test_onmcpo_trains_on_ranked_generations_regenerated_on_schedule(tmp_path, every, steps, segments):
    trainer = _trainer(tmp_path, mcpo_regenerate_every=every)
    tok = trainer._tokenizer
    generated, selected = [], []
    generate = trainer._generate_ranked
    trainer._generate_ranked = lambda model, prompts, *a: (generated.append((trainer.state.global_step, len(prompts))),
                                                           generate(model, prompts, *a))[1]
    select = trainer._mcpo_select
    trainer._mcpo_select = lambda model, rows, g: (selected.append((rows, g)), select(model, rows, g))[1]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    # 4 prompts, 2 per step, 2 epochs; a prompt is generated when first met in a segment of `every` steps:
    # every=2 regenerates in the second epoch (segment 1), every=4 reuses the first epoch's groups
    assert [step for step, _ in generated] == steps and all(n == 2 for _, n in generated)
    assert {seg for seg, _ in trainer._onmcpo_cache.values()} == segments
    assert len(trainer._onmcpo_cache) == 4
    for key, (_, group) in trainer._onmcpo_cache.items():
        assert len(group) == 3
        prompt = tok.decode(list(key), skip_special_tokens=True)
        texts = [tok.decode(list(key) + c.tolist(), skip_special_tokens=True)[len(prompt):] for c in group]
        scores = reward([prompt] * 3, texts)
        assert scores == sorted(scores, reverse=True)  # best first: y0, then the candidates
    for rows, g in selected:
        assert g == 3 and rows[0].shape[0] == 2 * 3
        assert torch.equal(rows[2].sum(dim=1) > 0, torch.ones(6, dtype=torch.bool))  # every row has a completion
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved > 1e-4
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_onmcpo_groups_are_reproducible_and_cached(tmp_path):
    a, b = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    batch = a.data_collator([a.train_dataset[i] for i in range(2)])
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ga, gb = a._onmcpo_groups(a.model, rows, 2), b._onmcpo_groups(b.model, rows, 2)
    assert ga[1] == gb[1] == 3
    for x, y in zip(ga[0], gb[0]):
        assert torch.equal(x, y)
    calls = []
    a._generate_ranked = lambda *args: calls.append(args)
    again = a._onmcpo_groups(a.model, rows, 2)  # same segment: served from the cache, no generation
    assert not calls and all(torch.equal(x, y) for x, y in zip(again[0], ga[0]))


def test_onmcpo_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="reward_model"):
        _trainer(tmp_path, reward_model=None)
    with pytest.raises(ValueError, match="mcpo_num_generations"):
        _trainer(tmp_path, mcpo_num_generations=1)
    with pytest.raises(ValueError, match="mcpo_regenerate_every"):
        _trainer(tmp_path, mcpo_regenerate_every=0)
    with pytest.raises(ValueError, match="mcpo_max_new_tokens"):
        _trainer(tmp_path, mcpo_max_new_tokens=0)
    with pytest.raises(ValueError, match="mcpo_online applies"):
        FastPrefDPOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=dpo_config(tmp_path),
                           train_dataset=preference_rows(4), processing_class=tiny_tokenizer(), fastpref_loss="dpo",
                           mcpo_online=True, reward_model=reward)


def test_group_rows_layout():
    prompts = [torch.tensor([5, 6]), torch.tensor([7])]
    groups = [[torch.tensor([8, 2]), torch.tensor([2])], [torch.tensor([9, 9, 2]), torch.tensor([4, 2])]]
    ids, mask, completion = _trl_onmcpo.group_rows(prompts, groups, pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 2], [5, 6, 2, 0], [7, 9, 9, 2], [7, 4, 2, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert completion.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [0, 1, 1, 0]]
