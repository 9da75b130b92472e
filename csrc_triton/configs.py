"""Autotune plumbing shared by the kernels: per-architecture config lists and the pruning hook.

Each kernel file lists its configurations per (architecture, input precision) next to the kernel:
``{("sm_80", "half"): [...], ("sm_80", "fp32"): [...], ("sm_90a", ...): ...}``. "half" (bf16/fp16)
runs on tensor cores; "fp32" uses an exact ``ieee`` dot (FMA), whose operands live in registers,
so it needs smaller tiles; "tf32" is fp32 input with TF32 enabled (``tf32_enabled``)
(TF32 tensor cores, as torch.matmul would use). The autotuner gets the union; ``prune_to_device``
keeps only the list for the GPU it runs on and the input dtype, so an A100 never benchmarks
H100-sized tiles. A kernel with optional extra outputs (constexpr ``EXTRAS`` / ``ENTROPY``) also has an
``*_EXTRAS_CONFIGS`` table, used when the flag is on: the default table with the columns whose
configurations spill under the extras' register pressure replaced.
"""
from typing import Dict, List, Optional, Tuple

import triton

ARCHS = ("sm_80", "sm_90a")
PRECISIONS = ("half", "fp32", "tf32")
ConfigTable = Dict[Tuple[str, str], List[triton.Config]]


def config(block_n: int, block_v: Optional[int], block_d: Optional[int], num_warps: int,
           num_stages: int) -> triton.Config:
    """A config; ``block_v``/``block_d`` are None for kernels without those tiles."""
    blocks = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d}
    return triton.Config({k: v for k, v in blocks.items() if v is not None},
                         num_warps=num_warps, num_stages=num_stages)


def config_tuple(cfg: triton.Config) -> Tuple[int, Optional[int], Optional[int], int, int]:
    """The arguments of ``config`` that rebuild ``cfg`` (picklable, for compile workers)."""
    kw = cfg.kwargs
    return kw["BLOCK_N"], kw.get("BLOCK_V"), kw.get("BLOCK_D"), cfg.num_warps, cfg.num_stages


def config_name(cfg: triton.Config) -> str:
    """E.g. ``n64_v128_d32_w8_s3``: BLOCK_N, BLOCK_V, BLOCK_D, warps, stages."""
    kw = cfg.kwargs
    blocks = "_".join(f"{k[6:].lower()}{kw[k]}" for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D") if k in kw)
    return f"{blocks}_w{cfg.num_warps}_s{cfg.num_stages}"


def union(*tables: ConfigTable) -> List[triton.Config]:
    """Every configuration of the tables, each once, in table order (the autotuner's candidate list)."""
    seen, out = set(), []
    for table in tables:
        for cfg in (c for key in table for c in table[key]):
            if config_name(cfg) not in seen:
                seen.add(config_name(cfg))
                out.append(cfg)
    return out


def device_arch() -> str:
    """'sm_90a' on Hopper and newer, 'sm_80' otherwise (Ampere/Ada)."""
    import torch

    major, _ = torch.cuda.get_device_capability()
    return "sm_90a" if major >= 9 else "sm_80"


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32, as torch.matmul would: ``torch.backends.cuda.matmul.fp32_precision``
    (torch >= 2.9; what ``TrainingArguments(tf32=True)`` sets), else the legacy ``allow_tf32``. Never raises:
    reading the legacy flag after the new API was used raises in torch, and then the exact path is kept."""
    import torch

    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def precision_of(dtype) -> str:
    """The config-table column for an input dtype (must agree with the backend's dot precision)."""
    import torch

    if dtype != torch.float32:
        return "half"
    return "tf32" if tf32_enabled() else "fp32"


def table_column(policy_dtype, ref_dtype=None) -> str:
    """The config-table column for a launch whose heads may differ in dtype: the most constrained of the
    two heads' columns ("fp32" FMA tiles, then "tf32", then "half"), so both tiles fit."""
    columns = {precision_of(policy_dtype), precision_of(ref_dtype if ref_dtype is not None else policy_dtype)}
    return next(c for c in ("fp32", "tf32", "half") if c in columns)


def pruner(table: ConfigTable, extras_table: Optional[ConfigTable] = None, extras_flag: str = "EXTRAS"):
    """An ``early_config_prune`` hook keeping the configurations listed for the current GPU and the heads'
    dtypes (a kernel without a reference passes its policy head as the reference head), from ``extras_table``
    when the launch sets the constexpr ``extras_flag`` (the extra outputs hold more live tiles, so some
    configurations spill there; ``fastpref kernels`` compiles both tables)."""

    def prune_to_device(configs, named_args, **kwargs):
        extras = extras_table is not None and bool(kwargs.get(extras_flag, named_args.get(extras_flag, False)))
        key = (device_arch(), table_column(named_args["hidden_ptr"].dtype, named_args["ref_hidden_ptr"].dtype))
        wanted = {config_name(c) for c in (extras_table if extras else table)[key]}
        kept = [c for c in configs if config_name(c) in wanted]
        return kept or configs

    return prune_to_device
