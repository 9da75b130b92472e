"""``fused_logprobs(..., extra_outputs=...)``: entropy (with its gradient), mean logit, target-is-top-1 and
log sum p^2 of the policy, against the fp64 eager reference, in the torch backend (small tiles), the Triton
backend (interpreter, subprocess), under vocabulary parallelism (two gloo processes) and in the loss modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _interpret import run_interpreted

import fastpref
import fastpref.reference
from fastpref._types import EXTRA_OUTPUTS
from fastpref.backends import torch_backend
from fastpref.testing import make_core_case, rel_err

SCRIPT = Path(__file__).with_name("triton_interpret_cases.py")
_spec = importlib.util.spec_from_file_location("triton_interpret_cases", SCRIPT)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

FP64_TOL = 1e-12
FP32_TOL = 1e-4
# V = 203 spans four vocabulary tiles of 64 (the last one partial); 8-row blocks repeat too.
SMALL_TILES = (8, 64)
CORE = dict(V=203, D=16)
TORCH_CASES = {
    "padded": dict(),
    "bias_temperature_softcap": dict(bias=True, temperature=0.7, softcap=5.0),
    "fully_ignored_sequence": dict(bias=True, ignore_seq=1),
    "packed_unequal_lengths": dict(layout="packed", lengths=(7, 1, 13, 4), bias=True, softcap=3.0),
    "separate_ref_forward_kl": dict(layout="packed", ref="separate", kl="forward", bias=True, temperature=1.3),
    "shared_ref_reverse_kl": dict(ref="shared", kl="reverse", ignore_seq=2),
    "entropy_gradient_only": dict(bias=True, grads_on=()),
}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(torch_backend, "BLOCK_N", SMALL_TILES[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", SMALL_TILES[1])


def _check_against_eager(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want)
    for key in want:
        assert rel_err(got[key], want[key]) < tol, (key, rel_err(got[key], want[key]))
    assert torch.equal(got["token_is_top1"], want["token_is_top1"])


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_torch_backend_matches_eager_fp64(small_tiles, name):
    case = cases.with_top1_targets(make_core_case(torch.float64, seed=11, **CORE, **TORCH_CASES[name]))
    got = cases.run_extras(fastpref.fused_logprobs, case, backend="torch")
    want = cases.run_extras(fastpref.reference.fused_logprobs, case)
    _check_against_eager(got, want, FP64_TOL)
    # not vacuous: some targets are the top-1 token and some are not; the entropy gradient is nonzero
    top1, valid = got["token_is_top1"], case.targets != -100
    assert top1.dtype == torch.bool and 0 < int(top1.sum()) < int(valid.sum())
    assert not top1[~valid].any()
    for key in ("token_entropy", "token_mean_logits", "token_log_sum_sq_probs"):
        assert (got[key][~valid] == 0).all() and (got[key][valid] != 0).all(), key
    assert got["d_hidden"].abs().sum() > 0
    if TORCH_CASES[name].get("ignore_seq") is not None:
        empty = TORCH_CASES[name]["ignore_seq"]
        assert all(float(got[k][empty]) == 0 for k in EXTRA_OUTPUTS)
    # the per-sequence count of top-1 positions is a float count
    seq_ids = case.kwargs.get("seq_ids")
    if seq_ids is None:
        seq_ids = torch.arange(case.targets.shape[0]).repeat_interleave(case.targets.shape[1])
    counts = torch.zeros_like(got["is_top1"]).index_add(0, seq_ids, top1.reshape(-1).to(torch.float64))
    assert got["is_top1"].dtype == torch.float64 and torch.equal(got["is_top1"], counts)


def test_entropy_values_are_the_softmax_entropy():
    """Independent of the reference: H, mean logit and log sum p^2 from their definitions."""
    case = make_core_case(torch.float64, seed=3, **CORE, bias=True, softcap=4.0, ignore=0.0)
    stats = fastpref.fused_logprobs(*case.inputs, extra_outputs=EXTRA_OUTPUTS, backend="torch", **case.kwargs)
    z = torch.nn.functional.linear(case.hidden, case.weight, case.kwargs["bias"])
    z = 4.0 * torch.tanh(z / 4.0)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(stats.token_entropy, -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.token_mean_logits, z.mean(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.token_log_sum_sq_probs, (p * p).sum(-1).log(), rtol=1e-12, atol=1e-12)


def test_subset_and_defaults():
    case = make_core_case(torch.float64, seed=5, **CORE, ref="shared", kl="forward")
    plain = fastpref.fused_logprobs(*case.inputs, **case.kwargs)
    for name in EXTRA_OUTPUTS:
        assert getattr(plain, name) is None and getattr(plain, "token_" + name) is None
    some = fastpref.fused_logprobs(*case.inputs, extra_outputs=["mean_logits"], **case.kwargs)
    assert some.mean_logits is not None and some.token_mean_logits.shape == case.targets.shape
    assert some.entropy is None and some.is_top1 is None and some.log_sum_sq_probs is None
    assert torch.equal(some.logps, plain.logps) and torch.equal(some.kl, plain.kl)


def test_extras_leave_logps_and_their_gradients_unchanged(small_tiles):
    case = make_core_case(torch.float64, seed=6, **CORE, bias=True, ref="shared", kl="forward")
    base = cases.run_extras(fastpref.fused_logprobs, case, extras=(), backend="torch")
    with_extras = cases.run_extras(fastpref.fused_logprobs, case, extras=("mean_logits", "is_top1"),
                                   backend="torch")
    for key in ("logps", "d_hidden", "d_weight", "d_bias"):
        assert torch.equal(base[key], with_extras[key]), key


def test_bad_extra_outputs_name_the_argument():
    case = make_core_case(torch.float64, seed=1, **CORE)
    with pytest.raises(ValueError, match="extra_outputs.*'entropie'"):
        fastpref.fused_logprobs(*case.inputs, extra_outputs=("entropie",), **case.kwargs)
    with pytest.raises(TypeError, match="extra_outputs"):
        fastpref.fused_logprobs(*case.inputs, extra_outputs="entropy", **case.kwargs)
    with pytest.raises(ValueError, match="extra_outputs"):
        fastpref.FusedDPOLoss(extra_outputs=("top5",))


def test_opcheck_with_extras():
    from fastpref._prepare import check_call
    from fastpref.ops import _op_args

    case = make_core_case(torch.float64, seed=2, V=12, D=5, S=2, T=3, layout="packed", lengths=(2, 3, 1),
                          bias=True)
    call = check_call(case.hidden.requires_grad_(), case.weight.requires_grad_(), case.targets,
                      extra_outputs=EXTRA_OUTPUTS, **case.kwargs)
    torch.library.opcheck(torch.ops.fastpref.fused_logprobs.default, _op_args(call))


# ---------------------------------------------------------------------------------------------- modules


def test_dpo_module_reports_extras_and_keeps_loss_and_gradients():
    extras = ("entropy", "mean_logits", "is_top1")
    g = torch.Generator().manual_seed(0)
    S, T, D, V = 4, 6, 16, 50
    hidden = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, V, (S, T), generator=g)
    targets[:, :2] = -100
    ref_hidden = hidden + 0.1 * torch.randn(S, T, D, generator=g, dtype=torch.float64)

    def run(cls, ex):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = cls(beta=0.2, extra_outputs=ex)(w, h, targets, ref_hidden=ref_hidden)
        out.loss.backward()
        return out, h.grad, w.grad

    stats = fastpref.fused_logprobs(hidden, weight, targets, extra_outputs=extras)
    for cls in (fastpref.FusedDPOLoss, fastpref.reference.modules.FusedDPOLoss):
        base, dh, dw = run(cls, ())
        out, dh2, dw2 = run(cls, extras)
        assert torch.equal(base.loss, out.loss) and torch.equal(dh, dh2) and torch.equal(dw, dw2)
        assert not set(extras) & set(base.metrics)
        for name in extras:
            assert not out.metrics[name].requires_grad
            torch.testing.assert_close(out.metrics[name], getattr(stats, name), rtol=1e-12, atol=1e-12)
        assert "log_sum_sq_probs" not in out.metrics


# --------------------------------------------------------------------------------------------- Triton


def test_triton_interpreter_matches_eager(tmp_path):
    out = tmp_path / "extras.json"
    results = run_interpreted(SCRIPT, out, "extras")
    assert set(results) == set(cases.EXTRA_SPECS)
    for name, res in results.items():
        assert set(cases.EXTRA_KEYS) <= set(res["keys"]) and "d_hidden" in res["keys"]
        assert 0 < res["top1_count"] < res["valid_count"], name
        for key in res["keys"]:
            for label in ("chunked", "atomic"):
                assert res[f"{key}/{label}"] < FP32_TOL, (name, key, label, res[f"{key}/{label}"])
            assert res[f"token_is_top1/{label}"] == 0.0


# ------------------------------------------------------------------------------- vocabulary parallelism

VP_SPLITS = (70, 133)  # unequal slices of V = 203


def _vp_worker(rank: int, world: int) -> int:
    from fastpref.backends import triton_backend

    torch_backend.BLOCK_N, torch_backend.BLOCK_V = 8, 32
    group = dist.new_group(list(range(world)))
    lo = sum(VP_SPLITS[:rank])
    hi = lo + VP_SPLITS[rank]
    checked = 0
    runs = [(torch.float64, dict(backend="torch"), FP64_TOL)]
    if triton_backend.interpreting():
        runs.append((torch.float32, dict(backend="triton"), FP32_TOL))
    for dtype, kw, tol in runs:
        spec = dict(layout="packed", lengths=(5, 1, 6), bias=True, ref="shared", kl="reverse", softcap=4.0,
                    ignore_seq=1, V=sum(VP_SPLITS), D=8)
        case = cases.with_top1_targets(make_core_case(dtype, seed=40, **spec))
        want = cases.run_extras(fastpref.reference.fused_logprobs, case)
        kwargs = dict(case.kwargs, bias=case.kwargs["bias"][lo:hi].clone())
        local = type(case)(case.hidden, case.weight[lo:hi].clone(), case.targets, kwargs, case.upstream)
        got = cases.run_extras(fastpref.fused_logprobs, local, vocab_parallel_group=group, **kw)
        for key in want:
            ref = want[key][lo:hi] if key in ("d_weight", "d_bias") else want[key]
            assert rel_err(got[key], ref) < tol, (kw, key, rel_err(got[key], ref))
            checked += 1
        assert torch.equal(got["token_is_top1"], want["token_is_top1"]) and want["token_is_top1"].any()
    return checked


def test_vocab_parallel_extras_match_unsharded(tmp_path, monkeypatch):
    """Torch backend (fp64) and the Triton kernels in the interpreter (fp32), two gloo processes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import run_distributed

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned children before they import the kernels
    counts = run_distributed(_vp_worker, tmp_path=tmp_path)
    assert counts[0] == counts[1] == 2 * 12  # 12 outputs and gradients per backend
