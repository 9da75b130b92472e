"""Inputs the torch backend accepts must give the same results through the Triton kernels (run here in
Triton's interpreter, in a subprocess: ``TRITON_INTERPRET`` is read when the kernels are first imported):
biases of any stride, and fp32 calls after TF32 was enabled through torch's new precision API."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import dataclasses, json, sys, torch
import fastpref
from fastpref.backends import triton_backend

assert triton_backend.interpreting()
torch.manual_seed(0)
N, D, V = 7, 16, 50
hidden = torch.randn(N, D, requires_grad=True)
weight = (0.3 * torch.randn(V, D)).requires_grad_()
targets = torch.randint(0, V, (N,)); targets[2] = -100
seq_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
ref_hidden = hidden.detach() + 0.2 * torch.randn(N, D)
ref_weight = weight.detach() + 0.05 * torch.randn(V, D)
biases = {
    "strided": torch.randn(2 * V)[::2],
    "expanded": torch.randn(1).expand(V),
    "transposed_column": torch.randn(V, 3).t()[1],
}
out = {}

def run(backend, **kw):
    for t in (hidden, weight):
        t.grad = None
    stats = fastpref.fused_logprobs(hidden, weight, targets, seq_ids=seq_ids, backend=backend, **kw)
    loss = stats.logps.sum() + 0.5 * stats.token_logps.sum() + (stats.kl.sum() if stats.kl is not None else 0)
    loss.backward()
    values = [stats.logps, stats.token_logps] + ([stats.ref_logps, stats.kl] if stats.kl is not None else [])
    return [v.detach().clone() for v in values] + [hidden.grad.clone(), weight.grad.clone()]

def max_diff(a, b):
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))

for name, bias in biases.items():
    out["bias/" + name] = max_diff(run("triton", bias=bias), run("torch", bias=bias))
    kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=bias, kl="forward")
    out["ref_bias/" + name] = max_diff(run("triton", **kw), run("torch", **kw))

# TrainingArguments(tf32=True) on torch >= 2.9 sets the new API; reading allow_tf32 afterwards raises.
from fastpref.kernels.configs import precision_of, tf32_enabled
torch.backends.fp32_precision = "tf32"
out["tf32/enabled"] = tf32_enabled() and precision_of(torch.float32) == "tf32"
out["tf32/call"] = max_diff(run("triton"), run("torch"))
torch.backends.fp32_precision = "ieee"
out["ieee/enabled"] = tf32_enabled()
out["ieee/call"] = max_diff(run("triton"), run("torch"))

# No host sync inside the backend: count every tensor -> Python value conversion during its forward and
# both backwards (the value checks of the op are tested separately: tests/test_compile.py).
from fastpref._prepare import prepare
prep = prepare(hidden.detach(), weight.detach(), targets, seq_ids=seq_ids, num_seqs=3, ref_hidden=ref_hidden,
               kl="forward", backend="triton")
reads = []
originals = {}
for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero", "__index__"):
    originals[name] = getattr(torch.Tensor, name)
    def probe(self, *a, _name=name, **k):
        reads.append(_name)
        return originals[_name](self, *a, **k)
    setattr(torch.Tensor, name, probe)
try:
    fwd = triton_backend.forward(prep)
    for deterministic in (True, False):
        prep = dataclasses.replace(prep, options=fastpref.KernelOptions(deterministic=deterministic))
        triton_backend.backward(prep, fwd.lse, fwd.ref_lse, fwd.token_kl, torch.ones(N), torch.ones(N),
                                (True, True, False))
finally:
    for name, fn in originals.items():
        setattr(torch.Tensor, name, fn)
out["host_reads"] = reads
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("head", ["bias", "ref_bias"])
@pytest.mark.parametrize("layout", ["strided", "expanded", "transposed_column"])
def test_bias_of_any_stride_matches_the_torch_backend(results, head, layout):
    assert results[f"{head}/{layout}"] < 1e-4


def test_tf32_through_the_new_precision_api_does_not_raise(results):
    assert results["tf32/enabled"] is True
    # The interpreter runs the dot in fp32 whatever the precision flag says: equal up to fp32 round-off.
    assert results["tf32/call"] < 1e-4


def test_backend_reads_no_tensor_value_on_the_host(results):
    """Row compaction, grids and chunking come from shapes and device tensors: no .item()/bool()/nonzero()."""
    assert results["host_reads"] == []


def test_ieee_through_the_new_precision_api(results):
    assert results["ieee/enabled"] is False
    assert results["ieee/call"] < 1e-4


def test_table_column_is_the_most_constrained_head(monkeypatch):
    import torch

    from fastpref.kernels import configs

    monkeypatch.setattr(configs, "tf32_enabled", lambda: False)
    assert configs.table_column(torch.bfloat16) == "half"
    assert configs.table_column(torch.bfloat16, torch.float32) == "fp32"
    assert configs.table_column(torch.float32, torch.bfloat16) == "fp32"
    monkeypatch.setattr(configs, "tf32_enabled", lambda: True)
    assert configs.table_column(torch.bfloat16, torch.float32) == "tf32"
    assert configs.table_column(torch.float16, torch.bfloat16) == "half"


@pytest.mark.parametrize("kl", [None, "forward"])
def test_each_head_gets_its_own_dot_precision(monkeypatch, kl):
    """A bf16 policy with an fp32 reference head: the reference tiles use the exact fp32 dot, not TF32."""
    import torch

    from fastpref._prepare import prepare
    from fastpref.backends import triton_backend
    from fastpref.kernels import configs

    monkeypatch.setattr(configs, "tf32_enabled", lambda: False)
    launches = []
    monkeypatch.setattr(triton_backend, "_launch", lambda name, grid, *args, **kw: launches.append((name, kw)))
    monkeypatch.setattr(triton_backend, "vocab_splits", lambda n_rows, vocab, device: (1, vocab))
    monkeypatch.setattr(triton_backend, "chunk_columns", lambda *args: 256)
    n, d, d_ref, v = 6, 8, 12, 20
    prep = prepare(torch.randn(n, d, dtype=torch.bfloat16), torch.randn(v, d, dtype=torch.bfloat16),
                   torch.randint(0, v, (n,)), seq_ids=torch.zeros(n, dtype=torch.long),
                   ref_hidden=torch.randn(n, d_ref), ref_weight=torch.randn(v, d_ref), kl=kl, backend="triton")
    out = triton_backend.forward(prep)
    triton_backend.backward(prep, out.lse, out.ref_lse, out.token_kl, torch.ones(n), torch.ones(n) if kl else None,
                            (True, True, False))
    assert [name for name, _ in launches] == ["fwd", "dz"]
    for name, kw in launches:
        assert kw["DOT_PRECISION"] == "tf32"  # ignored by tl.dot for bf16 operands
        # The backward reads the reference head only for the KL gradient.
        expected = "ieee" if (name == "fwd" or kl) else "tf32"
        assert kw["REF_DOT_PRECISION"] == expected, (name, kw)


def test_autotune_keys_bucket_the_row_count():
    """A config tuned on a short batch is not reused for a long one: every GEMM kernel's autotune key
    holds the row count rounded up to a power of two."""
    from fastpref.backends import triton_backend
    from fastpref.kernels import logprobs_bwd, logprobs_dz, logprobs_fwd

    for key in (logprobs_fwd.FWD_KEY, logprobs_dz.DZ_KEY, logprobs_bwd.BWD_KEY):
        assert key[0] == "n_rows_bucket"
    assert [triton_backend.rows_bucket(n) for n in (0, 1, 64, 65, 4096, 5000)] == [64, 64, 64, 128, 4096, 8192]


def test_chunk_columns_follow_the_workspace_budget():
    from fastpref.backends.triton_backend import CHUNK_ALIGN, chunk_columns

    # 8192 bf16 rows in 256 MiB: 16384 columns; never below one aligned chunk, never beyond the vocabulary
    assert chunk_columns(8192, 128256, 2, 256 * 2**20) == 16384
    assert chunk_columns(8192, 128256, 2, 1) == CHUNK_ALIGN
    assert chunk_columns(10, 1000, 4, 2**30) == 1024
    assert chunk_columns(3000, 128256, 4, 100 * 2**20) % CHUNK_ALIGN == 0


def test_kernel_options_are_checked():
    import fastpref

    with pytest.raises(ValueError, match="workspace_bytes"):
        fastpref.KernelOptions(workspace_bytes=0)
    with pytest.raises(TypeError, match="deterministic"):
        fastpref.KernelOptions(deterministic=1)
