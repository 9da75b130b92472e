"""``fastpref check --device cuda``: the Triton backend on a GPU at realistic shapes, in one command.

Sections (:mod:`fastpref.device_check.checks`): every shipped kernel configuration forced once, parity
with the fp64 truth by the eager-error rule (:mod:`fastpref.device_check.cases`), strided and expanded
biases, TF32 on/off and mixed-precision heads, bitwise determinism of two runs, and the host-sync count
of a ``FusedDPOLoss`` forward+backward. :func:`run` writes ``device_check.json`` and ``device_check.md``.

``device="cpu-interpret"`` runs the same code on tiny shapes under Triton's interpreter: a smoke test
of the command for CI (``TRITON_INTERPRET=1`` must be set before ``fastpref.kernels`` is first imported,
so it runs in its own process). It measures nothing about a GPU, and its report says so.

Imported by the CLI only: ``import fastpref`` does not load this package.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Optional

import torch

from . import cases, checks, report

DEVICES = ("cuda", "cpu-interpret")


def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter (set before their first import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _machine(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (f"GPU {torch.cuda.get_device_name()} (sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB), {platform.node() or 'unknown host'}")
    return (f"CPU only, Triton interpreter (TRITON_INTERPRET=1), tiny shapes, {platform.processor() or 'cpu'}: "
            "a smoke run of the command, not a GPU measurement")


def check_device(device: str, tiny: bool) -> None:
    """Raise ValueError (naming the argument) when ``device``/``tiny`` cannot run here."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES} for the device check, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if device == "cuda" and interpreting():
        raise ValueError("--device cuda: TRITON_INTERPRET=1 is set; unset it to run the kernels on the GPU")
    if device == "cpu-interpret" and not interpreting():
        raise ValueError("--device cpu-interpret: set TRITON_INTERPRET=1 in the environment before starting")
    if device == "cpu-interpret" and not tiny:
        raise ValueError("--device cpu-interpret is a test-only smoke: add --tiny")


def run(device: str, out: str, *, tiny: bool = False, seed: int = 0, budget_s: Optional[float] = None) -> dict:
    """Run every section on ``device`` ("cuda" or "cpu-interpret"), write the reports under ``out``.

    Args:
        tiny: interpreter-sized shapes (required on "cpu-interpret"; a plumbing check on "cuda").
        budget_s: rows that would start after this many seconds are reported as skipped.
    Returns the results dict (``meta``, ``summary``, ``rows``, ``files``).
    """
    check_device(device, tiny)
    from . import configs as shipped

    start = time.perf_counter()
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    tables = shipped.discover()
    keys = [arch for t in tables for arch, _ in t.table]
    ctx = checks.Context(device=dev, scale="tiny" if tiny else "cuda", interpreting=interpreting(), seed=seed,
                         deadline=start + budget_s if budget_s else float("inf"),
                         arch=checks.pick_arch(keys, capability))
    rows = checks.all_sections(ctx)
    other = sorted({k for k in keys if k != ctx.arch})
    summary = {s: sum(r["status"] == s for r in rows) for s in ("ok", "FAIL", "skipped")}
    import triton

    results = {
        "meta": {
            "machine": _machine(device), "device": device, "tiny": tiny, "interpreting": interpreting(),
            "torch": torch.__version__, "triton": triton.__version__, "arch": ctx.arch, "seed": seed,
            "tables": [t.label for t in tables], "slack": cases.SLACK,
            "elapsed_s": round(time.perf_counter() - start, 1),
            "note": (f"Configurations of {', '.join(other)} are not run on this device "
                     "(`fastpref kernels` compiles them ahead of time)." if other else ""),
        },
        "summary": summary, "rows": rows,
    }
    results["files"] = report.write(results, out)
    return results
