"""The benchmark grid and its driver: ``run(config)`` measures every row and writes the reports.

For each shape: build the inputs once, run each implementation once untracked (the compiled peers'
compile time is reported as ``warmup_s``), measure each implementation's memory in its own tracked step,
then time all implementations and the GEMM floor interleaved.
"""
from __future__ import annotations

import itertools
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import measure, peers, report
from .workloads import (
    DPO_BETA,
    IMPLEMENTATIONS,
    WORKLOADS,
    Case,
    GemmFloor,
    Impl,
    Options,
    build_case,
    fmt_dtype,
    implementations,
    parse_dtype,
    release,
)

Shape = Tuple[int, int, int, str]  # tokens, dim, vocab, dtype

# --quick: under 3 minutes on 2 shared CPU cores, torch.compile warm-up of Liger and CCE included. Every loss at
# N=256, V=32k; DPO also at N=512 (time vs N) and V=128k (memory vs V): the plots in bench/results/
QUICK_SHAPES: List[Shape] = [(256, 128, 32000, "fp32"), (512, 128, 32000, "fp32"), (256, 128, 128256, "fp32")]
QUICK_ALL_LOSSES: Tuple[Shape, ...] = ((256, 128, 32000, "fp32"),)
QUICK_PLOT_LOSSES = ("dpo",)
# --quick runs with one torch thread unless --threads says otherwise: on a shared 2-core machine, two OpenMP
# threads wait on each other at every op and code made of many tile-sized ops (fastpref's torch backend,
# TRL's chunked kernels) slows down several times more than code made of a few big ones.
QUICK_THREADS = 1
# The full grid: time vs N at V = 32k (the DPO target row is N=4096, D=1024, V=32000, fp32), memory vs V at
# N = 1024 (32k, 128k, 256k vocabularies), D = 4096 at N = 1024, V = 32k, and bf16 rows over the same V set.
FULL_SHAPES: List[Shape] = (
    [(n, 1024, 32000, "fp32") for n in (1024, 2048, 4096)]
    + [(1024, 1024, v, "fp32") for v in (128256, 256000)]
    + [(1024, 4096, 32000, "fp32")]
    + [(1024, 1024, v, "bf16") for v in (32000, 128256, 256000)]
)
# The GEMM floor is cheap next to the implementations: it is timed this many times per round, and its fastest
# sample is the floor the ratios use.
FLOOR_TIMES_PER_ROUND = 3
# Implementations that allocate full [tokens x V] logits are skipped above this estimated footprint.
DEFAULT_MAX_LOGITS_GIB = 8.0
MATERIALIZING = ("eager", "cce")


@dataclass
class Config:
    quick: bool = False
    out: str = "bench/out"
    device: str = "cpu"
    workloads: Sequence[str] = WORKLOADS
    impls: Sequence[str] = IMPLEMENTATIONS
    shapes: Optional[List[Shape]] = None  # None: the quick or full grid
    repeats: Optional[int] = None
    compile: bool = True
    plots: bool = True
    seed: int = 0
    max_logits_gib: float = DEFAULT_MAX_LOGITS_GIB
    show: bool = True  # rich table and progress bar on the terminal
    threads: Optional[int] = None  # torch.set_num_threads; None keeps torch's default

    def grid(self) -> List[Shape]:
        return list(self.shapes) if self.shapes else (QUICK_SHAPES if self.quick else FULL_SHAPES)

    def jobs(self) -> List[Tuple[str, Shape]]:
        """(workload, shape) pairs in run order: the grid x the workloads (--quick: see QUICK_SHAPES)."""
        quick = self.quick and not self.shapes
        return [(w, s) for s in self.grid() for w in self.workloads
                if not quick or s in QUICK_ALL_LOSSES or w in QUICK_PLOT_LOSSES]

    def num_threads(self) -> Optional[int]:
        return self.threads or (QUICK_THREADS if self.quick else None)

    def num_repeats(self) -> int:
        return self.repeats or (3 if self.quick else 5)


def shapes_from(tokens: Sequence[int], dims: Sequence[int], vocabs: Sequence[int],
                dtypes: Sequence[str]) -> List[Shape]:
    """The cartesian product of the given values, as grid rows."""
    return [(n, d, v, dt) for dt, d, v, n in itertools.product(dtypes, dims, vocabs, tokens)]


@dataclass
class RowResult:
    rows: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)


def _warm_up(impl: Impl, case: Case, opts: Options) -> Tuple[Optional[Impl], float, str]:
    """Run ``impl`` once (compilation happens here). If torch.compile fails, Liger falls back to
    compiled=False and CCE is dropped (None); the reason is returned either way."""
    start = time.perf_counter()
    try:
        measure.fwd_bwd(impl.step)
        measure.sync(case.device)
        return impl, time.perf_counter() - start, ""
    except Exception as exc:  # torch.compile can fail on a machine without a working C++ toolchain
        if not impl.compiled:
            raise
        reason = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
        if impl.name != "liger":
            return None, 0.0, reason
        t = case.tensors
        run = peers.liger_dpo(DPO_BETA, compiled=False)
        fallback = Impl("liger", lambda: run(t["weight"], t["hidden"], t["targets"], t["ref_hidden"], t["ref_weight"]),
                        note=f"compiled=False: {reason}")
        start = time.perf_counter()
        measure.fwd_bwd(fallback.step)
        return fallback, time.perf_counter() - start, reason
    finally:
        release(case.params)


def measure_shape(workload: str, shape: Shape, cfg: Config, opts: Options, progress=None) -> RowResult:
    tokens, dim, vocab, dtype_name = shape
    device = torch.device(cfg.device)
    case = build_case(workload, tokens, dim, vocab, parse_dtype(dtype_name), device, seed=cfg.seed)
    out = RowResult()
    key = dict(workload=workload, tokens=case.tokens, dim=dim, vocab=vocab, dtype=fmt_dtype(case.dtype),
               device=device.type)
    impls, skipped = implementations(case, opts)
    logits_gib = peers.gib(peers.logits_bytes(case.tokens, vocab))
    # Eager holds ~4 logits-sized tensors at its peak (logits, log-softmax, their grads); the floor 2.
    too_big = 4 * logits_gib > cfg.max_logits_gib
    if too_big:
        for impl in [i for i in impls if i.name in MATERIALIZING]:
            skipped[impl.name] = f"would materialize ~{4 * logits_gib:.1f} GiB of logits (> --max-logits-gib)"
        impls = [i for i in impls if i.name not in MATERIALIZING]
    for name, why in skipped.items():
        out.skipped.append({**key, "impl": name, "reason": why})

    # One untracked step per implementation first: torch.compile runs here (its time is reported), and
    # one-time allocations (GEMM-library buffers, lazy imports) stay out of everyone's memory figures.
    phase_start = time.perf_counter()
    phases: Dict[str, float] = {}
    warmup: Dict[str, float] = {}
    for i, impl in enumerate(impls):
        if progress:
            progress(f"{workload} N={case.tokens} V={vocab}: warm-up {impl.name}")
        impls[i], seconds, reason = _warm_up(impl, case, opts)
        if impls[i] is None:
            out.skipped.append({**key, "impl": impl.name, "reason": reason})
        elif impl.compiled:
            warmup[impl.name] = seconds
    impls = [i for i in impls if i is not None]

    phases["warmup_s"] = time.perf_counter() - phase_start
    label = f"{workload} N={case.tokens} V={vocab}"
    tracked, grads = _measure_memory(impls, case, label, progress) if opts.memory else ({}, {})

    phases["memory_s"] = time.perf_counter() - phase_start - phases["warmup_s"]
    steps = {impl.name: (lambda s=impl.step: measure.fwd_bwd(s)) for impl in impls}
    floor = None
    if 2 * logits_gib <= cfg.max_logits_gib:
        floor = GemmFloor(case)
        floor.step()
        steps["gemm-floor"] = floor.step
    if progress:
        progress(f"{workload} N={case.tokens} V={vocab}: timing")
    timings = measure.time_interleaved(steps, cfg.num_repeats(), device, before_each=lambda: release(case.params),
                                       per_round={"gemm-floor": FLOOR_TIMES_PER_ROUND})
    release(case.params)
    # The floor is a lower bound: contention only adds to it, so its fastest sample is its estimate.
    floor_times = timings["gemm-floor"].times_s if floor is not None else None
    floor_s = min(floor_times) if floor_times else None
    floor_median_s = timings["gemm-floor"].median if floor_times else None
    del floor
    phases["timing_s"] = time.perf_counter() - phase_start - phases["warmup_s"] - phases["memory_s"]

    inputs = case.input_bytes()
    for impl in impls:
        tm = timings[impl.name]
        mem = tracked.get(impl.name)
        out.rows.append({
            **key, "impl": impl.name, "time_s": tm.median, "time_min_s": min(tm.times_s), "time_spread": tm.spread,
            "times_s": tm.times_s,
            "warmup_s": warmup.get(impl.name), "input_bytes": inputs, "grad_bytes": grads.get(impl.name),
            "tracked_bytes": mem, "peak_bytes": None if mem is None else inputs + mem,
            "workspace_bytes": None if mem is None else mem - grads[impl.name],
            "memory": None if mem is not None else MEMORY_NOT_MEASURED, "floor_s": floor_s,
            "floor_median_s": floor_median_s, "floor_times_s": floor_times, "floor_gemms": case.floor_label(),
            "note": impl.note, "row_phases_s": {k: round(v, 2) for k, v in phases.items()},
        })
    add_ratios(out.rows)
    return out


def _measure_memory(impls: List[Impl], case: Case, label: str, progress=None) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Each implementation's tracked peak and gradient bytes, one fwd+bwd step each (see measure.py)."""
    tracked: Dict[str, int] = {}
    grads: Dict[str, int] = {}
    with measure.frozen_gc():  # the gc.collect() before each memory run then costs nothing
        for impl in impls:
            if progress:
                progress(f"{label}: memory {impl.name}")
            release(case.params)
            tracked[impl.name] = measure.peak_step_bytes(lambda: measure.fwd_bwd(impl.step), case.device)
            grads[impl.name] = sum(p.grad.numel() * p.grad.element_size() for p in case.params if p.grad is not None)
            release(case.params)
    return tracked, grads


PEERS = ("eager", "trl", "liger")


def add_ratios(rows: List[dict]) -> None:
    """Ratios to the peers of the same shape (time: t / t_peer, of the medians and of the best repeats;
    workspace: ws_peer / ws = 'x below') and to the GEMM floor (``floor_s``: the fastest floor sample)."""
    by_name = {r["impl"]: r for r in rows}
    for r in rows:
        for peer in PEERS:
            p = by_name.get(peer)
            r[f"time_vs_{peer}"] = r["time_s"] / p["time_s"] if p else None
            r[f"best_time_vs_{peer}"] = r["time_min_s"] / p["time_min_s"] if p else None
            measured = p and p.get("workspace_bytes") is not None and r.get("workspace_bytes") is not None
            r[f"workspace_below_{peer}"] = (p["workspace_bytes"] / max(r["workspace_bytes"], 1)) if measured else None
        r["time_vs_floor"] = r["time_s"] / r["floor_s"] if r["floor_s"] else None
        r["best_time_vs_floor"] = r["time_min_s"] / r["floor_s"] if r["floor_s"] else None


# The targets (CPU, fp32, same run) for DPO with reference at N=4096, D=1024, V=32000.
TARGET_SHAPE = dict(workload="dpo", tokens=4096, dim=1024, vocab=32000, dtype="fp32")


def evaluate_targets(rows: List[dict]) -> List[dict]:
    """Check the fastpref-torch row of the target shape, when this run has it: time ratios from the
    medians and, because a shared machine only ever adds time, from the best of the repeats too."""
    sel = {r["impl"]: r for r in rows if all(r[k] == v for k, v in TARGET_SHAPE.items()) and r["device"] == "cpu"}
    fp = sel.get("fastpref-torch")
    if fp is None:
        return []
    checks = []

    def add(what, value, limit, at_most):
        met = None if value is None else (value <= limit if at_most else value >= limit)
        checks.append({"target": what, "value": value, "limit": limit, "met": met})

    for prefix, label in (("", "median"), ("best_", "best")):
        add(f"time / eager <= 1.0 ({label})", fp[f"{prefix}time_vs_eager"], 1.0, True)
        add(f"time / liger <= 0.85, i.e. >= 15% faster ({label})", fp[f"{prefix}time_vs_liger"], 0.85, True)
        add(f"time / GEMM floor <= 1.35 ({label})", fp[f"{prefix}time_vs_floor"], 1.35, True)
        if fp.get(f"{prefix}time_vs_trl") is not None:  # eager as TRL 1.16 computes it (chunked LM head)
            add(f"time / trl <= 1.0 ({label})", fp[f"{prefix}time_vs_trl"], 1.0, True)
    add("workspace >= 10x below liger", fp["workspace_below_liger"], 10.0, False)
    add("workspace >= 40x below eager", fp["workspace_below_eager"], 40.0, False)
    four = sel.get("fastpref-torch-4gemm")  # KernelOptions(grad_in_forward=True): the "with item 2" targets
    if four is not None:
        for prefix, label in (("", "median"), ("best_", "best")):
            add(f"4gemm: time / eager <= 1.0 ({label})", four[f"{prefix}time_vs_eager"], 1.0, True)
            add(f"4gemm: time / liger <= 0.85 ({label})", four[f"{prefix}time_vs_liger"], 0.85, True)
            add(f"4gemm: time / GEMM floor <= 1.2 ({label})", four[f"{prefix}time_vs_floor"], 1.2, True)
        add("4gemm: workspace below liger's (a group's logits, not flat in V)", four["workspace_below_liger"], 1.0,
            False)
    return checks


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(cfg: Config) -> dict:
    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": cfg.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    if cfg.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    model = _cpu_model()
    if model:
        info["cpu_model"] = model
    for pkg in ("trl", "liger_kernel", "cut_cross_entropy", "memray", "triton"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            info[pkg] = None
    return info


MEMORY_NOT_MEASURED = "not measured (memray missing)"
# The one workload a peer is measured on (the others skip it anyway, so its package is not needed there).
PEER_WORKLOAD = {"liger": "dpo", "cce": "logprobs"}


def missing_dependencies(cfg: Config) -> List[dict]:
    """The optional modules this run needs that are not installed (looked up, not imported), each as
    ``{module, install, needed_for, effect}``; the run goes on without them."""
    needs = []
    if cfg.device == "cpu":
        needs.append(("memray", "CPU memory", f"memory columns {MEMORY_NOT_MEASURED}"))
    if cfg.plots:
        needs.append(("matplotlib", "the PNG plots", "no plots (results.json and results.md are still written)"))
    if cfg.show:
        needs.append(("rich", "the progress bar and table", "a plain-text table"))
    for impl, modules in peers.PEER_MODULES.items():
        workload = PEER_WORKLOAD.get(impl)
        if impl in cfg.impls and (workload is None or workload in cfg.workloads):
            needs += [(m, f"the {impl} peer", f"{impl} skipped") for m in modules]
    return [dict(module=m, install=peers.install_hint(m), needed_for=what, effect=effect)
            for m, what, effect in needs if not peers.is_installed(m)]


def dependency_note(dep: dict) -> str:
    """One line for a missing optional module: what it is for, what the run does without it, how to install."""
    return f"{dep['module']} is not installed ({dep['needed_for']}): {dep['effect']}; install with {dep['install']}"


def run(cfg: Config) -> dict:
    """Measure the grid, write results.json / results.md / PNGs under ``cfg.out``, return the results.

    Missing optional packages (memray, matplotlib, rich, the peers) are reported first, one line each with
    the pip extra that installs them, and the run goes on without them (see ``missing_dependencies``)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    for w in cfg.workloads:
        if w not in WORKLOADS:
            raise ValueError(f"--losses: unknown workload {w!r}; choose from {WORKLOADS}")
    missing = missing_dependencies(cfg)
    if cfg.show:
        for dep in missing:
            print(f"fastpref bench: {dependency_note(dep)}", file=sys.stderr)
    gone = {d["module"] for d in missing}
    unavailable = {impl: f"{', '.join(m for m in mods if m in gone)} not installed: {peers.install_hint(mods[0])}"
                   for impl, mods in peers.PEER_MODULES.items() if gone & set(mods)}
    opts = Options(compile=cfg.compile, impls=tuple(cfg.impls), unavailable=unavailable, memory="memray" not in gone)
    threads_before = torch.get_num_threads()
    if cfg.num_threads():
        torch.set_num_threads(cfg.num_threads())
    try:
        return _run(cfg, opts, missing)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Config, opts: Options, missing: List[dict]) -> dict:
    started = time.perf_counter()
    env = environment(cfg)
    gone = {d["module"] for d in missing}
    env["memory"] = ("torch.cuda.max_memory_allocated" if cfg.device == "cuda" else
                     "memray" if opts.memory else MEMORY_NOT_MEASURED)
    if cfg.device == "cpu" and opts.memory:
        env["memray_empty_region_bytes"] = measure.memray_overhead_bytes()
    rows: List[dict] = []
    skipped: List[dict] = []
    jobs = cfg.jobs()
    with report.Progress(len(jobs), enabled=cfg.show and "rich" not in gone) as bar:
        for workload, shape in jobs:
            res = measure_shape(workload, shape, cfg, opts, progress=bar.describe)
            rows += res.rows
            skipped += res.skipped
            bar.advance()
    if hasattr(os, "getloadavg"):
        env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    results = {
        "meta": env,
        "config": {"grid": "custom" if cfg.shapes else ("quick" if cfg.quick else "full"), "quick": cfg.quick,
                   "repeats": cfg.num_repeats(), "compile": cfg.compile, "threads": torch.get_num_threads(),
                   "workloads": list(cfg.workloads), "impls": list(cfg.impls),
                   "shapes": [list(s) for s in cfg.grid()], "jobs": [[w, list(s)] for w, s in jobs],
                   "max_logits_gib": cfg.max_logits_gib},
        "rows": rows, "skipped": skipped, "targets": evaluate_targets(rows),
        "missing_dependencies": missing, "notes": [dependency_note(d) for d in missing],
    }
    paths = report.write_all(results, cfg.out, plots=cfg.plots and "matplotlib" not in gone)
    results["files"] = paths
    if cfg.show:
        report.print_table(results)
    return results
