"""``fastpref check``: gradient-parity self-test of every backend (and loss) available here.

Each row runs a fused computation and its eager reference (``fastpref.reference``) on the same random
inputs, applies the same random upstream gradients, and reports the largest relative error over the
outputs and the gradients. Exit status 1 if any row exceeds its tolerance.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List, Tuple

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", choices=["torch", "triton"],
                        help="backend(s) to check (default: every one available on this machine)")
    parser.add_argument("--seed", type=int, default=0)


def available_backends() -> List[str]:
    """torch always; triton on CUDA, or on CPU under TRITON_INTERPRET=1."""
    backends = ["torch"]
    try:
        import triton  # noqa: F401

        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            backends.append("triton")
    except ImportError:
        pass
    return backends


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|), 0 for two empty or all-zero tensors."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _core_case(name: str, dtype: torch.dtype, device: torch.device, seed: int) -> Tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    S, T, D, V = 4, 9, 32, 1000
    kwargs: Dict = {}
    if name == "packed":
        lengths = [5, 1, 12, 3]
        n = sum(lengths)
        hidden = rnd(n, D)
        targets = torch.randint(0, V, (n,), generator=g)
        kwargs["seq_ids"] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    else:
        hidden = rnd(S, T, D)
        targets = torch.randint(0, V, (S, T), generator=g)
        targets[0, :3] = -100
        targets[-1, :] = -100  # a fully ignored sequence
    weight = rnd(V, D, scale=0.3)
    kwargs["bias"] = rnd(V, scale=0.1)
    if name in ("kl_forward", "kl_reverse", "packed"):
        kwargs["ref_hidden"] = hidden.detach() + rnd(*hidden.shape, scale=0.3)
        kwargs["ref_weight"] = weight.detach() + rnd(V, D, scale=0.05)
        kwargs["kl"] = "reverse" if name == "kl_reverse" else "forward"
    if name == "softcap":
        kwargs.update(temperature=0.7, softcap=5.0)
    targets = targets.to(device)
    return (hidden.requires_grad_(), weight.requires_grad_(), targets), kwargs


def check_core(backend: str, dtype: torch.dtype, seed: int) -> List[Tuple[str, float]]:
    """Rows (case name, max relative error) of the fused op vs the eager reference."""
    import fastpref
    import fastpref.reference as ref

    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    rows = []
    for i, name in enumerate(["padded", "softcap", "kl_forward", "kl_reverse", "packed"]):
        (hidden, weight, targets), kwargs = _core_case(name, dtype, device, seed + i)
        kwargs["bias"].requires_grad_()
        results = []
        for fn, kw in ((fastpref.fused_logprobs, {"backend": backend}), (ref.fused_logprobs, {})):
            stats = fn(hidden, weight, targets, **kwargs, **kw)
            g = torch.Generator().manual_seed(seed + 100 + i)
            loss = (stats.logps * torch.randn(stats.logps.shape, generator=g).to(stats.logps)).sum()
            loss = loss + (stats.token_logps * torch.randn(stats.token_logps.shape, generator=g).to(stats.logps)).sum()
            if stats.kl is not None:
                loss = loss + (stats.kl * torch.randn(stats.kl.shape, generator=g).to(stats.kl)).sum()
            grads = torch.autograd.grad(loss, [hidden, weight, kwargs["bias"]])
            outs = [stats.logps, stats.token_logps] + ([stats.kl] if stats.kl is not None else [])
            results.append(outs + list(grads))
        rows.append((name, max(rel_err(a, b) for a, b in zip(*results))))
    return rows


# Extra checks (e.g. the loss modules) register here: name -> fn(dtype, seed) -> [(case, rel_err)].
EXTRA_CHECKS: Dict[str, Callable[[torch.dtype, int], List[Tuple[str, float]]]] = {}


def run(args: argparse.Namespace) -> int:
    backends = args.backend or available_backends()
    failures = 0
    print(f"fastpref check: backends {', '.join(backends)}; relative tolerance fp64 1e-10, fp32 1e-4")
    print(f"{'what':<28}{'dtype':<10}{'case':<14}{'max rel err':>14}  result")
    start = time.perf_counter()
    suites = [(f"fused_logprobs[{b}]", lambda dt, s, b=b: check_core(b, dt, s)) for b in backends]
    suites += list(EXTRA_CHECKS.items())
    for label, fn in suites:
        # The Triton kernels take no float64 (tl.dot accumulates in fp32): fp32 rows only.
        dtypes = (torch.float32,) if label == "fused_logprobs[triton]" else (torch.float64, torch.float32)
        for dtype in dtypes:
            for case, err in fn(dtype, args.seed):
                ok = err <= TOLERANCE[dtype]
                failures += not ok
                print(f"{label:<28}{str(dtype).replace('torch.', ''):<10}{case:<14}{err:>14.2e}  {'ok' if ok else 'FAIL'}")
    print(f"{'all passed' if not failures else f'{failures} FAILED'} in {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0
