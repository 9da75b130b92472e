"""python -m fastpref.demo: the shipped task, and a quick run whose reward accuracy must rise."""
import json

import pytest

pytest.importorskip("transformers")

from fastpref import demo  # noqa: E402


def test_shipped_data_is_the_generated_task():
    rows = demo.load_rows()
    assert rows == demo.generate_rows(1200, seed=0)
    for row in rows[:50]:
        assert row["chosen"] != row["rejected"] and row["chosen_reward"] == 1.0
        assert 0.0 <= row["rejected_reward"] < 1.0
        step = (row["prompt"][1] - row["prompt"][0]) % demo.MODULUS
        assert row["chosen"][0] == (row["prompt"][-1] + step) % demo.MODULUS  # chosen continues the progression


def test_encode_scores_only_responses():
    rows = demo.load_rows()[:2]
    batch = demo.encode(rows, ("chosen", "rejected"))
    assert batch.input_ids.shape[0] == 4
    scored = (batch.labels != -100).sum(1)
    assert scored.tolist() == [len(r["chosen"]) + 1 for r in rows] + [len(r["rejected"]) + 1 for r in rows]


def test_quick_demo_accuracy_rises(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert demo.main(["--quick", "--steps", "40", "--eval-pairs", "64", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "FusedDPOLoss" in text and "FusedVARLoss" in text and "Peak memory" in text
    for method in ("dpo", "var"):
        history = report["histories"][method]
        assert history[0]["step"] == 0 and history[-1]["step"] == 40
        assert history[0]["accuracy"] == pytest.approx(0.5)  # policy == reference: every pair ties
        assert history[-1]["accuracy"] >= 0.65, (method, history)
        assert history[-1]["margin"] > history[0]["margin"]
    losses = [h["loss"] for h in report["histories"]["dpo"][1:]]
    assert losses[-1] < 0.6931  # below the DPO loss at policy == reference
    memory = report["memory"]
    if memory["eager"] is not None:  # memray installed (test extra): fused must use less than eager
        assert memory["fused"] < memory["eager"]
