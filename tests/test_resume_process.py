"""Exact resume across processes: 2 steps and a checkpoint here, then a *fresh Python process* resumes from the
checkpoint for 2 more steps; its parameters and logs equal 4 uninterrupted steps, for every stateful loss of
tests/test_resume.py (alpha-DPO's EMA, MC-PO's generator and the global RNG, SPO's online samples). Nothing of the
first process survives in the second except the checkpoint folder."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from test_resume import CASES, _logs, _params, _trainer, tok  # noqa: E402,F401  (tok: fixture)

TESTS = Path(__file__).resolve().parent

RESUME = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from _trl_fixtures import tiny_tokenizer
    from test_resume import _logs, _params, _trainer
    from pathlib import Path
    out = {{}}
    for case in {cases!r}:
        folder = Path({root!r}) / case
        trainer = _trainer(tiny_tokenizer(), folder / "split", case)
        trainer.train(resume_from_checkpoint=str(folder / "split" / "checkpoint-2"))
        out[case] = dict(params=_params(trainer), logs=_logs(trainer))
    torch.save(out, Path({root!r}) / "resumed.pt")
""")


def test_resume_in_a_fresh_process_equals_uninterrupted_run(tok, tmp_path):  # noqa: F811
    torch.set_num_threads(1)
    cases = sorted(CASES)
    straight = {}
    for case in cases:
        first = _trainer(tok, tmp_path / case / "split", case, stop_at=2)
        first.train()
        run = _trainer(tok, tmp_path / case / "straight", case)
        run.train()
        straight[case] = dict(params=_params(run), logs=_logs(run))
    script = RESUME.format(tests=str(TESTS), cases=cases, root=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    for case in cases:
        want, got = straight[case], resumed[case]
        assert [h["step"] for h in got["logs"]] == [h["step"] for h in want["logs"]] == [1, 2, 3, 4]
        for h, r in zip(want["logs"], got["logs"]):
            assert h.keys() == r.keys(), case
            for key in h:
                assert r[key] == pytest.approx(h[key], rel=1e-6, abs=1e-7), (case, h["step"], key)
        for name, p in want["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-6, atol=1e-7, msg=f"{case} {name}")
