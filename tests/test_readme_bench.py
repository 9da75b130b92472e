"""README.md's Performance section is generated from the committed bench results (python -m fastpref.bench.readme)."""
import os
import re

import pytest

from fastpref.bench import readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the generator reads the paths the README quotes, relative to the repository


def _readme() -> str:
    with open(readme.README) as f:
        return f.read()


@pytest.mark.parametrize("name", readme.BLOCKS)
def test_readme_blocks_equal_what_the_committed_results_generate(name):
    assert readme.extract_block(_readme(), name) == readme.generate()[name], \
        "README.md is stale: run python -m fastpref.bench.readme"


def test_check_mode_passes_on_the_committed_readme(capsys):
    assert readme.main(["--check"]) == 0


def test_quick_block_is_the_committed_quick_table():
    with open(readme.QUICK_MD) as f:
        md = readme.parse_results_md(f.read())
    block = readme.extract_block(_readme(), "cpu-quick")
    assert md.table and all(line in block for line in md.table)
    assert md.machine in block  # machine, threads and load average come from the results file


def test_performance_section_states_what_was_not_measured():
    text = _readme()
    section = text[text.index("## Performance"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    assert "not measured: gpu" in section.lower() and "fastpref-triton" in section
    assert readme.TARGET_NOTE in section and "python -m fastpref.bench.readme" in section
    order = [section.index(readme.start_marker(n)) for n in readme.BLOCKS]
    assert all(0 <= i for i in order)


def test_kernel_summary_counts_match_the_reports():
    summary = readme.render_kernels({p: open(p).read() for p in readme.KERNEL_MDS})
    for path in readme.KERNEL_MDS:
        with open(path) as f:
            text = f.read()
        rows = [line for line in text.splitlines() if re.match(r"\| (logprobs|logits)_", line)]  # kernel rows
        line = next(s for s in summary.splitlines() if f"`{path}`" in s)
        assert f"| {len(rows)} |" in line
        wgmma_yes = sum(1 for r in rows if "| yes |" in r)
        if wgmma_yes == 0:
            assert "| none |" in line
        else:
            assert f"{wgmma_yes} of {len(rows)}" in line or f"all {len(rows)}" in line
        spills = sum(int(r.strip("|").split("|")[5]) for r in rows)
        assert f"| {spills} |" in line
        # the SASS column sums the reports' fence / ATOMG / RED totals ("total (in loops)" cells)
        totals = [sum(int(r.strip("|").split("|")[col].split()[0]) for r in rows) for col in (9, 10, 12)]
        assert line.endswith(f"| {totals[0]} / {totals[1]} / {totals[2]} |"), (line, totals)


def test_update_rewrites_only_between_markers():
    text = "intro\n" + "".join(f"{readme.start_marker(n)}\nold {n}\n{readme.end_marker(n)}\nbetween\n"
                               for n in readme.BLOCKS) + "outro\n"
    new = readme.update(text, {n: f"new {n}" for n in readme.BLOCKS})
    assert "old" not in new and new.startswith("intro\n") and new.endswith("outro\n")
    assert new.count("between") == len(readme.BLOCKS)
    assert readme.update(new, {n: f"new {n}" for n in readme.BLOCKS}) == new  # idempotent
    with pytest.raises(ValueError, match="cpu-quick"):
        readme.update("no markers here", {"cpu-quick": "x"})


def test_parser_rejects_other_files():
    with pytest.raises(ValueError):
        readme.parse_results_md("# something else\n")
    with pytest.raises(ValueError):
        readme.parse_kernel_md("| a | b |\n")
    with pytest.raises(ValueError, match="trainer step"):
        readme.parse_trainer_step_md("### fastpref bench (quick grid, cpu)\n")


def test_trainer_step_block_is_the_committed_table_and_targets():
    """The trainer-step block quotes bench/results/trainer_step_cpu.md's table, targets and note status, and its
    target count matches the committed JSON's evaluated targets."""
    import json

    with open(readme.TRAINER_STEP_MD) as f:
        md = readme.parse_trainer_step_md(f.read())
    with open(readme.TRAINER_STEP_MD.replace(".md", ".json")) as f:
        results = json.load(f)
    block = readme.extract_block(_readme(), "trainer-step")
    assert md.table and all(line in block for line in md.table + md.targets + md.status)
    assert md.machine in block and len(md.table) == 2 + len(results["rows"])
    assert len(md.targets) == len(results["targets"])
    met = sum(t["met"] is True for t in results["targets"])
    assert f"Targets met: {met} of {len(results['targets'])}" in block
