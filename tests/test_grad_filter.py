"""The backward's gradient filter (``KernelOptions.grad_filter``): its options, its error bound against float64
truth on both backends, and the defaults (off for fp32/fp64, on for bf16/fp16 where it saves work).

The bound (``KernelOptions`` docstring): the filter drops only entries ``(i, v)``, ``v`` not the target, of the
logits gradient ``G = dL/d(h W^T + b)`` with ``|G_iv| <= t s_i`` (``s_i = (|a_i| + |b_i|) / T``), so
``||ddH_i|| <= sum_{v eligible} |G_iv| ||w_v||`` and ``||ddW_v|| <= sum_{i eligible} |G_iv| ||h_i||``, whatever
the backend's tiling. ``G`` comes from the eager reference run on the logits themselves (an identity head).

Run as a script (``TRITON_INTERPRET=1``, argv[1] a JSON path) it writes the Triton backend's results (the fused
atomic backward filters; the deterministic one is always exact), which
``test_triton_kernels_filter_within_bound`` reads from a subprocess (the interpreter must be switched on before
the kernels are first imported).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict

import pytest
import torch
from _interpret import run_interpreted

import fastpref
from fastpref import reference
from fastpref._types import GRAD_FILTER_AUTO, KernelOptions
from fastpref.testing import CoreCase, make_core_case, rel_err, run_core

# A peaked softmax: head entries of std 2.5 (logits of std ~12 at D = 24), so most of a
# row's vocabulary blocks lie far below the threshold.
PEAKED = dict(S=3, T=11, D=24, V=700, weight_scale=2.5)
OFF, T12 = KernelOptions(grad_filter=None), KernelOptions(grad_filter=2.0 ** -12)


def least_likely_targets(case: CoreCase) -> CoreCase:
    """``case`` with every third valid target replaced by its least likely token: its own probability is then far
    below the threshold, so dropping the one-hot term would break the bound."""
    h = case.hidden.reshape(-1, case.hidden.shape[-1]).double()
    z = h @ case.weight.double().t()
    targets = case.targets.clone().reshape(-1)
    pick = (targets != -100) & (torch.arange(targets.numel()) % 3 == 0)
    targets[pick] = z.argmin(-1)[pick]
    return CoreCase(case.hidden, case.weight, targets.view(case.targets.shape), case.kwargs, case.upstream)


def truth_and_bounds(case: CoreCase, threshold: float) -> Dict[str, torch.Tensor]:
    """float64 truth (dH, dW) and the filter's bounds: per row of dH, per row of dW (module docstring)."""
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
    stats = reference.fused_logprobs(logits, eye, c.targets, **kw)
    loss = sum((getattr(stats, k) * up).sum() for k, up in c.upstream.items() if getattr(stats, k) is not None)
    grad = torch.autograd.grad(loss, logits)[0].reshape(n, vocab)
    flat = c.targets.reshape(-1)
    seq = kw["seq_ids"] if kw.get("seq_ids") is not None else \
        torch.arange(c.targets.shape[0]).repeat_interleave(c.targets.shape[-1])
    scale = torch.zeros(n, dtype=torch.float64)
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
            "bound_weight": dropped.t() @ h.norm(dim=1), "grad": grad, "eligible": eligible}


def bound_slack(got: Dict[str, torch.Tensor], truth: Dict[str, torch.Tensor], noise: float = 1e-12) -> Dict[str, float]:
    """Per gradient: max over rows of (||error_row|| - bound_row) / max|truth| (<= noise when the bound holds)."""
    out = {}
    for key, bound in (("d_hidden", "bound_hidden"), ("d_weight", "bound_weight")):
        err = (got[key].double().reshape(truth[key].shape) - truth[key]).norm(dim=1)
        out[key] = float((err - truth[bound]).max() / truth[key].abs().max()) - noise
    return out


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("bad", ["on", 0.0, 1.0, -0.5, True, [0.1]])
def test_grad_filter_option_is_validated(bad):
    with pytest.raises(ValueError, match="KernelOptions.grad_filter"):
        KernelOptions(grad_filter=bad)


def test_auto_is_off_in_fp32_and_where_nothing_is_saved():
    auto = KernelOptions()
    assert auto.grad_filter == "auto" and GRAD_FILTER_AUTO == 2.0 ** -12
    assert auto.filter_threshold(torch.float32, "torch") is None
    assert auto.filter_threshold(torch.float64, "torch") is None
    for dtype in (torch.bfloat16, torch.float16):
        assert auto.filter_threshold(dtype, "torch") == GRAD_FILTER_AUTO
        assert auto.filter_threshold(dtype, "triton") is None  # deterministic: cuBLAS spans whole chunks
        assert KernelOptions(deterministic=False).filter_threshold(dtype, "triton") == GRAD_FILTER_AUTO
    assert OFF.filter_threshold(torch.bfloat16, "torch") is None
    assert KernelOptions(grad_filter=0.01).filter_threshold(torch.float64, "torch") == 0.01
    assert KernelOptions(grad_filter=0.01, deterministic=False).filter_threshold(torch.float32, "triton") == 0.01
    assert KernelOptions(grad_filter=0.01).filter_threshold(torch.bfloat16, "triton") is None  # always exact


# ------------------------------------------------------------------------------------- torch backend


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles small enough that a peaked softmax leaves whole (row, vocabulary block) slices below t."""
    from fastpref.backends import torch_backend

    monkeypatch.setattr(torch_backend, "BLOCK_N", 8)
    monkeypatch.setattr(torch_backend, "BLOCK_V", 64)
    return torch_backend


TORCH_CASES = {
    "logps": dict(PEAKED),
    "logps_packed_bias_softcap_temperature": dict(PEAKED, layout="packed", bias=True, softcap=80.0,
                                                  temperature=0.8),
    "kl_forward": dict(PEAKED, ref="shared", kl="forward"),
    "kl_reverse_separate": dict(PEAKED, ref="separate", kl="reverse", bias=True),
}


@pytest.mark.parametrize("name", TORCH_CASES)
def test_torch_backend_filter_is_within_its_bound_in_fp64(name, small_blocks):
    case = least_likely_targets(make_core_case(torch.float64, seed=11, **TORCH_CASES[name]))
    truth = truth_and_bounds(case, T12.grad_filter)
    exact = run_core(fastpref.fused_logprobs, case, backend="torch", options=OFF)
    assert small_blocks.LAST_FILTER_STATS == {"rows_seen": 0, "rows_skipped": 0}
    filtered = run_core(fastpref.fused_logprobs, case, backend="torch", options=T12)
    stats = dict(small_blocks.LAST_FILTER_STATS)
    assert stats["rows_skipped"] > stats["rows_seen"] // 20, stats  # not vacuous: slices were skipped
    for key in ("d_hidden", "d_weight"):
        assert rel_err(exact[key].reshape(truth[key].shape), truth[key]) < 1e-12  # off: exact
        assert rel_err(filtered[key], exact[key]) > 1e-9, key  # on: something was dropped
    assert max(bound_slack(filtered, truth).values()) <= 0, bound_slack(filtered, truth)
    if "bias" in case.kwargs:
        drop = truth["grad"].abs() * truth["eligible"]
        assert ((filtered["d_bias"] - exact["d_bias"]).abs() <= drop.sum(0) * (1 + 1e-9) + 1e-12).all()
    for key in exact:  # the forward is untouched
        if not key.startswith("d_"):
            assert torch.equal(filtered[key], exact[key]), key


def test_log_prob_bound_in_softmax_mass(small_blocks):
    """The stated form for a log-prob-only gradient: ||ddH_i|| <= |a_i| / T * P_i * max ||w_v||, with P_i the
    softmax mass of the eligible (skippable) entries."""
    case = make_core_case(torch.float64, seed=12, **PEAKED)
    truth = truth_and_bounds(case, T12.grad_filter)
    filtered = run_core(fastpref.fused_logprobs, case, backend="torch", options=T12)
    h = case.hidden.reshape(-1, case.hidden.shape[-1])
    p = torch.softmax(h @ case.weight.t(), dim=-1)
    seq = torch.arange(case.targets.shape[0]).repeat_interleave(case.targets.shape[1])
    a = (case.upstream["token_logps"].reshape(-1) + case.upstream["logps"][seq]) * (case.targets.reshape(-1) != -100)
    mass = (p * truth["eligible"]).sum(1)
    bound = a.abs() * mass * case.weight.norm(dim=1).max()
    err = (filtered["d_hidden"].reshape(-1, h.shape[1]) - truth["d_hidden"]).norm(dim=1)
    assert (err <= bound * (1 + 1e-9) + 1e-13).all()
    active = a != 0  # (an ignored row has no gradient: every entry of it is trivially eligible)
    limit = torch.clamp(truth["eligible"].sum(1) * T12.grad_filter, max=1.0)
    assert active.sum() > 10 and (mass[active] <= limit[active] + 1e-12).all()
    assert err.max() > 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_default_filters_and_keeps_the_parity_rule(dtype, small_blocks):
    """bf16/fp16 default ("auto"): the filter is on, and the fused error vs the fp64 truth stays within the eager
    error + eps/4 (the rule of tests/test_core_parity.py) on a peaked softmax."""
    case = make_core_case(torch.float64, seed=13, **PEAKED, ref="shared", kl="forward").to(dtype)
    truth = run_core(reference.fused_logprobs, case.to(torch.float64))
    eager = run_core(reference.fused_logprobs, case)
    fused = run_core(fastpref.fused_logprobs, case, backend="torch")
    assert small_blocks.LAST_FILTER_STATS["rows_skipped"] > 0
    off = run_core(fastpref.fused_logprobs, case, backend="torch", options=OFF)
    assert small_blocks.LAST_FILTER_STATS["rows_seen"] == 0
    assert not torch.equal(fused["d_weight"], off["d_weight"])
    for key, t in truth.items():
        assert rel_err(fused[key], t) <= rel_err(eager[key], t) + torch.finfo(dtype).eps / 4, key


def test_fp32_default_is_exact(small_blocks):
    case = make_core_case(torch.float32, seed=14, **PEAKED)
    default = run_core(fastpref.fused_logprobs, case, backend="torch")
    assert small_blocks.LAST_FILTER_STATS["rows_seen"] == 0
    off = run_core(fastpref.fused_logprobs, case, backend="torch", options=OFF)
    assert all(torch.equal(default[k], off[k]) for k in off)


# ------------------------------------------------------------------------------------- Triton backend

# The interpreter's 16 x 64 tiles (a tile holding a target is never skipped): a looser threshold skips enough.
TRITON_T = 2.0 ** -9
TRITON_CASES = {
    "logps_chunks": dict(PEAKED, T=7, V=2000, weight_scale=4.0, bias=True),
    "kl_reverse": dict(PEAKED, T=7, V=2000, weight_scale=4.0, ref="shared", kl="reverse"),
}


def interpreter_main(path: str) -> None:
    """Under TRITON_INTERPRET=1: the atomic backward's filtered gradients against the fp64 bound, the chunked
    (deterministic) backward's exactness with a filter set, and the bf16 defaults of both paths."""
    torch.set_num_threads(1)
    results = {}
    for i, (name, spec) in enumerate(TRITON_CASES.items()):
        case = least_likely_targets(make_core_case(torch.float32, seed=20 + i, **spec))
        truth = truth_and_bounds(case, TRITON_T)
        runs = {label: run_core(fastpref.fused_logprobs, case, backend="triton", options=opts) for label, opts in (
            ("atomic", KernelOptions(grad_filter=TRITON_T, deterministic=False)),
            ("atomic_off", KernelOptions(grad_filter=None, deterministic=False)),
            ("chunked", KernelOptions(grad_filter=TRITON_T, workspace_bytes=1)),  # several 256-column chunks
            ("chunked_off", KernelOptions(grad_filter=None, workspace_bytes=1)))}
        res = {f"slack/{k}": v for k, v in bound_slack(runs["atomic"], truth, 0.0).items()}
        for key in ("d_hidden", "d_weight"):
            err = (runs["atomic_off"][key].double().reshape(truth[key].shape) - truth[key]).norm(dim=1)
            res[f"off_error/{key}"] = float(err.max() / truth[key].abs().max())
            res[f"dropped/{key}"] = rel_err(runs["atomic"][key], runs["atomic_off"][key])
        res["chunked_exact"] = all(torch.equal(runs["chunked"][k], runs["chunked_off"][k]) for k in runs["chunked"])
        results[name] = res
    case = make_core_case(torch.float32, seed=30, **TRITON_CASES["logps_chunks"]).to(torch.bfloat16)
    runs = {label: run_core(fastpref.fused_logprobs, case, backend="triton", options=opts) for label, opts in (
        ("atomic_auto", KernelOptions(deterministic=False)),
        ("atomic_off", KernelOptions(deterministic=False, grad_filter=None)))}
    results["bf16"] = {"atomic_auto_differs": rel_err(runs["atomic_auto"]["d_weight"], runs["atomic_off"]["d_weight"])}
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def test_triton_kernels_filter_within_bound(tmp_path):
    out = tmp_path / "grad_filter.json"
    results = run_interpreted(__file__, out)
    for name in TRITON_CASES:
        res = results[name]
        for key in ("d_hidden", "d_weight"):
            # fp32 kernels: the unfiltered run's own error vs the truth is the allowance on top of the bound
            assert res[f"slack/{key}"] <= res[f"off_error/{key}"] + 1e-6, (name, key, res)
            assert res[f"dropped/{key}"] > 1e-4, (name, key, res)  # not vacuous: tiles were skipped
        assert res["chunked_exact"], name  # the deterministic backward never filters
    assert results["bf16"]["atomic_auto_differs"] > 0  # bf16 default: on in the atomic backward


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1")
    interpreter_main(sys.argv[1])
