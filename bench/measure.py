"""Timing (interleaved repeats, median and spread) and peak memory of one fwd+bwd step.

Memory on CPU is measured with memray: each implementation runs once inside its own ``memray.Tracker``
region, which records only the allocations made inside it, so the inputs (allocated before) are not
counted and the peaks of different implementations cannot mix. memray intercepts every
malloc/free, which slows allocation-heavy code; that is why memory runs are separate from the timed
runs. On CUDA the peak is ``torch.cuda.max_memory_allocated`` minus what was allocated before.
Either way ``tracked`` = the step's own peak (gradients included); the reported figures are
``peak = inputs + tracked`` and ``workspace = tracked - gradients``.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .peers import install_hint, is_installed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(step: Callable[[], torch.Tensor]) -> None:
    loss = step()
    loss.backward()


@dataclass
class Timing:
    times_s: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats."""
        return (max(self.times_s) - min(self.times_s)) / self.median if self.median > 0 else 0.0


def time_interleaved(steps: Dict[str, Callable[[], None]], repeats: int, device: torch.device,
                     before_each: Callable[[], None] = lambda: None,
                     on_step: Callable[[str], None] = lambda name: None,
                     per_round: Optional[Dict[str, int]] = None) -> Dict[str, Timing]:
    """Time every step ``repeats`` times, round-robin (rotating the order each round) so that slow
    drifts of a shared machine hit every implementation alike. ``per_round[name] = k`` times that step
    ``k`` times back to back in each round (a cheap step such as the GEMM floor gets ``k * repeats``
    samples)."""
    names = list(steps)
    per_round = per_round or {}
    times: Dict[str, List[float]] = {n: [] for n in names}
    with frozen_gc():
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)] if names else []
            for name in order:
                for _ in range(per_round.get(name, 1)):
                    before_each()
                    gc.collect()
                    sync(device)
                    start = time.perf_counter()
                    steps[name]()
                    sync(device)
                    times[name].append(time.perf_counter() - start)
                on_step(name)
    return {n: Timing(t) for n, t in times.items()}


@contextlib.contextmanager
def frozen_gc():
    """Move every object alive now out of the collector's reach (``gc.freeze``) for the block, so that the
    ``gc.collect()`` before each timed step scans only what the steps allocated: with torch, transformers
    (TRL) and inductor imported, a full collection costs ~0.3 s, which made most of a --quick run."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def peak_step_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``run()`` on top of what was live before it."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        import memray
    except ImportError as exc:  # the runner checks first; this is for direct callers
        raise ImportError(f"CPU memory is measured with memray, which is not installed: {install_hint('memray')}") \
            from exc

    with tempfile.TemporaryDirectory(prefix="fastpref-memray-") as tmp:
        path = os.path.join(tmp, "step.bin")
        with memray.Tracker(path, native_traces=False, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
            run()
        return int(memray.FileReader(path).metadata.peak_memory)


def memray_overhead_bytes() -> int:
    """Peak memray reports for an empty region (its own bookkeeping seen through the hooks)."""
    return peak_step_bytes(lambda: None, torch.device("cpu"))


def cpu_step_peaks(steps: Dict[str, Callable[[], Any]]) -> Dict[str, Optional[int]]:
    """memray peak of one call of each step, each in its own region, less memray's own bookkeeping
    (:func:`memray_overhead_bytes`, clamped at 0); None for every step when memray is not installed, so that a
    run without it still finishes and reports memory as not measured."""
    if not is_installed("memray"):
        return {name: None for name in steps}
    overhead = memray_overhead_bytes()
    return {name: max(0, peak_step_bytes(step, torch.device("cpu")) - overhead) for name, step in steps.items()}


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values)
