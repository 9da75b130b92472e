"""``fastpref bench --device cuda --quick``: the issue's two target rows on one GPU, beside the cost model.

Rows (bf16, padded, every position valid; ``bench/workloads.py`` builds the inputs):

- ``dpo``: DPO with a frozen reference head, 8192 tokens per model, D = 4096, V = 128256;
- ``logprobs``: the bare log-prob op, 8192 tokens, D = 4096, V = 151936.

Per row: the measured cuBLAS floor (``gemm-floor``: ``torch.mm`` at the same shapes: logits ``H W^T``,
``dH``, ``dW`` for the policy, plus the reference logits for DPO: four GEMMs), ``fastpref-triton``, for DPO
``fastpref-triton-4gemm`` (``KernelOptions(grad_in_forward=True)``: dH and dW formed in the forward),
``eager`` (full logits), Liger's chunked DPO loss (DPO), Cut Cross-Entropy (log-probs) and TRL's chunked
LM-head path (``trl.kernels``). An implementation whose package is missing is a skipped row naming the
pip extra that installs it. Time: the median of interleaved repeats (the order rotates each round),
each timed with CUDA events; peak memory: ``torch.cuda.max_memory_allocated`` over one step. Ratios: to
the floor and to Liger. Beside each row, ``bench/cost_model.py``'s prediction at the card's published peaks.

``device="cpu-interpret"`` with tiny shapes runs the same code on CPU under Triton's interpreter (a smoke
test for CI: timings there say nothing about a GPU, and the report says so). Writes ``gpu_bench.json``
and ``gpu_bench.md`` under ``out``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import cost_model, measure, runner
from .peers import gib, mib
from .workloads import DPO_BETA, Case, GemmFloor, Impl, Options, build_case, parse_dtype, release

Row = Tuple[str, int, int, int, str]  # workload, tokens, dim, vocab, dtype
QUICK_ROWS: List[Row] = [("dpo", 8192, 4096, 128256, "bf16"), ("logprobs", 8192, 4096, 151936, "bf16")]
TINY_ROWS: List[Row] = [("dpo", 24, 32, 200, "bf16"), ("logprobs", 24, 32, 200, "bf16")]
IMPLS = ("gemm-floor", "fastpref-triton", "fastpref-triton-4gemm", "eager", "liger", "cce", "trl")
EXTRAS = {"liger": "pip install 'fastpref[bench]' (liger-kernel)",
          "cce": "pip install 'fastpref[bench]' (cut-cross-entropy)",
          "trl": "pip install 'fastpref[trl]' (trl>=1.16 has trl.kernels)"}
# The issue's targets (bf16, one H100): checked on GPU rows only.
TARGETS = [("dpo", "time_vs_floor", 1.5), ("dpo", "time_vs_liger", 0.5), ("dpo", "workspace_beyond_dw_mib", 512.0),
           ("logprobs", "time_vs_floor", 1.5)]
FLOOR_PER_ROUND = 3


@dataclass
class Config:
    device: str = "cuda"  # "cuda" or "cpu-interpret"
    out: str = "bench/out/gpu"
    tiny: bool = False
    repeats: Optional[int] = None
    compile: bool = True
    seed: int = 0

    def rows(self) -> List[Row]:
        return TINY_ROWS if self.tiny else QUICK_ROWS

    def num_repeats(self) -> int:
        return self.repeats or (2 if self.tiny else 5)


def _optional(name: str, module: str) -> Optional[str]:
    """None when ``module`` imports, else the skip reason with its pip extra."""
    try:
        __import__(module)
        return None
    except ImportError as exc:
        return f"{module} not importable ({exc}): {EXTRAS[name]}"


def implementations(case: Case, cfg: Config) -> Tuple[List[Impl], Dict[str, str]]:
    """The peers that run on ``case`` and, for the others, why not."""
    from . import peers, workloads

    cuda, t = case.device.type == "cuda", case.tensors
    ready: List[Impl] = [Impl("fastpref-triton", workloads._fastpref(case, "triton"), note="backend='triton'")]
    skipped: Dict[str, str] = {}
    if case.workload in workloads.FOUR_GEMM_WORKLOADS:
        ready.append(Impl("fastpref-triton-4gemm", workloads._fastpref(case, "triton", grad_in_forward=True),
                          note="KernelOptions(grad_in_forward=True): dH, dW in the forward"))
    else:
        skipped["fastpref-triton-4gemm"] = "the loss couples the batch or is the bare op: no in-forward gradients"
    logits = peers.logits_bytes(case.tokens, case.vocab) * (2 if case.workload == "dpo" else 1)
    budget = torch.cuda.get_device_properties(case.device).total_memory if cuda else float("inf")
    if 4 * logits > 0.8 * budget:
        skipped["eager"] = f"would hold ~{gib(4 * logits):.0f} GiB of fp32 logits (> 80% of the card)"
    else:
        ready.append(Impl("eager", workloads._eager(case), note="naive full logits"))
    if case.workload != "dpo":
        skipped["liger"] = "Liger's chunked loss is the DPO row's peer"
    elif _optional("liger", "liger_kernel.chunked_loss") is not None:
        skipped["liger"] = _optional("liger", "liger_kernel.chunked_loss")
    else:
        compiled = cfg.compile and cuda
        run = peers.liger_dpo(DPO_BETA, compiled=compiled)
        ready.append(Impl("liger", lambda: run(t["weight"], t["hidden"], t["targets"], t["ref_hidden"], t["ref_weight"]),
                          note="LigerFusedLinearDPOLoss" + ("" if compiled else ", compiled=False"), compiled=compiled))
    if case.workload != "logprobs":
        skipped["cce"] = "CCE computes per-token log-probs only: the log-prob row's peer"
    elif _optional("cce", "cut_cross_entropy") is not None:
        skipped["cce"] = _optional("cce", "cut_cross_entropy")
    elif not cuda:
        skipped["cce"] = "CCE's kernels need CUDA (its CPU path is torch.compile only): not in the CPU smoke"
    else:
        run_cce, impl = peers.cce_token_logps(case.device)
        ready.append(Impl("cce", lambda: run_cce(t["hidden"], t["weight"], t["targets"]).sum(), note=f"impl={impl}"))
    try:
        ready.append(Impl("trl", workloads._trl(case), note="trl.kernels.ChunkedLogProbFunction"))
    except ImportError as exc:
        skipped["trl"] = f"no chunked LM-head path in the installed TRL ({exc}): {EXTRAS['trl']}"
    return ready, skipped


def time_interleaved(steps: Dict[str, Callable[[], None]], repeats: int, device: torch.device,
                     before_each: Callable[[], None]) -> Dict[str, List[float]]:
    """Seconds of each step, ``repeats`` rounds with the order rotated each round (the floor
    ``FLOOR_PER_ROUND`` times a round); CUDA events on a GPU, a synchronized wall clock elsewhere."""
    names = list(steps)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with measure.frozen_gc():
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                for _ in range(FLOOR_PER_ROUND if name == "gemm-floor" else 1):
                    before_each()
                    measure.sync(device)
                    if device.type == "cuda":
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        steps[name]()
                        end.record()
                        end.synchronize()
                        times[name].append(start.elapsed_time(end) / 1e3)
                    else:
                        t0 = time.perf_counter()
                        steps[name]()
                        times[name].append(time.perf_counter() - t0)
    return times


def _peak(step: Callable[[], None], device: torch.device) -> Optional[int]:
    try:
        return measure.peak_step_bytes(step, device)
    except ImportError:  # memray (CPU memory) not installed
        return None


def measure_row(row: Row, cfg: Config, device: torch.device,
                card: Optional[cost_model.Card]) -> Tuple[List[dict], List[dict]]:
    """Measured rows and skipped peers of one (workload, shape)."""
    workload, tokens, dim, vocab, dtype = row
    case = build_case(workload, tokens, dim, vocab, parse_dtype(dtype), device, seed=cfg.seed)
    key = dict(workload=workload, tokens=case.tokens, dim=dim, vocab=vocab, dtype=dtype, device=cfg.device)
    impls, skipped = implementations(case, cfg)
    skips = [{**key, "impl": k, "reason": v} for k, v in skipped.items()]
    ready, warmup = [], {}
    for impl in impls:
        try:
            done, seconds, reason = runner._warm_up(impl, case, Options(compile=cfg.compile))
        except Exception as exc:  # one failing implementation must not hide the other rows
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            done, seconds, reason = None, 0.0, f"FAILED: {type(exc).__name__}: {first_line}"
        if done is None:
            skips.append({**key, "impl": impl.name, "reason": reason})
        else:
            ready.append(done)
            warmup[done.name] = seconds
    peaks, grads = {}, {}
    for impl in ready:
        release(case.params)
        peaks[impl.name] = _peak(lambda: measure.fwd_bwd(impl.step), device)
        grads[impl.name] = sum(p.grad.numel() * p.grad.element_size() for p in case.params if p.grad is not None)
        release(case.params)
    floor = GemmFloor(case)
    floor.step()
    steps = {"gemm-floor": floor.step, **{i.name: (lambda s=i.step: measure.fwd_bwd(s)) for i in ready}}
    params = case.params
    times = time_interleaved(steps, cfg.num_repeats(), device, before_each=lambda: release(params))
    release(params)
    floor_s = statistics.median(times["gemm-floor"])
    liger = statistics.median(times["liger"]) if "liger" in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        pred = cost_model.predict(name, workload, case.tokens, dim, vocab, dtype, card)
        tracked = peaks.get(name)
        ws = None if tracked is None else tracked - grads[name]
        rows.append({
            **key, "impl": name, "time_s": med, "time_min_s": min(ts), "times_s": ts, "warmup_s": warmup.get(name),
            "peak_bytes": None if tracked is None else tracked + case.input_bytes(), "tracked_bytes": tracked,
            "workspace_bytes": ws,
            "workspace_beyond_dw_mib": None if ws is None or name != "fastpref-triton" else mib(ws - 4 * vocab * dim),
            "time_vs_floor": med / floor_s, "time_vs_liger": med / liger if liger else None,
            "prediction": pred.to_dict(), "time_vs_predicted": med / pred.time_s if pred.time_s else None,
            "note": next((i.note for i in ready if i.name == name),
                         f"torch.mm: {case.floor_label()} (preallocated; no memory figure)"),
        })
    return rows, skips


def targets(rows: List[dict], on_gpu: bool) -> List[dict]:
    """The issue's targets on the fastpref-triton rows (met: None when not measured on a GPU)."""
    out = []
    for workload, field, limit in TARGETS:
        row = next((r for r in rows if r["workload"] == workload and r["impl"] == "fastpref-triton"), None)
        value = None if row is None else row.get(field)
        met = None if (value is None or not on_gpu) else value <= limit
        out.append({"workload": workload, "target": f"{field} <= {limit}", "value": value, "met": met,
                    "note": "" if on_gpu else "not measured on a GPU"})
    return out


def _machine(cfg: Config, card: Optional[cost_model.Card]) -> str:
    if cfg.device == "cuda":
        name = torch.cuda.get_device_name()
        return f"GPU {name} ({'cost model: ' + card.name if card else 'unknown card: no cost-model prediction'})"
    return ("CPU only, Triton interpreter (TRITON_INTERPRET=1), tiny shapes: a smoke run of the command; "
            "no number here is a GPU measurement")


def run(cfg: Config) -> dict:
    """Measure every row, write ``gpu_bench.json`` and ``gpu_bench.md`` under ``cfg.out``."""
    if cfg.device not in ("cuda", "cpu-interpret"):
        raise ValueError(f"--device must be 'cuda' or 'cpu-interpret' here, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if cfg.device == "cpu-interpret" and (os.environ.get("TRITON_INTERPRET") != "1" or not cfg.tiny):
        raise ValueError("--device cpu-interpret is a test-only smoke: set TRITON_INTERPRET=1 and pass --tiny")
    start = time.perf_counter()
    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    card = cost_model.card_for(torch.cuda.get_device_name()) if cfg.device == "cuda" else None
    rows, skipped = [], []
    for row in cfg.rows():
        measured, skips = measure_row(row, cfg, device, card)
        rows += measured
        skipped += skips
        if device.type == "cuda":  # the row's inputs and buffers died with measure_row
            torch.cuda.empty_cache()
    results = {
        "meta": {"machine": _machine(cfg, card), "device": cfg.device, "card": card.name if card else None,
                 "torch": torch.__version__, "platform": platform.platform(), "repeats": cfg.num_repeats(),
                 "compile": cfg.compile, "elapsed_s": round(time.perf_counter() - start, 1),
                 "packages": runner.environment(runner.Config(device="cpu"))},
        "rows": rows, "skipped": skipped, "targets": targets(rows, cfg.device == "cuda"),
    }
    os.makedirs(cfg.out, exist_ok=True)
    paths = {"json": os.path.join(cfg.out, "gpu_bench.json"), "md": os.path.join(cfg.out, "gpu_bench.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    results["files"] = paths
    return results


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(results: dict) -> str:
    """The report: machine, one table of measured rows with the prediction beside each, targets, skips."""
    meta = results["meta"]
    lines = ["# fastpref GPU benchmark", "", f"Machine: {meta['machine']}", "",
             f"torch {meta['torch']}; median of {meta['repeats']} interleaved repeats (CUDA events on a GPU); "
             f"{meta['elapsed_s']} s. Prediction: bench/cost_model.py (roofline at the card's published peaks).", "",
             "| workload | N | D | V | dtype | impl | time ms | min ms | vs floor | vs liger | peak GiB | workspace MiB "
             "| predicted ms | bound | measured / predicted | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        p = r["prediction"]
        pred_ms = None if p["time_s"] is None else 1e3 * p["time_s"]
        lines.append(
            f"| {r['workload']} | {r['tokens']} | {r['dim']} | {r['vocab']} | {r['dtype']} | {r['impl']} | "
            f"{1e3 * r['time_s']:.2f} | {1e3 * r['time_min_s']:.2f} | {_num(r['time_vs_floor'], '.2f')} | "
            f"{_num(r['time_vs_liger'], '.2f')} | {_num(r['peak_bytes'] and gib(r['peak_bytes']), '.2f')} | "
            f"{_num(r['workspace_bytes'] and mib(r['workspace_bytes']), '.0f')} | {_num(pred_ms, '.2f')} | "
            f"{p['bound'] or '-'} | {_num(r['time_vs_predicted'], '.2f')} | {r['note'] or p['note']} |")
    lines += ["", "## Targets (fastpref-triton)", "", "| workload | target | value | met | note |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['workload']} | {t['target']} | {_num(t['value'], '.3f')} | "
                     f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} | {t['note']} |")
    lines += ["", "## Skipped", "", "| workload | impl | reason |", "|---|---|---|"]
    lines += [f"| {s['workload']} | {s['impl']} | {s['reason']} |" for s in results["skipped"]]
    return "\n".join(lines) + "\n"
