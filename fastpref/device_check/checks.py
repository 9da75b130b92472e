"""The sections of the device check; each returns rows (dicts, see :func:`make_row`).

- ``configs``: every shipped configuration of the device's architecture, forced once
  (:mod:`fastpref.device_check.configs`), on the sweep case of its precision column, by the eager-error rule.
- ``parity``: realistic shapes with the autotuned configurations (bf16, fp16, fp32; KL modes, packed,
  softcap), by the eager-error rule.
- ``bias``: a strided bias ``randn(2V)[::2]`` (and reference bias) and an expanded one ``randn(1).expand(V)``.
- ``precision``: fp32 with TF32 off and on (``torch.backends.cuda.matmul.fp32_precision``), and a bf16
  policy with an fp32 reference head.
- ``determinism``: two forward+backward runs with ``fastpref.KernelOptions()`` give bitwise-equal results.
- ``syncs``: host synchronizations in one ``FusedDPOLoss`` forward+backward
  (``torch.cuda.set_sync_debug_mode("warn")``, warnings counted; target 0). CUDA only.

A row that raises becomes a failed row with the error, so one broken case never hides the others.
"""
from __future__ import annotations

import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import fastpref

from . import cases
from . import configs as shipped


@dataclass
class Context:
    """Where and how the check runs."""

    device: torch.device
    scale: str  # "cuda" or "tiny" (cases.SHAPES)
    interpreting: bool
    seed: int = 0
    deadline: float = float("inf")  # time.perf_counter() after which rows are skipped
    arch: Optional[str] = None
    _cache: Dict[str, Tuple[Any, Dict[str, torch.Tensor], Dict[str, float]]] = field(default_factory=dict)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline


def make_row(section: str, name: str, *, status: str, dtype: str = "", shape: str = "", config: str = "",
             fused_err: Optional[float] = None, eager_err: Optional[float] = None, worst: str = "",
             limit: Optional[float] = None, value: Any = None, note: str = "", seconds: float = 0.0) -> dict:
    """One row of the report; ``status`` is "ok", "FAIL" or "skipped"."""
    return dict(section=section, name=name, status=status, dtype=dtype, shape=shape, config=config,
                fused_err=fused_err, eager_err=eager_err, worst=worst, limit=limit, value=value, note=note,
                seconds=round(seconds, 3))


def guarded(section: str, name: str, ctx: Context, body: Callable[[], dict]) -> dict:
    """``body()``, or a skipped row past the time budget, or a failed row with the exception."""
    if ctx.out_of_time():
        return make_row(section, name, status="skipped", note="time budget (--budget-s) spent")
    start = time.perf_counter()
    try:
        row = body()
    except Exception as exc:  # a first GPU run must report every row, not stop at the first error
        last = traceback.extract_tb(exc.__traceback__)[-1]
        note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} " \
               f"({last.filename.rsplit('/', 1)[-1]}:{last.lineno})"
        row = make_row(section, name, status="FAIL", note=note)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def shape_label(case: Any) -> str:
    n = case.targets.numel()
    d, v = case.weight.shape[1], case.weight.shape[0]
    return f"N={n} D={d} V={v}"


def _truth(ctx: Context, spec: cases.Spec, seed: int, cache: bool):
    """(low-precision case, fp64 truth, eager errors) of ``spec``, cached for the sweep."""
    if cache and spec.name in ctx._cache:
        return ctx._cache[spec.name]
    low, case64 = cases.build(spec, ctx.scale, seed, ctx.device)
    truth = cases.eager(case64, spec.bias_view)
    del case64
    with cases.matmul_precision(spec.tf32):
        eager_errs = cases.errors(cases.eager(low, spec.bias_view), truth)
    entry = (low, truth, eager_errs)
    if cache:
        ctx._cache[spec.name] = entry
    return entry


def parity(ctx: Context, spec: cases.Spec, section: str, *, seed: int, cache: bool = False, config: str = "",
           options: Optional[Any] = None) -> dict:
    """One eager-error-rule row: the Triton backend on ``spec`` against the fp64 truth."""
    low, truth, eager_errs = _truth(ctx, spec, seed, cache)
    with cases.matmul_precision(spec.tf32):
        fused = cases.run(fastpref.fused_logprobs, low, bias_view=spec.bias_view, backend="triton",
                          options=options or fastpref.KernelOptions())
    errs = cases.errors(fused, truth)
    passed, worst, fused_err, eager_err = cases.judge(errs, eager_errs, spec.precision)
    return make_row(section, spec.name, status="ok" if passed else "FAIL", dtype=spec.precision,
                    shape=shape_label(low), config=config, fused_err=fused_err, eager_err=eager_err, worst=worst,
                    limit=eager_err + cases.SLACK[spec.precision],
                    note="" if spec.ref_dtype is None else f"reference head {spec.ref_dtype}")


def pick_arch(keys: List[str], capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """The table architecture for a device: the newest ``sm_XY[a]`` key not above its compute capability
    (the newest key of all without a device: the interpreter smoke)."""
    def number(key: str) -> int:
        found = re.search(r"(\d+)", key)
        return int(found.group(1)) if found else -1

    ranked = sorted(set(keys), key=number)
    if capability is not None:
        ranked = [k for k in ranked if number(k) <= 10 * capability[0] + capability[1]]
    return ranked[-1] if ranked else None


def config_sweep(ctx: Context) -> List[dict]:
    """Every configuration listed for ``ctx.arch``, forced once, by the eager-error rule."""
    rows = []
    deterministic, atomic = fastpref.KernelOptions(), fastpref.KernelOptions(deterministic=False)
    for i, table in enumerate(shipped.discover()):
        for precision, cfg in shipped.configs_for(table, ctx.arch):
            label = f"{ctx.arch}/{precision}/{shipped.config_name(cfg)}"
            if table.module == ROWS_MODULE:  # not launched by the op: swept through the module path using it
                rows.append(guarded("configs", table.label, ctx,
                                    lambda t=table, p=precision, c=cfg, lb=label: rows_parity(ctx, t, p, c, lb)))
                continue
            spec = cases.SWEEP.get(precision)
            if spec is None:
                rows.append(make_row("configs", table.label, status="skipped", config=label,
                                     note=f"no sweep case for precision column {precision!r}"))
                continue

            def body(spec=spec, cfg=cfg, label=label, table=table):
                for options in (deterministic, atomic):
                    with shipped.forced(table, cfg, interpreting=ctx.interpreting) as count:
                        row = parity(ctx, spec, "configs", seed=ctx.seed + 100 + i, cache=True, config=label,
                                     options=options)
                    if count.launches:
                        row["name"], row["value"] = table.label, count.launches
                        if options is atomic:
                            row["note"] = "launched by the KernelOptions(deterministic=False) backward"
                        return row
                return make_row("configs", table.label, status="FAIL", config=label, dtype=spec.precision,
                                note="no kernel of this table was launched, with either KernelOptions(deterministic)")

            rows.append(guarded("configs", table.label, ctx, body))
    ctx._cache.clear()
    return rows


#: The kernel module whose configurations the ``grad_in_forward`` module path launches (not the op).
ROWS_MODULE = "logits_rows"


def rows_parity(ctx: Context, table: Any, precision: str, cfg: Any, label: str) -> dict:
    """``csrc_triton/logits_rows.py`` with ``cfg`` forced, called as ``KernelOptions(grad_in_forward=True)`` calls
    it (``fastpref.backends.triton_rows``): the log-sum-exp, target logit and in-place gradient of a logits buffer
    in ``precision`` against the same formulas in fp64 (``torch.logsumexp``); relative error at most 1e-5 (fp32)
    or 1e-12 (fp64). The module path on a GPU: tests/test_triton_gpu.py."""
    from ..backends.triton_rows import row_softmax_stats, softmax_grad_

    dtype, limit = {"fp32": (torch.float32, 1e-5), "fp64": (torch.float64, 1e-12)}[precision]
    rows, vocab = (512, 32003) if ctx.scale == "cuda" else (6, 150)
    g = torch.Generator().manual_seed(ctx.seed + 7)
    z64 = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
    z64[0] += 1e3  # a large offset: the online max must hold it
    z64 = z64.to(dtype).double()  # the truth is that of the rounded input
    targets = torch.randint(0, vocab, (rows,), generator=g)
    scale = torch.randn(rows, generator=g, dtype=torch.float64)
    lse64 = torch.logsumexp(z64, dim=1)
    onehot = torch.nn.functional.one_hot(targets, vocab).to(torch.float64)
    truth = [lse64, z64.gather(1, targets[:, None]).squeeze(1), scale[:, None] * (onehot - (z64 - lse64[:, None]).exp())]
    z = z64.to(ctx.device, dtype)
    t_dev = targets.to(ctx.device)
    with shipped.forced(table, cfg, interpreting=ctx.interpreting) as count:
        lse, target = row_softmax_stats(z, t_dev)
        grad = softmax_grad_(z, lse, scale.to(ctx.device, dtype), t_dev)
    # Each row's values carry ~eps * |lse| of the input's own rounding: errors relative to max(1, |lse|).
    row_scale = lse64.abs().clamp_min(1.0)
    err = max(float(((a.double().cpu() - b).abs() / (row_scale if b.dim() == 1 else row_scale[:, None])).max())
              for a, b in zip((lse, target, grad), truth))
    ok = err <= limit and count.launches == 2
    return make_row("configs", table.label, status="ok" if ok else "FAIL", dtype=precision, shape=f"R={rows} V={vocab}",
                    config=label, fused_err=err, limit=limit, value=count.launches,
                    note="row kernels of grad_in_forward vs fp64 formulas" + ("" if count.launches == 2 else
                                                                               ": expected 2 launches"))


def parity_section(ctx: Context, section: str, specs: List[cases.Spec]) -> List[dict]:
    return [guarded(section, spec.name, ctx, lambda spec=spec, i=i: parity(ctx, spec, section, seed=ctx.seed + i))
            for i, spec in enumerate(specs)]


def determinism(ctx: Context) -> List[dict]:
    """Two runs of the sweep case (bf16, KL, bias) with the default options: bitwise-equal results."""
    spec = cases.SWEEP["half"]

    def body() -> dict:
        low, _ = cases.build(spec, ctx.scale, ctx.seed + 7, ctx.device)
        runs = [cases.run(fastpref.fused_logprobs, low, backend="triton", options=fastpref.KernelOptions())
                for _ in range(2)]
        differ = sorted(k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k]))
        note = "bitwise equal: " + ", ".join(sorted(runs[0])) if not differ else "differ: " + ", ".join(differ)
        return make_row("determinism", "two_runs_bitwise_equal", status="ok" if not differ else "FAIL",
                        dtype=spec.precision, shape=shape_label(low), config="KernelOptions()", value=len(differ),
                        note=note)

    return [guarded("determinism", "two_runs_bitwise_equal", ctx, body)]


def _dpo_step(ctx: Context) -> Tuple[Callable[[], None], str]:
    """One FusedDPOLoss forward+backward (4 chosen + 4 rejected sequences, a reference pass), bf16."""
    T, D, V = (256, 1024, 32011) if ctx.scale == "cuda" else (3, 32, 200)
    g = torch.Generator().manual_seed(ctx.seed)
    dt, dev = torch.bfloat16, ctx.device
    weight = (torch.randn(V, D, generator=g) * D ** -0.5).to(dev, dt).requires_grad_()
    hidden = torch.randn(8, T, D, generator=g).to(dev, dt).requires_grad_()
    ref_hidden = torch.randn(8, T, D, generator=g).to(dev, dt)
    targets = torch.randint(0, V, (8, T), generator=g).to(dev)
    targets[:, : T // 4] = -100  # prompt positions
    loss_fn = fastpref.FusedDPOLoss(beta=0.1, backend="triton")

    def step() -> None:
        weight.grad = hidden.grad = None
        loss_fn(weight, hidden, targets, ref_hidden=ref_hidden).loss.backward()

    return step, f"S=8 T={T} D={D} V={V}"


def syncs(ctx: Context) -> List[dict]:
    """Host synchronizations of a FusedDPOLoss forward+backward after a warm-up step (target 0)."""
    def body() -> dict:
        step, shape = _dpo_step(ctx)
        step()  # warm-up: autotuning and compilation sync legitimately
        if ctx.device.type != "cuda":
            return make_row("syncs", "fused_dpo_fwd_bwd", status="skipped", dtype="bf16", shape=shape,
                            note="not measured: needs CUDA (torch.cuda.set_sync_debug_mode); the step ran")
        torch.cuda.synchronize(ctx.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(ctx.device)
        found = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in found})
        return make_row("syncs", "fused_dpo_fwd_bwd", status="ok" if not found else "FAIL", dtype="bf16",
                        shape=shape, value=len(found), limit=0,
                        note=("host syncs at " + ", ".join(where[:10])) if found else "no host sync")

    return [guarded("syncs", "fused_dpo_fwd_bwd", ctx, body)]


def all_sections(ctx: Context) -> List[dict]:
    """Every section in report order."""
    return (config_sweep(ctx) + parity_section(ctx, "parity", cases.PARITY)
            + parity_section(ctx, "bias", cases.BIAS) + parity_section(ctx, "precision", cases.PRECISION)
            + determinism(ctx) + syncs(ctx))
