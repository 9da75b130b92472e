"""KernelOptions(grad_in_forward=True) with backend="triton": the row passes are the Triton kernels of
``csrc_triton/logits_rows.py`` and the reference pass the fused Triton forward, run on CPU through Triton's
interpreter in a subprocess (``TRITON_INTERPRET`` is read at import). Compared with the torch backend's recompute
path on the same fp32 inputs: loss, metrics and gradients."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from _interpret import run_interpreted


def run_case() -> dict:
    import torch

    import fastpref
    from fastpref.modules import grad_in_forward as gif

    g = torch.Generator().manual_seed(0)
    s, t, d, v = 4, 5, 16, 150  # V: not a multiple of the interpreter's BLOCK_V
    hidden, ref_hidden = torch.randn(s, t, d, generator=g), torch.randn(s, t, d, generator=g)
    weight, bias = torch.randn(v, d, generator=g) * 0.3, torch.randn(v, generator=g) * 0.1
    targets = torch.randint(0, v, (s, t), generator=g)
    targets[0, :2] = -100
    targets[3, 1:] = -100  # a one-token rejected response
    out = {}
    for name, backend, options in (("torch", "torch", None),
                                   ("triton", "triton", fastpref.KernelOptions(grad_in_forward=True,
                                                                               workspace_bytes=8 * v * 4))):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        module = fastpref.FusedDPOLoss(beta=0.5, backend=backend, kernel_options=options)
        res = module(leaves[1], leaves[0], targets, bias=leaves[2], ref_hidden=ref_hidden, temperature=0.7)
        res.loss.backward()
        out[name] = dict(loss=res.loss.item(), logps=res.metrics["logps"].tolist(),
                         grads=[x.grad.flatten().tolist() for x in leaves], path=dict(gif.LAST_PATH))
    return out


def test_triton_rows_path_equals_torch_recompute(tmp_path):
    out = run_interpreted(__file__, tmp_path / "out.json")
    assert out["triton"]["path"]["path"] == "in_forward" and out["triton"]["path"]["groups"] == 2, out["triton"]["path"]
    assert abs(out["triton"]["loss"] - out["torch"]["loss"]) <= 1e-5 * max(1.0, abs(out["torch"]["loss"]))
    for a, b in zip(out["triton"]["logps"], out["torch"]["logps"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    for got, want in zip(out["triton"]["grads"], out["torch"]["grads"]):
        scale = max(abs(x) for x in want)
        assert scale > 0 and max(abs(x - y) for x, y in zip(got, want)) <= 1e-5 * scale


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(run_case()))
