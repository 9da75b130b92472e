"""Ahead-of-time compilation of every Triton kernel and autotune configuration (``fastpref kernels``).

No GPU is needed: ``triton.compile`` lowers each (kernel, variant, configuration) to PTX for a
``GPUTarget``, and the ``ptxas`` shipped in the Triton wheel assembles it with ``-v`` to report
registers and spills (Triton's own ptxas invocation, with the flags used at runtime). One ``.ptx`` and
one ``.cubin`` per configuration are written under ``--out`` and a table is printed: kernel, variant, config,
registers, spill bytes, shared memory, whether Hopper ``wgmma`` instructions are used, how many of the
kernel's ``tl.dot`` ops became warp-group MMAs, and what the SASS (``cuobjdump -sass`` of the cubin, the
wheel's cuobjdump) does that serialises the memory system: GPU-wide fences (``MEMBAR.*.GPU``/``.SYS``),
atomics through the returning path (``ATOMG``/``ATOM``, what an ``acq_rel`` atomic compiles to, as opposed
to the fire-and-forget reduction ``RED``) and L1 invalidates (``CCTL.IVALL``), each also counted inside
loops (``parse_sass``).

Variants are the specialisations that matter for resources: the heaviest path of each kernel
(reference tile + KL + bias + softcap) for bf16 inputs (tensor cores; forward and reverse KL; the
forward also in its split-vocabulary form) and fp32 inputs (forward KL) with the exact ``ieee`` dot (FMA, the
default) or TF32 tensor cores (used when TF32 is enabled, ``configs.tf32_enabled``); each also with the extra
outputs on (``<variant>_extras``), over the kernel's ``*_EXTRAS_CONFIGS`` (what the autotuner keeps for them).

Adding a kernel is one line in ``KERNELS`` (and ``GEMM_KERNELS`` when it has a ``tl.dot``): the signature is
built from the argument names (``_signature``) and constexprs the variants do not set are read from the
kernel's module (e.g. ``GROUP_N``).
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ARCH_CAPABILITY = {"sm_80": 80, "sm_90a": 90}

# name -> (module, kernel attribute, config attribute)
KERNELS = {
    "logprobs_fwd": ("fastpref.kernels.logprobs_fwd", "logprobs_fwd_kernel", "FWD_CONFIGS"),
    "logprobs_bwd": ("fastpref.kernels.logprobs_bwd", "logprobs_bwd_kernel", "BWD_CONFIGS"),
    "logprobs_combine": ("fastpref.kernels.logprobs_combine", "logprobs_combine_kernel", "COMBINE_CONFIGS"),
    "logprobs_dz": ("fastpref.kernels.logprobs_dz", "logprobs_dz_kernel", "DZ_CONFIGS"),
    "logits_row_stats": ("fastpref.kernels.logits_rows", "row_softmax_stats_kernel", "ROWS_CONFIGS"),
    "logits_softmax_grad": ("fastpref.kernels.logits_rows", "softmax_grad_kernel", "ROWS_CONFIGS"),
}
GEMM_KERNELS = ("logprobs_fwd", "logprobs_bwd", "logprobs_dz")

# variant -> (input dtype, dot input precision, constexpr flags, kernels it applies to)
_FLAGS = dict(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, KL_MODE=1, SOFTCAP=True, UPCAST=False,
              NEED_DH=True, NEED_DW=True, NEED_DB=True, SPLIT=False, EXTRAS=False, ENTROPY=False)
VARIANTS = {
    "bf16_kl": ("bf16", "tf32", _FLAGS, GEMM_KERNELS),
    "bf16_rkl": ("bf16", "tf32", dict(_FLAGS, KL_MODE=2), GEMM_KERNELS),
    "fp32_kl": ("fp32", "ieee", _FLAGS, GEMM_KERNELS),
    "tf32_kl": ("fp32", "tf32", _FLAGS, GEMM_KERNELS),
    "bf16_kl_split": ("bf16", "tf32", dict(_FLAGS, SPLIT=True), ("logprobs_fwd",)),
    "kl": ("fp32", "ieee", _FLAGS, ("logprobs_combine",)),
    "fp32_rows": ("fp32", "ieee", _FLAGS, ("logits_row_stats", "logits_softmax_grad")),
    "fp64_rows": ("fp64", "ieee", _FLAGS, ("logits_row_stats", "logits_softmax_grad")),
}
# variant -> the precision column of the kernels' config tables
VARIANT_PRECISION = {"bf16_kl": "half", "bf16_rkl": "half", "fp32_kl": "fp32", "tf32_kl": "tf32",
                     "bf16_kl_split": "half", "kl": "half", "fp32_rows": "fp32", "fp64_rows": "fp64"}
# Each variant with the extra outputs on (``extra_outputs``: EXTRAS in the forward and combine, ENTROPY in the
# backward kernels), over the configurations ``configs.pruner`` keeps for them (``variant_table``).
EXTRAS_SUFFIX = "_extras"
VARIANTS.update({name + EXTRAS_SUFFIX: (dtype, precision, dict(flags, EXTRAS=True, ENTROPY=True), kernels)
                 for name, (dtype, precision, flags, kernels) in list(VARIANTS.items())})
VARIANT_PRECISION.update({name + EXTRAS_SUFFIX: column for name, column in list(VARIANT_PRECISION.items())})

# Pointer element types by argument name (any other ``*_ptr`` is fp32): the heads, the dz workspace and the row
# kernels' logits and row values take the input dtype, indices int64, counts int32; other scalars i32 unless float.
_HALF_INPUTS = {"hidden_ptr", "weight_ptr", "bias_ptr", "ref_hidden_ptr", "ref_weight_ptr", "ref_bias_ptr", "dz_ptr",
                "logits_ptr", "row_lse_ptr", "row_target_ptr", "row_scale_ptr"}
_INDEX_INPUTS = {"targets_ptr", "rows_ptr", "seq_ids_ptr"}
_INT32_INPUTS = {"n_active_ptr"}
_FLOAT_SCALARS = {"inv_temperature", "softcap"}


@dataclass(frozen=True)
class SassCounts:
    """What a kernel's SASS does that serialises the memory system, each as total and inside loops.

    ``fences``: GPU- or system-wide memory barriers (``MEMBAR.*.GPU``, ``MEMBAR.*.SYS``); ``atomics``: global
    atomics through the returning path (``ATOMG``, or generic ``ATOM``), which ptxas emits for ``acq_rel``/
    ``acquire`` atomics even when the result is unused; ``reductions``: fire-and-forget reductions (``RED``,
    ``REDG``), what a ``relaxed`` atomic whose result is unused becomes; ``l1_invalidates``: ``CCTL.IVALL``.
    """

    fences: int = 0
    fences_in_loops: int = 0
    atomics: int = 0
    atomics_in_loops: int = 0
    reductions: int = 0
    reductions_in_loops: int = 0
    l1_invalidates: int = 0
    l1_invalidates_in_loops: int = 0
    loops: int = 0  # backward branches


SASS_KINDS = ("fences", "atomics", "reductions", "l1_invalidates")
# `/*0d70*/  @!P5 BRA 0x12f0 ;` in cuobjdump -sass (the encoding lines, `/* 0x... */`, do not match)
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")


def sass_kind(opcode: str) -> Optional[str]:
    """The ``SASS_KINDS`` entry of an opcode (``MEMBAR.ALL.GPU`` -> "fences"), or None."""
    base, *mods = opcode.split(".")
    if base == "MEMBAR" and {"GPU", "SYS", "GL"} & set(mods):
        return "fences"
    if base in ("ATOMG", "ATOM"):  # not ATOMS (shared memory)
        return "atomics"
    if base in ("RED", "REDG"):
        return "reductions"
    if base == "CCTL" and "IVALL" in mods:
        return "l1_invalidates"
    return None


def parse_sass(text: str) -> SassCounts:
    """Count fences, returning atomics, reductions and L1 invalidates in ``cuobjdump -sass`` output.

    A loop is the address range from a backward branch's target to the branch (a ``BRA`` whose target
    address is below its own); an instruction is inside a loop when some such range holds its address.
    Addresses restart at every ``Function :`` section, so each function's loops cover only its own code.
    """
    functions: List[List[Tuple[int, str, str]]] = [[]]
    for line in text.splitlines():
        if "Function :" in line:
            functions.append([])
        elif (m := _SASS_LINE.match(line)) is not None:
            functions[-1].append((int(m.group(1), 16), m.group(2), m.group(3)))
    counts = dict.fromkeys(SASS_KINDS, 0)
    in_loops = dict.fromkeys(SASS_KINDS, 0)
    n_loops = 0
    for instructions in functions:
        loops = []
        for address, opcode, operands in instructions:
            targets = re.findall(r"0x([0-9a-fA-F]+)", operands)
            if opcode.split(".")[0] == "BRA" and targets and int(targets[-1], 16) < address:
                loops.append((int(targets[-1], 16), address))
        n_loops += len(loops)
        for address, opcode, _ in instructions:
            kind = sass_kind(opcode)
            if kind is not None:
                counts[kind] += 1
                in_loops[kind] += any(lo <= address <= hi for lo, hi in loops)
    return SassCounts(loops=n_loops, **counts, **{f"{k}_in_loops": v for k, v in in_loops.items()})


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
    cubin_path: str = ""
    sass: Optional[SassCounts] = None  # None for a report read back from Markdown without the SASS columns


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def ptxas_path() -> str:
    """The ptxas bundled with the Triton wheel (the one Triton itself assembles with)."""
    return _nvidia_bin("ptxas")


def disassemble(cubin_path: str) -> str:
    """The SASS of a cubin: ``cuobjdump -sass`` of the cuobjdump bundled with the Triton wheel."""
    done = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True)
    if done.returncode != 0 or "Function :" not in done.stdout:
        raise RuntimeError(f"cuobjdump -sass {cubin_path} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def _signature(fn, dtype: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    """Triton's type string for every argument of ``fn``, from its name (see ``_HALF_INPUTS`` and the sets below it)."""
    named = {**dict.fromkeys(_HALF_INPUTS, "*" + dtype), **dict.fromkeys(_INDEX_INPUTS, "*i64"),
             **dict.fromkeys(_INT32_INPUTS, "*i32"), **dict.fromkeys(_FLOAT_SCALARS, "fp32")}
    return {name: "constexpr" if name in constexprs else named.get(name, "*fp32" if name.endswith("_ptr") else "i32")
            for name in fn.arg_names}


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


def _constexprs(module, fn, variant: str, cfg) -> Dict[str, object]:
    """The variant's flags and precision, the config's blocks, and for any other constexpr of ``fn`` the module
    constant of the same name (e.g. ``GROUP_N``, which the launcher passes from there)."""
    _, precision, flags, _ = VARIANTS[variant]
    given = dict(flags, **cfg.kwargs, DOT_PRECISION=precision, REF_DOT_PRECISION=precision)
    constexprs = {k: v for k, v in given.items() if k in fn.arg_names}
    for param in fn.params:
        if param.is_constexpr and param.name not in constexprs and hasattr(module, param.name):
            constexprs[param.name] = getattr(module, param.name)
    return constexprs


def compile_one(job: tuple) -> KernelReport:
    """Compile one (kernel, variant, arch, config, out_dir) job: read ptxas -v's report, write the .ptx and
    .cubin, and count in the cubin's SASS what ``parse_sass`` counts (one compile gives all three).

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
    module = importlib.import_module(module_name)
    fn = getattr(module, fn_name)
    cfg = config(*cfg_tuple)
    constexprs = _constexprs(module, fn, variant, cfg)
    signature = _signature(fn, VARIANTS[variant][0], constexprs)
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
    stem = os.path.join(out_dir, f"{kernel_name}__{variant}__{config_name(cfg)}")
    with open(stem + ".ptx", "w") as f:
        f.write(ptx)
    with open(stem + ".cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    return KernelReport(kernel=kernel_name, variant=variant, config=config_name(cfg), arch=arch, registers=registers,
                        spill_bytes=spills, shared_bytes=int(compiled.metadata.shared),
                        wgmma=bool(re.search(r"\bwgmma\.mma_async", ptx)), wgmma_dots=wgmma_dots,
                        dots=wgmma_dots + len(re.findall(r"\btt\.dot\b", ttgir)), ptx_path=stem + ".ptx",
                        cubin_path=stem + ".cubin", sass=parse_sass(disassemble(stem + ".cubin")))


def variant_table(module, kernel_name: str, variant: str) -> dict:
    """The config table the autotuner draws from for ``variant``: the kernel's ``X_CONFIGS``, or with the extra
    outputs on, the module's ``X_EXTRAS_CONFIGS`` where it has one (the combine kernel has a single config)."""
    name = KERNELS[kernel_name][2]
    extras = getattr(module, name.replace("_CONFIGS", "_EXTRAS_CONFIGS"), None)
    return extras if extras is not None and variant.endswith(EXTRAS_SUFFIX) else getattr(module, name)


def jobs_for(arch: str, out_dir: str, kernels: Optional[List[str]] = None,
             variants: Optional[List[str]] = None) -> list:
    import importlib

    from fastpref.kernels.configs import config_tuple

    jobs = []
    for kernel_name in kernels or list(KERNELS):
        module = importlib.import_module(KERNELS[kernel_name][0])
        for variant in variants or list(VARIANTS):
            if kernel_name not in VARIANTS[variant][3]:
                continue
            for cfg in variant_table(module, kernel_name, variant)[(arch, VARIANT_PRECISION[variant])]:
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


def _pair(total: int, in_loops: int) -> str:
    return f"{total} ({in_loops})" if total else "0"


def format_table(reports: List[KernelReport]) -> str:
    """A Markdown table of the reports; the SASS columns read "total (inside loops)"."""
    lines = ["| kernel | variant | config | arch | registers | spill bytes | shared mem (B) | wgmma | wgmma dots "
             "| GPU fences (in loops) | ATOMG (in loops) | CCTL.IVALL (in loops) | RED (in loops) |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        s = r.sass or SassCounts()
        lines.append(f"| {r.kernel} | {r.variant} | {r.config} | {r.arch} | {r.registers} | {r.spill_bytes} "
                     f"| {r.shared_bytes} | {'yes' if r.wgmma else 'no'} | {r.wgmma_dots}/{r.dots} "
                     f"| {_pair(s.fences, s.fences_in_loops)} | {_pair(s.atomics, s.atomics_in_loops)} "
                     f"| {_pair(s.l1_invalidates, s.l1_invalidates_in_loops)} "
                     f"| {_pair(s.reductions, s.reductions_in_loops)} |")
    return "\n".join(lines)


def serialising(report: KernelReport, in_loops: bool = False) -> List[str]:
    """The kinds of GPU-wide serialisation in a report's SASS (fences, returning atomics, L1 invalidates),
    anywhere or only inside loops."""
    s = report.sass or SassCounts()
    kinds = ("fences", "atomics", "l1_invalidates")
    return [k for k in kinds if getattr(s, f"{k}_in_loops" if in_loops else k)]


def sass_summary(reports: List[KernelReport]) -> str:
    """One sentence on the SASS columns of ``reports``."""
    anywhere = [r for r in reports if serialising(r)]
    looped = [r for r in anywhere if serialising(r, in_loops=True)]
    if not anywhere:
        reds = sum(1 for r in reports if r.sass and r.sass.reductions)
        return ("No configuration has a GPU-wide fence, a returning atomic or an L1 invalidate in its SASS"
                + (f"; {reds} use fire-and-forget `RED` reductions (relaxed atomics)." if reds else "."))
    kernels = ", ".join(sorted({f"`{r.kernel}`" for r in anywhere}))
    return (f"{len(anywhere)} configuration(s) of {kernels} have GPU-wide fences, returning atomics or L1 invalidates "
            f"in their SASS, {len(looped)} of them inside a loop (see the table).")


_ARCH_NOTES = {
    "sm_80": ("A100 (sm_80)", "bf16 and TF32 configurations use mma.sync tensor-core tiles (Ampere has no wgmma); "
              "the exact fp32 path (`fp32_kl`, the default for fp32 inputs) uses the `ieee` FMA dot."),
    "sm_90a": ("H100 (sm_90a)", "Every bf16 and TF32 configuration lowers all of its GEMMs to Hopper warp-group MMA "
               "(`wgmma.mma_async`): the logits (and reference logits) tiles of the forward, of the dz kernel and "
               "of the fused atomic backward, and that kernel's `dz @ W` and `dz^T @ H`. The exact fp32 path "
               "(`fp32_kl`, the default for fp32 inputs unless TF32 is enabled) uses the `ieee` FMA dot, which has "
               "no wgmma form."),
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
inputs with TF32; `kl` for the combine kernel of the split forward; `*_extras` the same with the extra outputs
(entropy, mean logit, top-1, log sum p^2) over the configurations kept for them. Config `nN_vV_dD_wW_sS` = BLOCK_N
positions x BLOCK_V vocabulary x BLOCK_D hidden slice, W warps, S pipeline stages. The last four columns
count SASS instructions (`cuobjdump -sass` of the cubin), as total (inside a loop: between a backward branch
and its target): GPU-wide fences (`MEMBAR` of `.GPU`/`.SYS` scope), atomics through the returning path
(`ATOMG`, what an `acq_rel` atomic becomes), L1 invalidates (`CCTL.IVALL`) and fire-and-forget reductions
(`RED`, what a `relaxed` atomic whose result is unused becomes).

{note} {spills} {sass_summary(reports)}

{format_table(reports)}
"""
