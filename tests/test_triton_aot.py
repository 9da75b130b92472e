"""Ahead-of-time compile of every Triton kernel and autotune configuration (no GPU needed): resources, wgmma,
and the SASS (no GPU-wide fence, returning atomic or L1 invalidate in any kernel)."""
import argparse
import importlib
import os

import pytest

from fastpref.backends import triton_aot as kernels
from fastpref.cli import build_parser
from fastpref.commands import kernels as kernels_command

ARCHS = ("sm_80", "sm_90a")
# tl.dot ops per GEMM kernel in the heaviest variants: the logits and reference logits tiles, and in the
# fused atomic backward also dz @ W and dz^T @ H.
EXPECTED_DOTS = {"logprobs_fwd": 2, "logprobs_bwd": 4, "logprobs_dz": 2}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    jobs = []
    for arch in ARCHS:
        os.makedirs(out / arch)
        jobs += kernels.jobs_for(arch, str(out / arch))
    return kernels.compile_jobs(jobs)


def _expected_count(arch):
    total = 0
    for name, (module_name, _, _) in kernels.KERNELS.items():
        module = importlib.import_module(module_name)
        total += sum(len(kernels.variant_table(module, name, v)[(arch, kernels.VARIANT_PRECISION[v])])
                     for v, spec in kernels.VARIANTS.items() if name in spec[3])
    return total


def test_every_variant_is_also_compiled_with_the_extra_outputs():
    """Each default variant has an ``_extras`` twin with EXTRAS and ENTROPY on (and nothing else changed), and
    the extras twins of the GEMM kernels draw from the kernel's ``*_EXTRAS_CONFIGS`` table."""
    defaults = [v for v in kernels.VARIANTS if not v.endswith(kernels.EXTRAS_SUFFIX)]
    assert len(kernels.VARIANTS) == 2 * len(defaults)
    for v in defaults:
        dtype, precision, flags, names = kernels.VARIANTS[v]
        assert not flags["EXTRAS"] and not flags["ENTROPY"]
        twin = kernels.VARIANTS[v + kernels.EXTRAS_SUFFIX]
        assert twin == (dtype, precision, dict(flags, EXTRAS=True, ENTROPY=True), names)
        assert kernels.VARIANT_PRECISION[v + kernels.EXTRAS_SUFFIX] == kernels.VARIANT_PRECISION[v]
    for name in kernels.GEMM_KERNELS:
        module_name, _, table_name = kernels.KERNELS[name]
        module = importlib.import_module(module_name)
        extras = getattr(module, table_name.replace("_CONFIGS", "_EXTRAS_CONFIGS"))
        assert kernels.variant_table(module, name, "bf16_kl_extras") is extras
        assert kernels.variant_table(module, name, "bf16_kl") is getattr(module, table_name)
        assert set(extras) == set(getattr(module, table_name)) and all(extras.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_configuration_compiles_without_spills(reports, arch):
    mine = [r for r in reports if r.arch == arch]
    assert len(mine) == _expected_count(arch) > 0
    for r in mine:
        assert os.path.getsize(r.ptx_path) > 0 and os.path.getsize(r.cubin_path) > 0
        assert 0 < r.registers <= 255, r
        assert r.shared_bytes <= (227 if arch == "sm_90a" else 163) * 1024, r
    spilling = [f"{r.kernel} {r.variant} {r.config}: {r.spill_bytes} B" for r in mine if r.spill_bytes]
    assert not spilling, f"spills on {arch}: {spilling}"


def test_sass_has_no_gpu_wide_fence_returning_atomic_or_l1_invalidate(reports):
    """Anywhere in any kernel, not only in loops: the fused backward's atomics are relaxed (``RED``), and no
    other kernel has atomics. The parser is not vacuous: every GEMM kernel has its K loop, and the fused
    backward's reductions are found inside its loop over D."""
    bad = [f"{r.kernel} {r.variant} {r.config} {r.arch}: {kernels.serialising(r)} ({r.sass})"
           for r in reports if kernels.serialising(r)]
    assert not bad, "\n".join(bad)
    assert all(r.sass is not None for r in reports)
    assert all(r.sass.loops > 0 for r in reports if r.kernel in kernels.GEMM_KERNELS)
    fused = [r for r in reports if r.kernel == "logprobs_bwd"]
    assert all(r.sass.reductions_in_loops > 0 for r in fused)
    assert not any(r.sass.reductions for r in reports if r.kernel != "logprobs_bwd")


def test_hopper_gemms_use_wgmma(reports):
    half = [r for r in reports if r.arch == "sm_90a" and r.variant.startswith(("bf16", "tf32"))]
    assert {r.kernel for r in half} == set(kernels.GEMM_KERNELS) == set(EXPECTED_DOTS)
    for r in half:
        assert r.wgmma, f"{r.kernel} {r.variant} {r.config} does not use wgmma on sm_90a"
        assert r.wgmma_dots == r.dots == EXPECTED_DOTS[r.kernel], r  # every GEMM of the kernel
    assert not any(r.wgmma for r in reports if r.arch == "sm_80")
    # the exact fp32 path is an FMA dot: no tensor cores, by design
    assert not any(r.wgmma_dots for r in reports if r.variant.startswith("fp32_kl"))


def test_table_and_cli_arguments(reports):
    assert {r.kernel for r in reports} == set(kernels.KERNELS)
    assert all((r.dots > 0) == (r.kernel in kernels.GEMM_KERNELS) for r in reports)
    table = kernels.format_table(reports)
    assert table.count("\n") == len(reports) + 1
    for column in ("GPU fences (in loops)", "ATOMG (in loops)", "CCTL.IVALL (in loops)", "RED (in loops)"):
        assert column in table.splitlines()[0]
    args = build_parser().parse_args(["kernels", "--arch", "sm_90a", "--out", "somewhere", "--report", "r.md"])
    assert (args.arch, args.out, args.report) == ("sm_90a", "somewhere", "r.md")
    report = kernels.report_markdown("sm_90a", [r for r in reports if r.arch == "sm_90a"])
    assert sum(report.count(f"| {name} |") for name in kernels.KERNELS) == sum(r.arch == "sm_90a" for r in reports)
    assert "No configuration has a GPU-wide fence, a returning atomic or an L1 invalidate" in report
    with pytest.raises(ValueError, match="arch"):
        kernels.compile_all("sm_75", "somewhere")


def test_cli_prints_the_sass_columns_and_fails_on_a_fence_in_a_loop(monkeypatch, capsys, tmp_path):
    """The command's table and exit status, on reports given to it (the compile is tested above)."""
    clean = kernels.KernelReport("k", "bf16_kl", "n64_w4_s3", "sm_90a", 128, 0, 1024, True, 2, 2, "k.ptx",
                                 sass=kernels.SassCounts(reductions=3, reductions_in_loops=2, loops=1))
    fenced = kernels.KernelReport("k", "bf16_rkl", "n64_w4_s3", "sm_90a", 128, 0, 1024, True, 2, 2, "k.ptx",
                                  sass=kernels.parse_sass(SASS_ACQ_REL_LOOP))
    args = argparse.Namespace(arch="sm_90a", out=str(tmp_path), workers=1, report=str(tmp_path / "r.md"))
    for given, status in (([clean], 0), ([clean, fenced], 1)):
        monkeypatch.setattr(kernels_command, "compile_all", lambda *a, given=given, **k: given)
        assert kernels_command.run(args) == status
        out = capsys.readouterr().out
        assert "| 3 (2) |" in out and "RED (in loops)" in out
        assert ("k bf16_rkl n64_w4_s3: fences, atomics, l1_invalidates inside a loop" in out) == (status == 1)
    assert "| 1 (1) | 1 (1) | 1 (1) | 0 |" in (tmp_path / "r.md").read_text()


# Hand-written SASS in cuobjdump -sass's layout (address comment, optional predicate, opcode, operands; the
# second half of each 128-bit encoding on a line of its own).
SASS_ACQ_REL_LOOP = """
	code for sm_90a
		Function : k
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000e620000000800 */
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   MEMBAR.ALL.GPU ;
        /*0030*/                   ERRBAR;
        /*0040*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, desc[UR14][R32.64], R35 ;
        /*0050*/                   CCTL.IVALL ;
        /*0060*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0070*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        /*0080*/              @!P0 BRA 0x20 ;                                  /* 0xfffffff800d4d947 */
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""

SASS_RELAXED = """
		Function : k
        /*0000*/                   ATOMS.ADD RZ, [R3], R4 ;
        /*0010*/                   MEMBAR.ALL.CTA ;
        /*0020*/                   FENCE.VIEW.ASYNC.S ;
        /*0030*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;
        /*0040*/                   REDUX.SUM UR4, R6 ;
        /*0050*/               @P1 BRA.U !UP0, 0x30 ;
        /*0060*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R8.64], R9 ;
        /*0070*/                   EXIT ;
"""

SASS_FENCE_OUTSIDE_LOOPS = """
		Function : first
        /*0000*/                   FFMA R0, R1, R2, R0 ;
        /*0010*/               @P0 BRA 0x0 ;
        /*0020*/               @P1 BRA 0x60 ;
        /*0030*/                   MEMBAR.SC.GPU ;
        /*0040*/                   ATOMG.E.ADD.STRONG.GPU PT, R4, [R2.64], R5 ;
        /*0050*/                   CCTL.IVALL ;
        /*0060*/                   EXIT ;
		Function : second
        /*0000*/                   FFMA R0, R1, R2, R0 ;
        /*0010*/                   NOP ;
        /*0020*/                   NOP ;
        /*0030*/                   NOP ;
        /*0040*/                   NOP ;
        /*0050*/               @P0 BRA 0x0 ;
        /*0060*/                   MEMBAR.SC.SYS ;
        /*0070*/                   EXIT ;
"""


def test_parse_sass_fence_and_atomic_inside_a_loop():
    s = kernels.parse_sass(SASS_ACQ_REL_LOOP)
    assert (s.fences, s.fences_in_loops, s.atomics, s.atomics_in_loops) == (1, 1, 1, 1)
    assert (s.l1_invalidates, s.l1_invalidates_in_loops, s.reductions) == (1, 1, 0)
    assert s.loops == 1  # the trailing self-branch is padding, not a loop


def test_parse_sass_relaxed_reductions_only():
    s = kernels.parse_sass(SASS_RELAXED)
    # shared-memory atomics, CTA-scope and proxy fences and warp reductions are not GPU-wide
    assert (s.fences, s.atomics, s.l1_invalidates) == (0, 0, 0)
    assert (s.reductions, s.reductions_in_loops, s.loops) == (2, 1, 1)


def test_parse_sass_fence_outside_loops_and_per_function_addresses():
    s = kernels.parse_sass(SASS_FENCE_OUTSIDE_LOOPS)
    # a forward branch is no loop; the second function's loop spans its own 0x0-0x50, not the first's
    assert (s.fences, s.fences_in_loops, s.atomics, s.atomics_in_loops) == (2, 0, 1, 0)
    assert (s.l1_invalidates, s.l1_invalidates_in_loops, s.loops) == (1, 0, 2)
    assert [kernels.sass_kind(op) for op in ("MEMBAR.ALL.GPU", "MEMBAR.GL", "ATOM.E.ADD", "ATOMS.ADD", "REDUX")] == \
        ["fences", "fences", "atomics", None, None]


def test_parse_ptxas():
    text = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 4 bytes spill stores, "
            "12 bytes spill loads\nptxas info    : Used 96 registers, used 1 barriers\n")
    assert kernels.parse_ptxas(text) == (96, 16)


def test_signature_is_built_from_argument_names():
    from fastpref.kernels import logprobs_bwd, logprobs_dz

    fn = logprobs_dz.logprobs_dz_kernel
    sig = kernels._signature(fn, "bf16", {"BLOCK_N": 64})
    assert (sig["hidden_ptr"], sig["dz_ptr"], sig["rows_ptr"], sig["targets_ptr"]) == ("*bf16",) * 2 + ("*i64",) * 2
    assert (sig["n_active_ptr"], sig["lse_ptr"], sig["n_rows_bucket"], sig["softcap"]) == ("*i32", "*fp32", "i32", "fp32")
    assert sig["BLOCK_N"] == "constexpr"
    cfg = logprobs_bwd.BWD_CONFIGS[("sm_90a", "half")][0]
    constexprs = kernels._constexprs(logprobs_bwd, logprobs_bwd.logprobs_bwd_kernel, "bf16_kl", cfg)
    assert constexprs["GROUP_N"] == logprobs_bwd.GROUP_N  # a constexpr the variants do not set: the module's


@pytest.mark.parametrize("arch", ARCHS)
def test_autotuner_prunes_to_the_device_and_precision(monkeypatch, arch):
    import torch

    from fastpref.kernels import configs, logprobs_bwd, logprobs_dz, logprobs_fwd

    monkeypatch.setattr(configs, "device_arch", lambda: arch)
    bf16, fp32 = torch.bfloat16, torch.float32
    tuned_kernels = ((logprobs_fwd.FWD_CONFIGS, logprobs_fwd.logprobs_fwd_autotuned, {}),
                     (logprobs_bwd.BWD_CONFIGS, logprobs_bwd.logprobs_bwd_autotuned, {}),
                     (logprobs_dz.DZ_CONFIGS, logprobs_dz.logprobs_dz_autotuned, {}),
                     # with the extra outputs: the flag the launcher passes selects the extras table
                     (logprobs_fwd.FWD_EXTRAS_CONFIGS, logprobs_fwd.logprobs_fwd_autotuned, {"EXTRAS": True}),
                     (logprobs_bwd.BWD_EXTRAS_CONFIGS, logprobs_bwd.logprobs_bwd_autotuned, {"ENTROPY": True}),
                     (logprobs_dz.DZ_EXTRAS_CONFIGS, logprobs_dz.logprobs_dz_autotuned, {"ENTROPY": True}),
                     (logprobs_fwd.FWD_CONFIGS, logprobs_fwd.logprobs_fwd_autotuned, {"EXTRAS": False}),
                     (logprobs_dz.DZ_CONFIGS, logprobs_dz.logprobs_dz_autotuned, {"ENTROPY": False}))
    for table, tuned, flags in tuned_kernels:
        # (policy dtype, reference dtype, TF32 on, expected column): a mixed launch takes the stricter tiles.
        for dtype, ref_dtype, tf32, precision in ((bf16, bf16, False, "half"), (fp32, fp32, False, "fp32"),
                                                  (fp32, fp32, True, "tf32"), (bf16, fp32, False, "fp32"),
                                                  (bf16, fp32, True, "tf32")):
            monkeypatch.setattr(configs, "tf32_enabled", lambda tf32=tf32: tf32)
            args = {"hidden_ptr": torch.empty(0, dtype=dtype), "ref_hidden_ptr": torch.empty(0, dtype=ref_dtype)}
            kept = tuned.early_config_prune(tuned.configs, args, **flags)
            assert sorted(configs.config_name(c) for c in kept) == \
                sorted(configs.config_name(c) for c in table[(arch, precision)])
