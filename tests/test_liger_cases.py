"""Liger-Kernel's own chunked-loss test cases, run against our modules.

The PARAMETER VALUES below are copied from Liger-Kernel's ``test/chunked_loss/test_{simpo,orpo,cpo,kto,dpo}_loss.py``
(the snapshot whose loss signatures match the installed 0.8.5): shapes ``(B, T, H, V)`` with ``2B`` sequences
for the pairwise losses, ``bias``/``ref_bias``, ``(ignore_index, beta[, gamma | alpha])``, ``label_smoothing``,
``compute_nll_loss``, the DPO loss types with their extra keywords, and the input recipe (``randn`` hidden states,
weights and biases, random targets with a random number of positions set to ``ignore_index``; ORPO's random
``nll_target``; KTO's random labels and ``kl``). Liger's test code is not copied: each case runs our module and
the installed Liger module on the same inputs and compares loss, metrics and the gradients of input, weight and
bias. Liger's ``test_correctness`` shapes carry ignored positions; its ``test_correctness_functional`` shapes do not.

Only fp32: Liger's bf16 cases are the same cases in bf16 and are run here in fp32 on CPU (Liger's chunked
losses are plain torch; ``compiled=False``). The small shapes run the full grids. Liger's largest shape
(8, 128, 1024, 4096) costs about 35 s per loss on two CPU cores, past this file's time budget: with
``FASTPREF_LIGER_LARGE=1`` it is added once per loss, at the grid's first parameter combination.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import fastpref
from fastpref.testing import rel_err

chunked = pytest.importorskip("liger_kernel.chunked_loss")

# ----------------------------------------------------------------------------- Liger's parameter values
LARGE = (8, 128, 1024, 4096)
RANDOM = (3, 47, 31, 123)
TINY = (2, 2, 8, 8)  # functional tests only: no ignored positions
BIAS = [True, False]
LABEL_SMOOTHING = [0.0, 0.1]
COMPUTE_NLL = [True, False]
SIMPO_IGNORE_BETA_GAMMA = [(-100, 0.1, 0.5), (42, 0.2, 0.85)]
ORPO_IGNORE_BETA = [(-100, 0.1), (42, 0.2)]
CPO_IGNORE_BETA_ALPHA = [(-100, 0.1, 1.0), (42, 0.2, 0.85)]
KTO_IGNORE_BETA = [(-100, 0.1), (42, 0.2)]
DPO_IGNORE_BETA = [(-100, 0.1), (42, 0.2)]
DPO_LOSS_TYPES = [("sigmoid", {}), ("apo_zero", {}), ("apo_down", {}), ("sppo_hard", {}), ("nca_pair", {}),
                  ("hinge", {}), ("bco_pair", {}), ("robust", {"label_smoothing": 0.1}),
                  ("exo_pair", {"label_smoothing": 1e-3}), ("discopop", {"discopop_tau": 0.05})]
# Liger's fp32 tolerances (atol, rtol); we apply them as max|ours - theirs| <= atol + rtol * max|theirs|.
ATOL, RTOL = 1e-5, 5e-4


def _grid(*lists):
    return list(itertools.product(*lists))


def _with_large(grid, small_shapes=(RANDOM,)):
    """The grid on the small shapes, plus the large shape at the grid's first combination when asked for."""
    large = [(LARGE, *grid[0])] if os.environ.get("FASTPREF_LIGER_LARGE") == "1" else []
    return large + [(shape, *combo) for shape in small_shapes for combo in grid]


# ----------------------------------------------------------------------------- inputs and comparison
def _inputs(shape, *, pairwise=True, bias=True, ref_bias=False, ignore_index=-100, mask=True, seed=0):
    """Liger's recipe: randn hidden [S, T, H], weight [V, H], bias [V]; random targets, some set to ignore_index."""
    b, t, h, v = shape
    s = 2 * b if pairwise else b
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, t, h, generator=gen).requires_grad_()
    weight = torch.randn(v, h, generator=gen).requires_grad_()
    bias_t = torch.randn(v, generator=gen).requires_grad_() if bias else None
    targets = torch.randint(0, v, (s, t), generator=gen)
    if mask:
        count = int(torch.randint(1, s * t // 2, (1,), generator=gen))
        targets.view(-1)[torch.randperm(s * t, generator=gen)[:count]] = ignore_index
    ref = dict(ref_hidden=torch.randn(s, t, h, generator=gen), ref_weight=torch.randn(v, h, generator=gen),
               ref_bias=torch.randn(v, generator=gen) if ref_bias else None)
    return hidden, weight, bias_t, targets, ref, gen


def _close(ours, theirs, what):
    ours, theirs = ours.detach().double().reshape(theirs.shape), theirs.detach().double()
    err = (ours - theirs).abs().max().item()
    assert err <= ATOL + RTOL * theirs.abs().max().item(), f"{what}: max abs error {err}"


def _loss_and_grads(loss, leaves):
    return [loss] + list(torch.autograd.grad(loss, [x for x in leaves if x is not None]))


def _compare_grads(ours, theirs):
    for name, a, b in zip(("loss", "d_input", "d_weight", "d_bias"), ours, theirs):
        _close(a, b, name)
    assert all(g.abs().max() > 0 for g in theirs[1:])  # non-trivial gradients


def _lengths(targets, ignore_index):
    n = (targets != ignore_index).sum(-1).double()
    half = n.shape[0] // 2
    return n[:half], n[half:]


def _check_logits_means(out, aux, hidden, weight, bias, targets, ignore_index, masked):
    """Liger divides by B*T*V (ignored positions included); ours is over the non-ignored positions."""
    if not masked:  # the two definitions coincide
        _close(out.metrics["chosen_logits_mean"], aux[2], "chosen_logits_mean")
        _close(out.metrics["rejected_logits_mean"], aux[3], "rejected_logits_mean")
        return
    logits = hidden.detach().double() @ weight.detach().double().T
    if bias is not None:
        logits = logits + bias.detach().double()
    valid = targets != ignore_index
    half = targets.shape[0] // 2
    for name, rows in (("chosen_logits_mean", slice(None, half)), ("rejected_logits_mean", slice(half, None))):
        expected = logits[rows][valid[rows]].mean()
        assert abs(out.metrics[name].item() - expected.item()) <= 1e-5 * (1 + abs(expected.item())), name


# ----------------------------------------------------------------------------- SimPO
SIMPO_CASES = (_with_large(_grid(BIAS, SIMPO_IGNORE_BETA_GAMMA, LABEL_SMOOTHING, [True]))
               + [(shape, bias, (-100, 0.1, 0.5), 0.0, False) for shape in (TINY, RANDOM) for bias in BIAS])


@pytest.mark.parametrize("shape, bias, ignore_beta_gamma, label_smoothing, masked", SIMPO_CASES)
def test_simpo_liger_case(shape, bias, ignore_beta_gamma, label_smoothing, masked):
    ignore_index, beta, gamma = ignore_beta_gamma
    hidden, weight, b, targets, _, _ = _inputs(shape, bias=bias, ignore_index=ignore_index, mask=masked)
    kwargs = dict(ignore_index=ignore_index, beta=beta, alpha=1.0, gamma=gamma, label_smoothing=label_smoothing)
    liger = chunked.LigerFusedLinearSimPOLoss(**kwargs, compiled=False)
    ours = fastpref.FusedSimPOLoss.from_liger(**kwargs, extra_outputs=("mean_logits",))
    out = ours(weight, hidden, targets, bias=b)
    loss, aux = liger(weight, hidden, targets, b)
    _compare_grads(_loss_and_grads(out.loss, [hidden, weight, b]), _loss_and_grads(loss, [hidden, weight, b]))
    nw, nl = _lengths(targets, ignore_index)  # Liger's SimPO log-probs are length-averaged
    _close(out.metrics["chosen_logps"] / nw, aux[0], "chosen_logps")
    _close(out.metrics["rejected_logps"] / nl, aux[1], "rejected_logps")
    _close(out.metrics["nll"], aux[4], "nll")
    _close(out.metrics["chosen_rewards"], aux[5], "chosen_rewards")
    _close(out.metrics["rejected_rewards"], aux[6], "rejected_rewards")
    _check_logits_means(out, aux, hidden, weight, b, targets, ignore_index, masked)


# ----------------------------------------------------------------------------- ORPO
ORPO_CASES = (_with_large(_grid(BIAS, ORPO_IGNORE_BETA, [True], [True]))
              + [(shape, bias, (-100, 0.1), False, masked) for shape in (TINY, RANDOM) for bias in BIAS
                 for masked in (False,)])


@pytest.mark.parametrize("shape, bias, ignore_beta, with_nll_target, masked", ORPO_CASES)
def test_orpo_liger_case(shape, bias, ignore_beta, with_nll_target, masked):
    ignore_index, beta = ignore_beta
    hidden, weight, b, targets, _, gen = _inputs(shape, bias=bias, ignore_index=ignore_index, mask=masked)
    nll_target = torch.randint(0, shape[3], targets.shape, generator=gen) if with_nll_target else None
    liger = chunked.LigerFusedLinearORPOLoss(ignore_index=ignore_index, beta=beta, compiled=False)
    ours = fastpref.FusedORPOLoss.from_liger(ignore_index=ignore_index, beta=beta, extra_outputs=("mean_logits",))
    out = ours(weight, hidden, targets, bias=b, nll_target=nll_target)
    loss, aux = liger(weight, hidden, targets, b, nll_target=nll_target)
    _compare_grads(_loss_and_grads(out.loss, [hidden, weight, b]), _loss_and_grads(loss, [hidden, weight, b]))
    nw, nl = _lengths(targets, ignore_index)
    _close(out.metrics["chosen_logps"] / nw, aux[0], "chosen_logps")
    _close(out.metrics["rejected_logps"] / nl, aux[1], "rejected_logps")
    _close(out.metrics["nll"], aux[4], "nll")
    _close(out.metrics["chosen_rewards"], aux[5], "chosen_rewards")
    _close(out.metrics["rejected_rewards"], aux[6], "rejected_rewards")
    d = out.metrics["log_odds_ratio"]  # ours: the per-pair log-odds d; Liger's: mean log sigma(d), mean d
    _close(torch.nn.functional.logsigmoid(d).mean(), aux[7], "log_odds_ratio")
    _close(d.mean(), aux[8], "log_odds_chosen")
    _check_logits_means(out, aux, hidden, weight, b, targets, ignore_index, masked)


# ----------------------------------------------------------------------------- CPO
CPO_CASES = (_with_large(_grid(BIAS, CPO_IGNORE_BETA_ALPHA, LABEL_SMOOTHING, [False], [True]))
             + [(RANDOM, bias, (-100, 0.1, 1.0), 0.0, True, True) for bias in BIAS]  # average_log_prob
             + [(shape, bias, (-100, 0.1, 1.0), 0.0, False, False) for shape in (TINY, RANDOM) for bias in BIAS])


@pytest.mark.parametrize("shape, bias, ignore_beta_alpha, label_smoothing, average_log_prob, masked", CPO_CASES)
def test_cpo_liger_case(shape, bias, ignore_beta_alpha, label_smoothing, average_log_prob, masked):
    ignore_index, beta, alpha = ignore_beta_alpha
    hidden, weight, b, targets, _, _ = _inputs(shape, bias=bias, ignore_index=ignore_index, mask=masked)
    kwargs = dict(ignore_index=ignore_index, beta=beta, alpha=alpha, label_smoothing=label_smoothing,
                  average_log_prob=average_log_prob)
    liger = chunked.LigerFusedLinearCPOLoss(**kwargs, compiled=False)
    ours = fastpref.FusedCPOLoss.from_liger(**kwargs, extra_outputs=("mean_logits",))
    out = ours(weight, hidden, targets, bias=b)
    loss, aux = liger(weight, hidden, targets, b)
    _compare_grads(_loss_and_grads(out.loss, [hidden, weight, b]), _loss_and_grads(loss, [hidden, weight, b]))
    nw, nl = _lengths(targets, ignore_index) if average_log_prob else (1.0, 1.0)
    _close(out.metrics["chosen_logps"] / nw, aux[0], "chosen_logps")
    _close(out.metrics["rejected_logps"] / nl, aux[1], "rejected_logps")
    _close(out.metrics["nll"], aux[4], "nll")
    _close(out.metrics["chosen_rewards"], aux[5], "chosen_rewards")
    _close(out.metrics["rejected_rewards"], aux[6], "rejected_rewards")
    _check_logits_means(out, aux, hidden, weight, b, targets, ignore_index, masked)


# ----------------------------------------------------------------------------- KTO
KTO_CASES = (_with_large(_grid(BIAS, BIAS, KTO_IGNORE_BETA, [True]))
             + [(shape, bias, ref_bias, (-100, 0.1), False) for shape in (TINY, RANDOM) for bias in BIAS
                for ref_bias in BIAS])


@pytest.mark.parametrize("shape, bias, ref_bias, ignore_beta, masked", KTO_CASES)
def test_kto_liger_case(shape, bias, ref_bias, ignore_beta, masked):
    ignore_index, beta = ignore_beta
    hidden, weight, b, targets, ref, gen = _inputs(shape, pairwise=False, bias=bias, ref_bias=ref_bias,
                                                   ignore_index=ignore_index, mask=masked)
    labels = torch.randint(2, (shape[0],), generator=gen).bool()
    kl = torch.randn(1, generator=gen)
    liger = chunked.LigerFusedLinearKTOLoss(ignore_index=ignore_index, beta=beta, use_ref_model=True,
                                            average_log_prob=True, compiled=False)
    ours = fastpref.FusedKTOLoss(ignore_index=ignore_index, beta=beta, average_log_prob=True,
                                 extra_outputs=("mean_logits",))
    out = ours(weight, hidden, targets, bias=b, labels=labels, z0=kl, **ref)
    loss, aux = liger(hidden, weight, targets, b, preference_labels=labels, ref_input=ref["ref_hidden"],
                      ref_weight=ref["ref_weight"], ref_bias=ref["ref_bias"], kl=kl)
    _compare_grads(_loss_and_grads(out.loss, [hidden, weight, b]), _loss_and_grads(loss, [hidden, weight, b]))
    avg = out.metrics["logps"] / (targets != ignore_index).sum(-1)  # Liger returns sums of averaged log-probs
    _close(avg[labels].sum(), aux[0], "chosen_logps_sum")
    _close(avg[~labels].sum(), aux[1], "rejected_logps_sum")
    _close(out.metrics["chosen_rewards"].sum(), aux[4], "chosen_rewards_sum")
    _close(out.metrics["rejected_rewards"].sum(), aux[5], "rejected_rewards_sum")
    if not masked:  # Liger's logits sums run over every position: ours over the non-ignored ones
        vocab = shape[3]
        _close(vocab * out.metrics["mean_logits"][labels].sum(), aux[2], "chosen_logits_sum")
        _close(vocab * out.metrics["mean_logits"][~labels].sum(), aux[3], "rejected_logits_sum")


# ----------------------------------------------------------------------------- DPO (FusedDPOLoss's Liger options)
DPO_CASES = (_with_large(_grid(BIAS, BIAS, COMPUTE_NLL, DPO_IGNORE_BETA, DPO_LOSS_TYPES[:1]))
             + [(RANDOM, bias, ref_bias, nll, (-100, 0.1), lt) for bias in BIAS for ref_bias in BIAS
                for nll in COMPUTE_NLL for lt in DPO_LOSS_TYPES[1:]])


@pytest.mark.parametrize("shape, bias, ref_bias, compute_nll_loss, ignore_beta, loss_type", DPO_CASES)
def test_dpo_liger_case(shape, bias, ref_bias, compute_nll_loss, ignore_beta, loss_type):
    ignore_index, beta = ignore_beta
    name, extra = loss_type
    hidden, weight, b, targets, ref, _ = _inputs(shape, bias=bias, ref_bias=ref_bias, ignore_index=ignore_index)
    kwargs = dict(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss, average_log_prob=True,
                  loss_type=name, **extra)
    liger = chunked.LigerFusedLinearDPOLoss(**kwargs, use_ref_model=True, compiled=False)
    out = fastpref.FusedDPOLoss(**kwargs)(weight, hidden, targets, bias=b, **ref)
    loss, aux = liger(weight, hidden, targets, b, ref_input=ref["ref_hidden"], ref_weight=ref["ref_weight"],
                      ref_bias=ref["ref_bias"])
    _compare_grads(_loss_and_grads(out.loss, [hidden, weight, b]), _loss_and_grads(loss, [hidden, weight, b]))
    _close(out.metrics["chosen_rewards"], aux[5], "chosen_rewards")
    _close(out.metrics["rejected_rewards"], aux[6], "rejected_rewards")
    if compute_nll_loss:
        _close(out.metrics["nll"], aux[4], "nll")


def test_dpo_alpha_scales_the_nll_like_liger():
    """Liger's test_alpha_scales_nll_loss shape (4, 16, 32, 64), alpha = 2."""
    hidden, weight, _, targets, ref, _ = _inputs((2, 16, 32, 64), bias=False)
    kwargs = dict(beta=0.1, compute_nll_loss=True, alpha=2.0)
    liger = chunked.LigerFusedLinearDPOLoss(**kwargs, use_ref_model=True, compiled=False)
    out = fastpref.FusedDPOLoss(**kwargs)(weight, hidden, targets, **ref)
    loss, _ = liger(weight, hidden, targets, ref_input=ref["ref_hidden"], ref_weight=ref["ref_weight"])
    _compare_grads(_loss_and_grads(out.loss, [hidden, weight]), _loss_and_grads(loss, [hidden, weight]))


# ----------------------------------------------------------------------------- names, aliases, eager parity
def test_liger_names_and_aliases():
    assert fastpref.FusedCPOLoss(alpha=0.5).nll_weight == 0.5
    assert fastpref.FusedSimPOLoss(compute_nll_loss=True).nll_weight == 1.0  # Liger's alpha default
    assert fastpref.FusedSimPOLoss().nll_weight == 0.0 and fastpref.FusedORPOLoss().nll_weight == 1.0
    assert fastpref.FusedORPOLoss(compute_nll_loss=False).nll_weight == 0.0
    assert fastpref.FusedORPOLoss.from_liger(beta=0.3).orpo_lambda == 0.3
    simpo = fastpref.FusedSimPOLoss.from_liger()  # Liger's defaults: beta 0.1, the NLL on
    assert (simpo.beta, simpo.gamma, simpo.nll_weight) == (0.1, 0.5, 1.0)
    assert fastpref.FusedCPOLoss.from_liger(compute_nll_loss=False, alpha=0.7).nll_weight == 0.0
    with pytest.raises(TypeError, match="alias alpha"):
        fastpref.FusedCPOLoss(alpha=0.5, nll_weight=0.5)
    with pytest.raises(TypeError, match="orpo_lambda"):
        fastpref.FusedORPOLoss(beta=0.1)
    with pytest.raises(ValueError, match="compute_nll_loss=False"):
        fastpref.FusedSimPOLoss(compute_nll_loss=False, nll_weight=0.5)
    with pytest.raises(TypeError, match="nll_weight"):
        fastpref.FusedCPOLoss.from_liger(alpha=0.5, nll_weight=0.5)
    hidden, weight, _, targets, _, _ = _inputs(TINY, bias=False, mask=False)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastpref.FusedSimPOLoss(label_smoothing=0.5)(weight, hidden, targets)
    with pytest.raises(ValueError, match="nll_targets"):
        fastpref.FusedORPOLoss()(weight, hidden, targets, nll_targets=targets[:1])
    with pytest.raises(TypeError, match="alias nll_target"):
        fastpref.FusedORPOLoss()(weight, hidden, targets, nll_targets=targets, nll_target=targets)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_new_options_match_the_eager_twins_fp64(packed):
    import fastpref.reference as reference
    from fastpref.testing import make_sequences

    gen = torch.Generator().manual_seed(11)
    vocab, dim = 300, 16
    weight = (0.3 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    bias = (0.1 * torch.randn(vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    seq = make_sequences(gen, 6, dtype=torch.float64, packed=packed, vocab=vocab, dim=dim)
    nll_targets = torch.where(seq.targets >= 0, torch.randint(0, vocab, seq.targets.shape, generator=gen), -100)
    labels = torch.tensor([True, False, True, True, False, False])
    call = dict(bias=bias, seq_ids=seq.seq_ids, num_seqs=6 if packed else None)
    cases = [("FusedSimPOLoss", dict(label_smoothing=0.2, nll_weight=0.7), {}),
             ("FusedORPOLoss", dict(orpo_lambda=0.4), dict(nll_targets=nll_targets)),
             ("FusedCPOLoss", dict(label_smoothing=0.1, average_log_prob=True, alpha=0.5), {}),
             ("FusedKTOLoss", dict(average_log_prob=True), dict(labels=labels, z0=0.05, ref_hidden=seq.ref_hidden))]
    for name, ctor, extra in cases:
        results = []
        for cls in (getattr(fastpref, name), getattr(reference, name)):
            out = cls(**ctor, extra_outputs=("mean_logits",))(weight, seq.hidden, seq.targets, **call, **extra)
            grads = torch.autograd.grad(out.loss, [seq.hidden, weight, bias])
            results.append([out.loss, *grads] + [out.metrics[k] for k in sorted(out.metrics)])
        errs = [rel_err(a, b) for a, b in zip(*results)]
        assert max(errs) <= 1e-10, f"{name}: {errs}"
    # The NLL over other targets is a real change: ORPO with nll_targets differs from without.
    plain = fastpref.FusedORPOLoss(orpo_lambda=0.4)(weight, seq.hidden, seq.targets, **call)
    other = fastpref.FusedORPOLoss(orpo_lambda=0.4)(weight, seq.hidden, seq.targets, nll_targets=nll_targets, **call)
    assert abs(plain.loss.item() - other.loss.item()) > 1e-3
