"""Parity cases for the Triton backend, run in a subprocess under ``TRITON_INTERPRET=1``.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, i.e. when ``fastpref.kernels``
(the csrc_triton/ folder) is first imported, so it cannot be switched on inside the main pytest process
without affecting every other test there. ``tests/test_triton_interpret.py`` runs this file once as a
script and asserts on the errors it reports (JSON written to the path given as argv[1]).

Each case (``fastpref.testing.make_core_case`` at small shapes: few interpreter programs) applies random
upstream gradients to ``logps``, ``token_logps``, ``kl`` and ``token_kl`` and compares every output and
dH, dW, db with ``fastpref.testing.rel_err``:
- fp32: Triton vs the eager reference and vs the torch backend;
- bf16: error vs the fp64 truth (eager on exactly upcast inputs), next to the eager bf16 error.
The default (deterministic, chunked) backward runs with a workspace small enough for several vocabulary
chunks, and is compared with the fused atomic backward (``KernelOptions(deterministic=False)``) and
with a second run of itself (bitwise).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict

import torch

import fastpref
from fastpref.reference import fused_logprobs as eager_fused_logprobs
from fastpref.testing import CoreCase, core_leaves, make_core_case, rel_err, run_core

# Interpreter-sized defaults: N is never a multiple of BLOCK_N=16 and V=100 is not a multiple of
# BLOCK_V=64 (one vocabulary split); a separate reference head is narrower than the policy's.
SMALL = dict(T=7, V=100, lengths=(5, 1, 9, 3))
SEPARATE = dict(ref="separate", D_ref=40)

# name -> make_core_case options (over SMALL). The core-op case list at interpreter-sized shapes.
_SPECS = {
    "padded": dict(),
    "packed_interleaved": dict(layout="packed"),
    "bias": dict(bias=True),
    "temperature_softcap": dict(bias=True, temperature=0.7, softcap=5.0),
    "kl_forward_shared_head": dict(ref="shared", kl="forward", bias=True),
    "kl_reverse_shared_head": dict(ref="shared", kl="reverse"),
    "kl_forward_separate_head": dict(SEPARATE, kl="forward", bias=True, temperature=1.3, softcap=4.0),
    "kl_reverse_separate_head_packed": dict(SEPARATE, layout="packed", kl="reverse", bias=True),
    "ref_without_kl": dict(SEPARATE),
    "fully_ignored_sequence": dict(ref="shared", kl="forward", ignore_seq=1),
    "fully_ignored_sequence_packed": dict(layout="packed", ignore_seq=2, ref="shared", kl="reverse"),
    "one_token_sequences": dict(layout="packed", lengths=(1, 1, 1, 1, 1), ref="shared", kl="forward"),
    "single_position": dict(layout="packed", lengths=(1,), ignore=0.0, bias=True, ref="shared", kl="forward"),
    "zero_grad_sequence": dict(S=4, ref="shared", kl="forward", zero_grad_seq=2),
    "per_sequence_grads_only": dict(layout="packed", ref="shared", kl="forward", grads_on=("logps", "kl")),
    "per_token_grads_only": dict(ref="shared", kl="reverse", grads_on=("token_logps", "token_kl")),
    # V > 128 (INTERPRET_SPLIT_V): the split-vocabulary forward and its combine kernel; V > 256: several
    # chunks of the deterministic backward
    "vocab_split_forward_kl": dict(S=2, T=19, D=70, V=300, bias=True, ref="shared", kl="forward"),
    "vocab_split_reverse_kl_ragged": dict(SEPARATE, layout="packed", V=257, kl="reverse", softcap=3.0),
    "vocab_split_no_ref": dict(V=300, bias=True),
}
CASES = {name: dict(SMALL, **spec) for name, spec in _SPECS.items()}
BF16_CASES = ("padded", "temperature_softcap", "kl_forward_separate_head", "kl_reverse_separate_head_packed")


# The smallest workspace: chunks of 256 columns (the minimum), so vocabularies above 256 take several.
CHUNKED = fastpref.KernelOptions(workspace_bytes=1)
ATOMIC = fastpref.KernelOptions(deterministic=False)


def main(path: str) -> None:
    torch.set_num_threads(1)
    from fastpref._prepare import prepare
    from fastpref.backends import triton_backend

    assert triton_backend.interpreting(), "run with TRITON_INTERPRET=1"
    results: Dict[str, Dict[str, float]] = {}
    for i, (name, spec) in enumerate(CASES.items()):
        case = make_core_case(torch.float32, seed=i, **spec)
        tri = run_core(fastpref.fused_logprobs, case, backend="triton", options=CHUNKED)
        eager = run_core(eager_fused_logprobs, case)
        tb = run_core(fastpref.fused_logprobs, case, backend="torch")
        atomic = run_core(fastpref.fused_logprobs, case, backend="triton", options=ATOMIC)
        again = run_core(fastpref.fused_logprobs, case, backend="triton", options=CHUNKED)
        res = {}
        for key in eager:
            res[f"{key}/eager"] = rel_err(tri[key], eager[key])
            res[f"{key}/torch"] = rel_err(tri[key], tb[key])
            res[f"{key}/atomic"] = rel_err(atomic[key], eager[key])
            res[f"{key}/bitwise_rerun"] = bool(torch.equal(tri[key], again[key]))
        res["keys"] = sorted(eager)
        prep = prepare(*case.inputs, backend="triton", **case.kwargs)
        with torch.no_grad():
            nograd = fastpref.fused_logprobs(*case.inputs, backend="triton", **case.kwargs)
        res["n_splits"] = triton_backend.vocab_splits(prep.num_positions, prep.vocab_size, prep.hidden.device)[0]
        res["n_chunks"] = -(-prep.vocab_size // triton_backend.chunk_columns(
            prep.num_positions, prep.vocab_size, 4, CHUNKED.workspace_bytes))
        res["no_grad/token_logps"] = rel_err(nograd.token_logps, eager["token_logps"])
        results[name] = res

    for i, name in enumerate(BF16_CASES):
        case = make_core_case(torch.bfloat16, seed=100 + i, **CASES[name])
        truth = run_core(eager_fused_logprobs, case.to(torch.float64))
        eager = run_core(eager_fused_logprobs, case)
        tri = run_core(fastpref.fused_logprobs, case, backend="triton", options=CHUNKED)
        res = {"keys": sorted(truth)}
        for key in truth:
            res[f"{key}/fused_vs_truth"] = rel_err(tri[key], truth[key])
            res[f"{key}/eager_vs_truth"] = rel_err(eager[key], truth[key])
        results["bf16_" + name] = res
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


# ----------------------------------------------------------------------------------- extra outputs
# (tests/test_extra_outputs.py imports these helpers and runs ``extras_main`` in its own subprocess)

EXTRAS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
EXTRA_KEYS = tuple(k for name in EXTRAS for k in (name, "token_" + name))
EXTRA_SPECS = {
    "extras_softcap_bias": dict(SMALL, bias=True, temperature=0.7, softcap=5.0, ignore_seq=1),
    "extras_split_packed_kl": dict(SMALL, layout="packed", V=300, bias=True, ref="shared", kl="forward", ignore_seq=2),
}


def with_top1_targets(case: CoreCase) -> CoreCase:
    """``case`` with every other valid target replaced by the argmax of its logits (so that ``is_top1`` is
    True at some positions and False at others)."""
    from fastpref.reference.logprobs import eager_logits

    kw = case.kwargs
    flat = case.hidden.reshape(-1, case.hidden.shape[-1]).double()
    z = eager_logits(flat, case.weight.double(), None if kw.get("bias") is None else kw["bias"].double(),
                     kw.get("temperature", 1.0), kw.get("softcap"))
    targets = case.targets.clone().view(-1)
    pick = (targets != -100) & (torch.arange(targets.numel()) % 2 == 0)
    targets[pick] = z.argmax(-1)[pick]
    return CoreCase(case.hidden, case.weight, targets.view(case.targets.shape), case.kwargs, case.upstream)


def run_extras(fn, case: CoreCase, extras=EXTRAS, **extra) -> Dict[str, torch.Tensor]:
    """Like ``run_core``, with ``extra_outputs``: the outputs (``EXTRA_KEYS`` and ``logps``) and the gradients
    of ``sum(token_entropy * u) + sum(entropy * v)`` plus ``case.upstream``'s terms (fixed random u, v)."""
    leaves, kwargs = core_leaves(case)
    stats = fn(leaves["hidden"], leaves["weight"], case.targets, extra_outputs=extras, **kwargs, **extra)
    out = {k: getattr(stats, k).detach() for k in EXTRA_KEYS + ("logps",) if getattr(stats, k) is not None}
    g = torch.Generator().manual_seed(7)
    terms = [(getattr(stats, k).double() * up).sum() for k, up in case.upstream.items()
             if getattr(stats, k) is not None]
    if stats.entropy is not None:
        terms.append((stats.token_entropy.double() * torch.randn(stats.token_entropy.shape, generator=g,
                                                                  dtype=torch.float64)).sum())
        terms.append((stats.entropy.double() * torch.randn(stats.entropy.shape, generator=g,
                                                           dtype=torch.float64)).sum())
    grads = torch.autograd.grad(sum(terms), list(leaves.values()), allow_unused=True)
    for (name, leaf), grad in zip(leaves.items(), grads):
        out["d_" + name] = torch.zeros_like(leaf) if grad is None else grad
    return out


def extras_main(path: str) -> None:
    """fp32 Triton (chunked and atomic backward) vs the eager reference, with every extra output."""
    torch.set_num_threads(1)
    results: Dict[str, Dict[str, float]] = {}
    for i, (name, spec) in enumerate(EXTRA_SPECS.items()):
        case = with_top1_targets(make_core_case(torch.float32, seed=300 + i, **spec))
        eager = run_extras(eager_fused_logprobs, case)
        res = {"keys": sorted(eager)}
        for label, options in (("chunked", CHUNKED), ("atomic", ATOMIC)):
            tri = run_extras(fastpref.fused_logprobs, case, backend="triton", options=options)
            for key in eager:
                res[f"{key}/{label}"] = rel_err(tri[key], eager[key])
        res["top1_count"] = int(eager["token_is_top1"].sum())
        res["valid_count"] = int((case.targets != -100).sum())
        results[name] = res
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1")
    if len(sys.argv) > 2 and sys.argv[2] == "extras":
        extras_main(sys.argv[1])
    else:
        main(sys.argv[1])
