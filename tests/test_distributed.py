"""Distributed tests on CPU: two processes, gloo on loopback (127.0.0.1).

Each test spawns two fresh processes (``spawn`` start method). A child runs a worker function and
writes its return value (``torch.save``) or its traceback to a temporary folder; the parent waits
with a deadline, kills the other child as soon as one fails (so a peer blocked in a collective does
not hang the test), and re-raises the child's traceback as the test failure.
"""
from __future__ import annotations

import os
import socket
import sys
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
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Skip interpreter finalization: a static C++ object's still-joinable thread occasionally aborts a finished
    # worker there ("terminate called without an active exception", ~1 run in 20 on a 2-core machine) after its
    # result is already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def _vocab_parallel_bf16_worker(rank: int, world: int) -> int:
    """bf16 by the project rule: the sharded head's error vs the fp64 truth is no worse than the eager
    bf16 error (full logits) plus a small tolerance, for logps, KL and every gradient."""
    group = dist.group.WORLD
    case = VP_CASES[0]
    inp, coef = _vp_inputs(case, torch.bfloat16, seed=100)
    lo = sum(case["splits"][:rank])
    hi = lo + case["splits"][rank]

    def to64(d):
        return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}

    def local(t):
        return None if t is None else t[lo:hi].clone()

    coef64 = to64(coef)
    truth, truth_grads = _run_case(fastpref.reference.fused_logprobs, case, to64(inp), coef64)
    eager, eager_grads = _run_case(fastpref.reference.fused_logprobs, case, inp, coef)
    sharded = dict(inp, weight=local(inp["weight"]), bias=local(inp["bias"]),
                   ref_weight=local(inp["ref_weight"]), ref_bias=local(inp["ref_bias"]))
    vp, vp_grads = _run_case(fastpref.fused_logprobs, case, sharded, coef, vocab_parallel_group=group)
    pairs = [("logps", vp.logps, eager.logps, truth.logps), ("kl", vp.kl, eager.kl, truth.kl)]
    for name, got, ref, want, sl in zip(("dH", "dW", "db"), vp_grads, eager_grads, truth_grads,
                                        (slice(None), slice(lo, hi), slice(lo, hi))):
        pairs.append((name, got, ref[sl], want[sl]))
    for name, got, ref, want in pairs:
        want = want.double()
        err, eager_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= eager_err + 1e-3 * want.abs().max(), (name, float(err), float(eager_err))
    return len(pairs)


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
    from fastpref.integrations.distributed import vocab_range

    ranges = [vocab_range(v, group) for v in (7, 8, 2)]
    assert ranges == ([(0, 4), (0, 4), (0, 1)] if rank == 0 else [(4, 7), (4, 8), (1, 2)]), ranges
    # The Triton backend takes the group too (tests/test_triton_vocab_parallel.py); the eager reference does not.
    try:
        fastpref.reference.fused_logprobs(hidden, weight, targets, vocab_parallel_group=group)
        raise AssertionError("expected NotImplementedError")
    except NotImplementedError:
        pass
    return True


def _vocab_parallel_modules_worker(rank: int, world: int) -> int:
    """The fused modules with ``vocab_parallel_group=``: loss, gradients and batch statistics equal the
    unsharded module run on this rank alone (``stats_group="local"``: what one process would compute)."""
    group = dist.group.WORLD
    singletons = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    g = torch.Generator().manual_seed(7)
    vocab, dim, splits = 23, 6, (9, 14)
    lo, hi = sum(splits[:rank]), sum(splits[: rank + 1])

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    weight, bias, ref_weight = randn(vocab, dim), randn(vocab), randn(vocab, dim)
    hidden, ref_hidden = randn(6, 5, dim), randn(6, 5, dim)  # 3 pairs, or 2 MC-PO groups of 3
    targets = torch.randint(0, vocab, (6, 5), generator=g)
    targets[:, 0] = -100
    kl_hidden, kl_ref_hidden = randn(3, 4, dim), randn(3, 4, dim)
    kl_targets = torch.randint(0, vocab, (3, 4), generator=g)
    with_ref = dict(ref_hidden=ref_hidden, ref_weight="ref_weight")
    cases = [  # (class, options, call keywords, steps)
        (fastpref.FusedDPOLoss, dict(beta=0.3), dict(with_ref, temperature=0.9, softcap=4.0), 1),  # head at call
        (fastpref.FusedSPOLoss, dict(alpha=0.5, kl_coef=0.7, gamma=0.3),
         dict(kl_hidden=kl_hidden, kl_ref_hidden=kl_ref_hidden, kl_targets=kl_targets), 1),
        # two steps: the margin EMA is updated from the batch statistics, then used
        (fastpref.FusedAlphaDPOLoss, dict(beta=2.0, alpha=0.5), with_ref, 2),
        (fastpref.FusedKTOLoss, dict(beta=0.7),
         dict(with_ref, labels=torch.tensor([True, False, True, True, False, False]), kl_hidden=kl_hidden,
              kl_ref_hidden=kl_ref_hidden, kl_targets=kl_targets), 1),
    ]

    def run(cls, options, call, steps, sharded, **extra):
        sl = slice(lo, hi) if sharded else slice(None)
        loss_fn = cls(**options, vocab_parallel_group=group if sharded else None, **extra)
        outs = []
        for _ in range(steps):
            h = hidden.clone().requires_grad_(True)
            w, b = weight[sl].clone().requires_grad_(True), bias[sl].clone().requires_grad_(True)
            kw = {k: (ref_weight[sl] if isinstance(v, str) else v) for k, v in call.items()}
            out = loss_fn(w, h, targets, bias=b, **kw)
            outs.append((out, *torch.autograd.grad(out.loss, (h, w, b))))
        return loss_fn, outs

    checked = 0
    for cls, options, call, steps in cases:
        single_fn, single = run(cls, options, call, steps, sharded=False, stats_group="local")
        vp_fn, vp = run(cls, options, call, steps, sharded=True)  # default stats_group
        for step, ((out, dh, dw, db), (vp_out, vp_dh, vp_dw, vp_db)) in enumerate(zip(single, vp)):
            pairs = [("loss", vp_out.loss, out.loss), ("dH", vp_dh, dh), ("dW", vp_dw, dw[lo:hi]),
                     ("db", vp_db, db[lo:hi])]
            pairs += [(key, vp_out.metrics[key], out.metrics[key]) for key in ("margin_mean", "margin_std", "z0")
                      if key in out.metrics]
            for name, got, want in pairs:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{cls.__name__} step {step} {name}: {m}")
                checked += 1
        for name, buf in single_fn.named_buffers():
            torch.testing.assert_close(dict(vp_fn.named_buffers())[name], buf, rtol=1e-12, atol=0)
            checked += 1

    # alpha-DPO's statistics over an explicit data-parallel group (here one rank each) equal the local
    # ones; over the world, every vocabulary rank's copy of the batch counts (the duplicated batch
    # that the default avoids): the mean stays, the unbiased std shrinks.
    cls, options, call, steps = cases[2]
    local_fn, _ = run(cls, options, call, 1, sharded=False, stats_group="local")
    dp_fn, _ = run(cls, options, call, 1, sharded=True, stats_group=singletons[rank])
    dup_fn, _ = run(cls, options, call, 1, sharded=True, stats_group=group)
    torch.testing.assert_close(dp_fn.margin_std, local_fn.margin_std, rtol=1e-12, atol=0)
    torch.testing.assert_close(dup_fn.margin_mean, local_fn.margin_mean, rtol=1e-12, atol=1e-15)
    n = hidden.shape[0] // 2
    shrink = (2 * (n - 1) / (2 * n - 1)) ** 0.5  # unbiased std of the batch twice vs once
    torch.testing.assert_close(dup_fn.margin_std, local_fn.margin_std * shrink, rtol=1e-12, atol=0)
    checked += 3

    # MC-PO with generator=None and a different global seed per rank: the ranks would draw different
    # negatives; the sharded module uses rank 0's, and equals the unsharded module given those negatives.
    mc = dict(beta=0.2, group_size=3)
    stats = fastpref.fused_logprobs(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight)
    draws = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        draws.append(fastpref.FusedMCPOLoss(**mc).sample_negatives(stats.logps.view(2, 3), stats.ref_logps.view(2, 3)))
    assert not torch.equal(draws[0], draws[1])  # non-vacuous: independent draws disagree
    torch.manual_seed(11 + rank)
    h = hidden.clone().requires_grad_(True)
    w, b = weight[lo:hi].clone().requires_grad_(True), bias[lo:hi].clone().requires_grad_(True)
    vp_out = fastpref.FusedMCPOLoss(**mc, vocab_parallel_group=group)(
        w, h, targets, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight[lo:hi])
    assert torch.equal(vp_out.metrics["negatives"], draws[0]), (rank, vp_out.metrics["negatives"], draws[0])
    vp_grads = torch.autograd.grad(vp_out.loss, (h, w, b))
    h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    want = fastpref.FusedMCPOLoss(**mc)(w1, h1, targets, bias=b1, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                        negatives=draws[0])
    want_grads = torch.autograd.grad(want.loss, (h1, w1, b1))
    for name, got, ref in (("loss", vp_out.loss, want.loss), ("dH", vp_grads[0], want_grads[0]),
                           ("dW", vp_grads[1], want_grads[1][lo:hi]), ("db", vp_grads[2], want_grads[2][lo:hi])):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"MC-PO {name}: {m}")
        checked += 1
    return checked


def _vocab_parallel_all(rank: int, world: int) -> dict:
    """One pair of processes for every vocabulary-parallel check (process start-up dominates on CI)."""
    return dict(float64=_vocab_parallel_worker(rank, world, "float64"),
                float32=_vocab_parallel_worker(rank, world, "float32"),
                bfloat16=_vocab_parallel_bf16_worker(rank, world),
                errors=_vocab_parallel_errors_worker(rank, world),
                modules=_vocab_parallel_modules_worker(rank, world))


def test_vocab_parallel_matches_unsharded(tmp_path):
    """Two-process vocabulary parallel: logps, ref logps, KL (forward/reverse), dH, dW and db of every
    slice equal the unsharded head (fp64 to 1e-12, fp32 to 1e-5, bf16 by the eager-error rule), over
    unequal slices, bias, a separate or shared reference head, temperature, softcap, ignored
    positions, padded and packed layouts; the fused modules with the group (DPO with a reference head,
    SPO with its online-sample KL and weight baseline, alpha-DPO's margin EMA over two steps, KTO's z0,
    each equal to one process on the batch: the vocabulary ranks' copies of the batch count once; MC-PO's
    negatives taken from rank 0 even with per-rank random seeds); and the error paths (target beyond the
    global vocabulary, eager reference)."""
    results = run_distributed(_vocab_parallel_all, tmp_path=tmp_path)
    # every field and gradient of every case was compared, in every dtype
    assert results == [dict(float64=36, float32=36, bfloat16=5, errors=True, modules=35)] * 2


def test_vocab_parallel_needs_initialized_group():
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        fastpref.fused_logprobs(torch.randn(1, 2, 3), torch.randn(4, 3), torch.tensor([[0, 1]]),
                                vocab_parallel_group=object())


# --------------------------------------------------------------------------------------------------
# data parallel: DDP and FSDP2 with the head read by a fused loss module

from torch import nn  # noqa: E402

from fastpref.integrations import distributed as fdist  # noqa: E402
from fastpref.integrations import transformers as hf_integration  # noqa: E402

VOCAB, DIM, PAIRS, SEQ = 13, 8, 4, 5  # global batch: PAIRS chosen + PAIRS rejected sequences


class _TinyLM(nn.Module):
    """Embedding + one layer backbone; a separate LM head the fused loss reads directly."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.body = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=True)

    def backbone(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.emb(ids)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # hidden states, not logits
        return self.backbone(ids)

    def get_output_embeddings(self) -> nn.Module:  # what fastpref.integrations.transformers looks up
        return self.lm_head


def _make_model() -> _TinyLM:
    torch.manual_seed(0)
    return _TinyLM().double()


def _global_batch(step: int):
    """(ids [2P, T], targets [2P, T], ref_logps [2P]); rows 0..P-1 chosen, P..2P-1 rejected."""
    g = torch.Generator().manual_seed(10 + step)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (2 * PAIRS, SEQ), generator=g)
    targets[:, :2] = -100  # prompt positions
    ref_logps = -torch.rand(2 * PAIRS, generator=g, dtype=torch.float64) * 10
    return ids, targets, ref_logps


def _local_batch(step: int, rank: int, world: int):
    """This rank's pairs, still in the chosen-first layout."""
    ids, targets, ref = _global_batch(step)
    per = PAIRS // world
    rows = torch.cat([torch.arange(rank * per, (rank + 1) * per), PAIRS + torch.arange(rank * per, (rank + 1) * per)])
    return ids[rows], targets[rows], ref[rows]


def _head_loss(model: _TinyLM, hidden, targets, ref):
    return fastpref.FusedDPOLoss(beta=0.5)(model.lm_head.weight, hidden, targets, bias=model.lm_head.bias,
                                          ref_logps=ref).loss


def _single_process_grads(steps: int = 2, lr: float = 0.5):
    """Per-step gradients of one process on the whole batch (the DDP oracle), with SGD in between."""
    model = _make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        ids, targets, ref = _global_batch(step)
        opt.zero_grad()
        _head_loss(model, model(ids), targets, ref).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return out


def _ddp_worker(rank: int, world: int) -> dict:
    want = _single_process_grads()
    tol = dict(rtol=1e-10, atol=1e-12)
    seen = {}
    modes = [("outside", False), ("through", False), ("through", True), ("bypass", False)]
    for mode, find_unused in modes:
        model = _make_model()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        equal = True
        for step in range(len(want)):
            ids, targets, ref = _local_batch(step, rank, world)
            opt.zero_grad()
            if mode == "outside":  # backbone through the wrapper, head read outside its forward
                loss = _head_loss(ddp.module, ddp(ids), targets, ref)
            elif mode == "through":  # the whole loss as the wrapper's forward
                loss = fdist.forward_through(ddp, lambda i, t, r: _head_loss(model, model(i), t, r), ids, targets, ref)
            else:  # the wrapper bypassed: nothing is all-reduced
                loss = _head_loss(ddp.module, ddp.module(ids), targets, ref)
            loss.backward()
            for name, p in model.named_parameters():
                equal &= torch.allclose(p.grad, want[step][name], **tol)
            in_sync = True
            try:
                fdist.assert_replicas_in_sync(ddp)
            except RuntimeError as e:
                assert "forward_through" in str(e)
                in_sync = False
            opt.step()
        seen[f"{mode}/find_unused={find_unused}"] = (equal, in_sync)
    # find_unused_parameters=True with the head read outside the forward: DDP thinks it unused, then
    # its gradient arrives; torch raises in backward (loud, not silent).
    model = _make_model()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    ids, targets, ref = _local_batch(0, rank, world)
    try:
        _head_loss(model, ddp(ids), targets, ref).backward()
        seen["outside/find_unused=True"] = "no error"
    except RuntimeError as e:
        seen["outside/find_unused=True"] = "marked as ready twice" in str(e) or "ready only once" in str(e)
    return seen


def test_ddp_head_outside_forward_gets_all_reduced(tmp_path):
    """Two-process DDP: gradients equal the single-process gradients on the whole batch (two SGD steps)."""
    results = run_distributed(_ddp_worker, tmp_path=tmp_path)
    for seen in results:
        assert seen["outside/find_unused=False"] == (True, True)
        assert seen["through/find_unused=False"] == (True, True)
        assert seen["through/find_unused=True"] == (True, True)
        # Bypassing the wrapper leaves per-rank gradients: wrong, and the sync check says so.
        assert seen["bypass/find_unused=False"] == (False, False)
        assert seen["outside/find_unused=True"] is True


def _fsdp_worker(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    want = _single_process_grads(steps=1)[0]
    ids, targets, ref = _local_batch(0, rank, world)
    seen = {}
    for mode in ("root", "head-sharded"):
        model = _make_model()
        if mode == "head-sharded":
            fully_shard(model.lm_head)
        fully_shard(model)
        if mode == "root":
            # The root keeps its parameters unsharded after forward: the head read outside is the full one,
            # and through_sharded calls the loss directly.
            hidden = model(ids)
            assert fdist.sharding_kind(model.lm_head.weight) is None
            loss = fdist.through_sharded(model.lm_head, lambda: _head_loss(model, hidden, targets, ref))
        else:
            # A separately sharded head is a DTensor outside its forward: the fused op refuses it, and
            # gather_lm_head refuses to gather it for a trainable loss (full_tensor's grads are wrong, below) ...
            hidden = model(ids)
            try:
                _head_loss(model, hidden, targets, ref)
                raise AssertionError("a DTensor head must be rejected")
            except TypeError as e:
                assert "forward_through" in str(e)
            try:
                with hf_integration.gather_lm_head(model):
                    raise AssertionError("a trainable FSDP2 head must not be gathered")
            except RuntimeError as e:
                assert "through_sharded" in str(e)

            # ... and runs inside the head's forward, where FSDP gathers it and reduce-scatters its grads.
            def step(i, t, r):
                h = model.backbone(i)
                assert fdist.sharding_kind(model.lm_head.weight) == "fsdp2"
                return fdist.through_sharded(model.lm_head, lambda: _head_loss(model, h, t, r))

            loss = fdist.forward_through(model, step, ids, targets, ref)
        loss.backward()
        for name, p in model.named_parameters():
            got = p.grad.full_tensor()
            torch.testing.assert_close(got, want[name], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{mode} {name}: {m}")
        # No-grad read of the sharded head (e.g. as a reference head): the gathered copy is the full weight;
        # the caller's grad mode is left alone inside the block.
        for gathered in (fdist.gathered_params(model.lm_head.weight, model.lm_head.bias),
                         hf_integration.gather_lm_head(model, detach=True)):
            with gathered as (w, b):
                assert torch.is_grad_enabled() and not w.requires_grad and w.shape == (VOCAB, DIM)
                torch.testing.assert_close(w, _make_model().lm_head.weight.detach())
                torch.testing.assert_close(b, _make_model().lm_head.bias.detach())
        seen[mode] = True
    # What forward_through avoids (and why gather_lm_head refuses it): full_tensor() on a separately
    # sharded head gives the right values but its backward keeps each rank's own slice of its own
    # gradient (no reduce-scatter). The rest of the model is still right.
    model = _make_model()
    fully_shard(model.lm_head)
    fully_shard(model)
    hidden = model(ids)
    w, b = model.lm_head.weight.full_tensor(), model.lm_head.bias.full_tensor()
    fastpref.FusedDPOLoss(beta=0.5)(w, hidden, targets, bias=b, ref_logps=ref).loss.backward()
    seen["full_tensor head grad correct"] = torch.allclose(model.lm_head.weight.grad.full_tensor(),
                                                           want["lm_head.weight"])
    seen["full_tensor body grad correct"] = torch.allclose(model.body.weight.grad.full_tensor(),
                                                           want["body.weight"])
    return seen


def test_fsdp2_fully_shard_head(tmp_path):
    """FSDP2 on CPU/gloo: head in the root group, and a separately sharded head via forward_through."""
    results = run_distributed(_fsdp_worker, tmp_path=tmp_path)
    assert results == [{"root": True, "head-sharded": True, "full_tensor head grad correct": False,
                        "full_tensor body grad correct": True}] * 2


# --------------------------------------------------------------------------------------------------
# single process: forward_through mechanics, ZeRO-3 dispatch with a stand-in DeepSpeed


def test_forward_through_runs_hooks_and_restores_forward():
    model = _make_model()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.register_forward_hook(lambda m, args, out: calls.append("post"))
    out = fdist.forward_through(model, lambda x, k=1: model(x) * k, torch.tensor([[1, 2]]), k=3)
    assert calls == ["pre", "pre", "post", "post"]  # the redirect, and the inner call of the real forward
    torch.testing.assert_close(out, model(torch.tensor([[1, 2]])) * 3)
    assert "forward" not in vars(model)

    def boom():
        raise KeyError("inside fn")

    with pytest.raises(KeyError):
        fdist.forward_through(model, boom)
    assert "forward" not in vars(model)  # restored after an exception too
    with pytest.raises(TypeError, match="fn"):
        fdist.forward_through(model, "not callable")


def test_forward_through_keeps_an_instance_forward_and_refuses_nesting():
    """An instance-level forward (Accelerate's autocast wrapper, enable_hidden_forward) is what fn sees
    inside and what stays afterwards; redirecting a forward that is still redirected raises."""
    model = _make_model()
    ids = torch.tensor([[1, 2]])
    plain = model(ids)
    model.forward = lambda x: plain.new_full(plain.shape, 7.0)  # stands for a wrapper's instance forward
    instance_forward = model.forward
    out = fdist.forward_through(model, lambda x: model(x) + 1, ids)
    torch.testing.assert_close(out, plain.new_full(plain.shape, 8.0))
    assert vars(model)["forward"] is instance_forward
    # inside fn the redirect is gone, so fn may redirect the same module again
    assert fdist.forward_through(model, lambda: fdist.forward_through(model, lambda: 3)) == 3
    # while the redirect is in place (e.g. from a forward pre-hook) a second one would chain wrongly
    handle = model.register_forward_pre_hook(lambda m, a: fdist.forward_through(model, lambda: None))
    with pytest.raises(RuntimeError, match="nested"):
        fdist.forward_through(model, lambda: 1)
    handle.remove()
    assert vars(model)["forward"] is instance_forward  # restored after the error too


def test_through_sharded_runs_plain_heads_directly_and_refuses_fsdp1():
    model = _make_model()
    calls = []
    model.lm_head.register_forward_pre_hook(lambda *a: calls.append("hook"))
    assert fdist.through_sharded(model.lm_head, lambda: 5) == 5 and calls == []  # nothing sharded: no hooks
    model.lm_head.weight._fsdp_flattened = True
    with pytest.raises(NotImplementedError, match="FSDP1"):
        fdist.through_sharded(model.lm_head, lambda: 5)


class _FakeStatus:
    AVAILABLE = "available"
    NOT_AVAILABLE = "not_available"


def _fake_zero3_param(data: torch.Tensor, status: str) -> nn.Parameter:
    p = nn.Parameter(data.clone())
    p.ds_id, p.ds_status = id(p), status
    return p


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """A stand-in ``deepspeed`` exposing GatheredParameters and ZeroParamStatus; records the gathers."""
    import types

    log = []

    @__import__("contextlib").contextmanager
    def gathered(params, modifier_rank=None):
        log.append(("enter", [p.ds_id for p in params], modifier_rank))
        yield
        log.append(("exit",))

    ds = types.ModuleType("deepspeed")
    ds.zero = types.SimpleNamespace(GatheredParameters=gathered)
    pp = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    pp.ZeroParamStatus = _FakeStatus
    for name, mod in {"deepspeed": ds, "deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
                      "deepspeed.runtime.zero": types.ModuleType("deepspeed.runtime.zero"),
                      "deepspeed.runtime.zero.partition_parameters": pp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return log


def test_zero3_detection_and_gather_dispatch(fake_deepspeed):
    w = _fake_zero3_param(torch.randn(5, 3), _FakeStatus.NOT_AVAILABLE)
    b = _fake_zero3_param(torch.randn(5), _FakeStatus.AVAILABLE)  # e.g. already gathered by its module
    plain = torch.randn(5, 3)
    assert [fdist.sharding_kind(t) for t in (w, b, plain, None)] == ["zero3", "zero3", None, None]
    with fdist.gathered_params(w, None, b) as (gw, none, gb):
        assert fake_deepspeed == [("enter", [w.ds_id], None)]  # only the partitioned one, read-only
        assert torch.is_grad_enabled()  # the gather runs without grad; the caller's block keeps its mode
        assert none is None and not gw.requires_grad and not gb.requires_grad
        torch.testing.assert_close(gw, w.detach())
    assert fake_deepspeed[-1] == ("exit",)
    fake_deepspeed.clear()
    with fdist.gathered_params(plain) as (gp,):
        assert gp is not None and fake_deepspeed == []  # nothing sharded: no DeepSpeed call


def test_partitioned_zero3_head_is_rejected_clearly():
    empty = _fake_zero3_param(torch.empty(0), _FakeStatus.NOT_AVAILABLE)
    with pytest.raises(ValueError, match="ZeRO-3"):
        fastpref.fused_logprobs(torch.randn(1, 2, 3), empty, torch.tensor([[0, 1]]))


# --------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 for real (CPU accelerator, gloo), where deepspeed is installed (not a fastpref dependency)


# deepspeed is part of the test extra (make test installs it): these tests run, they are not skipped.
needs_deepspeed = pytest.mark.filterwarnings("ignore")


ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": PAIRS // WORLD, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}


def deepspeed_cpu_env(rank: int, world: int) -> None:
    """What DeepSpeed reads in a process the harness started (its gloo group already exists)."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed.ops

    # No JIT build of DeepSpeed's shared-memory CPU all-reduce (a C++ compile per machine, whose lock file, left by a
    # build killed at the deadline, makes every later run wait forever): gloo's collectives do the same work.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _zero3_worker(rank: int, world: int) -> dict:
    deepspeed_cpu_env(rank, world)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    model = _make_model().float()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                      config=ZERO3_CONFIG)
    seen = {"kind": fdist.sharding_kind(model.lm_head.weight), "numel": model.lm_head.weight.numel()}
    # a no-grad read of the partitioned head (e.g. a reference head): the full weight, released afterwards
    with fdist.gathered_params(model.lm_head.weight, model.lm_head.bias) as (w, b):
        seen["gathered"] = (w.clone(), b.clone())
    with hf_integration.gather_lm_head(model, detach=True) as (w, b):
        seen["gather_lm_head"] = (w, b)  # a copy: still valid after the context
    seen["numel_after"] = model.lm_head.weight.numel()
    ids, targets, ref = _local_batch(0, rank, world)
    ref = ref.float()

    def step(i, t, r):  # the whole loss as the engine's forward, the head's part as the head's forward
        h = model.backbone(i)
        return fdist.through_sharded(model.lm_head, lambda: _head_loss(model, h, t, r))

    engine.backward(fdist.forward_through(engine, step, ids, targets, ref))
    seen["grads"] = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}
    try:  # the head read outside its forward: the empty partition is rejected
        _head_loss(model, engine(ids), targets, ref)
        seen["outside"] = "no error"
    except ValueError as e:
        seen["outside"] = str(e)
    return seen


@needs_deepspeed
def test_zero3_through_sharded_and_gathered_params_with_real_deepspeed(tmp_path):
    """Two processes, ZeRO-3 (every parameter partitioned): the loss run through forward_through / through_sharded
    gives the single process's gradients (the head's included, gathered again for the fused backward and
    reduce-scattered by ZeRO's hooks); gathered_params / gather_lm_head(detach=True) read the full head."""
    results = run_distributed(_zero3_worker, tmp_path=tmp_path)
    model = _make_model().float()
    ids, targets, ref = _global_batch(0)
    _head_loss(model, model(ids), targets, ref.float()).backward()
    for rank, seen in enumerate(results):
        assert seen["kind"] == "zero3" and seen["numel"] == 0 and seen["numel_after"] == 0
        for key in ("gathered", "gather_lm_head"):
            torch.testing.assert_close(seen[key][0], model.lm_head.weight.detach())
            torch.testing.assert_close(seen[key][1], model.lm_head.bias.detach())
        assert "ZeRO-3" in seen["outside"], seen["outside"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(seen["grads"][name], p.grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
