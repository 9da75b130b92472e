"""Reports: rich progress bar and table, ``results.json``, ``results.md`` and PNG plots."""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

from .peers import is_installed, mib

IMPL_ORDER = ("eager", "trl", "liger", "cce", "fastpref-torch", "fastpref-torch-4gemm", "fastpref-triton",
              "fastpref-triton-4gemm")


class Progress:
    """A rich progress bar over benchmark rows (a no-op when disabled)."""

    def __init__(self, total: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("fastpref bench", total=self.total)
        return self

    def describe(self, text: str) -> None:
        if self.enabled:
            self._bar.update(self._task, description=text)

    def advance(self) -> None:
        if self.enabled:
            self._bar.advance(self._task)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.update(self._task, description="fastpref bench: done")
            self._bar.__exit__(*exc)
        return False


def _ratio(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratios(r: dict, key: str) -> str:
    """'median ratio (best-repeat ratio)', or '-' without that peer."""
    if r.get(key) is None:
        return "-"
    return f"{_ratio(r[key])} ({_ratio(r.get('best_' + key))})"


def _mib(num_bytes: Optional[int]) -> str:
    return "not measured" if num_bytes is None else f"{mib(num_bytes):.1f}"


def _below(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.0f}x" if x >= 10 else f"{x:.1f}x")


def _sorted(rows: List[dict]) -> List[dict]:
    order = {n: i for i, n in enumerate(IMPL_ORDER)}
    return sorted(rows, key=lambda r: (r["workload"], r["dtype"], r["dim"], r["vocab"], r["tokens"],
                                       order.get(r["impl"], 99)))


COLUMNS = ["loss", "N", "D", "V", "dtype", "impl", "time ms", "best ms", "spread", "x eager", "x TRL", "x Liger",
           "x GEMM floor", "peak MiB", "workspace MiB", "ws below eager", "ws below TRL", "ws below Liger"]
TEXT_COLUMNS = ("loss", "impl", "dtype")
IMPL_WIDTH = max(len(n) for n in IMPL_ORDER)


def table_rows(results: dict) -> List[List[str]]:
    out = []
    for r in _sorted(results["rows"]):
        out.append([r["workload"], str(r["tokens"]), str(r["dim"]), str(r["vocab"]), r["dtype"], r["impl"],
                     f"{1e3 * r['time_s']:.1f}", f"{1e3 * r['time_min_s']:.1f}", f"{100 * r['time_spread']:.0f}%",
                     _ratios(r, "time_vs_eager"), _ratios(r, "time_vs_trl"), _ratios(r, "time_vs_liger"),
                     _ratios(r, "time_vs_floor"), _mib(r.get("peak_bytes")),
                     _mib(r.get("workspace_bytes")), _below(r.get("workspace_below_eager")),
                     _below(r.get("workspace_below_trl")), _below(r.get("workspace_below_liger"))])
    return out


def print_table(results: dict) -> None:
    """The results table on the terminal: rich when installed, else the Markdown table as plain text."""
    if not is_installed("rich"):
        print("\n".join(["| " + " | ".join(COLUMNS) + " |"] + ["| " + " | ".join(r) + " |" for r in table_rows(results)]
                        + [f"{name}: {path}" for name, path in results.get("files", {}).items()]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fastpref bench: forward+backward, median (best) of interleaved repeats")
    for c in COLUMNS:
        if c == "impl":  # never truncated: IMPL_WIDTH fits the longest name
            table.add_column(c, justify="left", no_wrap=True, min_width=IMPL_WIDTH)
        else:
            table.add_column(c, justify="left" if c in TEXT_COLUMNS else "right")
    for row in table_rows(results):
        style = "bold green" if row[5].startswith("fastpref") else None
        table.add_row(*row, style=style)
    console = Console(width=max(Console().width, CONSOLE_MIN_WIDTH))
    console.print(table)
    for t in results.get("targets", []):
        console.print(f"target {t['target']}: {_ratio(t['value'])} -> {'met' if t['met'] else 'MISSED'}")
    for name, path in results.get("files", {}).items():
        console.print(f"{name}: {path}")


CONSOLE_MIN_WIDTH = 220


def machine_line(meta: dict, cfg: dict) -> str:
    """Where the numbers came from: machine, threads, load, repeats (also quoted by the README)."""
    cpu = f"{meta['cpu_model']}, " if meta.get("cpu_model") else ""
    gpu = f"GPU {meta['gpu']}; " if meta.get("gpu") else ""
    return (f"{meta['started']}; {cpu}{meta['cpu_count']} cores, {meta['platform']}; {gpu}torch {meta['torch']} with "
            f"{meta['torch_threads']} threads; load average {meta.get('load_avg_start')} at start, "
            f"{meta.get('load_avg_end')} at end (1, 5, 15 min); {cfg['repeats']} interleaved repeats per row; "
            f"{meta['elapsed_s']} s in all.")


def markdown(results: dict) -> str:
    meta, cfg = results["meta"], results["config"]
    lines = [
        f"### fastpref bench ({cfg['grid']} grid, {meta['device']})",
        "",
        machine_line(meta, cfg),
        "",
        "Forward + backward of the whole loss. `time ms`: median; `best ms`: fastest repeat; "
        "`spread`: (max - min) / median. "
        "`x eager`, `x TRL`, `x Liger`: this time / the peer's, as `median (best)`: the ratio of the medians and, in "
        "brackets, of the fastest repeats (lower is faster). `x GEMM floor`: this median (best) / the fastest "
        "GEMM-floor sample. `eager` = naive full logits; `trl` = TRL "
        f"{meta.get('trl') or '(not installed)'}'s chunked LM-head kernels. `peak`: inputs + the step's "
        "own peak allocation (gradients included); `workspace`: peak minus inputs and gradients; "
        f"`ws below X`: X's workspace / this workspace. Memory is {_memory_method(meta)}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    floors = {}
    for r in results["rows"]:
        floors[(r["workload"], r["tokens"], r["dim"], r["vocab"], r["dtype"])] = (
            r["floor_s"], r.get("floor_median_s"), len(r.get("floor_times_s") or []), r["floor_gemms"])
    lines += ["", "GEMM floor per row (same run, interleaved with the implementations): the plain products an "
              "unfused implementation needs, `policy` = H W^T, G W and G^T H (three products) and `ref` = "
              "H_ref W_ref^T (one more: with a live reference, as in DPO and MC-PO, the floor is four products, "
              "since every implementation must compute the reference's logits too). Timed several times per round; "
              "the fastest sample is the floor (median in brackets):", ""]
    for (w, n, d, v, dt), (s, med, k, label) in sorted(floors.items()):
        lines.append(f"- {w} N={n} D={d} V={v} {dt}: {label} = "
                     + ("not measured (too large)" if s is None else
                        f"{1e3 * s:.1f} ms (median {1e3 * med:.1f} ms of {k})" if med else f"{1e3 * s:.1f} ms"))
    notes = sorted({(r["impl"], r["note"]) for r in results["rows"] if r["note"]})
    warm = [r for r in results["rows"] if r.get("warmup_s")]
    if notes or warm or results["skipped"] or results.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in results.get("notes", [])]  # missing packages, a failed plot
        lines += [f"- {impl}: {note}" for impl, note in notes]
        if warm:
            lines.append("- first-call (torch.compile) warm-up, excluded from the times: "
                         + ", ".join(f"{r['impl']} {r['workload']} N={r['tokens']} V={r['vocab']}: {r['warmup_s']:.1f} s"
                                     for r in warm))
        reasons = defaultdict(set)
        for s in results["skipped"]:
            reasons[(s["impl"], s["reason"])].add(s["workload"])
        lines += [f"- {impl} not run for {', '.join(sorted(ws))}: {why}" for (impl, why), ws in sorted(reasons.items())]
    if meta.get("memray_empty_region_bytes") is not None:
        lines.append(f"- memray reports {meta.get('memray_empty_region_bytes', 0)} bytes for an empty tracked region; "
                     "it slows allocation, so memory and timing runs are separate.")
    if results.get("targets"):
        lines += ["", TARGETS_HEADING, ""]
        lines += [f"- {t['target']}: {_ratio(t['value'])} ({'met' if t['met'] else 'missed'})"
                  for t in results["targets"]]
    return "\n".join(lines) + "\n"


def _memory_method(meta: dict) -> str:
    """How memory was measured (results written before ``meta['memory']`` existed: from the device)."""
    method = meta.get("memory") or ("memray" if meta["device"] == "cpu" else "torch.cuda.max_memory_allocated")
    return "measured with memray (each implementation in its own tracked region)" if method == "memray" else method


TARGETS_HEADING = "Targets (DPO with reference, N=4096, D=1024, V=32000, fp32, fastpref torch backend):"


def _series(rows: List[dict], x_key: str, fixed_keys: tuple) -> Dict[tuple, Dict[str, List[tuple]]]:
    """Group rows into plots: for each (workload, fixed values) the (x, row) points of each impl."""
    groups: Dict[tuple, Dict[str, List[tuple]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["workload"],) + tuple(r[k] for k in fixed_keys)][r["impl"]].append((r[x_key], r))
    return {k: v for k, v in groups.items() if len({x for pts in v.values() for x, _ in pts}) >= 2}


def _line_plot(plt, impls: Dict[str, List[tuple]], value, path: str, floor=None, **axes) -> str:
    """One line per implementation (x, value(row)), optionally the GEMM floor dashed; saved to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    floor_pts = {}
    for impl in [i for i in IMPL_ORDER if i in impls]:
        pts = sorted(impls[impl], key=lambda p: p[0])
        ax.plot([x for x, _ in pts], [value(r) for _, r in pts], marker="o", label=impl)
        if floor:
            floor_pts.update({x: floor(r) for x, r in pts if floor(r)})
    if floor_pts:
        xs = sorted(floor_pts)
        ax.plot(xs, [floor_pts[x] for x in xs], linestyle="--", color="gray", label="GEMM floor")
    ax.set(**axes)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict, out_dir: str) -> List[str]:
    """memory_vs_V_<loss>_...png (peak memory, log scale) and time_vs_N_<loss>_...png (with the GEMM floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results["rows"]
    measured = [r for r in rows if r.get("peak_bytes") is not None]  # no memory plot without memray
    for (w, n, d, dt), impls in _series(measured, "vocab", ("tokens", "dim", "dtype")).items():
        written.append(_line_plot(
            plt, impls, lambda r: mib(r["peak_bytes"]), os.path.join(out_dir, f"memory_vs_V_{w}_N{n}_D{d}_{dt}.png"),
            xlabel="vocabulary size V", ylabel="peak memory (MiB)", yscale="log",
            title=f"{w}: peak memory vs V (N={n}, D={d}, {dt})"))
    for (w, v, d, dt), impls in _series(rows, "tokens", ("vocab", "dim", "dtype")).items():
        written.append(_line_plot(
            plt, impls, lambda r: 1e3 * r["time_s"], os.path.join(out_dir, f"time_vs_N_{w}_V{v}_D{d}_{dt}.png"),
            floor=lambda r: r["floor_s"] and 1e3 * r["floor_s"],
            xlabel="tokens N", ylabel="fwd+bwd time (ms)", title=f"{w}: time vs N (V={v}, D={d}, {dt})"))
    return written


def _write_results(results: dict, paths: Dict[str, object]) -> None:
    with open(paths["results.md"], "w") as f:
        f.write(markdown(results))
    with open(paths["results.json"], "w") as f:
        json.dump({**results, "files": paths}, f, indent=1)


def write_all(results: dict, out_dir: str, plots: bool = True) -> Dict[str, object]:
    """Write results.json and results.md, then the PNGs; returns their paths. The numbers are on disk before
    any plot is tried: a plotting failure is reported (stderr and a note in both files), not raised."""
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, object] = {"results.json": os.path.join(out_dir, "results.json"),
                                "results.md": os.path.join(out_dir, "results.md"), "plots": []}
    _write_results(results, paths)
    if not plots:
        return paths
    try:
        paths["plots"] = write_plots(results, out_dir)
    except Exception as exc:  # matplotlib missing or broken, a backend error: the measured numbers must survive
        note = f"plots not written: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results["notes"] = list(results.get("notes", [])) + [note]
        print(f"fastpref bench: {note}", file=sys.stderr)
    _write_results(results, paths)  # again, with the plot paths (or the failure's note)
    return paths
