"""Distributed tests on CPU: two processes, gloo on loopback (127.0.0.1).

Each test spawns two fresh processes (``spawn`` start method). A child runs a worker function and
writes its return value (``torch.save``) or its traceback to a temporary folder; the parent waits
with a deadline, kills the other child as soon as one fails (so a peer blocked in a collective does
not hang the test), and re-raises the child's traceback as the test failure.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpref
import fastpref.reference
from fastpref.backends import torch_backend

WORLD = 2
DEADLINE_S = 90.0  # generous for a loaded 2-core machine; a healthy test takes a few seconds


# --------------------------------------------------------------------------------------------------
# harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, outdir: str) -> None:
    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's data plane on loopback
    out = Path(outdir)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = fn(rank, world, *args)
        torch.save(result, out / f"{rank}.pt")
    except BaseException:
        (out / f"{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, *args: Any, world: int = WORLD, tmp_path: Path) -> List[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, str(tmp_path)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    errors = [(r, tmp_path / f"{r}.err") for r in range(world)]
    messages = [f"--- rank {r} ---\n{e.read_text()}" for r, e in errors if e.exists()]
    if messages:
        pytest.fail("a distributed worker failed:\n" + "\n".join(messages), pytrace=False)
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        pytest.fail(f"distributed workers did not finish cleanly (exit codes {codes}; deadline {DEADLINE_S}s)")
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------------------------------
# vocabulary parallel: sharded head == unsharded head

VP_CASES = [
    # splits: rows of the head held by each rank (unequal on purpose)
    dict(name="padded+bias+ref-head+forward-kl+temp+softcap", splits=(15, 22), padded=True, bias=True,
         ref="own", kl="forward", temperature=0.8, softcap=5.0),
    dict(name="packed+shared-head+reverse-kl", splits=(30, 7), padded=False, bias=True, ref="shared",
         kl="reverse", temperature=1.0, softcap=None),
    dict(name="no-ref+tiny-slice", splits=(1, 36), padded=True, bias=False, ref=None, kl=None,
         temperature=1.3, softcap=None),
    dict(name="ref-no-kl+softcap", splits=(20, 17), padded=False, bias=False, ref="own", kl=None,
         temperature=1.0, softcap=2.0),
]


def _vp_inputs(case: dict, dtype: torch.dtype, seed: int):
    """The same full-vocabulary problem on every rank (seeded), with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    vocab, dim = sum(case["splits"]), 8
    shape = (4, 6) if case["padded"] else (21,)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    inp = dict(hidden=randn(*shape, dim), weight=randn(vocab, dim) * 0.7,
               targets=torch.randint(0, vocab, shape, generator=g))
    flat = inp["targets"].view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 4]] = -100
    inp["bias"] = randn(vocab) if case["bias"] else None
    inp["ref_hidden"] = randn(*shape, dim) if case["ref"] else None
    inp["ref_weight"] = randn(vocab, dim) * 0.7 if case["ref"] == "own" else None
    inp["ref_bias"] = randn(vocab) if (case["ref"] == "own" and case["bias"]) else None
    if not case["padded"]:
        inp["seq_ids"] = torch.randint(0, 3, shape, generator=g)
        inp["num_seqs"] = 4  # one empty sequence
    # upstream gradient weights: per sequence, per position, per-sequence KL (one sequence gets 0)
    num_seqs = shape[0] if case["padded"] else 4
    coef = dict(logps=randn(num_seqs), token=randn(*shape), kl=randn(num_seqs))
    coef["logps"][1] = 0.0
    return inp, coef


def _objective(stats, coef, kl) -> torch.Tensor:
    loss = (stats.logps * coef["logps"]).sum() + (stats.token_logps * coef["token"]).sum()
    if kl:
        loss = loss + (stats.kl * coef["kl"]).sum() + 0.5 * stats.token_kl.sum()
    return loss


def _call(fn, case, inp, hidden, weight, bias, **extra):
    kw = {k: v for k, v in inp.items() if k not in ("hidden", "weight", "targets", "bias")}
    return fn(hidden, weight, inp["targets"], bias=bias, kl=case["kl"], temperature=case["temperature"],
              softcap=case["softcap"], **kw, **extra)


def _run_case(fn, case, inp, coef, **extra):
    """Call ``fn`` with fresh leaves; return (stats, grads of hidden, weight and bias)."""
    hidden = inp["hidden"].clone().requires_grad_(True)
    weight = inp["weight"].clone().requires_grad_(True)
    bias = None if inp["bias"] is None else inp["bias"].clone().requires_grad_(True)
    stats = _call(fn, case, inp, hidden, weight, bias, **extra)
    params = [hidden, weight] + ([] if bias is None else [bias])
    return stats, torch.autograd.grad(_objective(stats, coef, case["kl"]), params)


def _vocab_parallel_worker(rank: int, world: int, dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    # Small blocks so that row blocks and vocab blocks (not aligned with the slices) both repeat.
    torch_backend.BLOCK_N, torch_backend.BLOCK_V = 8, 8
    group = dist.new_group(list(range(world)))
    checked = 0
    for i, case in enumerate(VP_CASES):
        inp, coef = _vp_inputs(case, dtype, seed=100 + i)
        lo = sum(case["splits"][:rank])
        hi = lo + case["splits"][rank]

        def local(t):
            return None if t is None else t[lo:hi].clone()

        full_stats, full_grads = _run_case(fastpref.reference.fused_logprobs, case, inp, coef)
        sharded = dict(inp, weight=local(inp["weight"]), bias=local(inp["bias"]),
                       ref_weight=local(inp["ref_weight"]), ref_bias=local(inp["ref_bias"]))
        vp_stats, vp_grads = _run_case(fastpref.fused_logprobs, case, sharded, coef,
                                       vocab_parallel_group=group)
        for field in ("logps", "lengths", "token_logps", "ref_logps", "ref_token_logps", "kl", "token_kl"):
            want, got = getattr(full_stats, field), getattr(vp_stats, field)
            assert (want is None) == (got is None), (case["name"], field)
            if want is not None:
                torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{case['name']} {field}: {m}")
                checked += 1
        names = ["dH", "dW"] + (["db"] if case["bias"] else [])
        for name, got, want in zip(names, vp_grads, full_grads):
            if name != "dH":
                want = want[lo:hi]  # this rank's slice of the unsharded gradient
            assert got.shape == want.shape, (case["name"], name, got.shape, want.shape)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{case['name']} {name}: {m}")
            checked += 1
        # No-grad calls take the same collectives without saving anything.
        with torch.no_grad():
            ng = _call(fastpref.fused_logprobs, case, sharded, inp["hidden"], sharded["weight"], sharded["bias"],
                       vocab_parallel_group=group)
        torch.testing.assert_close(ng.logps, full_stats.logps.detach(), **tol)
        checked += 1
    return checked


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_vocab_parallel_matches_unsharded(dtype_name, tmp_path):
    checked = run_distributed(_vocab_parallel_worker, dtype_name, tmp_path=tmp_path)
    assert checked == [36, 36]  # every field and gradient of every case was compared


def _vocab_parallel_errors_worker(rank: int, world: int) -> bool:
    group = dist.group.WORLD
    hidden, weight = torch.randn(1, 5, 4), torch.randn(3 + rank, 4)  # global V = 7
    targets = torch.tensor([[0, 6, 2, -100, 5]])
    ok = fastpref.fused_logprobs(hidden, weight, targets, vocab_parallel_group=group)
    assert ok.token_logps.shape == (1, 5)
    bad = targets.clone()
    bad[0, 1] = 7
    try:
        fastpref.fused_logprobs(hidden, weight, bad, vocab_parallel_group=group)
        raise AssertionError("a target >= global V must raise")
    except ValueError as e:
        assert "V=7" in str(e), e
    for call in (lambda: fastpref.fused_logprobs(hidden, weight, targets, backend="triton", vocab_parallel_group=group),
                 lambda: fastpref.reference.fused_logprobs(hidden, weight, targets, vocab_parallel_group=group)):
        try:
            call()
            raise AssertionError("expected NotImplementedError")
        except NotImplementedError:
            pass
    return True


def test_vocab_parallel_errors(tmp_path):
    assert run_distributed(_vocab_parallel_errors_worker, tmp_path=tmp_path) == [True, True]


def test_vocab_parallel_needs_initialized_group():
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        fastpref.fused_logprobs(torch.randn(1, 2, 3), torch.randn(4, 3), torch.tensor([[0, 1]]),
                                vocab_parallel_group=object())
