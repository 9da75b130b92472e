"""The shipped kernel configurations, found generically, and a way to force one of them for a launch.

:func:`discover` imports every module of ``fastpref.kernels`` and collects each module attribute whose
name ends in ``_CONFIGS`` (a dict ``{(arch, precision): [triton.Config, ...]}``), with the kernels
defined in the same module: its autotuners (``triton.autotune`` objects) and the raw ``@triton.jit``
kernels they wrap (or, in a module without an autotuner, its own jitted functions).

:func:`forced` pins one configuration for the kernels of one module while the block runs: each autotuner
of the module gets that one config (so it runs it without benchmarking), and each raw kernel's ``run``
is wrapped to count launches and to replace the launch's block sizes (and, on a GPU, warps and
stages) with the config's. The wrapper covers launchers that bypass the autotuner, such as the
backend's fixed blocks under Triton's interpreter. Everything is restored on exit.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Dict, Iterator, List, Tuple

BLOCK_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
LAUNCH_KEYS = ("num_warps", "num_stages")


@dataclass
class ConfigTable:
    """One ``*_CONFIGS`` table with the kernels of its module."""

    module: str  # short name, e.g. "logprobs_fwd"
    name: str  # attribute name, e.g. "FWD_CONFIGS"
    table: Dict[Tuple[str, str], List[Any]]
    autotuners: List[Any] = field(default_factory=list)
    kernels: List[Any] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.module}.{self.name}"


def config_name(cfg: Any) -> str:
    """E.g. ``n64_v128_d32_w8_s3`` (the naming of ``fastpref.kernels.configs``)."""
    kw = cfg.kwargs
    blocks = "_".join(f"{k[6:].lower()}{kw[k]}" for k in BLOCK_KEYS if k in kw)
    return f"{blocks}_w{cfg.num_warps}_s{cfg.num_stages}"


def _python_fn(kernel: Any) -> Any:
    """The Python function under a JITFunction / InterpretedFunction (None for anything else)."""
    fn = getattr(kernel, "fn", None)
    return fn if callable(fn) and hasattr(fn, "__module__") and not hasattr(fn, "run") else None


def _kernels_of(module: ModuleType) -> Tuple[List[Any], List[Any]]:
    """(autotuners, raw kernels) defined in ``module``."""
    from triton.runtime.autotuner import Autotuner

    autotuners, raw = [], []
    for value in vars(module).values():
        if isinstance(value, Autotuner):
            autotuners.append(value)
        elif hasattr(value, "run") and _python_fn(value) is not None and _python_fn(value).__module__ == module.__name__:
            raw.append(value)
    wrapped = [t.fn for t in autotuners if hasattr(t, "fn")]
    for k in wrapped:
        if all(k is not r for r in raw):
            raw.append(k)
    return autotuners, raw


def discover() -> List[ConfigTable]:
    """Every ``*_CONFIGS`` table of ``fastpref.kernels``, in module order (a table imported into another
    module is listed once, under the module that defines kernels next to it)."""
    import fastpref.kernels as package

    found: Dict[int, ConfigTable] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        autotuners, raw = _kernels_of(module)
        for attr, value in vars(module).items():
            if not attr.endswith("_CONFIGS") or not isinstance(value, dict):
                continue
            entry = ConfigTable(info.name, attr, value, autotuners, raw)
            if id(value) not in found or (raw and not found[id(value)].kernels):
                found[id(value)] = entry
    return list(found.values())


def configs_for(table: ConfigTable, arch: str) -> Iterator[Tuple[str, Any]]:
    """(precision column, config) for every config listed for ``arch`` (each config once per column)."""
    for (key_arch, precision), configs in table.table.items():
        if key_arch != arch:
            continue
        seen = set()
        for cfg in configs:
            if config_name(cfg) not in seen:
                seen.add(config_name(cfg))
                yield precision, cfg


@dataclass
class LaunchCount:
    """Launches of the forced module's kernels inside a :func:`forced` block."""

    launches: int = 0


@contextlib.contextmanager
def forced(table: ConfigTable, cfg: Any, *, interpreting: bool) -> Iterator[LaunchCount]:
    """Run the block with ``cfg`` pinned for every kernel of ``table``'s module; yields the launch count."""
    count = LaunchCount()
    override = {k: v for k, v in cfg.kwargs.items() if k in BLOCK_KEYS}
    if not interpreting:  # the interpreter runs one program at a time: warps and stages mean nothing there
        override.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    saved_configs = [(t, t.configs) for t in table.autotuners]
    patched = []
    try:
        for tuner in table.autotuners:
            tuner.configs = [cfg]
        for kernel in table.kernels:
            had_own = "run" in vars(kernel)
            original = kernel.run

            def run(*args, _original=original, **kwargs):
                count.launches += 1
                for key, value in override.items():
                    if key in kwargs or key in LAUNCH_KEYS:
                        kwargs[key] = value
                return _original(*args, **kwargs)

            kernel.run = run
            patched.append((kernel, had_own, original))
        yield count
    finally:
        for tuner, configs in saved_configs:
            tuner.configs = configs
        for kernel, had_own, original in patched:
            if had_own:
                kernel.run = original
            else:
                del kernel.run
