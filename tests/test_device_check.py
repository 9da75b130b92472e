"""The GPU device check (``fastpref check --device cuda``), the GPU benchmark (``fastpref bench --device cuda
--quick``) and its cost model.

Without a GPU: unit tests of the pieces, and the CPU smoke, both commands on tiny shapes under Triton's
interpreter (``--device cpu-interpret --tiny``), in subprocesses because ``TRITON_INTERPRET`` must be set
before ``fastpref.kernels`` is first imported. Nothing here measures a GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpref.bench import cost_model, gpu
from fastpref.cli import build_parser, main
from fastpref.device_check import cases, checks
from fastpref.device_check import configs as shipped

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- cost model


def test_card_lookup_by_device_name():
    assert cost_model.card_for("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert cost_model.card_for("NVIDIA H200").bandwidth == 4.8e12
    assert cost_model.card_for("NVIDIA A100-SXM4-80GB").half_flops == 312e12
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA GeForce RTX 4090", "", None):
        assert cost_model.card_for(other) is None


def test_floor_prediction_counts_four_gemms_for_dpo():
    N, D, V = 8192, 4096, 128256
    h100 = cost_model.CARDS["H100 SXM"]
    p = cost_model.predict("gemm-floor", "dpo", N, D, V, "bf16", h100)
    assert p.flops == 4 * 2 * N * D * V
    assert p.bytes == 4 * (N + V) * D * 2 + N * V * (3 * 2 + 2)
    assert p.bound == "compute" and p.time_s == pytest.approx(p.flops / 989e12)
    assert 0.030 < p.time_s < 0.040  # ~35 ms: the cuBLAS floor of the DPO target row at peak
    assert cost_model.predict("gemm-floor", "logprobs", N, D, V, "bf16", h100).flops == 3 * 2 * N * D * V


def test_predictions_order_the_implementations():
    N, D, V, card = 8192, 4096, 151936, cost_model.CARDS["H100 SXM"]
    pred = {i: cost_model.predict(i, "logprobs", N, D, V, "bf16", card) for i in cost_model.IMPLS}
    assert pred["fastpref-triton"].flops == pred["cce"].flops == 4 / 3 * pred["gemm-floor"].flops  # one recompute
    assert pred["eager"].bytes > pred["trl"].bytes > pred["gemm-floor"].bytes > pred["cce"].bytes
    assert all(p.time_s >= p.flops_s and p.time_s >= p.bytes_s for p in pred.values())
    # the same step moves more per byte of bandwidth on an H200: never slower than on an H100
    h200 = cost_model.predict("eager", "logprobs", N, D, V, "bf16", cost_model.CARDS["H200"])
    assert h200.time_s <= pred["eager"].time_s


def test_no_prediction_without_a_card_or_a_published_peak():
    p = cost_model.predict("eager", "dpo", 64, 16, 100, "bf16", None)
    assert p.time_s is None and p.flops > 0 and "unknown card" in p.note
    p = cost_model.predict("eager", "dpo", 64, 16, 100, "fp32", cost_model.CARDS["A100"])
    assert p.time_s is None and "fp32" in p.note
    assert p.to_dict()["card"] == "A100"


@pytest.mark.parametrize("kwargs, name", [(dict(impl="nope"), "impl"), (dict(workload="var"), "workload"),
                                          (dict(vocab=0), "vocab"), (dict(tokens=1.5), "tokens")])
def test_cost_model_errors_name_the_argument(kwargs, name):
    args = dict(impl="eager", workload="dpo", tokens=8, dim=4, vocab=10, dtype="bf16", card=None, **{})
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        cost_model.predict(**args)


# ----------------------------------------------------------------------------------------- device check pieces


def test_discovers_every_config_table_with_its_kernels():
    tables = {t.label: t for t in shipped.discover()}
    assert {"logprobs_fwd.FWD_CONFIGS", "logprobs_bwd.BWD_CONFIGS"} <= set(tables)
    for t in tables.values():
        assert t.kernels, f"{t.label}: no kernel found beside the table"
        assert all(isinstance(k, tuple) and len(k) == 2 for k in t.table)
    assert tables["logprobs_fwd.FWD_CONFIGS"].autotuners  # the autotuned kernels are the ones forced
    names = [shipped.config_name(c) for _, c in shipped.configs_for(tables["logprobs_fwd.FWD_CONFIGS"], "sm_90a")]
    assert names and all(n.startswith("n") and "_w" in n for n in names)


def test_forced_pins_one_config_and_restores_everything():
    table = next(t for t in shipped.discover() if t.autotuners)
    tuner, kernel = table.autotuners[0], table.kernels[0]
    before = list(tuner.configs)
    cfg = before[-1]
    with shipped.forced(table, cfg, interpreting=True) as count:
        assert tuner.configs == [cfg] and "run" in vars(kernel)
        assert count.launches == 0
    assert tuner.configs == before and "run" not in vars(kernel)


def test_pick_arch():
    keys = ["sm_80", "sm_90a", "sm_80"]
    assert checks.pick_arch(keys, (9, 0)) == "sm_90a"
    assert checks.pick_arch(keys, (8, 9)) == "sm_80"
    assert checks.pick_arch(keys, (7, 5)) is None
    assert checks.pick_arch(keys, None) == "sm_90a"


def test_eager_error_rule():
    eager = {"logps": 1e-2, "d_weight": 2e-2}
    assert cases.judge({"logps": 5e-3, "d_weight": 2.05e-2}, eager, "bf16")[0]
    passed, worst, fused, base = cases.judge({"logps": 5e-3, "d_weight": 3e-2}, eager, "bf16")
    assert not passed and worst == "d_weight" and (fused, base) == (3e-2, 2e-2)
    assert not cases.judge({"logps": float("nan"), "d_weight": 0.0}, eager, "bf16")[0]
    assert not cases.judge({"bias_gaps": 1.0}, {}, "fp32")[0]  # a gradient into the strided bias's gaps


def test_bias_views_keep_their_strides():
    bias = torch.randn(7)
    _, strided, pick = cases._bias_leaf(bias, "strided")
    assert strided.stride() == (2,) and torch.equal(strided, bias)
    _, expanded, _ = cases._bias_leaf(bias, "expanded")
    assert expanded.stride() == (0,) and torch.equal(expanded, bias[:1].expand(7))
    with pytest.raises(ValueError, match="bias_view"):
        cases._bias_leaf(bias, "transposed")


def test_matmul_precision_is_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with cases.matmul_precision(True):
        assert matmul.fp32_precision == "tf32"
    with cases.matmul_precision(False):
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before


def test_cases_cover_every_precision_column():
    tables = shipped.discover()
    columns = {column for t in tables if t.module != checks.ROWS_MODULE for _, column in t.table}
    assert columns <= set(cases.SWEEP), columns
    rows = [t for t in tables if t.module == checks.ROWS_MODULE]  # swept through the grad_in_forward path
    assert len(rows) == 1 and {column for _, column in rows[0].table} <= {"fp32", "fp64"}
    assert set(cases.SHAPES["cuda"]) == set(cases.SHAPES["tiny"])
    big = cases.SHAPES["cuda"]
    assert big["large_vocab"]["V"] == 128256 and big["long"]["layout"] == "packed" and sum(big["long"]["lengths"]) == 4096
    assert all(s["V"] % 64 for k, s in big.items() if k != "large_vocab")  # vocabularies not a multiple of blocks


# ----------------------------------------------------------------------------------------- command line


def test_test_only_flags_are_hidden_and_guarded(capsys):
    for command in ("check", "bench"):
        out = subprocess.run([sys.executable, "-m", "fastpref", command, "--help"], capture_output=True, text=True,
                             check=True, env=dict(os.environ, COLUMNS="200")).stdout
        assert "--device" in out and "--tiny" not in out
    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
            main(["check", "--device", "cpu-interpret", "--tiny"])
        with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
            main(["bench", "--device", "cpu-interpret", "--tiny"])
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    with pytest.raises(SystemExit, match="--tiny"):
        main(["check", "--tiny"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main(["check", "--device", "cuda"])
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main(["bench", "--device", "cuda", "--quick"])
    args = build_parser().parse_args(["check", "--device", "cuda", "--out", "o", "--budget-s", "60"])
    assert (args.device, args.out, args.budget_s, args.tiny) == ("cuda", "o", 60.0, False)


# ----------------------------------------------------------------------------------------- CPU smoke (interpreter)


def _interpret(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "fastpref", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_device_check_smoke_under_the_interpreter(tmp_path):
    proc = _interpret("check", "--device", "cpu-interpret", "--tiny", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "device_check.json").read_text())
    md = (tmp_path / "device_check.md").read_text()
    assert "not a GPU measurement" in results["meta"]["machine"] and results["meta"]["machine"] in md
    rows = results["rows"]
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    assert list(by_section) == ["configs", "parity", "bias", "precision", "determinism", "syncs"]
    # every shipped configuration of the chosen arch was forced once, and its kernel really launched
    arch = results["meta"]["arch"]
    expected = sorted((t.label, f"{arch}/{p}/{shipped.config_name(c)}")
                      for t in shipped.discover() for p, c in shipped.configs_for(t, arch))
    assert sorted((r["name"], r["config"]) for r in by_section["configs"]) == expected
    assert all(r["value"] >= 1 for r in by_section["configs"])
    names = {r["name"] for r in rows}
    assert {"bias_strided_bf16", "bias_expanded_bf16", "fp32_tf32_on", "fp32_tf32_off",
            "bf16_policy_fp32_ref_head", "two_runs_bitwise_equal"} <= names
    failed = [r for r in rows if r["status"] == "FAIL"]
    assert not failed, failed
    (sync,) = by_section["syncs"]
    assert sync["status"] == "skipped" and "needs CUDA" in sync["note"]
    assert results["summary"]["FAIL"] == 0 and "| two_runs_bitwise_equal |" in md


def test_gpu_bench_smoke_under_the_interpreter(tmp_path):
    proc = _interpret("bench", "--device", "cpu-interpret", "--tiny", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "no number here is a GPU measurement" in md
    impls = {(r["workload"], r["impl"]) for r in results["rows"]}
    for workload in ("dpo", "logprobs"):
        assert {(workload, "gemm-floor"), (workload, "fastpref-triton"), (workload, "eager")} <= impls
    assert ("dpo", "liger") in impls or any(s["impl"] == "liger" and "pip install" in s["reason"]
                                             for s in results["skipped"])
    assert any(s["impl"] == "cce" and s["workload"] == "logprobs" for s in results["skipped"])
    for r in results["rows"]:
        per_round = gpu.FLOOR_PER_ROUND if r["impl"] == "gemm-floor" else 1
        assert r["time_s"] > 0 and len(r["times_s"]) == per_round * results["meta"]["repeats"]
        assert r["time_vs_floor"] == pytest.approx(r["time_s"] / next(
            x["time_s"] for x in results["rows"] if x["impl"] == "gemm-floor" and x["workload"] == r["workload"]))
        assert r["prediction"]["time_s"] is None and r["prediction"]["flops"] > 0  # CPU: no card, no time
        assert f"| {r['workload']} | {r['tokens']} | {r['dim']} | {r['vocab']} | bf16 | {r['impl']} |" in md
    assert all(t["met"] is None and "not measured" in t["note"] for t in results["targets"])


@pytest.mark.gpu
def test_both_commands_on_cuda_with_tiny_shapes(tmp_path):
    """The GPU plumbing in seconds (the real run: ``fastpref check --device cuda``, see docs/gpu.md)."""
    from fastpref import device_check

    results = device_check.run("cuda", str(tmp_path / "check"), tiny=True)
    assert results["rows"] and (tmp_path / "check" / "device_check.md").exists()
    (sync,) = [r for r in results["rows"] if r["section"] == "syncs"]
    assert sync["status"] in ("ok", "FAIL") and isinstance(sync["value"], int)
    bench = gpu.run(gpu.Config(device="cuda", out=str(tmp_path / "bench"), tiny=True, compile=False))
    assert {r["impl"] for r in bench["rows"]} >= {"gemm-floor", "fastpref-triton", "eager"}
