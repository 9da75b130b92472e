"""Ahead-of-time compilation of every Triton kernel and autotune configuration (``fastpref kernels``).

No GPU is needed: ``triton.compile`` lowers each (kernel, variant, configuration) to PTX for a
``GPUTarget``, and the ``ptxas`` shipped in the Triton wheel assembles it with ``-v`` to report
registers and spills (Triton's own ptxas invocation, with the flags used at runtime). One ``.ptx`` per
configuration is written under ``--out`` and a table is
printed: kernel, variant, config, registers, spill bytes, shared memory, whether Hopper ``wgmma``
instructions are used, and how many of the kernel's ``tl.dot`` ops became warp-group MMAs.

Variants are the specialisations that matter for resources: the heaviest path of each kernel
(reference tile + KL + bias + softcap) for bf16 inputs (tensor cores; forward and reverse KL; the
forward also in its split-vocabulary form) and fp32 inputs (forward KL) with the exact ``ieee`` dot (FMA, the
default) or TF32 tensor cores (used when
``torch.backends.cuda.matmul.allow_tf32`` is set).
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ARCH_CAPABILITY = {"sm_80": 80, "sm_90a": 90}

# name -> (module, kernel attribute, config attribute)
KERNELS = {
    "logprobs_fwd": ("fastpref.kernels.logprobs_fwd", "logprobs_fwd_kernel", "FWD_CONFIGS"),
    "logprobs_bwd": ("fastpref.kernels.logprobs_bwd", "logprobs_bwd_kernel", "BWD_CONFIGS"),
    "logprobs_combine": ("fastpref.kernels.logprobs_combine", "logprobs_combine_kernel", "COMBINE_CONFIGS"),
}
GEMM_KERNELS = ("logprobs_fwd", "logprobs_bwd")

# variant -> (input dtype, dot input precision, constexpr flags, kernels it applies to)
_FLAGS = dict(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, KL_MODE=1, SOFTCAP=True, UPCAST=False,
              NEED_DH=True, NEED_DW=True, NEED_DB=True, SPLIT=False)
VARIANTS = {
    "bf16_kl": ("bf16", "tf32", _FLAGS, GEMM_KERNELS),
    "bf16_rkl": ("bf16", "tf32", dict(_FLAGS, KL_MODE=2), GEMM_KERNELS),
    "fp32_kl": ("fp32", "ieee", _FLAGS, GEMM_KERNELS),
    "tf32_kl": ("fp32", "tf32", _FLAGS, GEMM_KERNELS),
    "bf16_kl_split": ("bf16", "tf32", dict(_FLAGS, SPLIT=True), ("logprobs_fwd",)),
    "kl": ("fp32", "ieee", _FLAGS, ("logprobs_combine",)),
}
# variant -> the precision column of the kernels' config tables
VARIANT_PRECISION = {"bf16_kl": "half", "bf16_rkl": "half", "fp32_kl": "fp32", "tf32_kl": "tf32",
                     "bf16_kl_split": "half", "kl": "half"}

_HALF_INPUTS = {"hidden_ptr", "weight_ptr", "bias_ptr", "ref_hidden_ptr", "ref_weight_ptr", "ref_bias_ptr"}
_INDEX_INPUTS = {"targets_ptr", "rows_ptr", "seq_ids_ptr"}
_FLOAT_SCALARS = {"inv_temperature", "softcap"}


@dataclass
class KernelReport:
    kernel: str
    variant: str
    config: str
    arch: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool  # the PTX has Hopper wgmma.mma_async instructions
    wgmma_dots: int  # tl.dot ops lowered to warp-group MMA (TTGIR ttng.warp_group_dot)
    dots: int  # all tl.dot ops of the kernel
    ptx_path: str


def ptxas_path() -> str:
    """The ptxas bundled with the Triton wheel (the one Triton itself assembles with)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _signature(fn, dtype: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _HALF_INPUTS:
            sig[name] = "*" + dtype
        elif name in _INDEX_INPUTS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility_attrs(fn, signature: Dict[str, str]) -> Dict[Tuple[int], list]:
    """Mirror the JIT's specialisation for the usual case: 16-byte aligned pointers and D/strides
    divisible by 16 (hidden sizes are). Without it the loads are not vectorised and the AOT
    numbers would not describe the kernels that actually run."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = signature[name]
        if kind.startswith("*") or name in ("D", "D_ref") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def parse_ptxas(text: str) -> Tuple[int, int]:
    """(registers, spill bytes = stores + loads) from ``ptxas -v`` output."""
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_one(job: tuple) -> KernelReport:
    """Compile one (kernel, variant, arch, config, out_dir) job and read ptxas -v's report.

    The config is ``(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)`` (see ``configs.config``).
    """
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpref.kernels.configs import config, config_name

    kernel_name, variant, arch, cfg_tuple, out_dir = job
    module_name, fn_name, _ = KERNELS[kernel_name]
    fn = getattr(importlib.import_module(module_name), fn_name)
    cfg = config(*cfg_tuple)
    dtype, precision, flags, _ = VARIANTS[variant]
    constexprs = dict(flags, **cfg.kwargs, DOT_PRECISION=precision, REF_DOT_PRECISION=precision)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = _signature(fn, dtype, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_divisibility_attrs(fn, signature))
    # Triton's own ptxas run (same flags as at runtime) logs registers and spills with -v; a forced
    # compile makes sure it runs even when the kernel is in Triton's cache.
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", ARCH_CAPABILITY[arch], 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    registers, spills = parse_ptxas(log.getvalue())
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    wgmma_dots = len(re.findall(r"\bttng\.warp_group_dot\b(?!_)", ttgir))
    name = config_name(cfg)
    ptx_path = os.path.join(out_dir, f"{kernel_name}__{variant}__{name}.ptx")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    return KernelReport(kernel=kernel_name, variant=variant, config=name, arch=arch, registers=registers,
                        spill_bytes=spills, shared_bytes=int(compiled.metadata.shared),
                        wgmma=bool(re.search(r"\bwgmma\.mma_async", ptx)), wgmma_dots=wgmma_dots,
                        dots=wgmma_dots + len(re.findall(r"\btt\.dot\b", ttgir)), ptx_path=ptx_path)


def jobs_for(arch: str, out_dir: str, kernels: Optional[List[str]] = None,
             variants: Optional[List[str]] = None) -> list:
    import importlib

    from fastpref.kernels.configs import config_tuple

    jobs = []
    for kernel_name in kernels or list(KERNELS):
        module_name, _, configs_name = KERNELS[kernel_name]
        table = getattr(importlib.import_module(module_name), configs_name)
        for variant in variants or list(VARIANTS):
            if kernel_name not in VARIANTS[variant][3]:
                continue
            for cfg in table[(arch, VARIANT_PRECISION[variant])]:
                jobs.append((kernel_name, variant, arch, config_tuple(cfg), out_dir))
    return jobs


def compile_all(arch: str, out_dir: str, workers: Optional[int] = None, kernels: Optional[List[str]] = None,
                variants: Optional[List[str]] = None) -> List[KernelReport]:
    """Compile every configuration of every kernel for ``arch``; returns one report per .ptx."""
    if arch not in ARCH_CAPABILITY:
        raise ValueError(f"arch must be one of {sorted(ARCH_CAPABILITY)}, got {arch!r}")
    os.makedirs(out_dir, exist_ok=True)
    return compile_jobs(jobs_for(arch, out_dir, kernels, variants), workers)


def compile_jobs(jobs: list, workers: Optional[int] = None) -> List[KernelReport]:
    """Run ``compile_one`` over ``jobs`` in a process pool (compiles are CPU-bound and independent)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        return [compile_one(j) for j in jobs]
    # spawn, not fork: the caller may hold a CUDA context (e.g. a test session on a GPU machine).
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_one, jobs))


def format_table(reports: List[KernelReport]) -> str:
    """A Markdown table of the reports."""
    lines = ["| kernel | variant | config | arch | registers | spill bytes | shared mem (B) | wgmma | wgmma dots |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in reports:
        lines.append(f"| {r.kernel} | {r.variant} | {r.config} | {r.arch} | {r.registers} | {r.spill_bytes} "
                     f"| {r.shared_bytes} | {'yes' if r.wgmma else 'no'} | {r.wgmma_dots}/{r.dots} |")
    return "\n".join(lines)


_ARCH_NOTES = {
    "sm_80": ("A100 (sm_80)", "bf16 and TF32 configurations use mma.sync tensor-core tiles (Ampere has no wgmma); "
              "the exact fp32 path (`fp32_kl`, the default for fp32 inputs) uses the `ieee` FMA dot."),
    "sm_90a": ("H100 (sm_90a)", "Every bf16 and TF32 configuration lowers all of its GEMMs to Hopper warp-group MMA "
               "(`wgmma.mma_async`): the logits (and reference logits) tiles in both kernels, and `dz @ W`, "
               "`dz^T @ H` in the backward. The exact fp32 path (`fp32_kl`, the default for fp32 inputs unless "
               "`torch.backends.cuda.matmul.allow_tf32` is set) uses the `ieee` FMA dot, which has no wgmma form."),
}


def report_markdown(arch: str, reports: List[KernelReport]) -> str:
    """The kernel report for the README's performance section: how it was made, then the table."""
    import triton

    title, note = _ARCH_NOTES[arch]
    spills = "Every configuration is spill-free." if not any(r.spill_bytes for r in reports) else \
        "Some configurations SPILL (see the table)."
    return f"""# Triton kernel report: {title}

Produced without a GPU by `fastpref kernels --arch {arch} --out DIR` (Triton {triton.__version__}): `triton.compile`
for a `GPUTarget`; registers and spills from the `ptxas -v` log of Triton's own ptxas run; shared memory from
the compiled kernel's metadata; wgmma from the PTX, and the count of `tl.dot`s lowered to warp-group MMA from
the TTGIR. One row per autotune configuration and variant. A variant is the heaviest specialisation of a
kernel (reference tile + bias + softcap + KL): `bf16_kl` / `bf16_rkl` bf16 inputs with forward / reverse KL,
`bf16_kl_split` the split-vocabulary forward, `fp32_kl` fp32 inputs with the exact `ieee` dot, `tf32_kl` fp32
inputs with TF32; `kl` for the combine kernel of the split forward. Config `nN_vV_dD_wW_sS` = BLOCK_N
positions x BLOCK_V vocabulary x BLOCK_D hidden slice, W warps, S pipeline stages.

{note} {spills}

{format_table(reports)}
"""
