"""Ahead-of-time compile of every Triton kernel and autotune configuration (no GPU needed)."""
import os

import pytest

from fastpref.backends import triton_aot as kernels
from fastpref.cli import build_parser

ARCHS = ("sm_80", "sm_90a")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    jobs = []
    for arch in ARCHS:
        os.makedirs(out / arch)
        jobs += kernels.jobs_for(arch, str(out / arch))
    return kernels.compile_jobs(jobs)


def _expected_count(arch):
    import importlib

    total = 0
    for module_name, _, table_name in kernels.KERNELS.values():
        table = getattr(importlib.import_module(module_name), table_name)
        name = next(k for k, v in kernels.KERNELS.items() if v[0] == module_name)
        total += sum(len(table[(arch, kernels.VARIANT_PRECISION[v])])
                     for v, spec in kernels.VARIANTS.items() if name in spec[3])
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_every_configuration_compiles_without_spills(reports, arch):
    mine = [r for r in reports if r.arch == arch]
    assert len(mine) == _expected_count(arch) > 0
    for r in mine:
        assert os.path.getsize(r.ptx_path) > 0
        assert 0 < r.registers <= 255, r
        assert r.spill_bytes == 0, f"{r.kernel} {r.variant} {r.config} spills {r.spill_bytes} bytes on {arch}"
        assert r.shared_bytes <= (227 if arch == "sm_90a" else 163) * 1024, r


def test_hopper_gemms_use_wgmma(reports):
    half = [r for r in reports if r.arch == "sm_90a" and r.variant.startswith(("bf16", "tf32"))]
    assert {r.kernel for r in half} == {"logprobs_fwd", "logprobs_bwd"}
    for r in half:
        assert r.wgmma, f"{r.kernel} {r.variant} {r.config} does not use wgmma on sm_90a"
        # every GEMM: logits (+ reference logits) in both kernels, and dz @ W, dz^T @ H in the backward
        assert r.wgmma_dots == r.dots == (2 if r.kernel == "logprobs_fwd" else 4), r
    assert not any(r.wgmma for r in reports if r.arch == "sm_80")
    # the exact fp32 path is an FMA dot: no tensor cores, by design
    assert not any(r.wgmma_dots for r in reports if r.variant == "fp32_kl")


def test_table_and_cli_arguments(reports):
    assert {r.kernel for r in reports} == set(kernels.KERNELS)
    assert all((r.dots > 0) == (r.kernel in kernels.GEMM_KERNELS) for r in reports)
    table = kernels.format_table(reports)
    assert table.count("\n") == len(reports) + 1
    args = build_parser().parse_args(["kernels", "--arch", "sm_90a", "--out", "somewhere", "--report", "r.md"])
    assert (args.arch, args.out, args.report) == ("sm_90a", "somewhere", "r.md")
    report = kernels.report_markdown("sm_90a", [r for r in reports if r.arch == "sm_90a"])
    assert "spill-free" in report and report.count("| logprobs_") == sum(r.arch == "sm_90a" for r in reports)
    with pytest.raises(ValueError, match="arch"):
        kernels.compile_all("sm_75", "somewhere")


def test_parse_ptxas():
    text = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 4 bytes spill stores, "
            "12 bytes spill loads\nptxas info    : Used 96 registers, used 1 barriers\n")
    assert kernels.parse_ptxas(text) == (96, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_autotuner_prunes_to_the_device_and_precision(monkeypatch, arch):
    import torch

    from fastpref.kernels import configs, logprobs_bwd, logprobs_fwd

    monkeypatch.setattr(configs, "device_arch", lambda: arch)
    bf16, fp32 = torch.bfloat16, torch.float32
    for table, tuned in ((logprobs_fwd.FWD_CONFIGS, logprobs_fwd.logprobs_fwd_autotuned),
                         (logprobs_bwd.BWD_CONFIGS, logprobs_bwd.logprobs_bwd_autotuned)):
        # (policy dtype, reference dtype, TF32 on, expected column): a mixed launch takes the stricter tiles.
        for dtype, ref_dtype, tf32, precision in ((bf16, bf16, False, "half"), (fp32, fp32, False, "fp32"),
                                                  (fp32, fp32, True, "tf32"), (bf16, fp32, False, "fp32"),
                                                  (bf16, fp32, True, "tf32")):
            monkeypatch.setattr(configs, "tf32_enabled", lambda tf32=tf32: tf32)
            args = {"hidden_ptr": torch.empty(0, dtype=dtype), "ref_hidden_ptr": torch.empty(0, dtype=ref_dtype)}
            kept = tuned.early_config_prune(tuned.configs, args)
            assert sorted(configs.config_name(c) for c in kept) == \
                sorted(configs.config_name(c) for c in table[(arch, precision)])
