"""``fastpref bench`` without its optional packages (a plain ``pip install fastpref``): each missing one is
reported up front with the pip extra that installs it, the run finishes, and results.json / results.md carry
the note. A package is hidden by setting it (and its loaded submodules) to None in ``sys.modules``, which
makes both ``importlib.util.find_spec`` and ``import`` fail, as for a package that is not installed."""
import json
import os
import re
import sys

import pytest

from fastpref.bench import peers, report, runner
from fastpref.cli import main

# The smallest rows the bench allows: DPO (the Liger peer) and the bare op (the CCE peer), one repeat.
TINY = ["bench", "--n", "64", "--d", "16", "--dtype", "fp32", "--repeats", "1", "--threads", "1", "--no-compile"]
ALL_PEERS = "eager,trl,liger,cce,fastpref-torch"
PLAIN_INSTALL = ("memray", "matplotlib", "rich", "liger_kernel", "cut_cross_entropy", "trl", "transformers")


def hide(monkeypatch, *modules: str) -> None:
    """Make ``import m`` raise ImportError for each module (and any of its submodules already imported)."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.setitem(sys.modules, name, None)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def run_cli(tmp_path, capsys, *extra: str):
    rc = main([*TINY, "--out", str(tmp_path), *extra])
    captured = capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    return rc, captured.out + captured.err, results, (tmp_path / "results.md").read_text()


def assert_reported(output: str, md: str, results: dict, module: str) -> None:
    """One start-up line naming ``module`` and its extra; the same note in results.json and results.md."""
    hint = peers.install_hint(module)
    lines = [ln for ln in output.splitlines() if ln.startswith(f"fastpref bench: {module} is not installed")]
    assert len(lines) == 1 and lines[0].endswith(hint), output
    notes = [n for n in results["notes"] if n.startswith(f"{module} is not installed")]
    assert len(notes) == 1 and hint in notes[0] and f"- {notes[0]}" in md
    assert module in {d["module"] for d in results["missing_dependencies"]}


def test_find_spec_sees_a_hidden_module_as_missing(monkeypatch):
    assert peers.is_installed("torch") and not peers.is_installed("no_such_module_fastpref")
    hide(monkeypatch, "colorsys")
    assert not peers.is_installed("colorsys")
    with pytest.raises(ImportError):
        import colorsys  # noqa: F401


def test_every_install_hint_names_the_extra_that_installs_the_package():
    """The extras in the messages are pyproject.toml's: the package is listed in the extra named."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    for module, extra in peers.OPTIONAL_MODULES.items():
        listed = re.search(rf"^{extra} = \[(.*?)\]", text, re.M | re.S)
        assert listed is not None, extra
        assert re.search(rf'"{module.replace("_", "-")}[><=~"]', listed.group(1)), (module, extra)
        assert peers.install_hint(module) == f'pip install "fastpref[{extra}]"'


def test_only_what_the_run_needs_is_checked(monkeypatch):
    hide(monkeypatch, *PLAIN_INSTALL)
    cfg = runner.Config(device="cuda", workloads=["var"], impls=["eager", "liger", "cce"], plots=False, show=False)
    assert runner.missing_dependencies(cfg) == []  # no memray on CUDA, Liger/CCE not run for VAR, no plots/table
    cfg = runner.Config(workloads=["var"], impls=["eager", "trl"], plots=False, show=False)
    assert [d["module"] for d in runner.missing_dependencies(cfg)] == ["memray", "trl", "transformers"]


def test_plain_install_runs_with_a_note_per_missing_package(tmp_path, capsys, monkeypatch):
    """Everything optional missing: no traceback, eager and fastpref only, no memory, no plots, plain table."""
    hide(monkeypatch, *PLAIN_INSTALL)
    rc, output, results, md = run_cli(tmp_path, capsys, "--v", "256,512", "--losses", "dpo,logprobs",
                                      "--impls", ALL_PEERS)
    assert rc == 0 and "Traceback" not in output
    for module in PLAIN_INSTALL:
        assert_reported(output, md, results, module)
    assert {r["impl"] for r in results["rows"]} == {"eager", "fastpref-torch"}
    assert len(results["rows"]) == 2 * 2 * 2 and all(r["time_s"] > 0 for r in results["rows"])
    assert all(r["peak_bytes"] is None and r["memory"] == runner.MEMORY_NOT_MEASURED for r in results["rows"])
    assert results["files"]["plots"] == [] and not list(tmp_path.glob("*.png"))
    assert "| dpo | 64 | 16 | 256 | fp32 | fastpref-torch |" in output  # the plain-text table (no rich)


@pytest.mark.parametrize("module,impl,workload", [("liger_kernel", "liger", "dpo"),
                                                  ("cut_cross_entropy", "cce", "logprobs"),
                                                  ("trl", "trl", "dpo")])
def test_a_missing_peer_is_skipped_with_a_note(tmp_path, capsys, monkeypatch, module, impl, workload):
    hide(monkeypatch, module)
    rc, output, results, md = run_cli(tmp_path, capsys, "--v", "256", "--losses", workload, "--impls", ALL_PEERS,
                                      "--no-plots")
    assert rc == 0 and "Traceback" not in output
    assert_reported(output, md, results, module)
    ran = {r["impl"] for r in results["rows"]}
    assert impl not in ran and {"eager", "fastpref-torch"} <= ran
    if impl != "trl":
        assert "trl" in ran  # only the missing peer is left out
    skips = [s for s in results["skipped"] if s["impl"] == impl]
    assert skips and all(module in s["reason"] and peers.install_hint(module) in s["reason"] for s in skips)
    assert f"- {impl} not run for {workload}: {skips[0]['reason']}" in md
    # memory is still measured (memray is installed here)
    assert all(r["peak_bytes"] > 0 and r["memory"] is None for r in results["rows"])


def test_missing_memray_marks_memory_not_measured(tmp_path, capsys, monkeypatch):
    hide(monkeypatch, "memray")
    rc, output, results, md = run_cli(tmp_path, capsys, "--v", "256", "--losses", "dpo", "--impls",
                                      "eager,fastpref-torch", "--no-plots")
    assert rc == 0 and "Traceback" not in output
    assert_reported(output, md, results, "memray")
    rows = results["rows"]
    assert {r["impl"] for r in rows} == {"eager", "fastpref-torch"} and all(r["time_s"] > 0 for r in rows)
    for r in rows:
        assert r["memory"] == runner.MEMORY_NOT_MEASURED
        assert r["peak_bytes"] is None and r["workspace_bytes"] is None and r["workspace_below_eager"] is None
    assert results["meta"]["memory"] == runner.MEMORY_NOT_MEASURED and "memray_empty_region_bytes" not in results["meta"]
    assert f"Memory is {runner.MEMORY_NOT_MEASURED}." in md and "| not measured | not measured |" in md


def test_missing_matplotlib_writes_results_without_plots(tmp_path, capsys, monkeypatch):
    hide(monkeypatch, "matplotlib")
    # Two vocabularies: with matplotlib this run draws a memory-vs-V plot.
    rc, output, results, md = run_cli(tmp_path, capsys, "--v", "256,512", "--losses", "dpo", "--impls",
                                      "eager,fastpref-torch")
    assert rc == 0 and "Traceback" not in output
    assert_reported(output, md, results, "matplotlib")
    assert results["files"]["plots"] == [] and not list(tmp_path.glob("*.png"))
    assert len(results["rows"]) == 4


def test_a_plot_failure_leaves_the_results_on_disk(tmp_path, monkeypatch, capsys):
    seen = {}

    def broken_plots(results, out_dir):
        # Results come first: both files are complete before any plot is tried.
        seen["json"] = json.loads((tmp_path / "results.json").read_text())
        seen["md"] = (tmp_path / "results.md").read_text()
        raise RuntimeError("no display backend")

    monkeypatch.setattr(report, "write_plots", broken_plots)
    cfg = runner.Config(out=str(tmp_path), shapes=[(64, 16, 256, "fp32"), (64, 16, 512, "fp32")], workloads=["dpo"],
                        impls=["eager", "fastpref-torch"], compile=False, repeats=1, show=False, threads=1)
    results = runner.run(cfg)
    assert len(seen["json"]["rows"]) == 4 and "| dpo | 64 | 16 | 512 | fp32 | fastpref-torch |" in seen["md"]
    note = "plots not written: RuntimeError: no display backend"
    assert note in capsys.readouterr().err and results["files"]["plots"] == []
    assert note in json.loads((tmp_path / "results.json").read_text())["notes"]
    assert f"- {note}" in (tmp_path / "results.md").read_text()


def test_gpu_rows_report_a_missing_peer_up_front(monkeypatch, capsys):
    """``--device cuda --quick`` / ``cpu-interpret --tiny`` name a missing peer's extra before measuring
    (bench/gpu.py then skips the peer; the measurement itself is stubbed out here)."""
    from fastpref.bench import gpu

    hide(monkeypatch, "liger_kernel")
    monkeypatch.setattr(gpu, "run", lambda cfg: {"files": {"json": "x.json", "md": "x.md"}})
    monkeypatch.setattr(gpu, "markdown", lambda results: "")
    assert main(["bench", "--device", "cpu-interpret", "--tiny"]) == 0
    err = capsys.readouterr().err
    assert f"fastpref bench: liger_kernel is not installed (the liger peer): liger skipped; install with " \
           f"{peers.install_hint('liger_kernel')}" in err


def test_trainer_step_without_memray_writes_its_reports(tmp_path, monkeypatch):
    """bench/trainer_step.py without memray: the timed steps run, trainer_step.json / .md are written, every peak
    is None and the report says memory was not measured (DPO's trainers only, profiler off: a few seconds)."""
    pytest.importorskip("trl")
    import torch
    from test_bench_trainer_step import TINY

    from fastpref.bench import trainer_step

    hide(monkeypatch, "memray")
    threads = torch.get_num_threads()
    try:
        results = trainer_step.run(TINY, str(tmp_path), "test", threads=1, show=False, profile=False, losses=("dpo",))
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "trainer_step.json").read_text())
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    assert {r["trainer"] for r in written["rows"]} == {impl for loss, impl, _ in trainer_step.TRAINERS if loss == "dpo"}
    ok = [r for r in written["rows"] if r["status"] == "ok"]
    assert {"fastpref", "trl"} <= {r["trainer"] for r in ok} and all(r["median_s"] > 0 for r in ok)
    assert all(r["peak_mib"] is None and r["peak_below_peer"] is None for r in written["rows"])
    assert written["memory_note"] == runner.MEMORY_NOT_MEASURED
    memory_targets = [t for t in written["targets"] if t["what"].startswith("peak memory")]
    assert memory_targets and all(t["met"] is None for t in memory_targets)
    md = (tmp_path / "trainer_step.md").read_text()
    assert f"; {runner.MEMORY_NOT_MEASURED};" in md and "(not measured" in md
