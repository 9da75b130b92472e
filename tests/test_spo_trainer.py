"""FastPrefDPOTrainer with SPO as the paper runs it: online samples per prompt for each micro-batch's own prompts
(Alg. 1), seeded; the default sample length from the data; the best-of-n / ranked data path (Sec. 5, Eqs. 14-15)
into FusedSPOLoss's grouped modes; App. E.3's decayed ranked weights; the options' errors."""
import math
import random

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import WORDS, dpo_config, one_batch, one_thread, preference_rows, tiny_llama, tiny_tokenizer  # noqa: E402,F401,I001
from datasets import Dataset  # noqa: E402

import fastpref  # noqa: E402
from fastpref import losses  # noqa: E402
from fastpref.integrations.transformers import head_inputs, shift_labels  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402

SPO = dict(alpha=0.5, kl_coef=0.3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _text(ws):
    return " ".join(WORDS[w] for w in ws)


def grouped_rows(num: int = 4, n: int = 3, seed: int = 0, order: str = "ranks"):
    """``prompt``, ``responses`` (n distinct texts of 1-3 words) and ``ranks`` (a random permutation of 1..n) or
    ``scores`` (distinct floats)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "responses": [], order: []}
    for _ in range(num):
        rows["prompt"].append(_text([rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 4))]))
        rows["responses"].append([" " + _text([rng.randrange(len(WORDS)) for _ in range(rng.randint(1, 3))])
                                  for _ in range(n)])
        ranks = list(range(1, n + 1))
        rng.shuffle(ranks)
        rows[order].append(ranks if order == "ranks" else [rng.random() * 4 - 2 for _ in range(n)])
    return Dataset.from_dict(rows)


def _trainer(tok, tmp_path, data=None, loss_kwargs=None, seed=0, **options):
    config = {k: options.pop(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                                          "max_length", "optim") if k in options}
    return FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=dpo_config(tmp_path, seed=seed, **config),
        train_dataset=preference_rows(8) if data is None else data, processing_class=tok, fastpref_loss="spo",
        fastpref_loss_kwargs=dict(SPO, **(loss_kwargs or {})), **options)


def _prompts(rows, stride=1):
    """The prompt token lists of rows 0, stride, 2 * stride, ... of (input_ids, attention_mask, completion_mask)."""
    ids, mask, completion = rows
    return [ids[i][(mask[i] == 1) & (completion[i] == 0)].tolist() for i in range(0, ids.shape[0], stride)]


def _record_samples(trainer):
    """Wrap ``_spo_kl_rows``: per call, (the prompts of the micro-batch, the sampled rows)."""
    calls, original = [], trainer._spo_kl_rows

    def spy(model, rows, inputs):
        out = original(model, rows, inputs)
        calls.append((_prompts((inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])), out))
        return out

    trainer._spo_kl_rows = spy
    return calls


# -- online samples ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,accumulation", [(1, 1), (4, 1), (2, 2)])
def test_samples_per_prompt_of_each_micro_batch(tok, tmp_path, batch, accumulation):
    """spo_num_samples completions for every prompt of the micro-batch, drawn for that micro-batch's own prompts
    (each accumulation micro-batch its own), prompt-major; the cache holds one row set per micro-batch."""
    k, steps = 3, 2
    trainer = _trainer(tok, tmp_path, spo_num_samples=k, spo_max_new_tokens=3, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation, max_steps=steps)
    calls = _record_samples(trainer)
    trainer.train()
    assert len(calls) == steps * accumulation
    for prompts, samples in calls:
        pairs = len(prompts) // 2  # input_ids holds the chosen rows, then the rejected rows
        assert samples[0].shape[0] == batch * k == pairs * k
        assert _prompts(samples) == [p for p in prompts[:pairs] for _ in range(k)]
        assert bool((samples[2].sum(dim=1) >= 1).all())  # every sample has a scored completion token
    if accumulation > 1:  # the micro-batches of one step have different prompts, hence different samples
        assert calls[0][0] != calls[1][0]
    step, cached = trainer._spo_cache
    assert step == steps - 1 and len(cached) == accumulation
    for rows, (_, samples) in zip(cached, calls[-accumulation:]):
        assert all(torch.equal(a, b) for a, b in zip(rows, samples))


def test_resample_every_reuses_each_window_position(tok, tmp_path):
    """spo_resample_every = T: micro-batch j of the steps between two sampling steps reuses the samples of micro-batch
    j of the last sampling step (Alg. 1's intermittent batch); sampling steps draw anew."""
    trainer = _trainer(tok, tmp_path, spo_num_samples=2, spo_max_new_tokens=3, spo_resample_every=2,
                       per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    calls = _record_samples(trainer)
    trainer.train()
    samples = [s for _, s in calls]
    assert len(samples) == 6
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(samples[2], samples[0]) and same(samples[3], samples[1])  # step 1 reuses step 0's, per position
    assert not same(samples[0], samples[1])
    assert not same(samples[4], samples[0]) and not same(samples[5], samples[1])  # step 2 samples again
    assert trainer._spo_cache[0] == 2


def test_sampling_is_seeded_and_leaves_global_rng(tok, tmp_path):
    """Two trainers with the same seed draw the same samples whatever the global RNG holds; another seed draws
    others; sampling does not advance torch's global RNG."""
    drawn = []
    for seed, global_seed in ((0, 1), (0, 2), (1, 1)):
        trainer = _trainer(tok, tmp_path / str(seed), seed=seed, spo_num_samples=2)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.compute_loss(trainer.model, batch)
        assert torch.equal(torch.get_rng_state(), before)
        drawn.append(trainer._spo_cache[1][0])
    assert all(torch.equal(a, b) for a, b in zip(drawn[0], drawn[1]))
    assert not all(torch.equal(a, b) for a, b in zip(drawn[0], drawn[2]))


def test_eval_samples_afresh_without_caching(tok, tmp_path):
    """Evaluation: every call draws its own samples (seeded by step and call), the training cache is untouched."""
    trainer = _trainer(tok, tmp_path, spo_num_samples=2)
    calls = _record_samples(trainer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        trainer.compute_loss(trainer.model, batch)
    assert trainer._spo_cache is None and len(calls) == 2
    assert calls[0][1][0].shape[0] == 8 and not torch.equal(calls[0][1][0], calls[1][1][0])


@pytest.mark.parametrize("max_length", [None, 8])
def test_default_sample_length_follows_the_data(tok, tmp_path, max_length):
    """spo_max_new_tokens=None: generate gets the micro-batch's longest completion, capped so that prompt + sample
    fit args.max_length."""
    trainer = _trainer(tok, tmp_path, max_length=max_length)
    asked, generate = [], trainer.model.generate

    def spy(**kwargs):
        asked.append((kwargs["max_new_tokens"], kwargs["input_ids"].shape[1]))
        return generate(**kwargs)

    trainer.model.generate = spy
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.compute_loss(trainer.model, batch)
    (new, prompt_width), = asked
    longest = int(batch["completion_mask"].sum(dim=1).max())
    assert new == (longest if max_length is None else min(longest, max_length - prompt_width))
    if max_length is not None:
        assert new < longest  # the cap binds on this data (prompts of 3-5 tokens, completions up to 5)
        assert trainer._spo_cache[1][0][0].shape[1] <= max_length


# -- best-of-n / ranked data ------------------------------------------------------------------------------------

def _rows_by_hand(tok, data, order):
    """Group rows built from the raw dataset with the tokenizer (prompt + response + EOS), in ``order[b]``."""
    ids, completion = [], []
    for b, ex in enumerate(data):
        prompt = tok(ex["prompt"])["input_ids"]
        for i in order[b]:
            full = tok(ex["prompt"] + ex["responses"][i] + tok.eos_token)["input_ids"]
            assert full[:len(prompt)] == prompt
            ids.append(full)
            completion.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
    width = max(map(len, ids))
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    return pad(ids, tok.pad_token_id), pad([[1] * len(r) for r in ids], 0), pad(completion, 0)


def _head(model, ids, mask, completion, grad=True):
    labels = ids.masked_fill(completion == 0, -100)
    with torch.set_grad_enabled(grad):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return head_inputs(model, hidden, labels, logits_to_keep=shift_labels(labels) != -100)


@pytest.mark.parametrize("mode,order", [("ranked", "ranks"), ("ranked", "scores"), ("best_of_n", "ranks"),
                                        ("best_of_n", "scores")])
def test_grouped_step_equals_fused_head_by_hand(tok, tmp_path, mode, order):
    """spo_mode="ranked" / "best_of_n": loss and gradients of the trainer's step equal FusedSPOLoss(mode, group_size=n)
    called by hand on rows built from the raw data (ranked: best first; best-of-n: dataset order, best = argmax
    score / rank 1), with the KL on the same online samples."""
    n, prompts = 3, 4
    data = grouped_rows(prompts, n, seed=1, order=order)
    decay = dict(rank_decay=0.5) if mode == "ranked" else {}
    trainer = _trainer(tok, tmp_path, data, loss_kwargs=dict(gamma=0.4, **decay), spo_mode=mode, spo_num_samples=2)
    loss, grads, metrics = one_batch(trainer, rows=prompts)
    keys = [[(r if order == "ranks" else -r) for r in ex[order]] for ex in data]
    ranked = [sorted(range(n), key=key.__getitem__) for key in keys]
    best = torch.tensor([r[0] for r in ranked])
    rows = _rows_by_hand(tok, data, ranked if mode == "ranked" else [list(range(n))] * prompts)
    samples = trainer._spo_cache[1][0]
    assert samples[0].shape[0] == 2 * prompts
    assert _prompts(samples) == [p for p in _prompts(rows, n) for _ in range(2)]

    policy, ref = trainer.model, trainer.ref_model
    main, online = _head(policy, *rows), _head(policy, *samples)
    on_ref = _head(ref, *samples, grad=False)
    fn = fastpref.FusedSPOLoss(mode=mode, group_size=n, **SPO, gamma=0.4, **decay)
    out = fn(main.weight, main.hidden, main.targets, seq_ids=main.seq_ids, num_seqs=main.num_seqs,
             kl_hidden=online.hidden, kl_ref_hidden=on_ref.hidden, kl_targets=online.targets,
             kl_seq_ids=online.seq_ids, kl_num_seqs=online.num_seqs, ref_weight=ref.lm_head.weight.detach(),
             **(dict(best=best) if mode == "best_of_n" else {}))
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-5, atol=1e-5)
    assert metrics["kl"] > 0 and (out.metrics["weights"] - 1.0).abs().max() > 1e-4  # KL and Eq. 12's mu are live
    want = {k: p.grad for k, p in policy.named_parameters() if p.grad is not None}
    assert want.keys() == grads.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_grouped_dataset_kl_uses_the_best_response(tok, tmp_path):
    """spo_samples="dataset" with groups: the KL term runs on each prompt's best response (rank 1)."""
    data = grouped_rows(2, 3, seed=2)
    trainer = _trainer(tok, tmp_path, data, spo_mode="best_of_n", spo_samples="dataset",
                       per_device_train_batch_size=2)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])  # the groups replace the pairs
    assert rows[0].shape[0] == 6 and int(batch["group_size"]) == 3
    kl_rows = trainer._spo_kl_rows(trainer.model, rows, batch)
    best = [ex["ranks"].index(1) for ex in data]
    assert batch["group_best"].tolist() == best
    assert torch.equal(kl_rows[0], rows[0][torch.tensor([best[0], 3 + best[1]])])


# -- App. E.3's decayed ranked weights ----------------------------------------------------------------------------

def _ranked_from_paper(s, alpha, gamma, eta):
    """Eq. 15 with App. E.3's weights eta^k mu_k (k = 1..n-1), mu_k from Eq. 12 on the suffix set {k..n}, E^ the
    batch mean, no gradient through mu: written from the paper with plain probabilities."""
    p = torch.exp(s)
    batch, n = s.shape
    total = 0.0
    for k in range(n - 1):
        mass = p[:, k:].sum(dim=1) ** gamma
        mu = (2 * torch.sigmoid(mass - mass.mean())).detach()
        log_ratio = torch.log(p[:, k] ** alpha / (p[:, k:] ** alpha).sum(dim=1))
        total = total - (eta ** (k + 1)) * mu * log_ratio / alpha
    return total.mean()


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.2])
def test_rank_decay_matches_the_paper_fp64(eta):
    """losses.spo_ranked(rank_decay=eta) and FusedSPOLoss(mode="ranked", rank_decay=eta): loss and gradient equal an
    fp64 implementation of App. E.3 / Eq. 15 (the module on log-probs from a full-logits head)."""
    gen = torch.Generator().manual_seed(0)
    s = (-1.0 - 2.0 * torch.rand(5, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    got, _ = losses.spo_ranked(s, alpha=0.3, gamma=0.7, rank_decay=eta, kl_coef=0.0)
    want = _ranked_from_paper(s, 0.3, 0.7, eta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)

    groups, n, length, dim, vocab = 2, 3, 4, 8, 11
    hidden = torch.randn(groups * n, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (groups * n, length), generator=gen)
    out = fastpref.FusedSPOLoss(alpha=0.3, gamma=0.7, kl_coef=0.0, mode="ranked", group_size=n, rank_decay=eta)(
        weight, hidden, targets)
    logps = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[..., None]).squeeze(-1).sum(dim=1)
    want = _ranked_from_paper(logps.view(groups, n), 0.3, 0.7, eta)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-10)
    got_grads = torch.autograd.grad(out.loss, (hidden, weight))
    for a, b in zip(got_grads, torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if eta < 1.0:
        undecayed, _ = losses.spo_ranked(s, alpha=0.3, gamma=0.7, kl_coef=0.0)
        assert abs(undecayed.item() - got.item()) > 1e-3


def test_rank_decay_errors():
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="rank_decay"):
            fastpref.FusedSPOLoss(mode="ranked", group_size=3, rank_decay=bad)
        with pytest.raises(ValueError, match="rank_decay"):
            losses.spo_ranked(torch.zeros(2, 3), rank_decay=bad)
    with pytest.raises(ValueError, match="rank_decay .* only for mode='ranked'"):
        fastpref.FusedSPOLoss(mode="best_of_n", group_size=3, rank_decay=0.5)


# -- errors ---------------------------------------------------------------------------------------------------------

def _edit(data, column, index, value):
    rows = data.to_dict()
    rows[column][index] = value
    return rows


@pytest.mark.parametrize("mode,column,value,error,match", [
    ("ranked", "ranks", [1, 1, 3], ValueError, "column 'ranks' has ties"),
    ("best_of_n", "ranks", [2, 2, 1], ValueError, "column 'ranks' has ties"),
    ("ranked", "ranks", [1, 2, 4], ValueError, "column 'ranks' must be a permutation of 1..3"),
    ("ranked", "ranks", [1, 2], ValueError, "column 'ranks' must hold a list of 3 entries"),
    ("ranked", "scores", [0.5, 0.5, 0.1], ValueError, "column 'scores' has ties"),
    ("best_of_n", "scores", [0.9, 0.9, 0.1], ValueError, "column 'scores' has a tie for the best score"),
    ("ranked", "scores", [0.5, 0.2], ValueError, "column 'scores' must hold a list of 3 entries"),
    ("ranked", "responses", [" w1", " w2"], ValueError, "every example needs n = 3 'responses'"),
])
def test_bad_grouped_data_raises(tok, tmp_path, mode, column, value, error, match):
    order = column if column != "responses" else "ranks"
    data = grouped_rows(3, 3, order=order)
    rows = _edit(data, column, 1, value)
    with pytest.raises(error, match=match):
        _trainer(tok, tmp_path, Dataset.from_dict(rows), spo_mode=mode)


def test_bad_grouped_types_and_columns_raise(tok, tmp_path):
    data = grouped_rows(2, 3).to_dict()
    floats = dict(data, ranks=[[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match="column 'ranks' must hold ints"):
        _trainer(tok, tmp_path, Dataset.from_dict(floats), spo_mode="ranked")
    with pytest.raises(TypeError, match="column 'scores' must hold finite numbers"):
        _trainer(tok, tmp_path, Dataset.from_dict({**data, "scores": [[1.0, math.inf, 0.0]] * 2}).remove_columns(
            "ranks"), spo_mode="ranked")
    chat = [[{"role": "assistant", "content": "w1"}] * 3] * 2
    with pytest.raises(TypeError, match="column 'responses' must hold a list of plain-text strings"):
        _trainer(tok, tmp_path, Dataset.from_dict(dict(data, responses=chat)), spo_mode="best_of_n")
    with pytest.raises(ValueError, match="exactly one of 'ranks' .* or 'scores'"):
        _trainer(tok, tmp_path, Dataset.from_dict(dict(data, scores=[[0.1, 0.2, 0.3]] * 2)), spo_mode="ranked")
    with pytest.raises(ValueError, match="needs dataset columns 'prompt', 'responses'"):
        _trainer(tok, tmp_path, preference_rows(4), spo_mode="ranked")
    with pytest.raises(ValueError, match="n >= 2 responses"):
        _trainer(tok, tmp_path, Dataset.from_dict(dict(data, responses=[[" w1"], [" w2"]], ranks=[[1], [1]])),
                 spo_mode="ranked")


@pytest.mark.parametrize("options,match", [
    (dict(spo_mode="listwise"), "spo_mode must be one of"),
    (dict(spo_num_samples=0), "spo_num_samples must be a positive int"),
    (dict(spo_num_samples=True), "spo_num_samples must be a positive int"),
    (dict(spo_resample_every=0), "spo_resample_every must be a positive int"),
    (dict(spo_max_new_tokens=0), "spo_max_new_tokens must be a positive int or None"),
    (dict(spo_samples="cached"), "spo_samples must be 'online' or 'dataset'"),
    (dict(loss_kwargs=dict(mode="ranked", group_size=3)), "pass spo_mode instead"),
])
def test_bad_options_raise(tok, tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tok, tmp_path, **options)


def test_grouped_options_conflicts_raise(tok, tmp_path):
    data = grouped_rows(2, 3)
    with pytest.raises(ValueError, match="group_size: the trainer sets it"):
        _trainer(tok, tmp_path, data, loss_kwargs=dict(group_size=3), spo_mode="ranked")
    with pytest.raises(ValueError, match="spo_mode='ranked' is for fastpref_loss='spo'"):
        FastPrefDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=dpo_config(tmp_path), train_dataset=data,
                           processing_class=tok, fastpref_loss="simpo", spo_mode="ranked")


def test_grouped_accumulation_equals_one_batch(tok, tmp_path):
    """Ranked groups split into accumulation micro-batches give the one-batch step (every group trained on once,
    nothing dropped; the effective-batch pass reads the group rows): one SGD step of (batch 4, accumulation 1) and
    (2, 2) agree."""
    data = grouped_rows(4, 3, seed=3)
    params = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = _trainer(tok, tmp_path / str(batch), data, loss_kwargs=dict(gamma=0.5, rank_decay=0.5),
                           spo_mode="ranked", spo_samples="dataset", per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd")
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    start = dict(tiny_llama(seed=0).named_parameters())
    assert max((params[0][n] - start[n]).abs().max().item() for n in start) > 1e-4  # the step moved the policy
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_online_samples_under_bf16_autocast(tok, tmp_path):
    """DPOConfig(bf16=True): the reference head of the KL pass is cast with its hidden states (it was passed in
    fp32 beside bf16 hidden states, a TypeError), and the steps train with a finite loss and KL."""
    trainer = FastPrefDPOTrainer(
        model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1),
        args=dpo_config(tmp_path, bf16=True, max_steps=2, optim="sgd", learning_rate=0.1),
        train_dataset=preference_rows(8), processing_class=tok, fastpref_loss="spo",
        fastpref_loss_kwargs=dict(SPO, alpha=0.5, kl_coef=0.1))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert torch.isfinite(torch.tensor([h["loss"], h["kl"]])).all() and h["kl"] > 0.0
