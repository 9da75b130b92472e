"""fastpref.losses vs independent, deliberately naive float64 formulas (docs/losses.md, the papers).

The references below spell each loss out the obvious way (log(sigmoid(.)), exp of sums, Python loops
over examples) and share no code with the package; inputs are moderate so the naive forms are exact.
Extreme inputs are checked separately for finiteness and against fp64 truths.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from fastpref import losses as L

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def uniform(shape, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)


def batch(b: int = 6, seed: int = 0) -> dict:
    """One batch of pair statistics in fp64; policy log-probs require grad."""
    d = {
        "sw": uniform(b, -60.0, -5.0, seed), "sl": uniform(b, -60.0, -5.0, seed + 1),
        "rw": uniform(b, -60.0, -5.0, seed + 2), "rl": uniform(b, -60.0, -5.0, seed + 3),
        "nw": torch.randint(3, 30, (b,), generator=torch.Generator().manual_seed(seed + 4)).to(F64),
        "nl": torch.randint(3, 30, (b,), generator=torch.Generator().manual_seed(seed + 5)).to(F64),
    }
    d["sw"].requires_grad_(True)
    d["sl"].requires_grad_(True)
    return d


def lsig(x):
    return torch.log(torch.sigmoid(x))


def mean_of(terms):
    return torch.stack(terms).mean()


# ---------------------------------------------------------------- independent eager references

def ref_dpo(d, beta, eps):
    terms = []
    for i in range(len(d["sw"])):
        x = beta * ((d["sw"][i] - d["rw"][i]) - (d["sl"][i] - d["rl"][i]))
        terms.append(-(1 - eps) * lsig(x) - eps * lsig(-x))
    return mean_of(terms)


def ref_ipo(d, tau, normalized):
    nw, nl = (d["nw"], d["nl"]) if normalized else (1.0, 1.0)
    h = (d["sw"] / nw - d["rw"] / nw) - (d["sl"] / nl - d["rl"] / nl)
    return ((h - 1 / (2 * tau)) ** 2).mean()


def ref_simpo(d, beta, gamma, sft):
    return (-lsig(beta * d["sw"] / d["nw"] - beta * d["sl"] / d["nl"] - gamma) - sft * d["sw"] / d["nw"]).mean()


def ref_slic(d, delta, lam, sref):
    return (torch.clamp(delta - d["sw"] + d["sl"], min=0) - lam * sref).mean()


def ref_dpop(d, beta, lam):
    pen = torch.clamp(d["rw"] - d["sw"], min=0)
    return (-lsig(beta * (d["sw"] - d["rw"] - d["sl"] + d["rl"] - lam * pen))).mean()


def ref_orpo(d, lam):
    def log_odds(s, n):
        p = torch.exp(s / n)
        return torch.log(p) - torch.log(1 - p)
    nll = -d["sw"].sum() / d["nw"].sum()
    return nll - lam * lsig(log_odds(d["sw"], d["nw"]) - log_odds(d["sl"], d["nl"])).mean()


def ref_cpo(d, beta, lam):
    return (-lsig(beta * (d["sw"] - d["sl"]))).mean() + lam * (-d["sw"].sum() / d["nw"].sum())


def ref_kto(s, r, labels, z0, beta, wd, wu):
    terms = []
    for i in range(len(s)):
        v = torch.sigmoid(beta * (s[i] - r[i] - z0)) if labels[i] else torch.sigmoid(beta * (z0 - s[i] + r[i]))
        lam = wd if labels[i] else wu
        terms.append(lam - lam * v)  # λ_y − v(x, y), KTO paper Eq. 8
    return mean_of(terms)


def ref_var(s, rew, ref, beta, normalize, lengths=None, policy_mean=False, ref_mean=False):
    """Eq. 9-10 spelled out; ``ref_mean`` divides log π_ref(y_j|x_i) by y_j's length n_j (docs/losses.md §1
    ambiguity 2), ``policy_mean`` divides log π_θ(y_i|x_i) by n_i."""
    b = len(s)

    def lref(i, j):
        value = float(ref[i, j] if rew.dim() == 2 else ref[j])
        return value / float(lengths[j]) if ref_mean else value

    w = []
    for i in range(b):
        z = sum(math.exp(float(rew[i, j] if rew.dim() == 2 else rew[j]) / beta) * math.exp(lref(i, j))
                for j in range(b)) / b
        w.append(math.exp(float(rew[i, i] if rew.dim() == 2 else rew[i]) / beta) / z)
    w = torch.tensor(w, dtype=F64)
    if normalize == "self":
        w = b * w / w.sum()
    policy = [s[i] / float(lengths[i]) if policy_mean else s[i] for i in range(b)]
    return -sum(w[i] * policy[i] for i in range(b)) / b, w


def ref_alpha_dpo(d, beta, gamma_r, alpha, mean, std, eps):
    u = beta * (d["sw"] / d["nw"] - d["sl"] / d["nl"])
    m_raw = (d["sw"] / d["nw"] - d["sl"] / d["nl"] - d["rw"] / d["nw"] + d["rl"] / d["nl"]).detach()
    m = beta * (gamma_r + alpha * (m_raw - mean) / std)
    return (-(1 - eps) * lsig(u - m) - eps * lsig(m - u)).mean()


def ref_mcpo(s, r, negatives, beta):
    terms = []
    for b in range(s.shape[0]):
        rew = [beta * (s[b, i] - r[b, i]) for i in [0] + negatives[b].tolist()]
        terms.append(-rew[0] + torch.log(sum(torch.exp(x) for x in rew)))
    return mean_of(terms)


def ref_spo_weight(probs_sets, gamma, baseline=None):
    """μ per row from Eq. 12: 2σ((Σ π)^γ − Ê), Ê = the mean over rows of the same unless given."""
    mass = torch.stack([p.sum() ** gamma for p in probs_sets]).detach()
    return 2 * torch.sigmoid(mass - (mass.mean() if baseline is None else baseline))


def ref_spo(sw, sl, alpha, gamma, kl, kl_coef):
    pw, pl = torch.exp(sw), torch.exp(sl)
    mu = ref_spo_weight([torch.stack([pw[i], pl[i]]) for i in range(len(sw))], gamma)
    if alpha == 0:
        pref = -0.5 * mu * (sw - sl)
    else:
        pref = -(mu / alpha) * torch.log(pw ** alpha / (pw ** alpha + pl ** alpha))
    return pref.mean() + (kl_coef * kl.mean() if kl is not None else 0.0)


def ref_best_term(s_row, win, alpha):
    """One best-of-n term of Eq. 14 without μ: −(1/α) log(π_win^α / Σ π^α); α = 0: the gradient-limit
    form (as Eq. 11 for pairs), (1/n) Σ_j log π_j − log π_win."""
    if alpha == 0:
        return sum(s_row[j] for j in range(len(s_row))) / len(s_row) - s_row[win]
    p = torch.exp(s_row)
    return -(1 / alpha) * torch.log(p[win] ** alpha / (p ** alpha).sum())


def ref_spo_best(s, best, alpha, gamma):
    mu = ref_spo_weight(list(torch.exp(s)), gamma)
    return mean_of([mu[b] * ref_best_term(s[b], int(best[b]), alpha) for b in range(len(s))])


def ref_spo_ranked(s, alpha, gamma, baseline=None):
    p = torch.exp(s)
    n = s.shape[1]
    total = 0.0
    for k in range(n - 1):
        mu = ref_spo_weight([row[k:] for row in p], gamma, None if baseline is None else baseline[k])
        total = total + torch.stack([mu[b] * ref_best_term(s[b, k:], 0, alpha) for b in range(len(p))])
    return total.mean()


# ---------------------------------------------------------------- loss + gradient parity (fp64, 1e-10)

def assert_parity(loss, ref_loss, wrt):
    torch.testing.assert_close(loss, ref_loss, **TOL)
    got = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref_loss, wrt, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, **TOL)


PAIR_CASES = {
    "dpo": (lambda d: L.dpo(d["sw"], d["sl"], d["rw"], d["rl"], beta=0.3),
            lambda d: ref_dpo(d, 0.3, 0.0)),
    "dpo_smoothed": (lambda d: L.dpo(d["sw"], d["sl"], d["rw"], d["rl"], beta=0.1, label_smoothing=0.2),
                     lambda d: ref_dpo(d, 0.1, 0.2)),
    "ipo_mean": (lambda d: L.ipo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"], tau=0.5),
                 lambda d: ref_ipo(d, 0.5, True)),
    "ipo_sum": (lambda d: L.ipo(d["sw"], d["sl"], d["rw"], d["rl"], tau=0.1, length_normalize=False),
                lambda d: ref_ipo(d, 0.1, False)),
    "simpo": (lambda d: L.simpo(d["sw"], d["sl"], d["nw"], d["nl"], beta=2.5, gamma=1.0, sft_weight=0.3),
              lambda d: ref_simpo(d, 2.5, 1.0, 0.3)),
    "slic": (lambda d: L.slic(d["sw"], d["sl"], delta=10.0, reg_weight=0.1),
             lambda d: ref_slic(d, 10.0, 0.1, d["sw"])),
    "dpop": (lambda d: L.dpop(d["sw"], d["sl"], d["rw"], d["rl"], beta=0.3, dpop_lambda=5.0),
             lambda d: ref_dpop(d, 0.3, 5.0)),
    "orpo": (lambda d: L.orpo(d["sw"], d["sl"], d["nw"], d["nl"], orpo_lambda=0.5),
             lambda d: ref_orpo(d, 0.5)),
    "cpo": (lambda d: L.cpo(d["sw"], d["sl"], d["nw"], beta=0.1, nll_weight=0.7),
            lambda d: ref_cpo(d, 0.1, 0.7)),
    "alpha_dpo": (lambda d: L.alpha_dpo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"], beta=2.5,
                                        gamma_beta_ratio=0.4, alpha=0.2, margin_mean=0.3, margin_std=1.7,
                                        label_smoothing=0.1),
                  lambda d: ref_alpha_dpo(d, 2.5, 0.4, 0.2, 0.3, 1.7, 0.1)),
    "spo": (lambda d: L.spo(d["sw"] / 10, d["sl"] / 10, alpha=0.5, gamma=0.5, kl=None),
            lambda d: ref_spo(d["sw"] / 10, d["sl"] / 10, 0.5, 0.5, None, 0.0)),
    "spo_alpha0": (lambda d: L.spo(d["sw"] / 10, d["sl"] / 10, alpha=0.0, gamma=0.5),
                   lambda d: ref_spo(d["sw"] / 10, d["sl"] / 10, 0.0, 0.5, None, 0.0)),
}


@pytest.mark.parametrize("name", sorted(PAIR_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_pairwise_heads_match_eager_fp64(name, seed):
    d = batch(seed=10 * seed)
    head, ref = PAIR_CASES[name]
    loss, metrics = head(d)
    assert loss.dtype == F64 and loss.dim() == 0
    assert all(not v.requires_grad for v in metrics.values())
    assert_parity(loss, ref(d), [d["sw"], d["sl"]])


@pytest.mark.parametrize("name", sorted(PAIR_CASES))
def test_pairwise_heads_fp32_match_fp64_eager(name):
    d = batch(seed=3)
    d32 = {k: v.detach().float().requires_grad_(k in ("sw", "sl")) for k, v in d.items()}
    head, ref = PAIR_CASES[name]
    loss32, _ = head(d32)
    ref64 = ref(d)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), ref64, rtol=2e-5, atol=1e-6)
    got = torch.autograd.grad(loss32, [d32["sw"], d32["sl"]])
    want = torch.autograd.grad(ref64, [d["sw"], d["sl"]])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=1e-6)


def test_slic_sft_logps_gets_the_regularizer_gradient():
    d = batch()
    sref = uniform(6, -40, -10, 99).requires_grad_(True)
    loss, _ = L.slic(d["sw"], d["sl"], delta=10.0, reg_weight=0.25, sft_logps=sref)
    assert_parity(loss, ref_slic(d, 10.0, 0.25, sref), [d["sw"], d["sl"], sref])


def test_kto_matches_eager_fp64():
    s = uniform(8, -50, -5, 1).requires_grad_(True)
    r = uniform(8, -50, -5, 2)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    z0 = L.kto_z0(uniform(8, -40, -10, 3), uniform(8, -40, -10, 4))
    loss, m = L.kto(s, r, labels, z0=z0, beta=0.1, desirable_weight=1.3, undesirable_weight=0.8)
    assert_parity(loss, ref_kto(s, r, labels, z0, 0.1, 1.3, 0.8), [s])
    torch.testing.assert_close(m["chosen_rewards"], (0.1 * (s - r))[labels].detach(), **TOL)


def test_kto_saturated_tail_gradient_is_accurate_in_fp32():
    """|x| = beta |rho - z0| of 20-40: sigma rounds to 1 in fp32, yet the gradient lambda beta sigma(x) sigma(-x)
    (about e^-|x|) keeps its relative precision against the fp64 formula (torch.sigmoid's backward gives 0)."""
    rho = torch.tensor([200.0, -250.0, 300.0, -400.0], dtype=torch.float64)
    labels = torch.tensor([False, True, False, True])  # each on its saturated side: loss near lambda
    grads = {}
    for dtype in (torch.float32, torch.float64):
        s = rho.to(dtype).requires_grad_(True)
        loss, _ = L.kto(s, torch.zeros_like(s), labels, z0=0.0, beta=0.1, desirable_weight=1.5)
        loss.backward()
        grads[dtype] = s.grad.double()
    x = 0.1 * rho
    want = torch.where(labels, -1.5, 1.0) * 0.1 * torch.sigmoid(x) * torch.sigmoid(-x) / 4
    torch.testing.assert_close(grads[torch.float64], want, rtol=1e-6, atol=0)
    assert (grads[torch.float32] != 0).all()
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-5, atol=0)


def test_kto_z0_is_clamped_detached_mean():
    s = uniform(5, -30, -10, 0).requires_grad_(True)
    r = uniform(5, -30, -10, 1)
    want = max(0.0, (s - r).mean().item())
    z0 = L.kto_z0(s, r)
    assert not z0.requires_grad and z0.dim() == 0
    assert z0.item() == pytest.approx(want, abs=1e-12)
    assert L.kto_z0(r - 5.0, r).item() == 0.0  # policy below reference: clamped at 0


@pytest.mark.parametrize("normalize", ["self", "none"])
@pytest.mark.parametrize("form", ["cross", "diagonal"])
def test_var_matches_eager_fp64(normalize, form):
    b, beta = 5, 2.0
    s = uniform(b, -40, -5, 0).requires_grad_(True)
    shape = (b, b) if form == "cross" else (b,)
    rew, ref = uniform(shape, -3, 3, 1), uniform(shape, -8, -1, 2)
    loss, m = L.var(s, rew, beta=beta, ref_logps=ref, normalize=normalize)
    ref_loss, w = ref_var(s, rew, ref, beta, normalize)
    assert_parity(loss, ref_loss, [s])
    torch.testing.assert_close(m["weights"], w, **TOL)
    # c_i = w_i / B (docs/losses.md §8): the gradient is −w/B, detached weights
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], -w / b, **TOL)


def test_var_diagonal_self_normalized_is_softmax_of_rewards():
    b, beta = 6, 0.5
    s = uniform(b, -40, -5, 0)
    rew = uniform(b, -2, 2, 1)
    want = b * torch.softmax(rew / beta, 0)
    for ref in (None, uniform(b, -80, -5, 2)):  # π_ref drops out of the diagonal form
        torch.testing.assert_close(L.var(s, rew, beta=beta, ref_logps=ref)[1]["weights"], want, **TOL)


def test_var_mean_reduction_divides_by_lengths():
    s = uniform(4, -40, -5, 0).requires_grad_(True)
    n = torch.tensor([3, 7, 11, 20])
    rew, ref = uniform((4, 4), -1, 1, 1), uniform((4, 4), -9, -2, 2)
    loss, m = L.var(s, rew, beta=1.0, ref_logps=ref, lengths=n, policy_reduction="mean")
    ref_loss, _ = ref_var(s / n.to(F64), rew, ref, 1.0, "self")
    assert_parity(loss, ref_loss, [s])
    torch.testing.assert_close(m["logps"], s.detach(), **TOL)


@pytest.mark.parametrize("m_neg", [1, 2, 3])
def test_mcpo_matches_eager_fp64(m_neg):
    s = uniform((4, 6), -60, -5, 0).requires_grad_(True)
    r = uniform((4, 6), -60, -5, 1)
    neg = L.mcpo_sample_negatives(s.detach(), r, beta=0.5, num_negatives=m_neg,
                                  generator=torch.Generator().manual_seed(3))
    loss, metrics = L.mcpo(s, r, beta=0.5, negatives=neg)
    assert_parity(loss, ref_mcpo(s, r, neg, 0.5), [s])
    assert torch.equal(metrics["negatives"], neg)


def test_spo_with_kl_matches_eager_fp64():
    d = batch()
    kl = uniform(3, 0.0, 5.0, 7).requires_grad_(True)
    sw, sl = d["sw"] / 10, d["sl"] / 10
    loss, m = L.spo(sw, sl, alpha=0.3, gamma=0.7, kl=kl, kl_coef=0.05)
    assert_parity(loss, ref_spo(sw, sl, 0.3, 0.7, kl, 0.05), [d["sw"], d["sl"], kl])
    torch.testing.assert_close(m["kl"], kl.detach(), **TOL)


@pytest.mark.parametrize("alpha", [0.4, 0.0], ids=["alpha_0.4", "alpha_0"])
def test_spo_best_of_n_and_ranked_match_eager_fp64(alpha):
    """Eq. 14/15 (alpha > 0) and their alpha = 0 forms against the eager formulas."""
    s = uniform((5, 4), -6, -0.5, 0).requires_grad_(True)
    best = torch.tensor([0, 3, 1, 2, 3])
    loss, _ = L.spo_best_of_n(s, best, alpha=alpha, gamma=0.6)
    assert_parity(loss, ref_spo_best(s, best, alpha, 0.6), [s])
    loss, m = L.spo_ranked(s, alpha=alpha, gamma=0.6)
    assert m["weights"].shape == (5, 3)
    assert_parity(loss, ref_spo_ranked(s, alpha, 0.6), [s])


# ---------------------------------------------------------------- hand-derived c_s (docs/losses.md §8)

def test_hand_derived_gradients():
    d = batch(b=5, seed=3)
    b, sw, sl, rw, rl, nw, nl = 5, d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"]
    sig = torch.sigmoid

    beta = 0.2  # DPO: c_w = βσ(−βh), ∂L/∂S_w = −c_w / B
    h = ((sw - rw) - (sl - rl)).detach()
    gw, gl = torch.autograd.grad(L.dpo(sw, sl, rw, rl, beta=beta)[0], [sw, sl])
    torch.testing.assert_close(gw, -beta * sig(-beta * h) / b, **TOL)
    torch.testing.assert_close(gl, beta * sig(-beta * h) / b, **TOL)

    beta, gamma = 2.0, 0.5  # SimPO: c_w = βσ(−u)/n_w
    u = (beta * (sw / nw - sl / nl) - gamma).detach()
    gw, gl = torch.autograd.grad(L.simpo(sw, sl, nw, nl, beta=beta, gamma=gamma)[0], [sw, sl])
    torch.testing.assert_close(gw, -beta * sig(-u) / nw / b, **TOL)
    torch.testing.assert_close(gl, beta * sig(-u) / nl / b, **TOL)

    lam = 0.3  # ORPO: c_w = λσ(−d)/((1−e^{S̄_w}) n_w) + N/N_W
    aw, al = (sw / nw).detach(), (sl / nl).detach()
    dd = (aw - torch.log1p(-torch.exp(aw))) - (al - torch.log1p(-torch.exp(al)))
    gw, gl = torch.autograd.grad(L.orpo(sw, sl, nw, nl, orpo_lambda=lam)[0], [sw, sl])
    torch.testing.assert_close(gw, -lam * sig(-dd) / ((1 - torch.exp(aw)) * nw) / b - 1 / nw.sum(), **TOL)
    torch.testing.assert_close(gl, lam * sig(-dd) / ((1 - torch.exp(al)) * nl) / b, **TOL)

    alpha = 0.5  # SPO, γ = 0 (μ = 1): c_w = σ(α(S_l − S_w))
    gw, gl = torch.autograd.grad(L.spo(sw, sl, alpha=alpha, gamma=0.0)[0], [sw, sl])
    torch.testing.assert_close(gw, -sig(alpha * (sl - sw)).detach() / b, **TOL)
    torch.testing.assert_close(gl, sig(alpha * (sl - sw)).detach() / b, **TOL)

    beta, lam = 0.3, 2.0  # DPOP: c_w = βσ(−u)(1 + λ·1[S_w < R_w]), c_l = −βσ(−u)
    rw_mixed = torch.where(torch.arange(b) % 2 == 0, sw.detach() + 1.0, sw.detach() - 1.0)  # both branches
    u = (beta * ((sw - rw_mixed) - (sl - rl) - lam * torch.relu(rw_mixed - sw))).detach()
    gw, gl = torch.autograd.grad(L.dpop(sw, sl, rw_mixed, rl, beta=beta, dpop_lambda=lam)[0], [sw, sl])
    torch.testing.assert_close(gw, -beta * sig(-u) * (1 + lam * (sw < rw_mixed).double()) / b, **TOL)
    torch.testing.assert_close(gl, beta * sig(-u) / b, **TOL)

    beta, z0 = 0.1, 0.7  # KTO: desirable c = λ_D β σ(x)σ(−x), undesirable −λ_U β σ(x')σ(−x')
    labels = torch.tensor([True, False, True, False, False])
    (g,) = torch.autograd.grad(L.kto(sw, rw, labels, z0=z0, beta=beta, undesirable_weight=1.5)[0], [sw])
    x = (beta * (sw - rw - z0)).detach()
    c = torch.where(labels, 1.0 * beta * sig(x) * sig(-x), -1.5 * beta * sig(-x) * sig(x))
    torch.testing.assert_close(g, -c / b, **TOL)

    s = uniform((3, 5), -30, -5, 4).requires_grad_(True)  # MC-PO: c_0 = β(1 − p_0), c_j = −βp_j
    r = uniform((3, 5), -30, -5, 5)
    neg = torch.tensor([[1, 3], [4, 2], [2, 1]])
    beta = 0.7
    (g,) = torch.autograd.grad(L.mcpo(s, r, beta=beta, negatives=neg)[0], [s])
    want = torch.zeros_like(g)
    for i in range(3):
        cols = [0] + neg[i].tolist()
        p = torch.softmax(beta * (s[i, cols] - r[i, cols]).detach(), 0)
        want[i, 0] = -beta * (1 - p[0]) / 3
        want[i, cols[1:]] = beta * p[1:] / 3
    torch.testing.assert_close(g, want, **TOL)


def test_no_gradient_reaches_constant_statistics():
    """Reference log-probs, lengths, rewards and batch statistics are constants (docs/losses.md §0)."""
    d = {k: v.detach().clone().requires_grad_(True) for k, v in batch().items()}
    sw, sl, rw, rl, nw, nl = (d[k] for k in ("sw", "sl", "rw", "rl", "nw", "nl"))
    consts = [rw, rl, nw, nl]
    s3, r3 = uniform((6, 3), -20, -5, 0).requires_grad_(True), uniform((6, 3), -20, -5, 1).requires_grad_(True)
    rew = uniform((6, 6), -1, 1, 2).requires_grad_(True)
    ref66 = uniform((6, 6), -9, -2, 3).requires_grad_(True)
    stat = torch.tensor(0.5, dtype=F64, requires_grad=True)
    outs = [
        (L.dpo(sw, sl, rw, rl), consts), (L.ipo(sw, sl, rw, rl, nw, nl), consts),
        (L.simpo(sw, sl, nw, nl), consts), (L.dpop(sw, sl, rw, rl), consts), (L.orpo(sw, sl, nw, nl), consts),
        (L.cpo(sw, sl, nw), consts), (L.kto(sw, rw, sw > -30, z0=stat), consts + [stat]),
        (L.var(sw, rew, beta=1.0, ref_logps=ref66, lengths=nw, policy_reduction="mean"), [rew, ref66, nw]),
        (L.alpha_dpo(sw, sl, rw, rl, nw, nl, margin_mean=stat, margin_std=stat + 1), consts + [stat]),
        (L.mcpo(s3, r3, negatives=torch.ones(6, 1, dtype=torch.int64)), [r3]),
        (L.spo(sw, sl, gamma=0.5, weight_baseline=stat), [stat]),
    ]
    for (loss, _), wrt in outs:
        for g in torch.autograd.grad(loss, wrt, allow_unused=True):
            assert g is None or not bool(g.any())


# ---------------------------------------------------------------- cross-checks between heads

def test_alpha_dpo_with_alpha_zero_is_simpo():
    d = batch()
    beta, ratio = 2.5, 0.4
    a, _ = L.alpha_dpo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"], beta=beta, gamma_beta_ratio=ratio,
                       alpha=0.0, margin_mean=3.0, margin_std=2.0)
    s, _ = L.simpo(d["sw"], d["sl"], d["nw"], d["nl"], beta=beta, gamma=beta * ratio)
    assert_parity(a, s, [d["sw"], d["sl"]])


def test_alpha_dpo_margin_and_no_gradient_through_margin():
    d = batch()
    m = L.alpha_dpo_margin(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"])
    want = (d["sw"] / d["nw"] - d["sl"] / d["nl"]) - (d["rw"] / d["nw"] - d["rl"] / d["nl"])
    torch.testing.assert_close(m, want.detach(), **TOL)
    assert not m.requires_grad
    loss, metrics = L.alpha_dpo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"], beta=10.0, alpha=0.05,
                                margin_mean=m.mean(), margin_std=m.std())
    torch.testing.assert_close(metrics["margin"], m, **TOL)
    # c_w = βσ(−(u − m))/n_w: the margin term contributes no gradient (stop-gradient, Eq. 12)
    x = (10.0 * (d["sw"] / d["nw"] - d["sl"] / d["nl"])
         - 10.0 * (0.4 + 0.05 * (m - m.mean()) / m.std())).detach()
    (gw,) = torch.autograd.grad(loss, [d["sw"]])
    torch.testing.assert_close(gw, -10.0 * torch.sigmoid(-x) / d["nw"] / 6, **TOL)


def test_mcpo_single_negative_is_dpo_on_the_sampled_pair():
    s = uniform((5, 4), -60, -5, 0).requires_grad_(True)
    r = uniform((5, 4), -60, -5, 1)
    neg = torch.tensor([[1], [3], [2], [2], [1]])
    a, _ = L.mcpo(s, r, beta=0.1, negatives=neg)
    rows = torch.arange(5)
    b, _ = L.dpo(s[:, 0], s[rows, neg[:, 0]], r[:, 0], r[rows, neg[:, 0]], beta=0.1)
    assert_parity(a, b, [s])


def test_mcpo_drawing_the_positive_gives_log2_and_no_gradient():
    s = uniform((2, 3), -20, -5, 0).requires_grad_(True)
    loss, _ = L.mcpo(s, uniform((2, 3), -20, -5, 1), beta=0.5, negatives=torch.zeros(2, 1, dtype=torch.int64))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.autograd.grad(loss, s)[0].abs().max().item() < 1e-15  # zero up to rounding


def test_spo_multi_response_forms_reduce_to_pairs():
    d = batch()
    sw, sl = d["sw"] / 10, d["sl"] / 10
    pair, _ = L.spo(sw, sl, alpha=0.2, gamma=0.3)
    stacked = torch.stack([sw, sl], 1)
    best, _ = L.spo_best_of_n(torch.stack([sl, sw], 1), torch.ones(6, dtype=torch.int64), alpha=0.2, gamma=0.3)
    ranked, _ = L.spo_ranked(stacked, alpha=0.2, gamma=0.3)
    assert_parity(best, pair, [d["sw"], d["sl"]])
    assert_parity(ranked, pair, [d["sw"], d["sl"]])


def test_spo_gamma_zero_gives_uniform_weights():
    s = uniform((6, 3), -1e4, -1.0, 0)  # any log-probs, including extreme ones
    for out in (L.spo(s[:, 0], s[:, 1], gamma=0.0), L.spo_best_of_n(s, torch.zeros(6, dtype=torch.int64)),
                L.spo_ranked(s, gamma=0.0)):
        assert torch.equal(out[1]["weights"], torch.ones_like(out[1]["weights"]))


def test_spo_weight_baseline_matches_batch_mean_and_overrides_it():
    s = uniform((6, 2), -8, -0.5, 0)
    base = L.spo_weight_baseline(s, gamma=0.5)
    _, m_default = L.spo(s[:, 0], s[:, 1], gamma=0.5)
    _, m_given = L.spo(s[:, 0], s[:, 1], gamma=0.5, weight_baseline=base)
    torch.testing.assert_close(m_given["weights"], m_default["weights"], **TOL)
    _, m_shift = L.spo(s[:, 0], s[:, 1], gamma=0.5, weight_baseline=base + 1.0)
    assert bool((m_shift["weights"] < m_default["weights"]).all())
    assert L.spo_weight_baseline(uniform((6, 4), -8, -0.5, 1), gamma=0.5, ranked=True).shape == (3,)


def test_spo_small_alpha_switches_to_the_alpha_zero_form():
    d = batch()
    sw, sl = d["sw"], d["sl"]
    tiny, _ = L.spo(sw, sl, alpha=1e-7)
    zero, _ = L.spo(sw, sl, alpha=0.0)
    assert_parity(tiny, zero, [sw, sl])
    # its gradient is the α → 0 limit of the α > 0 gradient
    small, _ = L.spo(sw, sl, alpha=1e-5)
    g_small = torch.autograd.grad(small, [sw, sl])
    g_zero = torch.autograd.grad(zero, [sw, sl])
    for a, b in zip(g_small, g_zero):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- MC-PO sampler statistics

def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution (dof 3 and 4).
CHI2_999 = {3: 16.266, 4: 18.467}


@pytest.mark.parametrize("include_positive", [False, True])
def test_mcpo_sampler_frequencies_match_softmax(include_positive):
    draws, beta = 20000, 0.5
    s = torch.tensor([[-10.0, -12.0, -9.0, -14.0, -11.0]])
    r = torch.tensor([[-11.0, -11.5, -11.0, -11.0, -12.5]])
    rewards = beta * (s - r)[0].double()
    neg = L.mcpo_sample_negatives(s.expand(draws, 5), r.expand(draws, 5), beta=beta,
                                  generator=torch.Generator().manual_seed(1234), include_positive=include_positive)
    assert neg.shape == (draws, 1) and neg.dtype == torch.int64
    counts = torch.bincount(neg[:, 0], minlength=5).double()
    if include_positive:
        probs, dof = torch.softmax(rewards, 0), 4
    else:
        assert counts[0] == 0
        probs, counts, dof = torch.softmax(rewards[1:], 0), counts[1:], 3
    assert _chi_square(counts, probs) < CHI2_999[dof]


def test_mcpo_sampler_pairs_follow_sampling_without_replacement():
    draws, beta = 20000, 1.0
    s = torch.tensor([[-5.0, -6.0, -4.5, -7.0, -5.5]])
    r = torch.full_like(s, -6.0)
    neg = L.mcpo_sample_negatives(s.expand(draws, 5), r.expand(draws, 5), beta=beta, num_negatives=2,
                                  generator=torch.Generator().manual_seed(7))
    assert bool((neg[:, 0] != neg[:, 1]).all()) and bool((neg >= 1).all())
    p = torch.softmax(beta * (s - r)[0, 1:].double(), 0)
    # P({i, j}) for two draws without replacement: p_i p_j / (1 − p_i) + p_j p_i / (1 − p_j)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    probs = torch.stack([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    lo, hi = neg.min(1).values - 1, neg.max(1).values - 1
    counts = torch.stack([((lo == i) & (hi == j)).sum() for i, j in pairs]).double()
    assert _chi_square(counts, probs) < 20.515  # dof 5, upper 0.1% point


def test_mcpo_sampler_never_returns_positive_even_when_it_dominates():
    s = torch.tensor([[0.0, -500.0, -600.0]]).expand(1000, 3)
    r = torch.full_like(s, -300.0)
    neg = L.mcpo_sample_negatives(s, r, beta=1.0, num_negatives=2, generator=torch.Generator().manual_seed(0))
    assert bool((neg != 0).all())
    one = L.mcpo_sample_negatives(s, r, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert bool((one == 1).all())  # −500 beats −600 by e^100


def test_mcpo_sampler_is_seeded():
    s, r = uniform((8, 6), -30, -5, 0), uniform((8, 6), -30, -5, 1)
    a = L.mcpo_sample_negatives(s, r, num_negatives=3, generator=torch.Generator().manual_seed(5))
    b = L.mcpo_sample_negatives(s, r, num_negatives=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- extreme inputs: finite, no overflow

def _finite(loss, *wrt):
    assert torch.isfinite(loss)
    for g in torch.autograd.grad(loss, wrt, allow_unused=True):
        assert g is None or bool(torch.isfinite(g).all())


def _extreme_heads(dtype):
    """Every head at extreme summed log-probs (−1e4), β·h up to 1e4 and r/β = 1e3: (name, loss, metrics), leaves."""
    b = 4
    sw = torch.tensor([-1e4, -2.0, -9e3, -1.0], dtype=dtype, requires_grad=True)
    sl = torch.tensor([-1.0, -1e4, -8e3, -1e4], dtype=dtype, requires_grad=True)
    rw = torch.tensor([-3.0, -1e4, -1.0, -5e3], dtype=dtype)
    rl = torch.tensor([-1e4, -2.0, -1.0, -1e4], dtype=dtype)
    n = torch.tensor([500, 3, 400, 1000], dtype=dtype)
    labels = torch.tensor([True, False, True, False])
    grouped = torch.stack([sw, sl, sw + sl], 1)
    heads = {
        "dpo": L.dpo(sw, sl, rw, rl, beta=1.0), "ipo": L.ipo(sw, sl, rw, rl, n, n), "simpo": L.simpo(sw, sl, n, n),
        "slic": L.slic(sw, sl), "dpop": L.dpop(sw, sl, rw, rl), "orpo": L.orpo(sw, sl, n, n),
        "cpo": L.cpo(sw, sl, n), "kto": L.kto(sw, rw, labels, z0=L.kto_z0(sl, rl)),
        "spo": L.spo(sw, sl, gamma=0.01), "spo_alpha1": L.spo(sw, sl, alpha=1.0, gamma=1.0),
        "alpha_dpo": L.alpha_dpo(sw, sl, rw, rl, n, n, margin_mean=0.0, margin_std=1.0),
        "mcpo": L.mcpo(grouped, torch.stack([rw, rl, rl], 1), beta=1.0, negatives=torch.tensor([[1, 2]] * b)),
        "spo_ranked": L.spo_ranked(torch.stack([sw, sl, sw + 1], 1), gamma=0.01),
        "spo_best_of_n": L.spo_best_of_n(grouped, torch.tensor([0, 1, 2, 0]), alpha=0.5, gamma=0.01),
        "var": L.var(sw, torch.tensor([[10.0, -10.0, 5.0, 0.0]] * b, dtype=dtype), beta=0.01,
                     ref_logps=torch.stack([rw, rl, rw + rl, rl - 1.0])),
        "var_mean": L.var(sw, torch.tensor([[10.0, -10.0, 5.0, 0.0]] * b, dtype=dtype), beta=0.01,
                          ref_logps=torch.stack([rw, rl, rw + rl, rl - 1.0]), lengths=n, policy_reduction="mean",
                          ref_reduction="mean"),
    }
    return heads, (sw, sl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_summed_logps_are_finite(dtype):
    heads, (sw, sl) = _extreme_heads(dtype)
    for name, (loss, metrics) in heads.items():
        assert loss.dtype == dtype, name
        _finite(loss, sw, sl)
        assert all(bool(torch.isfinite(v).all()) for v in metrics.values() if v.is_floating_point()), name


def test_extreme_inputs_fp32_matches_fp64():
    """Not only finite: fp32 loss, gradients and metrics at the extreme inputs agree with float64."""
    h32, leaves32 = _extreme_heads(torch.float32)
    h64, leaves64 = _extreme_heads(torch.float64)
    for name in h64:
        (l32, m32), (l64, m64) = h32[name], h64[name]
        scale = max(1.0, abs(l64.item()))
        assert l32.item() == pytest.approx(l64.item(), rel=1e-5, abs=1e-6 * scale), name
        g32 = torch.autograd.grad(l32, leaves32, allow_unused=True)
        g64 = torch.autograd.grad(l64, leaves64, allow_unused=True)
        for a, b in zip(g32, g64):
            if b is None:
                assert a is None or not bool(a.any()), name
                continue
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()),
                                       msg=name)
        for key, v64 in m64.items():
            if v64.is_floating_point():
                v32 = m32[key].double()
                torch.testing.assert_close(v32, v64, rtol=1e-5, atol=1e-6 * max(1.0, v64.abs().max().item()),
                                           msg=f"{name}: {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_var_extreme_rewards_and_logps_do_not_overflow(dtype):
    b, beta = 4, 0.01
    s = torch.tensor([-1e4, -5e3, -20.0, -1.0], dtype=dtype, requires_grad=True)
    rew = torch.tensor([[10.0, -10.0, 5.0, 0.0]] * b, dtype=dtype)  # r/β up to 1e3
    ref = uniform((b, b), -1e4, -10.0, 3).to(dtype)
    loss, m = L.var(s, rew, beta=beta, ref_logps=ref)
    _finite(loss, s)
    assert m["weights"].sum().item() == pytest.approx(b, rel=1e-5)
    # fp32 agrees with the fp64 computation of the same weights
    _, m64 = L.var(s.double(), rew.double(), beta=beta, ref_logps=ref.double())
    torch.testing.assert_close(m["weights"].double(), m64["weights"], rtol=1e-5, atol=1e-5)
    loss_d, m_d = L.var(s, rew[0], beta=beta)  # diagonal form, r/β = 1e3
    _finite(loss_d, s)
    assert m_d["weights"][0].item() == pytest.approx(b, rel=1e-5)
    with pytest.raises(ValueError, match="not finite"):  # paper-literal weights overflow here
        L.var(s, rew, beta=beta, ref_logps=ref, normalize="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_mean_logp_near_zero(dtype):
    sw = torch.tensor([0.0, -1e-9, -1e-4, -2.0], dtype=dtype, requires_grad=True)
    sl = torch.tensor([-1e-7, -3.0, 0.0, -1e4], dtype=dtype, requires_grad=True)
    n = torch.tensor([10.0, 10.0, 10.0, 10.0], dtype=dtype)
    loss, m = L.orpo(sw, sl, n, n)
    _finite(loss, sw, sl)
    # log-odds of a mean log-prob a = −1e-5 is log(e^a/(1−e^a)) ≈ log(1e-5): exact to fp32 precision
    _, m1 = L.orpo(torch.tensor([-1e-4], dtype=dtype), torch.tensor([-20.0], dtype=dtype),
                   torch.tensor([10.0], dtype=dtype), torch.tensor([10.0], dtype=dtype))
    a, b = -1e-5, -2.0
    want = (a - math.log(-math.expm1(a))) - (b - math.log1p(-math.exp(b)))
    assert m1["log_odds_ratio"].item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_dpo_identical_margins_are_finite(dtype):
    sw = torch.full((4,), -20.0, dtype=dtype, requires_grad=True)
    sl = torch.full((4,), -30.0, dtype=dtype, requires_grad=True)
    r = torch.full((4,), -25.0, dtype=dtype)
    n = torch.full((4,), 10.0, dtype=dtype)
    m = L.alpha_dpo_margin(sw, sl, r, r, n, n)
    assert m.std().item() == 0.0
    loss, _ = L.alpha_dpo(sw, sl, r, r, n, n, margin_mean=m.mean(), margin_std=m.std())
    _finite(loss, sw, sl)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype,want", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_output_dtype(dtype, want):
    d = {k: v.detach().to(dtype) for k, v in batch().items()}
    s3 = uniform((6, 3), -20, -5, 0).to(dtype)
    outs = [
        L.dpo(d["sw"], d["sl"], d["rw"], d["rl"]), L.ipo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"]),
        L.simpo(d["sw"], d["sl"], d["nw"], d["nl"]), L.slic(d["sw"], d["sl"]),
        L.dpop(d["sw"], d["sl"], d["rw"], d["rl"]), L.orpo(d["sw"], d["sl"], d["nw"], d["nl"]),
        L.cpo(d["sw"], d["sl"], d["nw"]), L.kto(d["sw"], d["rw"], d["sw"] > -30, z0=0.5),
        L.var(d["sw"], d["rw"], beta=10.0),
        L.alpha_dpo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"], margin_mean=0.0, margin_std=1.0),
        L.mcpo(s3, s3 - 1, negatives=torch.ones(6, 1, dtype=torch.int64)),
        L.spo(d["sw"], d["sl"]), L.spo_best_of_n(s3, torch.zeros(6, dtype=torch.int64)), L.spo_ranked(s3),
    ]
    for loss, metrics in outs:
        assert loss.dtype == want
        assert all(v.dtype == want for v in metrics.values() if v.is_floating_point())
    assert L.alpha_dpo_margin(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"]).dtype == want
    assert L.kto_z0(d["sw"], d["rw"]).dtype == want


def test_fp32_matches_fp64_on_large_sums():
    """Margins of O(10^3) sums keep their precision through fp32 loss math (docs/losses.md §0)."""
    d = batch()
    d32 = {k: (v.detach() * 50).float() for k, v in d.items() if k not in ("nw", "nl")}
    d64 = {k: v.double() for k, v in d32.items()}
    for beta in (0.01, 0.1):
        l32 = L.dpo(d32["sw"], d32["sl"], d32["rw"], d32["rl"], beta=beta)[0]
        l64 = L.dpo(d64["sw"], d64["sl"], d64["rw"], d64["rl"], beta=beta)[0]
        assert l32.item() == pytest.approx(l64.item(), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- validation

def test_validation_errors_name_the_argument():
    d = batch()
    sw, sl, rw, rl, nw, nl = (d[k] for k in ("sw", "sl", "rw", "rl", "nw", "nl"))
    s3 = uniform((6, 3), -20, -5, 0)
    cases = [
        (lambda: L.dpo(sw, sl[:5], rw, rl), "rejected_logps"),
        (lambda: L.dpo(sw, sl, rw, rl[None]), "ref_rejected_logps"),
        (lambda: L.dpo(sw, sl, rw, rl, beta=0.0), "beta"),
        (lambda: L.dpo(sw, sl, rw, rl, label_smoothing=0.7), "label_smoothing"),
        (lambda: L.dpo(sw[:0], sl[:0], rw[:0], rl[:0]), "empty"),
        (lambda: L.ipo(sw, sl, rw, rl), "lengths"),
        (lambda: L.ipo(sw, sl, rw, rl, nw, nl, tau=-1.0), "tau"),
        (lambda: L.simpo(sw, sl, nw, nl * 0), "rejected_lengths"),
        (lambda: L.simpo(sw, sl, nw, nl[:3]), "rejected_lengths"),
        (lambda: L.slic(sw, sl, sft_logps=sw[:2]), "sft_logps"),
        (lambda: L.orpo(sw, sl, nw, -nl), "rejected_lengths"),
        (lambda: L.cpo(sw, sl, nw[:2]), "chosen_lengths"),
        (lambda: L.kto(sw, rw, torch.ones(5, dtype=torch.bool), z0=0.0), "labels"),
        (lambda: L.kto(sw, rw, torch.ones(6, dtype=torch.bool), z0=torch.ones(2)), "z0"),
        (lambda: L.var(sw, rw, beta=-1.0), "beta"),
        (lambda: L.var(sw, rw[:4], beta=1.0), "rewards"),
        (lambda: L.var(sw, torch.zeros(6, 6), beta=1.0), "ref_logps"),
        (lambda: L.var(sw, torch.zeros(6, 6), beta=1.0, ref_logps=rw), "ref_logps"),
        (lambda: L.var(sw, torch.zeros(6, 6, 6), beta=1.0), "rewards"),
        (lambda: L.var(sw, rw, beta=1.0, normalize="batch"), "normalize"),
        (lambda: L.var(sw, rw, beta=1.0, normalize="none"), "ref_logps"),
        (lambda: L.var(sw, rw, beta=1.0, policy_reduction="mean"), "lengths"),
        (lambda: L.var(sw, rw, beta=1.0, policy_reduction="max"), "policy_reduction"),
        (lambda: L.var(sw, rw, beta=1.0, ref_reduction="max"), "ref_reduction"),
        (lambda: L.var(sw, rw, beta=1.0, ref_logps=rl, ref_reduction="mean"), "lengths"),
        (lambda: L.var(sw, rw, beta=1.0, ref_logps=rl, lengths=nw * 0, ref_reduction="mean"), "lengths"),
        (lambda: L.alpha_dpo(sw, sl, rw, rl, nw, nl, margin_mean=0.0, margin_std=float("nan")), "margin_std"),
        (lambda: L.alpha_dpo(sw, sl, rw, rl, nw, nl, margin_mean=torch.zeros(2), margin_std=1.0), "margin_mean"),
        (lambda: L.mcpo(s3, s3[:, :2], negatives=torch.ones(6, 1, dtype=torch.int64)), "ref_logps"),
        (lambda: L.mcpo(sw, rw, negatives=torch.ones(6, 1, dtype=torch.int64)), "logps"),
        (lambda: L.mcpo(s3[:, :1], s3[:, :1], negatives=torch.ones(6, 1, dtype=torch.int64)), "logps"),
        (lambda: L.mcpo(s3, s3, negatives=torch.full((6, 1), 3)), "negatives must be column indices in 0..2"),
        (lambda: L.mcpo(s3, s3, negatives=torch.full((6, 1), -1)), "negatives must be column indices in 0..2"),
        (lambda: L.mcpo(s3, s3, negatives=torch.ones(5, 1, dtype=torch.int64)), "negatives must have shape"),
        (lambda: L.mcpo(s3, s3, negatives=torch.ones(6, 0, dtype=torch.int64)), "negatives must have shape"),
        (lambda: L.mcpo_sample_negatives(s3, s3, num_negatives=3), "num_negatives"),
        (lambda: L.mcpo_sample_negatives(s3, s3, num_negatives=0), "num_negatives"),
        (lambda: L.spo(sw, sl, alpha=-0.1), "alpha"),
        (lambda: L.spo(sw, sl, kl=torch.zeros(2, 2)), "kl"),
        (lambda: L.spo(sw, sl, weight_baseline=torch.zeros(3)), "weight_baseline"),
        (lambda: L.spo_best_of_n(s3, torch.full((6,), 3)), "best"),
        (lambda: L.spo_best_of_n(s3, torch.zeros(4, dtype=torch.int64)), "best"),
        (lambda: L.spo_ranked(s3[:, :1]), "logps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="chosen_logps"):
        L.dpo([1.0], sl, rw, rl)
    with pytest.raises(TypeError, match="labels"):
        L.kto(sw, rw, torch.ones(6), z0=0.0)
    with pytest.raises(TypeError, match="negatives"):
        L.mcpo(s3, s3, negatives=torch.ones(6, 1))
    with pytest.raises(TypeError, match="kl"):
        L.spo(sw, sl, kl=[0.1, 0.2])
    with pytest.raises(TypeError, match="beta"):
        L.dpo(sw, sl, rw, rl, beta="high")


def test_exports():
    import fastpref

    names = {"var", "alpha_dpo", "mcpo", "mcpo_sample_negatives", "spo", "spo_best_of_n", "spo_ranked", "dpo",
             "ipo", "simpo", "slic", "dpop", "kto", "orpo", "cpo", "kto_z0", "alpha_dpo_margin"}
    assert names <= set(fastpref.losses.__all__)
    for name in fastpref.losses.__all__:
        fn = getattr(fastpref.losses, name)
        assert fn.__doc__ and len(fn.__doc__) > 80, name


# ---------------------------------------------------------------- VAR reduction options (docs/losses.md §1)

@pytest.mark.parametrize("policy_reduction", ["sum", "mean"])
@pytest.mark.parametrize("normalize", ["self", "none"])
@pytest.mark.parametrize("form", ["cross", "diagonal"])
def test_var_ref_reduction_mean_matches_eager_fp64(form, normalize, policy_reduction):
    b, beta = 5, 2.0
    s = uniform(b, -40, -5, 0).requires_grad_(True)
    n = torch.tensor([3, 8, 15, 40, 1])  # integer token counts are accepted as lengths
    shape = (b, b) if form == "cross" else (b,)
    rew, ref = uniform(shape, -3, 3, 1), uniform(shape, -80, -5, 2)
    loss, m = L.var(s, rew, beta=beta, ref_logps=ref, normalize=normalize, lengths=n,
                    policy_reduction=policy_reduction, ref_reduction="mean")
    ref_loss, w = ref_var(s, rew, ref, beta, normalize, lengths=n, policy_mean=policy_reduction == "mean",
                          ref_mean=True)
    assert_parity(loss, ref_loss, [s])
    torch.testing.assert_close(m["weights"], w, **TOL)
    # c_i = w_i / B (÷ n_i for the token mean)
    denom = n.to(F64) if policy_reduction == "mean" else 1.0
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], -w / b / denom, **TOL)
    # The option matters exactly where π_ref does not cancel (not the diagonal self-normalized form).
    _, m_sum = L.var(s, rew, beta=beta, ref_logps=ref, normalize=normalize, lengths=n,
                     policy_reduction=policy_reduction)
    if form == "diagonal" and normalize == "self":
        torch.testing.assert_close(m_sum["weights"], m["weights"], **TOL)
    else:
        assert (m_sum["weights"] - m["weights"]).abs().max() > 1e-3


def test_var_ref_reduction_divides_column_j_by_the_length_of_y_j():
    """Lref[i, j] = log π_ref(y_j | x_i): the length is y_j's (the column's), not x_i's response's."""
    b = 3
    s = uniform(b, -20, -5, 0)
    rew = torch.zeros(b, b, dtype=F64)
    n = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    ref = torch.tensor([[-2.0, -4.0, -8.0]] * b, dtype=F64)  # per-token −2 for every response
    _, m = L.var(s, rew, beta=1.0, ref_logps=ref, lengths=n, ref_reduction="mean", normalize="none")
    # Lref/n = −2 everywhere: Ẑ_i = e^{−2}, lw_i = 0 − (−2) = 2 for every prompt.
    torch.testing.assert_close(m["log_weights"], torch.full((b,), 2.0, dtype=F64), **TOL)
    _, m_rows = L.var(s, rew, beta=1.0, ref_logps=ref.T.contiguous(), lengths=n, ref_reduction="mean",
                      normalize="none")
    assert (m_rows["log_weights"] - 2.0).abs().max() > 0.1  # dividing rows instead would be caught


def test_var_ref_reduction_without_reference_is_a_no_op():
    s, rew, n = uniform(4, -20, -5, 0), uniform(4, -1, 1, 1), torch.tensor([2, 3, 4, 5])
    a = L.var(s, rew, beta=1.0, lengths=n, ref_reduction="mean")
    c = L.var(s, rew, beta=1.0)
    torch.testing.assert_close(a[0], c[0], **TOL)


# ---------------------------------------------------------------- α-DPO std floor, SimPO γ, KTO z0

def _exact_alpha_dpo_batch(deltas):
    """Dyadic inputs with S̄_w − S̄_l = 0.375 and M_i = 0.5 + deltas_i exactly (no rounding in S/n or M)."""
    k = len(deltas)
    d = {"sw": torch.full((k,), -38.5, dtype=F64), "sl": torch.full((k,), -40.0, dtype=F64),
         "rl": torch.full((k,), -36.0, dtype=F64), "nw": torch.full((k,), 4.0, dtype=F64),
         "nl": torch.full((k,), 4.0, dtype=F64)}
    # M = 0.375 − (rw/4 + 9)  =>  rw = −34.5 − 4M
    d["rw"] = -34.5 - 4.0 * (0.5 + torch.tensor(deltas, dtype=F64))
    d["sw"].requires_grad_(True)
    d["sl"].requires_grad_(True)
    return d


def test_alpha_dpo_zero_std_is_floored_at_1e_6():
    d = _exact_alpha_dpo_batch([j * 2.0 ** -23 for j in (-2, -1, 0, 1, 3)])  # |M − μ| ≤ 3.6e-7
    m = L.alpha_dpo_margin(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"])
    torch.testing.assert_close(m, 0.5 + torch.tensor([-2, -1, 0, 1, 3], dtype=F64) * 2.0 ** -23, rtol=0, atol=0)
    args = (d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"])
    kw = dict(beta=10.0, gamma_beta_ratio=0.4, alpha=0.05, margin_mean=0.5)
    floored, _ = L.alpha_dpo(*args, margin_std=0.0, **kw)
    # The produced value: M* = (M − μ)/1e-6, i.e. exactly the loss at σ = 1e-6.
    assert_parity(floored, ref_alpha_dpo(d, 10.0, 0.4, 0.05, 0.5, 1e-6, 0.0), [d["sw"], d["sl"]])
    # Non-vacuous: σ = 2e-6 gives a different loss (the floor value itself is what is pinned).
    other, _ = L.alpha_dpo(*args, margin_std=2e-6, **kw)
    assert abs(other.item() - floored.item()) > 1e-3
    # A std below the floor is floored too, a std above it is used as is.
    below, _ = L.alpha_dpo(*args, margin_std=1e-9, **kw)
    assert below.item() == floored.item()


@pytest.mark.parametrize("bad", [-1e-3, -1.0, float("inf"), float("nan"), torch.tensor(-0.5, dtype=F64)])
def test_alpha_dpo_rejects_negative_or_non_finite_std(bad):
    d = batch()
    with pytest.raises(ValueError, match="margin_std"):
        L.alpha_dpo(d["sw"], d["sl"], d["rw"], d["rl"], d["nw"], d["nl"], margin_mean=0.0, margin_std=bad)


def test_simpo_gamma_is_absolute_and_gamma_beta_ratio_scales_with_beta():
    d = batch()
    args = (d["sw"], d["sl"], d["nw"], d["nl"])
    for beta, ratio in ((3.0, 0.25), (6.0, 0.1)):
        loss, _ = L.simpo(*args, beta=beta, gamma_beta_ratio=ratio)
        assert_parity(loss, ref_simpo(d, beta, beta * ratio, 0.0), [d["sw"], d["sl"]])
    # Defaults: γ = 0.5 absolute, which is SimPOConfig's ratio 0.25 only at β = 2.
    assert_parity(L.simpo(*args)[0], ref_simpo(d, 2.0, 0.5, 0.0), [d["sw"], d["sl"]])
    assert_parity(L.simpo(*args, gamma_beta_ratio=0.25)[0], L.simpo(*args)[0], [d["sw"], d["sl"]])
    assert abs(L.simpo(*args, beta=4.0)[0].item() - L.simpo(*args, beta=4.0, gamma_beta_ratio=0.25)[0].item()) > 1e-4
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        L.simpo(*args, gamma=1.0, gamma_beta_ratio=0.25)
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        L.simpo(*args, gamma_beta_ratio=float("nan"))


def test_kto_given_z0_is_used_unclamped():
    s = uniform(6, -50, -5, 1).requires_grad_(True)
    r = uniform(6, -50, -5, 2)
    labels = torch.tensor([True, False, True, True, False, False])
    loss, m = L.kto(s, r, labels, z0=-2.5, beta=0.3)
    assert_parity(loss, ref_kto(s, r, labels, -2.5, 0.3, 1.0, 1.0), [s])
    assert m["z0"].item() == -2.5
    clamped, _ = L.kto(s, r, labels, z0=0.0, beta=0.3)
    assert abs(clamped.item() - loss.item()) > 1e-3
    for bad in (float("nan"), float("inf"), torch.tensor(float("inf")), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="z0"):
            L.kto(s, r, labels, z0=bad)


# ---------------------------------------------------------------- input types

def test_non_floating_statistics_are_rejected_by_name():
    d = batch()
    sw, sl, rw, rl, nw, nl = (d[k].detach() for k in ("sw", "sl", "rw", "rl", "nw", "nl"))
    ints = torch.tensor([-10, -20, -30, -5, -7, -9])
    s3 = uniform((6, 3), -20, -5, 0)
    cases = [
        (lambda: L.dpo(ints, sl, rw, rl), "chosen_logps"),
        (lambda: L.dpo(sw, sl, rw, ints), "ref_rejected_logps"),
        (lambda: L.simpo(sw, ints, nw, nl), "rejected_logps"),
        (lambda: L.kto(ints, rw, sw > -30, z0=0.0), "logps"),
        (lambda: L.kto([1.0] * 6, rw, sw > -30, z0=0.0), "logps"),
        (lambda: L.kto(sw, rw.tolist(), sw > -30, z0=0.0), "ref_logps"),
        (lambda: L.var(sw, ints, beta=1.0), "rewards"),
        (lambda: L.var(ints, rw, beta=1.0), "logps"),
        (lambda: L.mcpo(s3.long(), s3, negatives=torch.ones(6, 1, dtype=torch.int64)), "logps"),
        (lambda: L.spo(sw, sl, kl=torch.ones(3, dtype=torch.int64)), "kl"),
        (lambda: L.spo_ranked(s3.long()), "logps"),
        (lambda: L.kto_z0(ints, rw), "mismatched_logps"),
    ]
    for call, name in cases:
        with pytest.raises(TypeError, match=name):
            call()
    # Lengths may be integer token counts: same result as float lengths.
    a, _ = L.simpo(sw, sl, nw.long(), nl.int())
    b, _ = L.simpo(sw, sl, nw, nl)
    torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------- SPO α = 0 branch and the switch


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_spo_ranked_with_per_k_weight_baseline_matches_eager_fp64(alpha):
    s = uniform((5, 4), -6, -0.5, 1).requires_grad_(True)
    baseline = torch.tensor([0.9, 0.7, 0.4], dtype=F64)  # one Ê per suffix k = 1..n−1
    loss, m = L.spo_ranked(s, alpha=alpha, gamma=0.6, weight_baseline=baseline)
    assert_parity(loss, ref_spo_ranked(s, alpha, 0.6, baseline), [s])
    mass = torch.exp(0.6 * torch.logcumsumexp(s.detach().flip(1), 1).flip(1))[:, :3]
    torch.testing.assert_close(m["weights"], 2 * torch.sigmoid(mass - baseline), **TOL)
    # the baseline is used (not the batch mean): a different one changes the loss
    other, _ = L.spo_ranked(s, alpha=alpha, gamma=0.6)
    assert abs(other.item() - loss.item()) > 1e-4


def _spo_forms(alpha):
    s = uniform((6, 3), -60, -5, 4).requires_grad_(True)
    best = torch.tensor([0, 1, 2, 0, 1, 2])
    return s, {
        "pairs": (L.spo(s[:, 0], s[:, 1], alpha=alpha, gamma=0.01), math.log(2)),
        "best_of_n": (L.spo_best_of_n(s, best, alpha=alpha, gamma=0.01), math.log(3)),
        "ranked": (L.spo_ranked(s, alpha=alpha, gamma=0.01), None),
    }


def test_spo_alpha_switch_is_continuous_in_gradient_and_jumps_by_log_n_over_alpha():
    above, below = 1.1e-6, 0.9e-6  # either side of the 1e-6 switch to the α = 0 form
    s_hi, hi = _spo_forms(above)
    s_lo, lo = _spo_forms(below)
    for name in hi:
        (l_hi, m_hi), log_n = hi[name]
        (l_lo, m_lo), _ = lo[name]
        g_hi = torch.autograd.grad(l_hi, s_hi)[0]
        g_lo = torch.autograd.grad(l_lo, s_lo)[0]
        torch.testing.assert_close(g_hi, g_lo, rtol=1e-4, atol=1e-4 * g_lo.abs().max().item(), msg=name)
        # The value is the paper's (1/α)·LSE above the switch: it carries mean(μ_k)·log(n_k)/α.
        mu = m_hi["weights"]
        if name == "ranked":
            offset = (mu * torch.tensor([math.log(3), math.log(2)], dtype=F64)).sum(1).mean() / above
        else:
            offset = mu.mean() * log_n / above
        assert offset.item() > 5e5
        assert (l_hi - offset).item() == pytest.approx(l_lo.item(), abs=1e-2)
        assert abs(l_hi.item() - l_lo.item()) > 1e5  # the documented jump


# ---------------------------------------------------------------- defaults (docs/api.md §2, docs/losses.md)

EXPECTED_DEFAULTS = {
    "dpo": dict(beta=0.1, label_smoothing=0.0),
    "ipo": dict(chosen_lengths=None, rejected_lengths=None, tau=0.1, length_normalize=True),
    "simpo": dict(beta=2.0, gamma=0.5, sft_weight=0.0, gamma_beta_ratio=None, label_smoothing=0.0, nll_weight=0.0),
    "slic": dict(delta=1.0, reg_weight=0.1, sft_logps=None),
    "dpop": dict(beta=0.3, dpop_lambda=50.0),
    "kto": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, average_log_prob=False, lengths=None),
    "orpo": dict(orpo_lambda=0.1, nll_weight=1.0, nll_logps=None, nll_lengths=None),
    "cpo": dict(rejected_lengths=None, beta=0.1, nll_weight=1.0, label_smoothing=0.0, average_log_prob=False),
    "var": dict(ref_logps=None, normalize="self", lengths=None, policy_reduction="sum", ref_reduction="sum"),
    "alpha_dpo": dict(beta=10.0, gamma_beta_ratio=0.4, alpha=0.05, label_smoothing=0.0),
    "mcpo": dict(beta=0.01),
    "mcpo_sample_negatives": dict(beta=0.01, num_negatives=1, generator=None, include_positive=False,
                                  sampling="mc"),
    "spo": dict(alpha=0.01, gamma=0.0, kl=None, kl_coef=0.01, weight_baseline=None),
    "spo_best_of_n": dict(alpha=0.01, gamma=0.0, kl=None, kl_coef=0.01, weight_baseline=None),
    "spo_ranked": dict(alpha=0.01, gamma=0.0, kl=None, kl_coef=0.01, weight_baseline=None, rank_decay=1.0),
}
# Keyword-only arguments with no default: VAR's β (unreported by the paper), the batch statistics.
REQUIRED = {"var": {"beta"}, "alpha_dpo": {"margin_mean", "margin_std"}, "mcpo": {"negatives"}, "kto": {"z0"}}


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULTS))
def test_head_defaults_are_pinned(name):
    params = inspect.signature(getattr(L, name)).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == EXPECTED_DEFAULTS[name]
    for k in EXPECTED_DEFAULTS[name]:  # every hyper-parameter is keyword-only, as in docs/api.md
        assert params[k].kind is inspect.Parameter.KEYWORD_ONLY or k in ("chosen_lengths", "rejected_lengths")
    required_kw = {k for k, p in params.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty}
    assert required_kw == REQUIRED.get(name, set())


# ---------------------------------------------------------------- MC-PO sampler: rows, include_positive, M > 1

def test_mcpo_sampler_rows_follow_their_own_softmax():
    draws, beta = 20000, 0.5
    s = torch.tensor([[-10.0, -12.0, -9.0, -14.0, -11.0],
                      [-30.0, -20.0, -20.0, -26.0, -23.0],
                      [-5.0, -9.0, -7.5, -6.0, -4.0]])
    r = torch.tensor([[-11.0, -11.5, -11.0, -11.0, -12.5],
                      [-25.0, -22.0, -21.0, -24.0, -25.0],
                      [-5.0, -5.0, -5.0, -5.0, -5.0]])
    rows = s.shape[0]
    neg = L.mcpo_sample_negatives(s.repeat_interleave(draws, 0), r.repeat_interleave(draws, 0), beta=beta,
                                  generator=torch.Generator().manual_seed(99))
    neg = neg.view(rows, draws)
    for i in range(rows):
        probs = torch.softmax(beta * (s[i, 1:] - r[i, 1:]).double(), 0)
        counts = torch.bincount(neg[i], minlength=5).double()
        assert counts[0] == 0
        assert _chi_square(counts[1:], probs) < CHI2_999[3], i
    # the rows really differ (a sampler ignoring the row would fail above for some row)
    p = [torch.softmax(beta * (s[i, 1:] - r[i, 1:]), 0) for i in range(rows)]
    assert (p[0] - p[1]).abs().max() > 0.2 and (p[1] - p[2]).abs().max() > 0.2


def test_mcpo_sampler_include_positive_with_two_draws():
    """include_positive=True, M = 2: Gumbel-top-2 over all K+1 columns, so y₀ is among the draws with
    P(0 ∈ Z) = p_0 + Σ_{j≠0} p_j p_0 / (1 − p_j), and Eq. 7 is applied literally (y₀ counted twice)."""
    draws, beta = 20000, 1.0
    s = torch.tensor([[-5.0, -6.0, -4.5, -7.0, -5.5]])
    r = torch.full_like(s, -6.0)
    neg = L.mcpo_sample_negatives(s.expand(draws, 5), r.expand(draws, 5), beta=beta, num_negatives=2,
                                  include_positive=True, generator=torch.Generator().manual_seed(21))
    assert bool((neg[:, 0] != neg[:, 1]).all())
    p = torch.softmax(beta * (s - r)[0].double(), 0)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    probs = torch.stack([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    lo, hi = neg.min(1).values, neg.max(1).values
    counts = torch.stack([((lo == i) & (hi == j)).sum() for i, j in pairs]).double()
    assert _chi_square(counts, probs) < 27.877  # dof 9, upper 0.1% point
    with_y0 = (neg == 0).any(1)
    assert with_y0.float().mean().item() == pytest.approx(float(probs[:4].sum()), abs=0.015)
    # The loss on such a draw is Eq. 7 literally: −βr_0 + log(2e^{βr_0} + e^{βr_j}).
    sg = uniform((2, 5), -20, -5, 3).requires_grad_(True)
    rg = uniform((2, 5), -20, -5, 4)
    two = torch.tensor([[0, 3], [2, 0]])
    loss, _ = L.mcpo(sg, rg, beta=0.5, negatives=two)
    assert_parity(loss, ref_mcpo(sg, rg, two, 0.5), [sg])
    x = 0.5 * (sg - rg).detach()
    by_hand = ((-x[0, 0] + torch.log(2 * torch.exp(x[0, 0]) + torch.exp(x[0, 3])))
               + (-x[1, 0] + torch.log(2 * torch.exp(x[1, 0]) + torch.exp(x[1, 2])))) / 2
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-12)


# ---------------------------------------------------------------- metric values by hand

def test_mcpo_metrics_by_hand():
    s = torch.tensor([[-10.0, -12.0, -9.0], [-17.0, -18.0, -25.0]], dtype=F64)
    r = torch.tensor([[-11.0, -11.0, -11.0], [-19.0, -19.0, -19.0]], dtype=F64)
    neg = torch.tensor([[1, 2], [2, 1]])
    loss, m = L.mcpo(s, r, beta=0.5, negatives=neg)
    # β r = [[0.5, −0.5, 1.0], [1.0, 0.5, −3.0]]
    torch.testing.assert_close(m["chosen_rewards"], torch.tensor([0.5, 1.0], dtype=F64), **TOL)
    torch.testing.assert_close(m["rejected_rewards"], torch.tensor([[-0.5, 1.0], [-3.0, 0.5]], dtype=F64), **TOL)
    torch.testing.assert_close(m["reward_margin"], torch.tensor([0.25, 2.25], dtype=F64), **TOL)
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor([0.0, 1.0], dtype=F64), **TOL)
    torch.testing.assert_close(m["rejected_logps"], torch.tensor([[-12.0, -9.0], [-25.0, -18.0]], dtype=F64), **TOL)
    e = math.exp
    want = ((-0.5 + math.log(e(0.5) + e(-0.5) + e(1.0))) + (-1.0 + math.log(e(1.0) + e(-3.0) + e(0.5)))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_spo_metrics_by_hand():
    sw = torch.tensor([-1.0, -3.0], dtype=F64)
    sl = torch.tensor([-2.0, -2.5], dtype=F64)
    _, m = L.spo(sw, sl, alpha=0.5, gamma=1.0, kl=torch.tensor([0.3, 0.1], dtype=F64))
    torch.testing.assert_close(m["reward_margin"], torch.tensor([1.0, -0.5], dtype=F64), **TOL)
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor([1.0, 0.0], dtype=F64), **TOL)
    torch.testing.assert_close(m["chosen_rewards"], sw, **TOL)
    # μ = 2σ((π_w + π_l) − mean over the batch), γ = 1
    mass = [math.exp(-1) + math.exp(-2), math.exp(-3) + math.exp(-2.5)]
    mean = sum(mass) / 2
    want = torch.tensor([2 / (1 + math.exp(-(x - mean))) for x in mass], dtype=F64)
    torch.testing.assert_close(m["weights"], want, **TOL)
    torch.testing.assert_close(m["kl"], torch.tensor([0.3, 0.1], dtype=F64), **TOL)


def test_alpha_dpo_metrics_by_hand():
    sw = torch.tensor([-5.0, -30.0], dtype=F64)
    sl = torch.tensor([-20.0, -10.0], dtype=F64)
    rw = torch.tensor([-12.0, -28.0], dtype=F64)
    rl = torch.tensor([-18.0, -12.0], dtype=F64)
    nw = torch.tensor([5.0, 10.0], dtype=F64)
    nl = torch.tensor([10.0, 5.0], dtype=F64)
    _, m = L.alpha_dpo(sw, sl, rw, rl, nw, nl, beta=2.0, margin_mean=0.0, margin_std=1.0)
    # S̄_w = [−1, −3], S̄_l = [−2, −2]; rewards β S̄
    torch.testing.assert_close(m["chosen_rewards"], torch.tensor([-2.0, -6.0], dtype=F64), **TOL)
    torch.testing.assert_close(m["rejected_rewards"], torch.tensor([-4.0, -4.0], dtype=F64), **TOL)
    torch.testing.assert_close(m["reward_margin"], torch.tensor([2.0, -2.0], dtype=F64), **TOL)
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor([1.0, 0.0], dtype=F64), **TOL)
    # M = (S̄_w − S̄_l) − (R̄_w − R̄_l) = [1 − (−2.4 + 1.8), −1 − (−2.8 + 2.4)]
    torch.testing.assert_close(m["margin"], torch.tensor([1.6, -0.6], dtype=F64), **TOL)
