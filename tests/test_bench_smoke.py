"""Smoke test of the benchmark harness (bench/) and the ``fastpref bench`` CLI on tiny shapes."""
import json
import os

import pytest

from bench import runner
from fastpref.cli import build_parser

WORKLOADS = ["logprobs", "dpo", "spo"]  # the runner's smoke grid (the parity test below covers all five)


def test_cli_exposes_the_documented_options():
    args = build_parser().parse_args(["bench", "--quick", "--out", "x", "--device", "cpu", "--losses", "dpo,var",
                                      "--no-compile", "--impls", "eager,fastpref-torch", "--n", "64,128"])
    assert args.quick and args.out == "x" and args.losses == ["dpo", "var"] and args.no_compile
    assert args.impls == ["eager", "fastpref-torch"] and args.n == [64, 128]


def test_unknown_workload_is_rejected(tmp_path):
    cfg = runner.Config(out=str(tmp_path), workloads=["nope"], shapes=[(64, 16, 256, "fp32")], show=False)
    with pytest.raises(ValueError, match="nope"):
        runner.run(cfg)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Two vocabularies so the memory-vs-V plot exists; no torch.compile (Liger uncompiled, CCE skipped).
    cfg = runner.Config(out=str(out), shapes=[(256, 16, 8192, "fp32"), (256, 16, 16384, "fp32")],
                        impls=["eager", "liger", "cce", "fastpref-torch"], compile=False, repeats=2,
                        show=False, workloads=WORKLOADS, threads=1)
    return runner.run(cfg), out


def test_writes_the_three_outputs(tiny_results):
    results, out = tiny_results
    assert os.path.isfile(out / "results.json") and os.path.isfile(out / "results.md")
    plots = results["files"]["plots"]
    assert any("memory_vs_V_dpo" in p for p in plots) and all(os.path.isfile(p) for p in plots)
    on_disk = json.loads((out / "results.json").read_text())
    assert {"meta", "config", "rows", "skipped", "targets"} <= set(on_disk)
    assert "| dpo | 256 | 16 | 8192 | fp32 | fastpref-torch |" in (out / "results.md").read_text()


def test_rows_carry_times_memory_and_ratios(tiny_results):
    results, _ = tiny_results
    rows = results["rows"]
    impls = {(r["workload"], r["impl"]) for r in rows}
    for w in WORKLOADS:
        assert (w, "eager") in impls and (w, "fastpref-torch") in impls
    assert ("dpo", "liger") in impls and ("var", "liger") not in impls
    # CCE on CPU is torch.compile only, so --no-compile must leave it out, and say so.
    assert any(s["impl"] == "cce" and "compile" in s["reason"] for s in results["skipped"])
    for r in rows:
        assert len(r["times_s"]) == 2 and r["time_s"] > 0 and r["floor_s"] > 0
        assert r["peak_bytes"] == r["input_bytes"] + r["tracked_bytes"]
        assert r["workspace_bytes"] == r["tracked_bytes"] - r["grad_bytes"]
        assert r["time_vs_floor"] == pytest.approx(r["time_s"] / r["floor_s"])
        assert r["time_min_s"] == min(r["times_s"]) <= r["time_s"]
        if r["impl"] == "eager":
            assert r["time_vs_eager"] == 1.0 and r["workspace_below_eager"] == 1.0
    by = {(r["workload"], r["vocab"], r["impl"]): r for r in rows}
    # Memory is really measured: eager's step allocates the [N x V] logits (8 MiB here) several times over,
    # and the fused op's workspace is smaller.
    eager, fused = by[("logprobs", 16384, "eager")], by[("logprobs", 16384, "fastpref-torch")]
    assert eager["workspace_bytes"] > 2 * 4 * 256 * 16384
    assert fused["workspace_bytes"] < eager["workspace_bytes"]
    assert fused["grad_bytes"] == 4 * (16384 * 16 + 256 * 16)


def test_targets_are_checked_on_the_target_row():
    base = dict(runner.TARGET_SHAPE, device="cpu", floor_s=1.0, floor_min_s=1.0)
    rows = [dict(base, impl="eager", time_s=2.0, time_min_s=2.0, workspace_bytes=4000),
            dict(base, impl="liger", time_s=3.0, time_min_s=3.0, workspace_bytes=1000),
            dict(base, impl="fastpref-torch", time_s=1.2, time_min_s=1.2, workspace_bytes=50)]
    runner.add_ratios(rows)
    checks = runner.evaluate_targets(rows)
    assert len(checks) == 8 and all(c["met"] for c in checks)
    rows[2].update(time_s=2.5, workspace_bytes=200)  # median slower than eager and floor, best still fast
    runner.add_ratios(rows)
    met = {c["target"]: c["met"] for c in runner.evaluate_targets(rows)}
    assert not met["time / eager <= 1.0 (median)"] and met["time / eager <= 1.0 (best)"]
    assert not met["time / GEMM floor <= 1.35 (median)"] and not met["workspace >= 40x below eager"]
    assert runner.evaluate_targets(rows[:2]) == []  # no fastpref row: nothing to check


@pytest.mark.parametrize("workload", ["logprobs", "dpo", "var", "spo", "mcpo"])
def test_implementations_compute_the_same_loss(workload):
    """The peers and fastpref benchmark the same quantity (same loss to fp32 accuracy)."""
    import torch

    from bench.workloads import Options, build_case, implementations

    case = build_case(workload, 128, 16, 3000, torch.float32, torch.device("cpu"), seed=3)
    ready, _ = implementations(case, Options(compile=False, impls=("eager", "liger", "fastpref-torch")))
    losses = {impl.name: impl.step().item() for impl in ready}
    for name, value in losses.items():
        assert value == pytest.approx(losses["eager"], rel=1e-4, abs=1e-4), (name, losses)


def test_failed_compile_falls_back_or_is_skipped():
    """A torch.compile failure must not abort the run: Liger reruns uncompiled, CCE is left out."""
    import torch

    from bench.workloads import Impl, Options, build_case

    case = build_case("dpo", 64, 16, 500, torch.float32, torch.device("cpu"))

    def broken():
        raise RuntimeError("inductor: no C++ compiler")

    impl, _, reason = runner._warm_up(Impl("liger", broken, compiled=True), case, Options())
    assert impl is not None and not impl.compiled and "compiled=False" in impl.note and "C++" in reason
    assert torch.isfinite(impl.step())
    impl, _, reason = runner._warm_up(Impl("cce", broken, compiled=True), case, Options())
    assert impl is None and "torch.compile failed" in reason
    with pytest.raises(RuntimeError):  # an uncompiled implementation's error is a real error
        runner._warm_up(Impl("eager", broken), case, Options())
