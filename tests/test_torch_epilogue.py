"""The torch backend's tile epilogues (fastpref/backends/torch_epilogue.py): the Inductor-compiled one
(``FASTPREF_COMPILE_TILES=1``) against the uncompiled one and the eager reference, over ragged row and
vocabulary tiles, fp64 and fp32, forward/reverse KL, bias, temperature and softcap; its fallback when the
compiler fails; no recompiles for new ragged shapes; the target slots."""
from __future__ import annotations

import shutil

import pytest
import torch

import fastpref
import fastpref.reference as reference
from fastpref.backends import torch_backend
from fastpref.backends import torch_epilogue as epilogue
from fastpref.testing import make_core_case, rel_err, run_core

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="Inductor needs a C++ compiler on CPU")

# Three variants (each compiles a forward and a backward graph once per dtype, a few seconds apiece).
CASES = {
    "logprobs_fp32": (torch.float32, dict()),
    "kl_forward_bias_fp64": (torch.float64, dict(bias=True, ref="separate", kl="forward")),
    "kl_reverse_softcap_temp_fp32": (torch.float32, dict(ref="separate", kl="reverse", temperature=0.7,
                                                         softcap=3.0, bias=True)),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # 8-row x 128-column tiles: every case spans several row and vocabulary blocks, the last of each ragged.
    monkeypatch.setattr(torch_backend, "BLOCK_N", 8)
    monkeypatch.setattr(torch_backend, "BLOCK_V", 128)
    monkeypatch.setitem(epilogue._STATE, "broken", False)


def _counting(monkeypatch):
    """Count the compiled epilogue calls that ran (forward, backward)."""
    calls = {"forward": 0, "backward": 0}
    real = epilogue._run

    def run(kind, flags, args):
        ok, out = real(kind, flags, args)
        calls[kind] += ok
        return ok, out

    monkeypatch.setattr(epilogue, "_run", run)
    return calls


@needs_compiler
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_epilogue_matches_uncompiled_and_reference(name, monkeypatch):
    dtype, opts = CASES[name]
    case = make_core_case(dtype, 3, V=300, **opts)  # 300 = 2 x 128 + a ragged 44-column tile
    monkeypatch.setenv(epilogue.ENV, "0")
    plain = run_core(fastpref.fused_logprobs, case, backend="torch")
    monkeypatch.setenv(epilogue.ENV, "1")
    calls = _counting(monkeypatch)
    compiled = run_core(fastpref.fused_logprobs, case, backend="torch")
    assert calls["forward"] > 2 and calls["backward"] > 2, calls  # the compiled path really ran, tile by tile
    eager = run_core(reference.fused_logprobs, case)
    assert list(compiled) == list(plain) == list(eager)
    for key, want in eager.items():
        assert compiled[key].dtype == want.dtype
        assert rel_err(compiled[key], want) < TOL[dtype], f"{name}: {key} {rel_err(compiled[key], want):.2e}"
        assert rel_err(compiled[key], plain[key]) < TOL[dtype], key


@needs_compiler
def test_new_ragged_shapes_do_not_recompile(monkeypatch):
    """Sizes are symbolic: once compiled, other row counts and a differently ragged vocabulary reuse the code."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv(epilogue.ENV, "1")
    dtype, opts = CASES["logprobs_fp32"]
    run_core(fastpref.fused_logprobs, make_core_case(dtype, 0, V=300, **opts), backend="torch")
    frames = counters["frames"]["ok"]
    for seed, vocab, lengths in ((1, 390, (5, 9, 3, 12)), (2, 517, (7, 2, 6, 11))):
        case = make_core_case(dtype, seed, V=vocab, layout="packed", lengths=lengths, ignore=0.0, **opts)
        run_core(fastpref.fused_logprobs, case, backend="torch")
    assert counters["frames"]["ok"] == frames


def test_compiler_failure_falls_back_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv(epilogue.ENV, "1")
    monkeypatch.setattr(epilogue, "_CACHE", {})
    monkeypatch.setattr(torch, "compile", broken)
    case = make_core_case(torch.float64, 5, V=300, ref="separate", kl="forward")
    with pytest.warns(RuntimeWarning, match="compiled tile epilogue failed.*no compiler here"):
        got = run_core(fastpref.fused_logprobs, case, backend="torch")
    assert epilogue._STATE["broken"] and not epilogue.use_compiled(1024, 1024, torch.device("cpu"))
    want = run_core(reference.fused_logprobs, case)
    for key, value in want.items():
        assert rel_err(got[key], value) < 1e-10, key


def test_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(epilogue.ENV, raising=False)
    assert not epilogue.use_compiled(4096, 4096, cpu)  # off by default
    monkeypatch.setenv(epilogue.ENV, "0")
    assert not epilogue.use_compiled(4096, 4096, cpu)
    monkeypatch.setenv(epilogue.ENV, "1")
    assert epilogue.use_compiled(2, 3, cpu) and not epilogue.use_compiled(2, 3, torch.device("meta"))
    monkeypatch.setenv(epilogue.ENV, "auto")
    assert epilogue.use_compiled(epilogue.MIN_TILE, 1, cpu) and not epilogue.use_compiled(8, 128, cpu)


def test_target_slots_cover_each_in_range_target_once():
    local = torch.tensor([5, -3, 130, 299, 0, 128, 300, 127, 256])
    slots = epilogue.TargetSlots(local, vocab=300, block_v=128)
    seen = {}
    for i in range(3):
        got = slots.get(i)
        if got is None:
            continue
        for row, col in zip(*(t.tolist() for t in got)):
            assert 0 <= col < 128 and row not in seen
            seen[row] = i * 128 + col
    assert seen == {r: int(v) for r, v in enumerate(local) if 0 <= v < 300}
    assert epilogue.TargetSlots(torch.tensor([400, -1]), 300, 128).get(1) is None
