"""The DPO family (TRL 1.16 loss types, f-divergences, LD-DPO, WPO; Liger's DPO options): the head
:func:`fastpref.losses.dpo_family` against TRL's own ``DPOTrainer._compute_loss`` (run on a stub trainer
and model, so every expression is TRL's) and an independent fp64 re-implementation, finite-difference
gradients, and :class:`fastpref.FusedDPOLoss` (fused op) against its eager twin and against the heads."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastpref
import fastpref.reference as reference
from fastpref import losses
from fastpref.backends import torch_backend
from fastpref.testing import make_case, make_sequences, rel_err, run_case

TYPES = losses.DPO_LOSS_TYPES
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
SMOOTHING = {"exo_pair": 1e-2, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(torch_backend, "BLOCK_V", 128)
    monkeypatch.setattr(torch_backend, "BLOCK_N", 8)


# ------------------------------------------------------------------------------------------- inputs


def token_batch(b=5, t=9, seed=0, dtype=torch.float64):
    """Per-token policy/reference log-probs [2B, T], a completion mask [2B, T + 1] (column 0: the prompt)
    and per-token log Σ p² (< log p is not required: any values)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (2 * b,), generator=g)
    lengths[0], lengths[b] = t, 2  # one long tail
    mask = torch.zeros(2 * b, t + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        start = 1 + int(torch.randint(0, t - n + 1, (1,), generator=g))
        mask[i, start:start + n] = 1
    shift = mask[:, 1:].bool()
    logp = -0.2 - 2.0 * torch.rand(2 * b, t, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(2 * b, t, generator=g, dtype=torch.float64)
    lss = -0.5 - torch.rand(2 * b, t, generator=g, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    logp, ref, lss = (torch.where(shift, x, zero).to(dtype) for x in (logp, ref, lss))
    return logp.requires_grad_(), ref, mask, lss


def options(loss_type, **extra):
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    eps = max([SMOOTHING.get(t, 0.0) for t in types])
    return dict(dict(loss_type=types, beta=0.7, label_smoothing=eps), **extra)


# ------------------------------------------------------------------------------------------- TRL's code path


class _StubModel(torch.nn.Module):
    """Returns fixed outputs (per-token log-probs and TRL's extra outputs), whatever the inputs."""

    is_gradient_checkpointing = False

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **kwargs):
        return self.outputs


def trl_loss(logp, ref, mask, lss, *, loss_type, beta=0.1, label_smoothing=0.0, loss_weights=None,
             f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None,
             use_weighting=False):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on a stub trainer whose model returns ``logp`` per token."""
    from trl import DPOTrainer

    n = logp.shape[0]
    zeros = torch.zeros_like(logp.detach())
    out = SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                          log_sum_sq_probs=lss, aux_loss=None)
    ref_out = SimpleNamespace(log_probs=ref)
    policy = _StubModel(out)
    trainer = SimpleNamespace(
        model=policy, ref_model=_StubModel(ref_out), precompute_ref_logps=False, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=discopop_tau), beta=beta,
        loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type), ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing, use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.ones(n, mask.shape[1], dtype=torch.long), attention_mask=torch.ones_like(mask),
                  completion_mask=mask)
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def ours(logp, ref, mask, lss, *, loss_type, ld_alpha=None, use_weighting=False, **opts):
    """The same loss from fastpref's heads on per-sequence statistics."""
    valid = mask[:, 1:].bool()
    if ld_alpha is None:
        s, r = logp.sum(1), ref.sum(1)
    else:
        s, r = losses.ld_logps(logp, valid, ld_alpha), losses.ld_logps(ref, valid, ld_alpha)
    n = valid.sum(1)
    b = logp.shape[0] // 2
    nll = losses.chosen_nll(logp.sum(1)[:b], n[:b])
    weights = None
    if use_weighting:
        w = losses.wpo_sequence_weights(logp.sum(1), losses.per_sequence_sums(lss), n)
        weights = w[:b] * w[b:]
    return losses.dpo_family(s[:b], s[b:], r[:b], r[b:], n[:b], n[b:], loss_type=loss_type, pair_weights=weights,
                             sft_nll=nll, **opts)


def _compare_with_trl(config, dtype=torch.float64, tol=1e-12, seed=0):
    logp, ref, mask, lss = token_batch(seed=seed, dtype=dtype)
    trl_value, trl_metrics = trl_loss(logp, ref, mask, lss, **config)
    (trl_grad,) = torch.autograd.grad(trl_value, logp)
    value, metrics = ours(logp, ref, mask, lss, **config)
    (grad,) = torch.autograd.grad(value, logp)
    if "exo_pair" in config["loss_type"] and dtype == torch.float64:
        tol = max(tol, 1e-7)  # TRL builds epsilon as a float32 tensor: log(1 - eps), log(eps) rounded to float32
    assert rel_err(value, trl_value) <= tol, (config, value.item(), trl_value.item())
    # Ignored positions hold constant zeros in both pipelines; TRL's masked sums also route a gradient there.
    valid = mask[:, 1:].bool()
    grad, trl_grad = grad[valid], trl_grad[valid]
    assert rel_err(grad, trl_grad) <= tol and grad.abs().max() > 0, config
    for key, trl_key in (("chosen_rewards", "rewards/chosen"), ("rejected_rewards", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                         ("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected")):
        close = 1e-7 if key == "reward_accuracy" else 1e-12  # TRL averages the accuracy in float32
        assert metrics[key].mean().item() == pytest.approx(trl_metrics[trl_key], rel=close, abs=close), key


@pytest.mark.parametrize("loss_type", TYPES)
def test_every_loss_type_equals_trl(loss_type):
    _compare_with_trl(options(loss_type))


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_DIV_TYPES)
def test_f_divergences_equal_trl(loss_type, f_div):
    # TRL's alpha-divergence has no float64 branch: compare it in float32.
    dtype, tol = (torch.float32, 2e-6) if f_div == "alpha_divergence" else (torch.float64, 1e-12)
    _compare_with_trl(options(loss_type, f_divergence_type=f_div, f_alpha_divergence_coef=0.3), dtype=dtype, tol=tol)


@pytest.mark.parametrize("coef", [1.0, 2.5, -0.5])
def test_alpha_divergence_coefficients_equal_trl(coef):
    _compare_with_trl(options("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef),
                      dtype=torch.float32, tol=2e-6)


@pytest.mark.parametrize("config", [
    options(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    options(["ipo", "exo_pair", "aot"], loss_weights=[1.0, -0.5, 2.0]),
    options(["sigmoid", "robust"], ld_alpha=0.4),
    options("ipo", ld_alpha=0.0),
    options("apo_down", ld_alpha=1.0),
    options("sigmoid", use_weighting=True),
    options(["sigmoid_norm", "ipo", "nca_pair", "discopop"], use_weighting=True, ld_alpha=0.5, discopop_tau=0.3),
    options(["exo_pair", "robust", "sppo_hard", "apo_zero"], loss_weights=[0.3, 0.3, 0.2, 0.2], use_weighting=True),
], ids=["mpo", "weights", "ld-list", "ld0", "ld1", "wpo", "wpo-ld-list", "wpo-smoothing"])
def test_combinations_equal_trl(config):
    _compare_with_trl(config, seed=3)


@pytest.mark.parametrize("loss_type", ["hinge", "sft"])
def test_trl_fails_where_the_head_weights_per_pair(loss_type):
    """Documented departure: TRL's in-place WPO product breaks hinge's backward and sft's expanded loss."""
    logp, ref, mask, lss = token_batch(seed=1)
    config = options(loss_type, use_weighting=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(trl_loss(logp, ref, mask, lss, **config)[0], logp)
    value, _ = ours(logp, ref, mask, lss, **config)
    plain, _ = ours(logp, ref, mask, lss, **options(loss_type))
    assert torch.isfinite(value) and value.item() != plain.item()


# ------------------------------------------------------------------------------------------- independent fp64


def _ls(z):
    return -torch.log1p(torch.exp(-z))


def independent(sw, sl, rw, rl, nw, nl, t, beta, eps, tau, nll):
    """TRL's per-pair formulas, written out once more (reverse KL)."""
    dw, dl = sw - rw, sl - rl
    x = beta * (dw - dl)
    avg = dw / nw - dl / nl
    cdpo = lambda z: -(1 - eps) * _ls(z) - eps * _ls(-z)  # noqa: E731
    if t == "aot":
        z = beta * (torch.sort(sw - sl).values - torch.sort(rw - rl).values)
    elif t == "aot_unpaired":
        z = beta * (torch.sort(dw).values - torch.sort(dl).values)
    table = {
        "sigmoid": lambda: -_ls(x), "hinge": lambda: torch.clamp(1 - x, min=0),
        "ipo": lambda: (avg - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: torch.sigmoid(x) * (_ls(x) - math.log(1 - eps))
        + torch.sigmoid(-x) * (_ls(-x) - math.log(eps)),
        "nca_pair": lambda: -_ls(beta * dw) - 0.5 * _ls(-beta * dw) - 0.5 * _ls(-beta * dl),
        "robust": lambda: ((1 - eps) * -_ls(x) - eps * -_ls(-x)) / (1 - 2 * eps),
        "bco_pair": lambda: -_ls(beta * dw) - _ls(-beta * dl),
        "sppo_hard": lambda: (dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2,
        "aot": lambda: cdpo(z), "aot_unpaired": lambda: cdpo(z),
        "apo_zero": lambda: 1 - torch.sigmoid(beta * dw) + torch.sigmoid(beta * dl),
        "apo_down": lambda: torch.sigmoid(beta * dw) + 1 - torch.sigmoid(beta * (dw - dl)),
        "discopop": lambda: -_ls(x) * (1 - torch.sigmoid(x / tau)) + torch.exp(-x) * torch.sigmoid(x / tau),
        "sft": lambda: nll * torch.ones_like(x), "sigmoid_norm": lambda: -_ls(beta * avg),
    }
    return table[t]().mean()


def pair_batch(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    sw, sl = -5 - 30 * torch.rand(b, generator=g, dtype=torch.float64), -5 - 30 * torch.rand(b, generator=g,
                                                                                            dtype=torch.float64)
    rw, rl = sw + 3 * torch.randn(b, generator=g, dtype=torch.float64), sl + 3 * torch.randn(b, generator=g,
                                                                                            dtype=torch.float64)
    nw, nl = torch.randint(1, 15, (b,), generator=g), torch.randint(1, 15, (b,), generator=g)
    return sw.requires_grad_(), sl.requires_grad_(), rw, rl, nw, nl


@pytest.mark.parametrize("loss_type", TYPES)
def test_head_matches_independent_fp64_and_finite_differences(loss_type):
    sw, sl, rw, rl, nw, nl = pair_batch(seed=TYPES.index(loss_type))
    opts = options(loss_type, discopop_tau=0.2)
    beta, eps = opts["beta"], opts["label_smoothing"]
    nll = losses.chosen_nll(sw, nw)
    value, _ = losses.dpo_family(sw, sl, rw, rl, nw, nl, sft_nll=nll, **opts)
    nll_by_hand = -sw.sum() / nw.sum()
    expected = independent(sw, sl, rw, rl, nw.double(), nl.double(), loss_type, beta, eps, 0.2, nll_by_hand)
    assert rel_err(value, expected) < 1e-12
    grads, expected_grads = (torch.autograd.grad(v, (sw, sl), allow_unused=True) for v in (value, expected))
    for a, e in zip(grads, expected_grads):
        assert (a is None and e is None) or rel_err(a, e) < 1e-11
    fn = lambda a, c: losses.dpo_family(a, c, rw, rl, nw, nl, sft_nll=losses.chosen_nll(a, nw), **opts)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (sw, sl), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_wpo_weights_and_list_weights_fp64():
    sw, sl, rw, rl, nw, nl = pair_batch(seed=40)
    cw = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.2
    nll = losses.chosen_nll(sw, nw)
    value, metrics = losses.dpo_family(sw, sl, rw, rl, nw, nl, loss_type=["hinge", "ipo", "sft"],
                                       loss_weights=[0.5, 2.0, 0.1], beta=0.4, pair_weights=cw, sft_nll=nll)
    per = [independent(sw, sl, rw, rl, nw.double(), nl.double(), t, 0.4, 0.0, 0.05, nll) for t in ("hinge", "ipo")]
    hinge = (torch.clamp(1 - 0.4 * ((sw - rw) - (sl - rl)), min=0) * cw).mean()
    ipo = ((((sw - rw) / nw - (sl - rl) / nl) - 1 / 0.8) ** 2 * cw).mean()
    expected = 0.5 * hinge + 2.0 * ipo + 0.1 * nll * cw.mean()
    assert rel_err(value, expected) < 1e-12
    assert metrics["loss_hinge"].item() == pytest.approx(hinge.item(), rel=1e-12) and per[0].item() != hinge.item()


def test_pair_weights_carry_no_gradient():
    sw, sl, rw, rl, nw, nl = pair_batch(seed=41)
    cw = (torch.rand(6, dtype=torch.float64) + 0.2).requires_grad_()
    value, _ = losses.dpo_family(sw, sl, rw, rl, loss_type="sigmoid", pair_weights=cw)
    assert torch.autograd.grad(value, cw, allow_unused=True)[0] is None


def test_f_divergence_scores_formulas():
    u = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert torch.equal(losses.f_divergence_scores(u), u)
    assert torch.allclose(losses.f_divergence_scores(u, "forward_kl"), 1 - 1 / u.exp(), rtol=1e-14)
    t = u.exp()
    assert torch.allclose(losses.f_divergence_scores(u, "js_divergence"), torch.log(2 * t / (t + 1)), rtol=1e-13)
    assert torch.allclose(losses.f_divergence_scores(u, "alpha_divergence", 0.5), (t ** -0.5 - 1) / -0.5, rtol=1e-13)
    big = torch.tensor([500.0], dtype=torch.float64)  # (α − 1)u clamped at 80 before exp
    assert losses.f_divergence_scores(big, "alpha_divergence", 2.0).item() == pytest.approx(math.exp(80) - 1)


# ------------------------------------------------------------------------------------------- LD-DPO


def test_ld_logps_by_hand_and_gradient():
    tok = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[False, True, True, True, True], [True, True, False, False, False]])
    out = losses.ld_logps(tok.requires_grad_(), valid, 0.25)
    assert out.tolist() == [-3.0 + 0.25 * -7.0, -11.0]  # shared m = 2 tokens
    (g,) = torch.autograd.grad(out.sum(), tok)
    assert g.tolist() == [[0.0, 1.0, 1.0, 0.25, 0.25], [1.0, 1.0, 0.0, 0.0, 0.0]]
    logp, _, mask, _ = token_batch(seed=5)
    assert torch.autograd.gradcheck(lambda x: losses.ld_logps(x, mask[:, 1:].bool(), 0.3), (logp,))
    assert torch.allclose(losses.ld_logps(logp, mask[:, 1:].bool(), 1.0), logp.sum(1), rtol=1e-14)


def test_ld_logps_packed_equals_padded():
    logp, _, mask, _ = token_batch(seed=6)
    valid = mask[:, 1:].bool()
    rows, _ = torch.nonzero(valid, as_tuple=True)
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    ids = torch.empty_like(rows)
    ids[perm] = rows  # sequences interleaved at random slots
    vals = torch.empty(rows.shape[0], dtype=torch.float64)
    for s in range(valid.shape[0]):  # each sequence's tokens in order along the packed array
        vals[torch.nonzero(ids == s).flatten()] = logp.detach()[s][valid[s]]
    ids, vals = torch.cat([ids, torch.tensor([0, 3])]), torch.cat([vals, torch.zeros(2, dtype=torch.float64)])
    ok = torch.ones(ids.shape[0], dtype=torch.bool)
    ok[-2:] = False  # two ignored positions
    packed = losses.ld_logps(vals, ok, 0.35, seq_ids=ids, num_seqs=valid.shape[0])
    assert torch.allclose(packed, losses.ld_logps(logp.detach(), valid, 0.35), rtol=1e-13, atol=1e-13)
    assert not torch.allclose(packed, logp.detach().sum(1))  # the tails are down-weighted


# ------------------------------------------------------------------------------------------- the module

MODULE_CONFIGS = [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type="ipo", ld_alpha=0.5),
    dict(loss_type=["robust", "exo_pair"], label_smoothing=0.1, f_divergence_type="js_divergence"),
    dict(loss_type="aot_unpaired", label_smoothing=0.05, beta=0.3),
    dict(loss_type="discopop", discopop_tau=0.2, average_log_prob=True, compute_nll_loss=True, alpha=0.4),
    dict(loss_type="sigmoid", label_smoothing=0.1, ld_alpha=0.2, compute_nll_loss=True),
]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: "-".join(map(str, c.values()))[:40])
def test_module_matches_eager_twin_fp64(config, packed):
    case = make_case("FusedDPOLoss", torch.float64, packed=packed, seed=4)
    fused = run_case(fastpref.FusedDPOLoss(**config), case)
    eager = run_case(reference.FusedDPOLoss(**config), case)
    assert rel_err(fused[0], eager[0]) < 1e-10
    for a, e in zip(fused[1], eager[1]):
        assert rel_err(a, e) < 1e-10 and a.abs().max() > 0
    assert ("nll" in fused[2]) == bool(config.get("compute_nll_loss"))


def _head_on_stats(case, config):
    """The module's loss rebuilt from the eager op's statistics and the heads."""
    seq = case.main
    layout = seq.layout()
    st = reference.fused_logprobs(seq.hidden, case.weight, seq.targets, bias=case.bias, ref_hidden=seq.ref_hidden,
                                  ref_weight=case.call["ref_weight"], **layout)
    valid = seq.targets != -100
    s, r, n = st.logps, st.ref_logps, st.lengths
    if config.get("ld_alpha") is not None:
        s = losses.ld_logps(st.token_logps, valid, config["ld_alpha"], **layout)
        r = losses.ld_logps(st.ref_token_logps, valid, config["ld_alpha"], **layout)
    if config.get("average_log_prob"):
        s, r = s / n, r / n
    b = s.shape[0] // 2
    nll = losses.chosen_nll(st.logps[:b], n[:b])
    opts = {k: v for k, v in config.items() if k not in ("ld_alpha", "average_log_prob", "compute_nll_loss", "alpha")}
    loss, _ = losses.dpo_family(s[:b], s[b:], r[:b], r[b:], n[:b], n[b:], sft_nll=nll, smooth_sigmoid=True, **opts)
    return loss + config.get("alpha", 1.0) * nll if config.get("compute_nll_loss") else loss


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: "-".join(map(str, c.values()))[:40])
def test_module_equals_heads_on_the_op_statistics(config, packed):
    case = make_case("FusedDPOLoss", torch.float64, packed=packed, seed=5)
    loss = reference.FusedDPOLoss(**config)(case.weight, case.main.hidden, case.main.targets, **case.kwargs()).loss
    assert rel_err(loss, _head_on_stats(case, config)) < 1e-12


def test_default_is_bitwise_the_original_dpo():
    case = make_case("FusedDPOLoss", torch.float32, seed=6)
    st = fastpref.fused_logprobs(case.main.hidden, case.weight, case.main.targets, bias=case.bias,
                                 ref_hidden=case.main.ref_hidden, ref_weight=case.call["ref_weight"])
    b = st.logps.shape[0] // 2
    for ctor in (dict(), dict(beta=0.3, label_smoothing=0.2), dict(loss_type=["sigmoid"], label_smoothing=0.1)):
        out = fastpref.FusedDPOLoss(**ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
        expected, _ = losses.dpo(st.logps[:b], st.logps[b:], st.ref_logps[:b], st.ref_logps[b:],
                                 beta=ctor.get("beta", 0.1), label_smoothing=ctor.get("label_smoothing", 0.0))
        assert torch.equal(out.loss, expected)
        assert set(out.metrics) == {"chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
                                    "reward_margin", "reward_accuracy", "logps"}


def test_precomputed_ref_logps_are_taken_as_ld_weighted():
    case = make_case("FusedDPOLoss", torch.float64, seed=7)
    module = fastpref.FusedDPOLoss(ld_alpha=0.3)
    # the reference head: ref_weight without a bias (a given ref_weight does not take the policy's bias)
    st = reference.fused_logprobs(case.main.ref_hidden, case.call["ref_weight"], case.main.targets)
    ref = losses.ld_logps(st.token_logps, case.main.targets != -100, 0.3)
    kwargs = {k: v for k, v in case.kwargs().items() if k not in ("ref_hidden", "ref_weight")}
    a = module(case.weight, case.main.hidden, case.main.targets, ref_logps=ref, **kwargs).loss
    b = module(case.weight, case.main.hidden, case.main.targets, **case.kwargs()).loss
    assert rel_err(a, b) < 1e-12


def test_module_use_weighting_matches_eager_twin_and_heads():
    """Needs the op's ``log_sum_sq_probs`` extra output (fused_logprobs(..., extra_outputs=...))."""
    case = make_case("FusedDPOLoss", torch.float64, packed=True, seed=8)
    config = dict(loss_type=["sigmoid", "ipo"], use_weighting=True, beta=0.5)
    fused = run_case(fastpref.FusedDPOLoss(**config), case)
    eager = run_case(reference.FusedDPOLoss(**config), case)
    assert rel_err(fused[0], eager[0]) < 1e-10
    assert all(rel_err(a, e) < 1e-10 for a, e in zip(fused[1], eager[1]))
    seq, layout = case.main, case.main.layout()
    st = reference.fused_logprobs(seq.hidden, case.weight, seq.targets, bias=case.bias, ref_hidden=seq.ref_hidden,
                                  ref_weight=case.call["ref_weight"], **layout)
    probs = torch.softmax(F.linear(seq.hidden, case.weight, case.bias), -1)
    lss = torch.where(seq.targets != -100, torch.log((probs ** 2).sum(-1)), torch.zeros((), dtype=torch.float64))
    w = losses.wpo_sequence_weights(st.logps, losses.per_sequence_sums(lss, **layout), st.lengths)
    s, r, n, b = st.logps, st.ref_logps, st.lengths, st.logps.shape[0] // 2
    expected, _ = losses.dpo_family(s[:b], s[b:], r[:b], r[b:], n[:b], n[b:], loss_type=["sigmoid", "ipo"], beta=0.5,
                                    pair_weights=w[:b] * w[b:])
    assert rel_err(fused[0], expected) < 1e-10
    unweighted = run_case(fastpref.FusedDPOLoss(loss_type=["sigmoid", "ipo"], beta=0.5), case)[0]
    assert rel_err(fused[0], unweighted) > 1e-3


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="dpo"), "loss_type"), (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_weights=[math.inf]), "loss_weights"), (dict(beta=0.0), "beta"), (dict(discopop_tau=-1.0), "discopop_tau"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=math.nan), "f_alpha_divergence_coef"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_type="exo_pair"), "label_smoothing"), (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
])
def test_invalid_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        losses.check_dpo_options(**bad)
    with pytest.raises(ValueError, match=match):
        fastpref.FusedDPOLoss(**bad)


def test_invalid_module_options_raise():
    for bad, match in ((dict(ld_alpha=1.5), "ld_alpha"), (dict(ld_alpha=0.5, average_log_prob=True), "ld_alpha"),
                       (dict(compute_nll_loss=True, alpha=math.nan), "alpha")):
        with pytest.raises(ValueError, match=match):
            fastpref.FusedDPOLoss(**bad)
    sw, sl, rw, rl, nw, nl = pair_batch(seed=2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        losses.dpo_family(sw, sl, rw, rl, loss_type="ipo")
    with pytest.raises(ValueError, match="sft_nll"):
        losses.dpo_family(sw, sl, rw, rl, loss_type="sft")
    with pytest.raises(ValueError, match="ld_alpha"):
        losses.ld_logps(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), -0.1)
    with pytest.raises(ValueError, match="even"):
        losses.ld_logps(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool), 0.5)


# ------------------------------------------------------------------------------------------- Liger's options

LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
               "discopop"]


@pytest.mark.parametrize("average,nll", [(False, False), (True, True)], ids=["sum", "avg-nll"])
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_module_equals_liger_dpo(loss_type, average, nll):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    gen = torch.Generator().manual_seed(11)
    weight = (0.3 * torch.randn(300, 32, generator=gen)).requires_grad_()
    bias = (0.1 * torch.randn(300, generator=gen)).requires_grad_()
    ref_weight, ref_bias = weight.detach() + 0.05 * torch.randn(300, 32, generator=gen), 0.1 * torch.randn(300)
    seq = make_sequences(gen, 6, dtype=torch.float32, packed=False, vocab=300, dim=32)
    config = dict(loss_type=loss_type, beta=0.5, label_smoothing=SMOOTHING.get(loss_type, 0.0), discopop_tau=0.3,
                  average_log_prob=average, compute_nll_loss=nll, alpha=0.7)
    leaves = [seq.hidden, weight, bias]
    out = fastpref.FusedDPOLoss(**config)(weight, seq.hidden, seq.targets, bias=bias, ref_hidden=seq.ref_hidden,
                                          ref_weight=ref_weight, ref_bias=ref_bias)
    theirs = chunked.LigerFusedLinearDPOLoss(compiled=False, **config)(
        weight, seq.hidden, seq.targets, bias, ref_input=seq.ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    liger_loss, aux = theirs
    for a, b in zip([out.loss, *torch.autograd.grad(out.loss, leaves)],
                    [liger_loss, *torch.autograd.grad(liger_loss, leaves)]):
        assert rel_err(a, b) <= 1e-4 and b.abs().max() > 0
    if nll:
        assert out.metrics["nll"].item() == pytest.approx(aux[4].item(), rel=1e-5)
