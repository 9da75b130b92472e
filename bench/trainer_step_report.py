"""Rows, targets, Markdown and plot of the trainer-step benchmark (bench/trainer_step.py)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import measure, report

TARGETS = (("trl", 1.0), ("trl+liger", 0.9))  # fastpref DPO step time / peer's, at most


def key(loss: str, trainer: str) -> str:
    return f"{loss}/{trainer}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def rows_of(entries: List[Any], measured: dict) -> List[dict]:
    """One row per trainer (``entries``: bench.trainer_step.Entry): times, tokens/s, ratios to its peer (and, for
    fastpref DPO, to TRL + Liger), memory, losses."""
    rows = {}
    for e in entries:
        times = measured["times"].get(e.name) or []
        tokens = measured["tokens"].get(e.name) or []
        peak = measured["memory"].get(e.name)
        median = measure.median_of(times) if times else None
        per_step = sum(tokens) / len(tokens) if tokens else None
        rows[e.name] = dict(
            loss=e.loss, trainer=e.impl, peer=e.peer, status="ok" if e.error is None else "unavailable",
            reason=e.error, times_s=[round(t, 4) for t in times], median_s=median, best_s=min(times, default=None),
            spread=round((max(times) - min(times)) / median, 3) if times else None,
            tokens_per_step=per_step, tokens_per_s=round(per_step / median, 1) if times else None,
            peak_mib=round(peak / 2**20, 1) if peak is not None else None,
            step1_loss=e.losses[0] if e.losses else None, losses=e.losses)
    for row in rows.values():
        for name, peer in (("peer", row["peer"]), ("liger", "trl+liger" if row["peer"] == "trl" else None)):
            other = rows.get(key(row["loss"], peer)) if peer else None
            row[f"x_{name}"] = _ratio(row["median_s"], other and other["median_s"])
            row[f"x_{name}_best"] = _ratio(row["best_s"], other and other["best_s"])
            row[f"peak_below_{name}"] = _ratio(other and other["peak_mib"], row["peak_mib"])
    return list(rows.values())


def evaluate_targets(rows: List[dict]) -> List[dict]:
    """The issue's targets for fastpref DPO: time <= 1.0x TRL's and <= 0.9x TRL + Liger's (ratios of medians),
    peak memory below both."""
    by = {key(r["loss"], r["trainer"]): r for r in rows}
    ours = by.get("dpo/fastpref")
    out = []
    for peer, limit in TARGETS:
        other = by.get(key("dpo", peer))
        if ours is None or other is None:
            continue
        label = "TRL DPOTrainer" if peer == "trl" else "TRL DPOTrainer + use_liger_kernel"
        why = f"{peer} failed: {other['reason']}" if other["status"] != "ok" else None
        ratio = _ratio(ours["median_s"], other["median_s"])
        out.append(dict(what=f"step time / {label} <= {limit} (median)", value=ratio,
                        met=None if why else ratio <= limit, note=why))
        below = _ratio(other["peak_mib"], ours["peak_mib"])
        # without memray (or an empty peak) there is no ratio: not measured, never "missed"
        unmeasured = None if below is not None else "peak memory not measured"
        out.append(dict(what=f"peak memory below {label}", value=below, met=None if why or unmeasured else below > 1.0,
                        note=why or unmeasured or f"{ours['peak_mib']} vs {other['peak_mib']} MiB"))
    return out


def _cell(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    size, meta = results["size"], results["meta"]
    lines = [f"### fastpref trainer step ({results['mode']}, cpu: Llama V={size['vocab']}, D={size['hidden']}, "
             f"{size['layers']} layers, {size['pairs']} prompts per batch, <= {size['prompt_len'] + size['completion_len']}"
             " tokens per row, fp32)", "",
             report.machine_line(meta, {"repeats": f"{size['warmup']} warm-up + {size['repeats']}"}), "",
             "One optimizer step (training_step: loss + backward, clipping, AdamW, scheduler, zero_grad) per trainer, "
             "same model, seed, data and batches. `peer`: what the row is compared with: TRL 1.16's DPOTrainer for "
             "DPO; for the seed losses (no TRL implementation) the same FastPrefDPOTrainer with `fastpref_eager=True` "
             "(the eager twin: full logits). `step ms`: median of the timed steps; `best ms`: fastest; `spread`: "
             "(max - min) / median; `x peer`, `x TRL+Liger`: this median / the peer's (best in brackets). "
             "`tokens/s`: non-padding tokens of the scored rows per median step. `peak MiB`: memray peak of one "
             "step above what is alive before it (parameters, AdamW state, reference model: the same for every "
             f"trainer){'; ' + results['memory_note'] if results.get('memory_note') else ''}; `below peer`: the "
             "peer's peak / this. `step-1 loss`: the first step's loss (the policy "
             "equals the reference there). " + settings_sentence(results.get("settings", {})), "",
             "| loss | trainer | peer | step ms | best ms | spread | x peer | x TRL+Liger | tokens/s | peak MiB | "
             "below peer | step-1 loss |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['trainer']} | {r['peer'] or '-'} | failed: see below |"
                         + " - |" * 8)
            continue
        lines.append(" | ".join([
            f"| {r['loss']}", r["trainer"], r["peer"] or "-", _cell(1e3 * r["median_s"], "{:.1f}"),
            _cell(1e3 * r["best_s"], "{:.1f}"), _cell(100 * r["spread"], "{:.0f}%"),
            f"{_cell(r['x_peer'])} ({_cell(r['x_peer_best'])})" if r["x_peer"] is not None else "-",
            f"{_cell(r['x_liger'])} ({_cell(r['x_liger_best'])})" if r["x_liger"] is not None else "-",
            _cell(r["tokens_per_s"], "{:.0f}"), _cell(r["peak_mib"], "{:.1f}"),
            _cell(r["peak_below_peer"], "{:.1f}x"), _cell(r["step1_loss"], "{:.6f}")]) + " |")
    lines += ["", "Targets (fastpref DPO against TRL, ratios of medians):", ""]
    for t in results["targets"]:
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "missed")
        lines.append(f"- {t['what']}: {_cell(t['value'])} ({state}{'; ' + t['note'] if t['note'] else ''})")
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Not measured:", ""] + [f"- `{r['loss']}/{r['trainer']}`: {r['reason']}" for r in failed]
    return "\n".join(lines + profile_markdown(results.get("profiles", {})) + [""])


def settings_sentence(settings: Dict[str, dict]) -> str:
    """The loss options every trainer of a loss shares (fastpref and its eager twin alike)."""
    parts = [f"{loss}: " + ", ".join(f"{k}={v!r}" for k, v in opts.items()) for loss, opts in settings.items() if opts]
    return f"Loss options: {'; '.join(parts)}." if parts else ""


def profile_markdown(profiles: Dict[str, dict]) -> List[str]:
    lines = []
    for name, p in profiles.items():
        lines += ["", f"Profile `{name}` (torch.profiler, one more step, CPU self time): step {p['step_s']} s, "
                      f"{p['self_s']} s self time, GEMMs {100 * p['gemm_share']:.0f}%.", "",
                  "| op | calls | self s | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_s']:.3f} | {100 * o['share']:.1f}% |" for o in p["ops"]]
    return lines


def write_plot(results: dict, path: str) -> Optional[str]:
    """Median step time and peak memory per trainer, grouped by loss; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    labels = [f"{r['loss']}\n{r['trainer']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, values, title in ((axes[0], [1e3 * r["median_s"] for r in rows], "median step (ms)"),
                              (axes[1], [r["peak_mib"] or 0 for r in rows], "peak step memory (MiB, memray)")):
        ax.bar(range(len(rows)), values, color=["C0" if r["trainer"].startswith("fastpref") else "C1" for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    fig.suptitle("FastPrefDPOTrainer (blue) vs peers (orange): " + results["mode"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


