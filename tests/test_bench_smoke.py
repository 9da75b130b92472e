"""Smoke test of the benchmark harness (bench/) and the ``fastpref bench`` CLI on tiny shapes."""
import json
import os

import pytest

from fastpref.bench import runner
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
                        impls=["eager", "trl", "liger", "cce", "fastpref-torch"], compile=False, repeats=2,
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
        assert (w, "eager") in impls and (w, "trl") in impls and (w, "fastpref-torch") in impls
    assert ("dpo", "liger") in impls and ("var", "liger") not in impls
    # CCE on CPU is torch.compile only, so --no-compile must leave it out, and say so.
    assert any(s["impl"] == "cce" and "compile" in s["reason"] for s in results["skipped"])
    for r in rows:
        assert len(r["times_s"]) == 2 and r["time_s"] > 0 and r["floor_s"] > 0
        assert r["peak_bytes"] == r["input_bytes"] + r["tracked_bytes"]
        assert r["workspace_bytes"] == r["tracked_bytes"] - r["grad_bytes"]
        # The floor is sampled several times per round and its fastest sample is the floor.
        assert len(r["floor_times_s"]) == 2 * runner.FLOOR_TIMES_PER_ROUND > 2
        assert r["floor_s"] == min(r["floor_times_s"]) <= r["floor_median_s"]
        assert r["time_vs_floor"] == pytest.approx(r["time_s"] / r["floor_s"])
        assert r["best_time_vs_floor"] == pytest.approx(r["time_min_s"] / r["floor_s"])
        assert r["time_min_s"] == min(r["times_s"]) <= r["time_s"]
        if r["impl"] == "eager":
            assert r["time_vs_eager"] == 1.0 and r["workspace_below_eager"] == 1.0
        trl = next(x for x in rows if x["impl"] == "trl" and x["workload"] == r["workload"]
                   and x["vocab"] == r["vocab"])
        assert r["time_vs_trl"] == pytest.approx(r["time_s"] / trl["time_s"])
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
    with_trl = rows + [dict(base, impl="trl", time_s=1.0, time_min_s=1.0, workspace_bytes=3000)]
    runner.add_ratios(with_trl)
    met = {c["target"]: c["met"] for c in runner.evaluate_targets(with_trl)}
    assert len(met) == 10 and met["time / trl <= 1.0 (best)"] is False  # 1.2 s vs TRL's 1.0 s
    runner.add_ratios(rows)
    rows[2].update(time_s=2.5, workspace_bytes=200)  # median slower than eager and floor, best still fast
    runner.add_ratios(rows)
    met = {c["target"]: c["met"] for c in runner.evaluate_targets(rows)}
    assert not met["time / eager <= 1.0 (median)"] and met["time / eager <= 1.0 (best)"]
    assert not met["time / GEMM floor <= 1.35 (median)"] and not met["workspace >= 40x below eager"]
    assert runner.evaluate_targets(rows[:2]) == []  # no fastpref row: nothing to check


@pytest.mark.parametrize("workload", ["logprobs", "dpo", "var", "spo", "mcpo"])
def test_implementations_compute_the_same_loss_and_gradients(workload):
    """The peers and fastpref benchmark the same quantity: same loss and same gradients (fp32 accuracy).
    CCE (torch.compile on CPU) is covered by the log-prob op's parity elsewhere, not here."""
    import torch

    from fastpref.bench.workloads import Options, build_case, implementations, release

    case = build_case(workload, 128, 16, 3000, torch.float32, torch.device("cpu"), seed=3)
    ready, skipped = implementations(case, Options(compile=False, impls=("eager", "trl", "liger", "fastpref-torch")))
    names = {impl.name for impl in ready}
    assert {"eager", "trl", "fastpref-torch"} <= names, skipped
    assert ("liger" in names) == (workload == "dpo")
    results = {}
    for impl in ready:
        release(case.params)
        loss = impl.step()
        loss.backward()
        results[impl.name] = (loss.item(), [p.grad.clone() for p in case.params])
    release(case.params)
    ref_loss, ref_grads = results["eager"]
    for name, (value, grads) in results.items():
        assert value == pytest.approx(ref_loss, rel=1e-4, abs=1e-4), (name, value, ref_loss)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_trl_peer_runs_the_policy_first_then_the_reference_without_grad(monkeypatch):
    """DPOTrainer's order and outputs: the policy (entropy, mean logit, top-1 for its metrics) with grad,
    then the reference under no_grad with log-probs only."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from fastpref.bench import peers
    from fastpref.bench.workloads import Options, build_case, implementations

    calls = []
    apply = ChunkedLogProbFunction.apply

    def spy(hidden, weight, *args):
        calls.append((hidden.data_ptr(), weight.data_ptr(), torch.is_grad_enabled(), args[-1]))
        return apply(hidden, weight, *args)

    monkeypatch.setattr(ChunkedLogProbFunction, "apply", spy)
    case = build_case("dpo", 64, 16, 500, torch.float32, torch.device("cpu"))
    (impl,), _ = implementations(case, Options(compile=False, impls=("trl",)))
    impl.step().backward()
    t = case.tensors
    assert calls == [(t["hidden"].data_ptr(), t["weight"].data_ptr(), True, peers.TRL_DPO_POLICY_OUTPUTS),
                     (t["ref_hidden"].data_ptr(), t["ref_weight"].data_ptr(), False, peers.TRL_LOGPROBS_ONLY)]


def test_quick_grid_is_light_and_single_threaded():
    """--quick: every loss at the first shape, DPO over the whole quick grid (the plots), one thread."""
    cfg = runner.Config(quick=True)
    jobs = cfg.jobs()
    assert cfg.num_threads() == runner.QUICK_THREADS == 1 and cfg.num_repeats() == 3
    assert {w for w, s in jobs if s == runner.QUICK_SHAPES[0]} == set(runner.WORKLOADS)
    for shape in runner.QUICK_SHAPES[1:]:
        assert {w for w, s in jobs if s == shape} == {"dpo"}
    assert len(jobs) == 5 + 2
    assert runner.Config(quick=True, threads=2).num_threads() == 2 and runner.Config().num_threads() is None
    # A custom grid runs every workload on every shape, quick or not.
    custom = runner.Config(quick=True, shapes=[(64, 16, 256, "fp32"), (128, 16, 256, "fp32")])
    assert len(custom.jobs()) == 2 * len(runner.WORKLOADS)


def test_full_grid_axes():
    """D is a grid axis, and bf16 rows cover the fp32 vocabularies."""
    dims = {d for _, d, _, _ in runner.FULL_SHAPES}
    assert len(dims) >= 2 and (1024, 4096, 32000, "fp32") in runner.FULL_SHAPES
    vocab = {dt: {v for _, _, v, t in runner.FULL_SHAPES if t == dt} for dt in ("fp32", "bf16")}
    assert vocab["bf16"] == vocab["fp32"] == {32000, 128256, 256000}
    assert any(s == (4096, 1024, 32000, "fp32") for s in runner.FULL_SHAPES)  # the DPO target row


def test_tiny_bf16_custom_grid_from_the_cli(tmp_path, capsys):
    from fastpref.cli import main

    rc = main(["bench", "--n", "64", "--d", "32", "--v", "1000", "--dtype", "bf16", "--repeats", "1",
               "--out", str(tmp_path), "--no-compile", "--no-plots", "--losses", "dpo,logprobs"])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert {r["dtype"] for r in rows} == {"bf16"} and {r["impl"] for r in rows} >= {"eager", "trl", "fastpref-torch"}
    assert all(r["time_s"] > 0 and r["workspace_bytes"] >= 0 for r in rows)
    out = capsys.readouterr().out
    # The rich table's impl column is never truncated.
    assert "fastpref-torch " in out and "fastpref-to…" not in out and "results.md" in out


def test_results_md_feeds_the_readme_generator(tiny_results):
    from fastpref.bench import readme

    _, out = tiny_results
    md = readme.parse_results_md((out / "results.md").read_text())
    assert md.machine.startswith(tuple("0123456789")) and "threads" in md.machine and "load average" in md.machine
    assert md.table[0].startswith("| loss | N | D | V |") and any("| trl |" in row for row in md.table)
    assert md.targets == []  # no target row in the tiny grid
    block = readme.render_quick(md, "X.md")
    assert md.table[-1] in block and block.startswith("Source: `X.md`") and md.machine in block


@pytest.mark.gpu
def test_runner_on_cuda(tmp_path):
    """The runner on device='cuda' with a tiny shape: Triton backend row, CUDA peak memory."""
    cfg = runner.Config(out=str(tmp_path), device="cuda", shapes=[(256, 64, 4096, "bf16")],
                        impls=["eager", "trl", "liger", "fastpref-torch", "fastpref-triton"], compile=False,
                        repeats=2, show=False, workloads=["logprobs", "dpo"], plots=False)
    results = runner.run(cfg)
    rows = {(r["workload"], r["impl"]): r for r in results["rows"]}
    for w in ("logprobs", "dpo"):
        for impl in ("eager", "trl", "fastpref-torch", "fastpref-triton"):
            r = rows[(w, impl)]
            assert r["device"] == "cuda" and r["time_s"] > 0 and r["tracked_bytes"] > 0
        assert rows[(w, "fastpref-triton")]["workspace_bytes"] < rows[(w, "eager")]["workspace_bytes"]
    assert results["meta"].get("gpu")


def test_failed_compile_falls_back_or_is_skipped():
    """A torch.compile failure must not abort the run: Liger reruns uncompiled, CCE is left out."""
    import torch

    from fastpref.bench.workloads import Impl, Options, build_case

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


def test_gpu_report_beside_the_cost_model():
    """bench/gpu.py's targets and Markdown on fabricated GPU rows (no GPU here: the numbers are made up)."""
    from fastpref.bench import cost_model, gpu

    card = cost_model.CARDS["H100 SXM"]

    def row(workload, impl, time_s, vocab, workspace=None):
        pred = cost_model.predict(impl, workload, 8192, 4096, vocab, "bf16", card)
        return dict(workload=workload, tokens=8192, dim=4096, vocab=vocab, dtype="bf16", device="cuda", impl=impl,
                    time_s=time_s, time_min_s=time_s, times_s=[time_s], peak_bytes=None, workspace_bytes=workspace,
                    workspace_beyond_dw_mib=workspace, time_vs_floor=time_s / 0.04,
                    time_vs_liger=time_s / 0.2 if workload == "dpo" else None, prediction=pred.to_dict(),
                    time_vs_predicted=time_s / pred.time_s, note="")

    rows = [row("dpo", "gemm-floor", 0.04, 128256), row("dpo", "fastpref-triton", 0.05, 128256, 300.0),
            row("dpo", "liger", 0.2, 128256), row("logprobs", "fastpref-triton", 0.07, 151936)]
    targets = gpu.targets(rows, on_gpu=True)
    assert [t["met"] for t in targets] == [True, True, True, False]  # 1.25x floor, 0.25x liger, 300 MiB; 1.75x floor
    assert all(t["met"] is None for t in gpu.targets(rows, on_gpu=False))
    md = gpu.markdown({"meta": dict(machine="GPU NVIDIA H100 80GB HBM3 (made-up rows)", torch="x", repeats=1,
                                    elapsed_s=0), "rows": rows, "targets": targets, "skipped": []})
    assert "| dpo | 8192 | 4096 | 128256 | bf16 | fastpref-triton | 50.00 |" in md and "| compute |" in md
    assert "| logprobs | time_vs_floor <= 1.5 | 1.750 | NO |" in md
