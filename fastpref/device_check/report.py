"""JSON and Markdown of the device check (``device_check.json`` and ``device_check.md`` under ``--out``)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2e}"


def markdown(results: dict) -> str:
    """The report as Markdown: the machine, a summary, then one table per section."""
    meta = results["meta"]
    lines = [
        "# fastpref device check", "",
        f"Machine: {meta['machine']}", "",
        f"torch {meta['torch']}, triton {meta['triton']}, arch of the forced configs: {meta['arch']}; "
        f"{meta['elapsed_s']} s. Rule: fused error vs the fp64 truth <= eager error in the same precision + "
        f"slack {meta['slack']}.", "",
        f"Summary: {results['summary']['ok']} ok, {results['summary']['FAIL']} failed, "
        f"{results['summary']['skipped']} skipped.", "",
    ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    sections: Dict[str, List[dict]] = {}
    for row in results["rows"]:
        sections.setdefault(row["section"], []).append(row)
    for section, rows in sections.items():
        lines += [f"## {section}", "",
                  "| name | dtype | shape | config | fused err | eager err | worst | limit | value | result | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            limit = r["limit"] if isinstance(r["limit"], int) else _fmt(r["limit"])
            value = "" if r["value"] is None else r["value"]
            lines.append(f"| {r['name']} | {r['dtype']} | {r['shape']} | {r['config']} | {_fmt(r['fused_err'])} | "
                         f"{_fmt(r['eager_err'])} | {r['worst']} | {limit} | {value} | {r['status']} | "
                         f"{r['note'].replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: str) -> Dict[str, str]:
    """Write both files under ``out`` (created if needed); returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "device_check.json"), "md": os.path.join(out, "device_check.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    return paths
