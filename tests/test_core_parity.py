"""Torch backend of fused_logprobs vs the eager reference: outputs and dH, dW, db."""
import pytest
import torch
from core_cases import CASES, named_case

import fastpref
import fastpref.reference as reference
from fastpref.backends import torch_backend
from fastpref.testing import make_core_case, rel_err, run_core

SHIPPED_BLOCKS = (torch_backend.BLOCK_N, torch_backend.BLOCK_V)
SMALL_BLOCKS = (8, 128)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Small tiles so every case spans several token and vocab blocks, with ragged last blocks.
    monkeypatch.setattr(torch_backend, "BLOCK_N", SMALL_BLOCKS[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", SMALL_BLOCKS[1])


@pytest.fixture(params=[SMALL_BLOCKS, SHIPPED_BLOCKS], ids=["small_blocks", "shipped_blocks"])
def blocks(request, monkeypatch):
    """The parity tests run twice: with small tiles (many ragged tiles) and with the shipped sizes
    (where these small cases fit one partial tile)."""
    monkeypatch.setattr(torch_backend, "BLOCK_N", request.param[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", request.param[1])
    return request.param


def _compare(name, dtype, tol):
    case = named_case(name, dtype)
    fused = run_core(fastpref.fused_logprobs, case, backend="torch")
    eager = run_core(reference.fused_logprobs, case)
    assert list(fused) == list(eager)
    for key, b in eager.items():
        a = fused[key]
        assert a.dtype == b.dtype
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < tol, f"{name}: {key} differs: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("name", CASES)
def test_parity_float64(name, blocks):
    _compare(name, torch.float64, 1e-10)


@pytest.mark.parametrize("name", CASES)
def test_parity_float32(name, blocks):
    _compare(name, torch.float32, 1e-5)


# Relative error (to the largest |value|) of eager fp32 math on half-precision products is ~1e-4..1e-2;
# the fused op's fp32 blocks stay near fp32 round-off on the forward outputs.
FP32_BLOCKS_TOL = 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_parity_half_precision_rule(name, dtype, blocks):
    """bf16/fp16: fused error vs the fp64 truth is no worse than the eager error plus a small tolerance.

    The truth is fp64 math on exactly the rounded inputs. Gradients come back in the input dtype, so
    both implementations carry its rounding (<= eps/2 of the largest entry); the tolerance is eps/4.
    The forward outputs are float32 and must also be fp32-accurate: that is what checks that half
    inputs are computed in fp32 blocks (eager's half-precision projection is ~100x further off).
    """
    slack = torch.finfo(dtype).eps / 4
    case = named_case(name, torch.float64).to(dtype)
    truth = run_core(reference.fused_logprobs, case.to(torch.float64))
    fused = run_core(fastpref.fused_logprobs, case, backend="torch")
    eager = run_core(reference.fused_logprobs, case)
    assert list(fused) == list(truth)
    for key, t in truth.items():
        f, e = fused[key], eager[key]
        fused_err, eager_err = rel_err(f, t), rel_err(e, t)
        assert torch.isfinite(f.float()).all()
        assert fused_err <= eager_err + slack, f"{name}: {key} fused {fused_err:.2e} vs eager {eager_err:.2e}"
        if key.startswith("d_"):
            assert f.dtype == dtype  # gradients in the input dtype
        else:
            assert f.dtype == torch.float32  # per-sequence stats are fp32 whatever the input dtype
            assert fused_err < FP32_BLOCKS_TOL, f"{name}: {key} {fused_err:.2e}: not fp32 blocks?"


def test_fully_ignored_sequence_is_zero_with_zero_grads():
    case = named_case("fully_ignored", torch.float64)
    hidden, weight, targets = (t.clone() for t in case.inputs)
    hidden.requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, **case.kwargs)
    assert stats.logps[1].item() == 0 and stats.lengths[1].item() == 0 and stats.kl[1].item() == 0
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert torch.count_nonzero(hidden.grad[1]) == 0
    assert torch.isfinite(hidden.grad).all()


def test_outputs_layout_and_lengths():
    case = named_case("packed", torch.float32)
    stats = fastpref.fused_logprobs(*case.inputs, **case.kwargs)
    seq, targets = case.kwargs["seq_ids"], case.targets
    expected_lengths = torch.zeros(4).index_add_(0, seq, (targets != -100).float())
    assert torch.equal(stats.lengths, expected_lengths)
    assert stats.token_logps.shape == targets.shape and stats.token_kl.shape == targets.shape
    assert stats.logps.dtype == torch.float32 and stats.ref_logps.dtype == torch.float32
    ignored = targets == -100
    assert ignored.any() and (stats.token_logps[ignored] == 0).all() and (stats.token_kl[ignored] == 0).all()
    assert (stats.token_logps <= 0).all() and (stats.token_kl >= -1e-6).all()
    assert stats.lengths.requires_grad is False and stats.ref_logps.requires_grad is False


def test_no_grad_call_saves_nothing():
    case = named_case("kl_forward", torch.float32)
    hidden, weight, targets = case.inputs
    kwargs = case.kwargs
    hidden.requires_grad_()
    with torch.no_grad():
        stats = fastpref.fused_logprobs(hidden, weight, targets, **kwargs)
    assert stats.logps.grad_fn is None and stats.kl.grad_fn is None and stats.token_logps.grad_fn is None
    plain = fastpref.fused_logprobs(hidden.detach(), weight, targets, **kwargs)
    assert plain.logps.grad_fn is None


def test_grad_only_through_requested_inputs():
    case = named_case("bias", torch.float64)
    hidden, weight, targets = case.inputs
    kwargs = case.kwargs
    weight = weight.clone().requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, **kwargs)  # hidden and bias need no grad
    (grad_w,) = torch.autograd.grad(stats.logps.sum(), [weight])
    ref = reference.fused_logprobs(hidden, weight, targets, **kwargs)
    (ref_w,) = torch.autograd.grad(ref.logps.sum(), [weight])
    assert rel_err(grad_w, ref_w) < 1e-10


def test_zero_upstream_rows_are_skipped(monkeypatch):
    """Positions whose upstream gradients are all zero cost no backward work."""
    seen = []
    real = torch_backend._logits_tile

    def spy(h, *args, **kwargs):
        seen.append(h.shape[0])
        return real(h, *args, **kwargs)

    hidden, weight, targets = named_case("padded", torch.float64).inputs
    hidden = hidden.clone().requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, backend="torch")
    monkeypatch.setattr(torch_backend, "_logits_tile", spy)
    stats.logps[2].backward()  # only sequence 2 gets an upstream gradient
    assert sum(seen) == (targets[2] != -100).sum().item() * -(-weight.shape[0] // torch_backend.BLOCK_V)
    assert torch.count_nonzero(hidden.grad[:2]) == 0 and torch.count_nonzero(hidden.grad[2]) > 0


def test_half_precision_gradients_have_input_dtype():
    case = named_case("bias", torch.bfloat16)
    hidden, weight, targets = (t.clone() for t in case.inputs)
    hidden.requires_grad_()
    weight.requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, **case.kwargs)
    stats.logps.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden.grad.float()).all()


@pytest.mark.parametrize("variant", ["forward_kl_shared_head", "reverse_kl_bias_temp_softcap_ignored"])
def test_default_blocks_large_problem_matches_reference(monkeypatch, variant):
    """The shipped tile sizes (not the tiny test ones) on a problem spanning several tiles."""
    monkeypatch.setattr(torch_backend, "BLOCK_N", SHIPPED_BLOCKS[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", SHIPPED_BLOCKS[1])
    spec = dict(layout="packed", lengths=(100,) * 11, interleave=False, D=32, V=9000, weight_scale=0.3)
    if variant == "forward_kl_shared_head":
        spec.update(ignore=0.0, ref="shared", kl="forward")
    else:
        spec.update(ignore=0.3, bias=True, ref="separate", kl="reverse", temperature=0.7, softcap=5.0)
    case = make_core_case(torch.float64, seed=3, **spec)
    out = run_core(fastpref.fused_logprobs, case)
    ref = run_core(reference.fused_logprobs, case)
    assert list(out) == list(ref)
    for key, b in ref.items():
        assert rel_err(out[key], b) < 1e-10, key
