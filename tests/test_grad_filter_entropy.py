"""The backward's gradient filter (``KernelOptions.grad_filter``) when the entropy extra output is in the loss
(``extra_outputs=("entropy",)``, upstream gradients on ``token_entropy`` and ``entropy``): the torch backend in
float64 and the Triton atomic backward under the interpreter, against the float64 truth and the stated bound.

The bound (``KernelOptions`` docstring): an entry ``(i, v)``, ``v`` not the target, of the logits gradient
``G = dL/d(h W^T + b)`` may be dropped only when ``|G_iv| <= t s_i`` with ``s_i = (|a_i| + |b_i| + |c_i|) / T``
(``a``, ``b``, ``c`` the per-position upstream gradients of ``token_logps``, ``token_kl`` and the entropy), so
``||ddH_i|| <= sum_{v eligible} |G_iv| ||w_v||``, ``||ddW_v|| <= sum_{i eligible} |G_iv| ||h_i||`` and
``|ddb_v| <= sum_{i eligible} |G_iv|``. The entropy's part of ``G`` is ``-c_i p_iv (log p_iv + H_i) / T``, so the
eligible set is computed here from the exact ``G`` (eager reference on the logits themselves, identity head),
not from the softmax alone. With a tiny threshold nothing is eligible and the filtered gradients must equal the
unfiltered ones.

Run as a script (``TRITON_INTERPRET=1``, argv[1] a JSON path) it writes the Triton atomic backward's results,
which ``test_triton_atomic_filter_with_entropy`` reads from a subprocess (the interpreter must be switched on
before the kernels are first imported).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Tuple

import pytest
import torch
from _interpret import run_interpreted

import fastpref
from fastpref import reference
from fastpref._types import KernelOptions
from fastpref.testing import CoreCase, core_leaves, make_core_case, rel_err

# A peaked softmax (head entries of std 2.5 at D = 24: logits of std ~12), as in tests/test_grad_filter.py.
PEAKED = dict(S=3, T=11, D=24, V=700, weight_scale=2.5)
OFF, T12 = KernelOptions(grad_filter=None), KernelOptions(grad_filter=2.0 ** -12)
TINY = KernelOptions(grad_filter=1e-30)  # a threshold no entry of these cases falls below


def entropy_upstream(case: CoreCase, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random float64 upstream gradients of ``token_entropy`` (the targets' shape) and ``entropy`` (per sequence)."""
    g = torch.Generator().manual_seed(seed)
    seqs = case.kwargs["num_seqs"] if "seq_ids" in case.kwargs else case.targets.shape[0]
    return (torch.randn(case.targets.shape, generator=g, dtype=torch.float64),
            torch.randn(seqs, generator=g, dtype=torch.float64))


def loss_of(stats, case: CoreCase, ent_up: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``case.upstream``'s terms plus ``sum(token_entropy * u) + sum(entropy * v)``, in float64."""
    terms = [(getattr(stats, k).double() * up).sum() for k, up in case.upstream.items()
             if getattr(stats, k) is not None]
    terms += [(stats.token_entropy.double() * ent_up[0]).sum(), (stats.entropy.double() * ent_up[1]).sum()]
    return sum(terms)


def run_entropy(fn, case: CoreCase, ent_up: Tuple[torch.Tensor, torch.Tensor], **extra) -> Dict[str, torch.Tensor]:
    """Forward outputs (``token_logps``, ``token_entropy``, ``token_kl`` where present) and the gradients
    ``d_hidden``, ``d_weight`` (and ``d_bias``) of :func:`loss_of`."""
    leaves, kwargs = core_leaves(case)
    stats = fn(leaves["hidden"], leaves["weight"], case.targets, extra_outputs=("entropy",), **kwargs, **extra)
    out = {k: getattr(stats, k).detach() for k in ("token_logps", "token_entropy", "token_kl")
           if getattr(stats, k) is not None}
    grads = torch.autograd.grad(loss_of(stats, case, ent_up), list(leaves.values()))
    out.update({"d_" + name: grad for name, grad in zip(leaves, grads)})
    return out


def truth_and_bounds(case: CoreCase, ent_up: Tuple[torch.Tensor, torch.Tensor], threshold: float
                     ) -> Dict[str, torch.Tensor]:
    """float64 truth (dH, dW, the logits gradient G) and the filter's bounds per row of dH, of dW and per bias
    entry, from the entries of G eligible for dropping (module docstring)."""
    c = case.to(torch.float64)
    kw = dict(c.kwargs)
    h, w = c.hidden.reshape(-1, c.hidden.shape[-1]), c.weight
    n, vocab = h.shape[0], w.shape[0]
    eye = torch.eye(vocab, dtype=torch.float64)
    logits = (h @ w.t()).reshape(*c.targets.shape, vocab).requires_grad_()
    if kw.get("ref_hidden") is not None:
        shared = kw.get("ref_weight") is None
        ref_w = w if shared else kw["ref_weight"]
        kw["ref_bias"] = kw.get("bias") if shared else kw.get("ref_bias")
        kw["ref_hidden"] = (kw["ref_hidden"].reshape(n, -1) @ ref_w.t()).reshape(*c.targets.shape, vocab)
        kw["ref_weight"] = eye
    stats = reference.fused_logprobs(logits, eye, c.targets, extra_outputs=("entropy",), **kw)
    grad = torch.autograd.grad(loss_of(stats, c, ent_up), logits)[0].reshape(n, vocab)
    flat = c.targets.reshape(-1)
    seq = kw["seq_ids"] if kw.get("seq_ids") is not None else \
        torch.arange(c.targets.shape[0]).repeat_interleave(c.targets.shape[-1])
    # per position: |a| + |b| + |c|, each the token-level upstream plus its sequence's
    scale = (ent_up[0].reshape(-1) + ent_up[1][seq]).abs()
    for tok, per_seq in (("token_logps", "logps"), ("token_kl", "kl")):
        if tok in c.upstream and (tok == "token_logps" or kw.get("kl")):
            scale += (c.upstream[tok].reshape(-1) + c.upstream[per_seq][seq]).abs()
    scale = scale * (flat != -100) / kw.get("temperature", 1.0)
    target = torch.zeros(n, vocab, dtype=torch.bool)
    valid = (flat != -100).nonzero().squeeze(1)
    target[valid, flat[valid]] = True
    eligible = (grad.abs() <= threshold * scale[:, None] * (1 + 1e-9)) & ~target
    dropped = grad.abs() * eligible
    return {"d_hidden": grad @ w, "d_weight": grad.t() @ h, "bound_hidden": dropped @ w.norm(dim=1),
            "bound_weight": dropped.t() @ h.norm(dim=1), "bound_bias": dropped.sum(0), "grad": grad,
            "eligible": eligible}


def bound_slack(got: Dict[str, torch.Tensor], truth: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per gradient: max over rows of (||error_row|| - bound_row) / max|truth| (<= 0 when the bound holds)."""
    out = {}
    for key, bound in (("d_hidden", "bound_hidden"), ("d_weight", "bound_weight")):
        err = (got[key].double().reshape(truth[key].shape) - truth[key]).norm(dim=1)
        out[key] = float((err - truth[bound]).max() / truth[key].abs().max())
    return out


def least_likely_targets(case: CoreCase) -> CoreCase:
    """``case`` with every third valid target replaced by its least likely token (its own gradient entry is then
    below the threshold: dropping the one-hot term would break the bound)."""
    h = case.hidden.reshape(-1, case.hidden.shape[-1]).double()
    z = h @ case.weight.double().t()
    targets = case.targets.clone().reshape(-1)
    pick = (targets != -100) & (torch.arange(targets.numel()) % 3 == 0)
    targets[pick] = z.argmin(-1)[pick]
    return CoreCase(case.hidden, case.weight, targets.view(case.targets.shape), case.kwargs, case.upstream)


# ------------------------------------------------------------------------------------- torch backend


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles small enough that a peaked softmax leaves whole (row, vocabulary block) slices below t."""
    from fastpref.backends import torch_backend

    monkeypatch.setattr(torch_backend, "BLOCK_N", 8)
    monkeypatch.setattr(torch_backend, "BLOCK_V", 64)
    return torch_backend


TORCH_CASES = {
    "entropy_and_logps": dict(PEAKED),
    "entropy_only": dict(PEAKED, grads_on=()),
    "entropy_kl_forward_packed_bias_softcap_temperature": dict(
        PEAKED, layout="packed", ref="shared", kl="forward", bias=True, softcap=80.0, temperature=0.8),
    "entropy_kl_reverse_separate": dict(PEAKED, ref="separate", kl="reverse", ignore_seq=1),
}


@pytest.mark.parametrize("name", TORCH_CASES)
def test_torch_filter_with_entropy_within_bound_fp64(name, small_blocks):
    case = least_likely_targets(make_core_case(torch.float64, seed=41, **TORCH_CASES[name]))
    ent_up = entropy_upstream(case, seed=42)
    truth = truth_and_bounds(case, ent_up, T12.grad_filter)
    exact = run_entropy(fastpref.fused_logprobs, case, ent_up, backend="torch", options=OFF)
    assert small_blocks.LAST_FILTER_STATS == {"rows_seen": 0, "rows_skipped": 0}
    filtered = run_entropy(fastpref.fused_logprobs, case, ent_up, backend="torch", options=T12)
    stats = dict(small_blocks.LAST_FILTER_STATS)
    assert stats["rows_skipped"] > stats["rows_seen"] // 20, stats  # not vacuous: slices were skipped
    assert truth["eligible"].any(dim=1).sum() > 10  # ... and many rows have eligible entries
    for key in ("d_hidden", "d_weight"):
        assert rel_err(exact[key].reshape(truth[key].shape), truth[key]) < 1e-12, key  # off: exact
        assert rel_err(filtered[key], exact[key]) > 1e-9, key  # on: something was dropped
    slack = bound_slack(filtered, truth)
    assert max(slack.values()) <= 1e-12, slack
    if "d_bias" in exact:
        assert ((filtered["d_bias"] - exact["d_bias"]).abs() <= truth["bound_bias"] * (1 + 1e-9) + 1e-12).all()
    for key in ("token_logps", "token_entropy", "token_kl"):  # the forward is untouched
        if key in exact:
            assert torch.equal(filtered[key], exact[key]), key


@pytest.mark.parametrize("name", ["entropy_and_logps", "entropy_kl_forward_packed_bias_softcap_temperature"])
def test_torch_tiny_threshold_with_entropy_equals_unfiltered(name, small_blocks):
    """t = 1e-30: the filter looks at every slice, drops none, and the gradients are bitwise the unfiltered ones.
    (Single entries of this peaked softmax do lie below 1e-30 * s_i, but no whole 64-column slice of a row does.)"""
    case = least_likely_targets(make_core_case(torch.float64, seed=43, **TORCH_CASES[name]))
    ent_up = entropy_upstream(case, seed=44)
    exact = run_entropy(fastpref.fused_logprobs, case, ent_up, backend="torch", options=OFF)
    tiny = run_entropy(fastpref.fused_logprobs, case, ent_up, backend="torch", options=TINY)
    stats = dict(small_blocks.LAST_FILTER_STATS)
    assert stats["rows_seen"] > 0 and stats["rows_skipped"] == 0, stats
    for key in exact:
        assert torch.equal(tiny[key], exact[key]), key


# ------------------------------------------------------------------------------------- Triton backend

# The interpreter's 16 x 64 tiles (a tile holding a target is never skipped): a looser threshold skips enough.
TRITON_T = 2.0 ** -9
TRITON_CASES = {
    "entropy_logps_bias": dict(PEAKED, T=7, V=2000, weight_scale=4.0, bias=True),
    "entropy_kl_reverse_temperature": dict(PEAKED, T=7, V=2000, weight_scale=4.0, ref="shared", kl="reverse",
                                           temperature=0.8),
}


def interpreter_main(path: str) -> None:
    """Under TRITON_INTERPRET=1: the atomic backward with the entropy in the loss, filtered at TRITON_T and at a
    tiny threshold, against its unfiltered run and the float64 truth and bound."""
    torch.set_num_threads(1)
    results = {}
    for i, (name, spec) in enumerate(TRITON_CASES.items()):
        case = least_likely_targets(make_core_case(torch.float32, seed=50 + i, **spec))
        ent_up = entropy_upstream(case, seed=60 + i)
        truth = truth_and_bounds(case, ent_up, TRITON_T)
        runs = {label: run_entropy(fastpref.fused_logprobs, case, ent_up, backend="triton", options=KernelOptions(
            grad_filter=t, deterministic=False)) for label, t in (("on", TRITON_T), ("off", None), ("tiny", 1e-30))}
        res = {f"slack/{k}": v for k, v in bound_slack(runs["on"], truth).items()}
        for key in ("d_hidden", "d_weight"):
            err = (runs["off"][key].double().reshape(truth[key].shape) - truth[key]).norm(dim=1)
            res[f"off_error/{key}"] = float(err.max() / truth[key].abs().max())
            res[f"dropped/{key}"] = rel_err(runs["on"][key], runs["off"][key])
        res["tiny_vs_off"] = max(rel_err(runs["tiny"][k], runs["off"][k]) for k in runs["off"])
        results[name] = res
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def test_triton_atomic_filter_with_entropy(tmp_path):
    out = tmp_path / "grad_filter_entropy.json"
    results = run_interpreted(__file__, out)
    for name in TRITON_CASES:
        res = results[name]
        for key in ("d_hidden", "d_weight"):
            # fp32 kernels: the unfiltered run's own error vs the truth is the allowance on top of the bound
            assert res[f"slack/{key}"] <= res[f"off_error/{key}"] + 1e-6, (name, key, res)
            assert res[f"dropped/{key}"] > 1e-4, (name, key, res)  # not vacuous: tiles were skipped
        assert res["tiny_vs_off"] == 0.0, (name, res)  # t = 1e-30 skips no tile: the same sums in the same order


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1")
    interpreter_main(sys.argv[1])
