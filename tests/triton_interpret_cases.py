"""Parity cases for the Triton backend, run in a subprocess under ``TRITON_INTERPRET=1``.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, i.e. when ``fastpref.kernels`` (the csrc_triton/ folder) is
first imported, so it cannot be switched on inside the main pytest process without affecting every
other test there. ``tests/test_triton_interpret.py`` runs this file once as a script and asserts on
the errors it reports (JSON written to the path given as argv[1]).

Each case builds small inputs (few interpreter programs), applies random upstream gradients to
``logps``, ``token_logps``, ``kl`` and ``token_kl`` and compares every output and dH, dW, db:
- fp32: Triton vs the eager reference and vs the torch backend (max abs error / max abs value);
- bf16: error vs the fp64 truth (eager on exactly upcast inputs), next to the eager bf16 error.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

import fastpref
from fastpref.reference import fused_logprobs as eager_fused_logprobs

OUTPUTS = ("logps", "lengths", "token_logps", "ref_logps", "kl", "token_kl", "ref_token_logps")
GRADS = ("d_hidden", "d_weight", "d_bias")


def make_case(dtype: torch.dtype, seed: int, *, layout: str = "padded", S: int = 3, T: int = 7, D: int = 24,
              V: int = 100, bias: bool = False, ref: Optional[str] = None, D_ref: int = 40, kl: Optional[str] = None,
              temperature: float = 1.0, softcap: Optional[float] = None, ignore_seq: Optional[int] = None,
              zero_grad_seq: Optional[int] = None, lengths: Optional[List[int]] = None,
              grads_on: tuple = ("logps", "token_logps", "kl", "token_kl")) -> Dict:
    """Inputs and upstream gradients of one case. ``ref`` is None, "shared" or "separate"."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if layout == "padded":
        shape = (S, T)
        targets = torch.randint(0, V, shape, generator=g)
        targets[:, :2][torch.rand(S, 2, generator=g) < 0.5] = -100  # some ignored prompt positions
        seq_ids, num_seqs = None, S
    else:  # packed, interleaved, unequal lengths
        lengths = lengths or [5, 1, 9, 3]
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        seq_ids = ids[torch.randperm(ids.numel(), generator=g)]
        num_seqs = len(lengths)
        shape = (ids.numel(),)
        targets = torch.randint(0, V, shape, generator=g)
        targets[torch.rand(shape, generator=g) < 0.15] = -100
    if ignore_seq is not None:
        if seq_ids is None:
            targets[ignore_seq] = -100
        else:
            targets[seq_ids == ignore_seq] = -100
    kwargs = dict(seq_ids=seq_ids, num_seqs=num_seqs, kl=kl, temperature=temperature, softcap=softcap)
    inputs = dict(hidden=randn(*shape, D), weight=randn(V, D, scale=D ** -0.5 * 2))
    if bias:
        inputs["bias"] = randn(V, scale=0.5)
    if ref is not None:
        kwargs["ref_hidden"] = randn(*shape, D if ref == "shared" else D_ref)
        if ref == "separate":
            kwargs["ref_weight"] = randn(V, D_ref, scale=D_ref ** -0.5 * 2)
            kwargs["ref_bias"] = randn(V, scale=0.5) if bias else None
    upstream = dict(logps=torch.randn(num_seqs, generator=g, dtype=torch.float64),
                    token_logps=torch.randn(shape, generator=g, dtype=torch.float64),
                    kl=torch.randn(num_seqs, generator=g, dtype=torch.float64),
                    token_kl=torch.randn(shape, generator=g, dtype=torch.float64))
    if zero_grad_seq is not None:  # e.g. an MC-PO candidate that was not sampled
        upstream["logps"][zero_grad_seq] = 0
        upstream["kl"][zero_grad_seq] = 0
        mask = (seq_ids == zero_grad_seq) if seq_ids is not None else (torch.arange(S) == zero_grad_seq)[:, None]
        upstream["token_logps"] = upstream["token_logps"].masked_fill(mask, 0)
        upstream["token_kl"] = upstream["token_kl"].masked_fill(mask, 0)
    upstream = {k: v for k, v in upstream.items() if k in grads_on}
    return dict(inputs=inputs, kwargs=kwargs, targets=targets, upstream=upstream)


def run(fn: Callable, case: Dict, dtype: Optional[torch.dtype] = None, **extra) -> Dict[str, torch.Tensor]:
    """Outputs and (dH, dW, db) of ``fn`` on the case (inputs cast to ``dtype``), all as float64."""
    cast = (lambda t: t if (t is None or dtype is None) else t.to(dtype))
    leaves = {k: cast(v).detach().requires_grad_() for k, v in case["inputs"].items()}
    kwargs = {k: (cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in case["kwargs"].items()}
    stats = fn(leaves["hidden"], leaves["weight"], case["targets"], bias=leaves.get("bias"), **kwargs, **extra)
    loss = 0
    for name, grad in case["upstream"].items():
        value = getattr(stats, name)
        if value is not None:
            loss = loss + (value.double() * grad).sum()
    names = ["hidden", "weight"] + (["bias"] if "bias" in leaves else [])
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    out = {n: getattr(stats, n).detach().double() for n in OUTPUTS if getattr(stats, n) is not None}
    out.update({"d_" + n: gr.double() for n, gr in zip(names, grads)})
    return out


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| / max |y| (absolute where y is ~0): one number per tensor, scale-free."""
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-6)) if y.numel() else 0.0


# name -> (make_case kwargs). The core-op case list, at interpreter-sized shapes: N is never a
# multiple of BLOCK_N=16 and V=100 is not a multiple of BLOCK_V=64 (one vocabulary split).
CASES = {
    "padded": dict(),
    "packed_interleaved": dict(layout="packed"),
    "bias": dict(bias=True),
    "temperature_softcap": dict(bias=True, temperature=0.7, softcap=5.0),
    "kl_forward_shared_head": dict(ref="shared", kl="forward", bias=True),
    "kl_reverse_shared_head": dict(ref="shared", kl="reverse"),
    "kl_forward_separate_head": dict(ref="separate", kl="forward", bias=True, temperature=1.3, softcap=4.0),
    "kl_reverse_separate_head_packed": dict(layout="packed", ref="separate", kl="reverse", bias=True),
    "ref_without_kl": dict(ref="separate"),
    "fully_ignored_sequence": dict(ref="shared", kl="forward", ignore_seq=1),
    "fully_ignored_sequence_packed": dict(layout="packed", ignore_seq=2, ref="shared", kl="reverse"),
    "one_token_sequences": dict(layout="packed", lengths=[1, 1, 1, 1, 1], ref="shared", kl="forward"),
    "single_position": dict(layout="packed", lengths=[1], bias=True, ref="shared", kl="forward"),
    "zero_grad_sequence": dict(S=4, ref="shared", kl="forward", zero_grad_seq=2),
    "per_sequence_grads_only": dict(layout="packed", ref="shared", kl="forward", grads_on=("logps", "kl")),
    "per_token_grads_only": dict(ref="shared", kl="reverse", grads_on=("token_logps", "token_kl")),
    # V > 128 (INTERPRET_SPLIT_V): the split-vocabulary forward and its combine kernel
    "vocab_split_forward_kl": dict(S=2, T=19, D=70, V=300, bias=True, ref="shared", kl="forward"),
    "vocab_split_reverse_kl_ragged": dict(layout="packed", V=257, ref="separate", kl="reverse", softcap=3.0),
    "vocab_split_no_ref": dict(V=200, bias=True),
}
BF16_CASES = ("padded", "temperature_softcap", "kl_forward_separate_head", "kl_reverse_separate_head_packed")


def main(path: str) -> None:
    torch.set_num_threads(1)
    from fastpref.backends import triton_backend
    from fastpref._types import assemble
    from fastpref._prepare import prepare

    assert triton_backend.interpreting(), "run with TRITON_INTERPRET=1"
    results: Dict[str, Dict[str, float]] = {}
    for i, (name, spec) in enumerate(CASES.items()):
        case = make_case(torch.float32, seed=i, **spec)
        tri = run(fastpref.fused_logprobs, case, backend="triton")
        eager = run(eager_fused_logprobs, case)
        tb = run(fastpref.fused_logprobs, case, backend="torch")
        res = {}
        for key in eager:
            res[f"{key}/eager"] = rel_err(tri[key], eager[key])
            res[f"{key}/torch"] = rel_err(tri[key], tb[key])
        res["keys"] = sorted(eager)
        # The kernel's own per-sequence sums (atomics by seq_ids) against assemble's reduction.
        prep = prepare(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"],
                       bias=case["inputs"].get("bias"), backend="triton", **case["kwargs"])
        with torch.no_grad():
            fwd = triton_backend.forward(prep)
            summed = assemble(prep, fwd.token_logps, fwd.ref_token_logps, fwd.token_kl)
            nograd = fastpref.fused_logprobs(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"],
                                             bias=case["inputs"].get("bias"), backend="triton", **case["kwargs"])
        res["seq_sums/logps"] = rel_err(fwd.seq_logps.double(), summed.logps.double())
        if fwd.seq_ref_logps is not None:
            res["seq_sums/ref_logps"] = rel_err(fwd.seq_ref_logps.double(), summed.ref_logps.double())
        if fwd.seq_kl is not None:
            res["seq_sums/kl"] = rel_err(fwd.seq_kl.double(), summed.kl.double())
        res["n_splits"] = triton_backend.vocab_splits(int(prep.valid.sum()), prep.vocab_size, prep.hidden.device)[0]
        res["no_grad/token_logps"] = rel_err(nograd.token_logps.double(), eager["token_logps"])
        results[name] = res

    for i, name in enumerate(BF16_CASES):
        case = make_case(torch.bfloat16, seed=100 + i, **CASES[name])
        truth = run(eager_fused_logprobs, case, dtype=torch.float64)
        eager = run(eager_fused_logprobs, case)
        tri = run(fastpref.fused_logprobs, case, backend="triton")
        res = {"keys": sorted(truth)}
        for key in truth:
            res[f"{key}/fused_vs_truth"] = rel_err(tri[key], truth[key])
            res[f"{key}/eager_vs_truth"] = rel_err(eager[key], truth[key])
        results["bf16_" + name] = res
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1")
    main(sys.argv[1])
