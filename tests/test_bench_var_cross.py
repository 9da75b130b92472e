"""bench/var_cross.py (VAR Alg. 1 cross-pair cost): at a tiny size, in-process, the reference rows counted by the
forward hooks equal the formula of each form (B^2 with var_responses="chosen", 2 B^2 with "both", none for the
diagonal form), on every step, and the JSON and Markdown reports are written."""
import json
import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import one_thread  # noqa: E402,F401

from fastpref.bench import var_cross  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("var_cross")
    size = var_cross.Size(batches=(2, 3), warmup=0, repeats=2, memory=False)
    threads = torch.get_num_threads()
    try:
        return out, var_cross.run(size, str(out), "test", show=False)
    finally:
        torch.set_num_threads(threads)  # run() sets its own


def test_counted_reference_rows_follow_the_formula(results):
    _, res = results
    rows = {(r["b"], r["form"]): r for r in res["rows"]}
    assert sorted(rows) == sorted((b, f) for b in (2, 3) for f in var_cross.FORMS)
    for (b, form), row in rows.items():
        c = row["counts"]
        # the formula written out here, independently of var_cross.expected()
        s = b if form == "cross/chosen" else 2 * b
        want_ref = {"diagonal": 0, "cross/chosen": b * b, "cross/both": 2 * b * b}[form]
        assert c["ref_rows"] == want_ref, (b, form, c)
        assert c["reward_pairs"] == want_ref, (b, form, c)  # r(x_i, y_j) for the same P x S pairs
        assert c["ref_forwards"] == (0 if form == "diagonal" else math.ceil(b / var_cross.PROMPTS_PER_CHUNK))
        assert c["reward_forwards"] == (0 if form == "diagonal" else 1)  # a few short texts: one chunk
        assert c["policy_rows"] == s
        assert row["counts_constant"] and row["matches_formula"]
        assert len(row["times_s"]) == 2 and row["median_s"] > 0
        assert all(math.isfinite(x) for x in row["losses"]) and len(row["losses"]) == 2
        assert row["x_diagonal"] is not None and (form != "diagonal" or row["x_diagonal"] == 1.0)


def test_reports_are_written(results):
    out, res = results
    with open(out / "var_cross.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    md = (out / "var_cross.md").read_text()
    assert md.index("| B | form |") < md.index("**Cost.**")  # results first
    assert "B^2" in md and "2 B^2" in md and "differs from the formula" not in md
    assert "- B = 3: cross/chosen 9 reference sequences" in md and "cross/both 18 reference sequences" in md
    assert "interleaved repeats per row" in md  # the machine line


def test_expected_counts_catch_a_wrong_count():
    """Non-vacuous: a count that is off by one row is flagged in the Markdown."""
    row = dict(b=2, form="cross/both", counts=dict(ref_rows=7, ref_forwards=2, reward_pairs=8, reward_forwards=1,
                                                    policy_rows=4),
               expected=var_cross.expected("cross/both", 2), counts_constant=True, median_s=0.01, best_s=0.01,
               x_diagonal=1.5, x_diagonal_best=1.5, peak_mib=None)
    row["matches_formula"] = all(row["counts"][k] == v for k, v in row["expected"].items())
    assert not row["matches_formula"]
    meta = dict(started="now", cpu_count=2, platform="p", torch="t", torch_threads=1, elapsed_s=0.0)
    md = var_cross.markdown(dict(mode="t", size=dict(warmup=0, repeats=1), meta=meta, beta=1.0, prompts_per_chunk=1,
                                 memory_note=None, rows=[row]))
    assert "differs from the formula" in md
