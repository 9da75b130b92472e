"""Rewrite the generated blocks of README.md's Performance section from the committed bench results.

    python -m fastpref.bench.readme            # rewrite README.md from fastpref.bench/results/
    python -m fastpref.bench.readme --check    # exit 1 if README.md differs from what bench/results/ generates

Four blocks, each between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``:

- ``cpu-quick``: the machine line, column legend and table of ``bench/results/cpu_quick.md`` (the
  ``results.md`` of ``fastpref bench --quick``), verbatim;
- ``cpu-target``: the machine line, table and target checks of ``bench/results/cpu_target_dpo.md`` (the
  ``results.md`` of the DPO target row), verbatim;
- ``kernels``: a summary of the static Triton kernel reports ``bench/results/kernels_<arch>.md`` (written by
  ``fastpref kernels --arch ARCH --out DIR --report FILE``): configurations, registers, spills, wgmma;
- ``trainer-step``: the machine line, legend, table, targets and note status of ``bench/results/trainer_step_cpu.md``
  (the ``trainer_step.md`` of ``python -m fastpref.bench.trainer_step``, plus its hand-written note).

Everything outside the markers is left alone; a missing marker is an error. tests/test_readme_bench.py
checks that README.md equals what this module generates from the committed files.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from fastpref.backends.triton_aot import KernelReport, SassCounts  # the report's row types (import no triton)

RESULTS_DIR = os.path.join("bench", "results")
QUICK_MD = os.path.join(RESULTS_DIR, "cpu_quick.md")
TARGET_MD = os.path.join(RESULTS_DIR, "cpu_target_dpo.md")
TARGET_NOTE = os.path.join(RESULTS_DIR, "cpu_target_note.md")
KERNEL_MDS = (os.path.join(RESULTS_DIR, "kernels_sm80.md"), os.path.join(RESULTS_DIR, "kernels_sm90a.md"))
TRAINER_STEP_MD = os.path.join(RESULTS_DIR, "trainer_step_cpu.md")
README = "README.md"
BLOCKS = ("cpu-quick", "cpu-target", "kernels", "trainer-step")


def start_marker(name: str) -> str:
    return f"<!-- bench:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


# ----------------------------------------------------------------------------------------------
# results.md (bench/report.py:markdown)


@dataclass
class BenchMarkdown:
    title: str
    machine: str  # the line under the title: date, machine, threads, load, repeats
    legend: str  # the paragraph explaining the columns
    table: List[str]  # header, separator and rows
    targets: List[str]  # "- time / eager <= 1.0 (median): 1.17 (missed)" ...


def parse_results_md(text: str) -> BenchMarkdown:
    """Split a ``results.md`` written by ``fastpref bench`` into its parts."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("### fastpref bench"):
        raise ValueError("not a fastpref bench results.md (no '### fastpref bench' title)")
    paragraphs: List[str] = []
    table: List[str] = []
    i = 1
    while i < len(lines) and not lines[i].startswith("|"):
        if lines[i].strip():
            paragraphs.append(lines[i].strip())
        i += 1
    while i < len(lines) and lines[i].startswith("|"):
        table.append(lines[i])
        i += 1
    if len(paragraphs) < 2 or len(table) < 3:
        raise ValueError("results.md: expected a machine line, a legend and a table with rows")
    targets: List[str] = []
    rest = lines[i:]
    for j, line in enumerate(rest):
        if line.startswith("Targets ("):
            targets = [t for t in rest[j + 1:] if t.startswith("- ")]
            break
    return BenchMarkdown(lines[0][4:].strip(), paragraphs[0], paragraphs[1], table, targets)


def _source(md: BenchMarkdown, source: str) -> str:
    grid = re.search(r"\((.*)\)", md.title)
    return f"Source: `{source}` ({grid.group(1) if grid else md.title}). Measured {md.machine}"


def render_quick(md: BenchMarkdown, source: str = QUICK_MD) -> str:
    return "\n".join([
        _source(md, source),
        "",
        md.legend,
        "",
        *md.table,
        "",
        f"GEMM-floor times, warm-up (torch.compile) times and skipped implementations: `{source}`.",
    ])


def note_status(note_text: str) -> List[str]:
    """The blockquote at the top of the target note (its status line), if any."""
    lines = note_text.splitlines()
    body = [line for line in lines[1:] if line.strip()]
    quote = []
    for line in body:
        if not line.startswith(">"):
            break
        quote.append(line)
    return quote


def render_target(md: BenchMarkdown, source: str = TARGET_MD, note: str = TARGET_NOTE,
                  status: Sequence[str] = ()) -> str:
    met = [t for t in md.targets if t.endswith("(met)")]
    lines = [_source(md, source), ""]
    if status:
        lines += [f"From `{note}`:", "", *status, ""]
    lines += [*md.table, ""]
    if md.targets:
        lines += [f"Targets met: {len(met)} of {len(md.targets)}.", "", *md.targets, ""]
    else:
        lines += ["This run has no target row, so no target was checked.", ""]
    lines.append(f"Where the time goes and why the missed targets are missed: `{note}`.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# kernel reports (fastpref/backends/triton_aot.py:report_markdown)


def parse_kernel_md(text: str) -> tuple:
    """(title, triton version, rows, note) of a kernel report; ``note`` is its paragraph above the table."""
    title = re.search(r"^# Triton kernel report: (.+)$", text, re.M)
    triton = re.search(r"\(Triton ([^)]+)\)", text)
    paragraphs = [p.strip() for p in text.split("\n\n")]
    table_at = next((i for i, p in enumerate(paragraphs) if p.startswith("|")), len(paragraphs))
    note = " ".join(paragraphs[table_at - 1].split()) if table_at >= 2 else ""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (9, 13) or not line.startswith("|") or not cells[4].isdigit():
            continue
        wgmma_dots, dots = (int(x) for x in cells[8].split("/"))
        rows.append(KernelReport(cells[0], cells[1], cells[2], cells[3], int(cells[4]), int(cells[5]), int(cells[6]),
                                 cells[7] == "yes", wgmma_dots, dots, ptx_path="",
                                 sass=_sass_cells(cells[9:]) if len(cells) == 13 else None))
    if not title or not rows:
        raise ValueError("not a fastpref kernel report (no title or no table rows)")
    return title.group(1), triton.group(1) if triton else "?", rows, note


def _sass_cells(cells: List[str]) -> SassCounts:
    """The report's four SASS columns, each "total (inside loops)" or "0"."""
    pairs = []
    for cell in cells:
        m = re.fullmatch(r"(\d+)(?: \((\d+)\))?", cell)
        if m is None:
            raise ValueError(f"not a SASS count: {cell!r}")
        pairs.append((int(m.group(1)), int(m.group(2) or 0)))
    (f, fl), (a, al), (c, cl), (r, rl) = pairs
    return SassCounts(fences=f, fences_in_loops=fl, atomics=a, atomics_in_loops=al, l1_invalidates=c,
                      l1_invalidates_in_loops=cl, reductions=r, reductions_in_loops=rl)


def _sass_summary(rows: Sequence[KernelReport]) -> str:
    if any(r.sass is None for r in rows):
        return "not read"
    fences = sum(r.sass.fences for r in rows)
    atomics = sum(r.sass.atomics for r in rows)
    reds = sum(r.sass.reductions for r in rows)
    return f"{fences} / {atomics} / {reds}"


def _variants(rows: Sequence[KernelReport]) -> str:
    return ", ".join(sorted({f"`{r.variant}`" for r in rows}))


def render_kernels(texts: Dict[str, str]) -> str:
    """A table with one line per architecture, from the reports' rows."""
    lines = ["| report | configurations | kernels | registers | spill bytes | max shared mem (KiB) | "
             "wgmma (Hopper warp-group MMA) | SASS: GPU fences / ATOMG / RED |",
             "|---|---:|---:|---|---:|---:|---|---|"]
    versions = set()
    notes = []
    for path, text in texts.items():
        title, triton, rows, note = parse_kernel_md(text)
        if note:
            notes.append(f"- {title}: {note}")
        versions.add(triton)
        regs = [r.registers for r in rows]
        spills = sum(r.spill_bytes for r in rows)
        with_mma = [r for r in rows if r.wgmma]
        without = [r for r in rows if not r.wgmma]
        if not with_mma:
            wgmma = "none"
        elif not without:
            wgmma = f"all {len(rows)} configurations"
        else:
            full = all(r.wgmma_dots == r.dots for r in with_mma)
            wgmma = (f"{len(with_mma)} of {len(rows)} configurations ({'every' if full else 'some'} `tl.dot` of "
                     f"{_variants(with_mma)}); none in {_variants(without)}")
        lines.append(f"| `{path}`: {title} | {len(rows)} | {len({r.kernel for r in rows})} | {min(regs)}-{max(regs)} "
                     f"| {spills} | {max(r.shared_bytes for r in rows) / 1024:.0f} | {wgmma} | {_sass_summary(rows)} |")
    lines += ["", f"Compiled ahead of time with Triton {', '.join(sorted(versions))}, without a GPU: "
              "`fastpref kernels --arch sm_80|sm_90a --out DIR --report FILE`. These are compile-time facts "
              "(register allocation, spills, shared memory, which instructions the GEMMs lower to, and from the SASS "
              "the GPU-wide fences, returning atomics (`ATOMG`) and fire-and-forget reductions (`RED`) of every "
              "configuration, summed), not timings. Registers are per thread (255 is the hardware cap). From the "
              "reports:", "", *notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# trainer step (bench/trainer_step.py)


@dataclass
class TrainerStepMarkdown:
    title: str
    machine: str
    legend: str
    table: List[str]
    targets: List[str]  # "- step time / TRL DPOTrainer <= 1.0 (median): 0.83 (met)" ...
    not_measured: List[str]  # "- `dpo/trl+liger`: RuntimeError: ..."
    status: List[str]  # the note's blockquote, if the file has one


def _list_after(lines: List[str], heading: str) -> List[str]:
    """The "- " lines right after the line starting with ``heading`` (up to the first other non-blank line)."""
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    out: List[str] = []
    for line in lines[start + 1:] if start is not None else []:
        if line.startswith("- "):
            out.append(line)
        elif line.strip() or out:
            break
    return out


def parse_trainer_step_md(text: str) -> TrainerStepMarkdown:
    """Split a ``trainer_step.md`` written by ``python -m fastpref.bench.trainer_step`` (plus, in the committed
    copy, a hand-written note whose first blockquote is its status) into its parts."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("### fastpref trainer step"):
        raise ValueError("not a trainer-step results file (no '### fastpref trainer step' title)")
    table_at = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    paragraphs = [line.strip() for line in lines[1:table_at] if line.strip()]
    table = []
    for line in lines[table_at:]:
        if not line.startswith("|"):
            break
        table.append(line)
    if len(paragraphs) < 2 or len(table) < 3:
        raise ValueError("trainer_step.md: expected a machine line, a legend and a table with rows")
    status = []
    for line in lines[lines.index(table[-1]) + 1:]:
        if line.startswith(">"):
            status.append(line)
        elif status:
            break
    return TrainerStepMarkdown(lines[0][4:].strip(), paragraphs[0], paragraphs[1], table,
                               _list_after(lines, "Targets ("), _list_after(lines, "Not measured:"), status)


def render_trainer_step(md: TrainerStepMarkdown, source: str = TRAINER_STEP_MD) -> str:
    grid = re.search(r"\((.*)\)", md.title)
    met = [t for t in md.targets if "(met" in t]
    unmeasured = [t for t in md.targets if "(not measured" in t]
    lines = [f"Source: `{source}` ({grid.group(1) if grid else md.title}). Measured {md.machine}", ""]
    if md.status:
        lines += [f"From the note in `{source}`:", "", *md.status, ""]
    lines += [md.legend, "", *md.table, ""]
    counted = f" ({len(unmeasured)} not measured)" if unmeasured else ""
    lines += [f"Targets met: {len(met)} of {len(md.targets)}{counted}.", "", *md.targets, ""]
    if md.not_measured:
        lines += ["Not measured:", "", *md.not_measured, ""]
    lines.append(f"torch.profiler breakdowns of the DPO steps and the note on missed targets: `{source}`.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# README


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def generate(quick_md: str = QUICK_MD, target_md: str = TARGET_MD,
             kernel_mds: Sequence[str] = KERNEL_MDS, trainer_step_md: str = TRAINER_STEP_MD) -> Dict[str, str]:
    """The body of every block, from the files (paths as written in the README)."""
    return {
        "cpu-quick": render_quick(parse_results_md(_read(quick_md)), quick_md),
        "cpu-target": render_target(parse_results_md(_read(target_md)), target_md, TARGET_NOTE,
                                    note_status(_read(TARGET_NOTE)) if os.path.exists(TARGET_NOTE) else ()),
        "kernels": render_kernels({p: _read(p) for p in kernel_mds}),
        "trainer-step": render_trainer_step(parse_trainer_step_md(_read(trainer_step_md)), trainer_step_md),
    }


def _span(text: str, name: str) -> tuple:
    start, end = start_marker(name), end_marker(name)
    a = text.find(start)
    b = text.find(end)
    if a < 0 or b < 0 or b < a or text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"README: expected one {start} ... {end} pair")
    return a + len(start), b


def extract_block(text: str, name: str) -> str:
    a, b = _span(text, name)
    return text[a:b].strip("\n")


def update(text: str, blocks: Dict[str, str]) -> str:
    """``text`` with the body of each named block replaced (markers kept)."""
    for name, body in blocks.items():
        a, b = _span(text, name)
        text = text[:a] + "\n" + body.strip("\n") + "\n" + text[b:]
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=README)
    parser.add_argument("--quick-md", default=QUICK_MD, help="results.md of fastpref bench --quick")
    parser.add_argument("--target-md", default=TARGET_MD, help="results.md of the DPO target row")
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_MDS), help="kernel reports")
    parser.add_argument("--trainer-step-md", default=TRAINER_STEP_MD, help="trainer_step.md of the trainer-step bench")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the README is stale")
    args = parser.parse_args(argv)
    blocks = generate(args.quick_md, args.target_md, args.kernels, args.trainer_step_md)
    old = _read(args.readme)
    new = update(old, blocks)
    if args.check:
        if new != old:
            print(f"{args.readme} is stale: run python -m fastpref.bench.readme", file=sys.stderr)
            return 1
        print(f"{args.readme} is up to date")
        return 0
    if new != old:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"{args.readme}: {'rewrote' if new != old else 'unchanged'} blocks {', '.join(blocks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
