"""fused_logprobs as a registered custom op: torch.compile(fullgraph=True) of a whole FusedDPOLoss
forward+backward, opcheck of both ops, the value-check helper (host on CPU, device-side elsewhere) and
the deterministic per-sequence reduction."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

import fastpref
from fastpref import _checks
from fastpref._prepare import check_call
from fastpref._types import segment_sums_deterministic
from fastpref.ops import _op_args

S, T, D, V = 4, 6, 16, 40
# Inductor needs a C++ compiler on CPU; aot_eager still traces forward and backward through the fake ops.
COMPILE_BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"


def _dpo_batch():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=g)
    hidden = torch.randn(S, T, D, generator=g)
    targets = torch.randint(0, V, (S, T), generator=g)
    targets[:, :2] = -100  # prompt positions
    targets[1, -1] = -100  # padding
    return weight, hidden, targets, hidden + 0.1 * torch.randn(S, T, D, generator=g)


def test_compiled_dpo_forward_backward_has_no_graph_break_and_matches_eager():
    """fullgraph=True raises on any graph break; the backward runs AOTAutograd's compiled graph."""
    torch._dynamo.reset()
    weight, hidden, targets, ref_hidden = _dpo_batch()
    loss_fn = fastpref.FusedDPOLoss(beta=0.1)

    def step(w, h, t, r):
        out = loss_fn(w, h, t, ref_hidden=r)  # shared-head reference
        return out.loss, out.metrics["chosen_rewards"], out.metrics["reward_margin"]

    def run(fn, t=targets):
        w, h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
        loss, rewards, margin = fn(w, h, t, ref_hidden)
        loss.backward()
        return loss.detach(), rewards, margin, w.grad, h.grad

    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)
    got, want = run(compiled), run(step)
    for name, a, b in zip(("loss", "chosen_rewards", "reward_margin", "dW", "dH"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert want[4][:, :2].abs().sum() == 0  # ignored positions get no gradient
    # Value checks run inside the op's real implementation: still the precise CPU error, no recompile needed.
    bad = targets.clone()
    bad[0, 3] = V + 2
    with pytest.raises(ValueError, match=f"targets must lie in \\[0, V={V}\\).*found {V + 2}"):
        run(compiled, bad)


def test_compiled_packed_needs_num_seqs():
    torch._dynamo.reset()
    hidden, weight = torch.randn(5, D), torch.randn(V, D)
    targets, seq_ids = torch.randint(0, V, (5,)), torch.tensor([0, 0, 1, 1, 1])

    def logps(num_seqs):
        return fastpref.fused_logprobs(hidden, weight, targets, seq_ids=seq_ids, num_seqs=num_seqs).logps

    with pytest.raises(Exception, match="num_seqs is required for packed input under torch.compile"):
        torch.compile(lambda: logps(None), fullgraph=True, backend="aot_eager")()
    got = torch.compile(lambda: logps(2), fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(got, fastpref.fused_logprobs(hidden, weight, targets, seq_ids=seq_ids).logps)


def _op_case(packed: bool, kl):
    g = torch.Generator().manual_seed(1)
    dt = torch.float64
    if packed:
        hidden = torch.randn(7, 5, dtype=dt, generator=g)
        targets = torch.randint(0, 12, (7,), generator=g)
        targets[2] = -100
        extra = dict(seq_ids=torch.tensor([0, 0, 1, 3, 1, 3, 3]), num_seqs=4)  # sequence 2 is empty
    else:
        hidden = torch.randn(2, 3, 5, dtype=dt, generator=g)
        targets = torch.randint(0, 12, (2, 3), generator=g)
        targets[0, 0] = -100
        extra = {}
    weight = torch.randn(12, 5, dtype=dt, generator=g).requires_grad_()
    bias = torch.randn(12, dtype=dt, generator=g).requires_grad_()
    call = check_call(hidden.requires_grad_(), weight, targets, bias=bias, ref_hidden=hidden.detach() + 0.1,
                      kl=kl, softcap=3.0, **extra)
    return _op_args(call)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kl", [None, "reverse"])
def test_opcheck_forward(packed, kl):
    torch.library.opcheck(torch.ops.fastpref.fused_logprobs.default, _op_case(packed, kl))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck_backward(packed):
    args = _op_case(packed, "forward")
    with torch.no_grad():
        outs = torch.ops.fastpref.fused_logprobs(*args)
    n = args[3].shape[0]
    g = torch.Generator().manual_seed(2)
    grads = (torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g))
    tensors = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]]
    bwd_args = (*tensors, outs[7], outs[8], outs[2], *grads, *args[8:], True, True, True)
    torch.library.opcheck(torch.ops.fastpref.fused_logprobs_backward.default, bwd_args)


# ---------------------------------------------------------------------------------------------------
# the value-check helper


class _DeviceFlag:
    """A stand-in for a boolean tensor on an accelerator: any host read-back (bool, item) fails."""

    def __init__(self, device_type: str = "cuda"):
        self.device = SimpleNamespace(type=device_type)
        self.reductions = 0

    def all(self):
        self.reductions += 1
        return self

    def __bool__(self):
        raise AssertionError("host synchronization: bool() of a device tensor")

    def item(self):
        raise AssertionError("host synchronization: item() of a device tensor")


def test_check_values_cpu_raises_precise_error():
    _checks.check_values(torch.tensor([True, True]), "never shown")
    with pytest.raises(ValueError, match=r"^x must be positive; found -2$"):
        _checks.check_values(torch.tensor([True, False]), "x must be positive", lambda: "; found -2")


def test_check_values_on_device_asserts_async_without_sync(monkeypatch):
    monkeypatch.delenv(_checks.SYNC_CHECKS_ENV, raising=False)
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((cond, msg)))
    flag = _DeviceFlag()
    details = []
    _checks.check_values(flag, "targets must lie in [0, V)", lambda: details.append(1) or "")
    assert calls == [(flag, "targets must lie in [0, V)")] and flag.reductions == 1 and not details


def test_check_values_sync_env_gives_host_errors_on_device(monkeypatch):
    monkeypatch.setenv(_checks.SYNC_CHECKS_ENV, "1")
    monkeypatch.setattr(torch, "_assert_async", lambda *a: pytest.fail("must not assert asynchronously"))

    class Failing(_DeviceFlag):
        def all(self):
            return torch.tensor(False)

    with pytest.raises(ValueError, match="bias must be finite; at 3"):
        _checks.check_values(Failing(), "bias must be finite", lambda: "; at 3")


def test_op_value_checks_all_go_through_the_helper(monkeypatch):
    """A packed call with a bias makes three value checks (targets, bias, seq_ids), all via check_values."""
    import fastpref._prepare as prepare_module

    seen = []
    real = prepare_module.check_values
    monkeypatch.setattr(prepare_module, "check_values", lambda ok, msg, *a: seen.append(msg) or real(ok, msg, *a))
    fastpref.fused_logprobs(torch.randn(4, D), torch.randn(V, D), torch.randint(0, V, (4,)), bias=torch.zeros(V),
                            seq_ids=torch.tensor([0, 0, 1, 1]), num_seqs=2)
    assert [m.split(" ")[0] for m in seen] == ["targets", "bias", "seq_ids"]


# ---------------------------------------------------------------------------------------------------
# the deterministic per-sequence reduction (the CUDA branch's math, run on CPU)


@pytest.mark.parametrize("n,num_seqs", [(0, 3), (1, 1), (13, 5), (300, 7)])
def test_segment_sums_deterministic_matches_index_add(n, num_seqs):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True)
    seq_ids = torch.randint(0, max(num_seqs - 1, 1), (n,), generator=g)  # the last sequence stays empty
    got = segment_sums_deterministic(values, seq_ids, num_seqs)
    want = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq_ids, values)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[-1] == 0 or num_seqs == 1
    if n:
        upstream = torch.randn(num_seqs, dtype=torch.float64, generator=g)
        (grad,) = torch.autograd.grad((got * upstream).sum(), values)
        torch.testing.assert_close(grad, upstream[seq_ids])


def test_segment_sums_deterministic_float32_is_accurate_and_repeatable():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4099, generator=g) * 50
    seq_ids = torch.randint(0, 9, (4099,), generator=g)
    a, b = segment_sums_deterministic(values, seq_ids, 9), segment_sums_deterministic(values, seq_ids, 9)
    assert torch.equal(a, b) and a.dtype == torch.float32
    exact = torch.zeros(9, dtype=torch.float64).index_add(0, seq_ids, values.double())
    torch.testing.assert_close(a.double(), exact, rtol=1e-6, atol=1e-4)
