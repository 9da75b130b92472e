"""The trainer-step benchmark (bench/trainer_step.py) at a tiny size: one timed step per trainer, its JSON and
Markdown, finite losses, FastPref and TRL DPO agreeing at step 1, and the README renderer reading its Markdown."""
import json
import math
import os

import pytest
import torch

from fastpref.bench import readme, trainer_step

# Vocabulary 512, one layer, 2 prompts of 8 + 12 tokens: the whole grid (10 trainers) in a few seconds.
TINY = trainer_step.Size(vocab=512, hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, prompt_len=8,
                         completion_len=12, pairs=2, candidates=2, warmup=0, repeats=1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_step")
    threads = torch.get_num_threads()
    try:
        found = trainer_step.run(TINY, str(out), "test", threads=1, show=False, profile=True)
    finally:
        torch.set_num_threads(threads)
    with open(out / "trainer_step.json") as f:
        written = json.load(f)
    with open(out / "trainer_step.md") as f:
        md = f.read()
    return found, written, md, out


def _rows(results):
    return {(r["loss"], r["trainer"]): r for r in results[1]["rows"]}


def test_json_has_every_trainer_with_one_timed_finite_step(results):
    found, written, _, _ = results
    assert written["rows"] == json.loads(json.dumps(found["rows"]))  # the file is what run() returned
    rows = _rows(results)
    assert set(rows) == {(loss, impl) for loss, impl, _ in trainer_step.TRAINERS}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert {r["trainer"] for r in ok} >= {"fastpref", "trl", "eager"}
    for r in ok:
        assert len(r["times_s"]) == TINY.repeats and r["median_s"] > 0, r
        profiled = f"{r['loss']}/{r['trainer']}" in trainer_step.PROFILED
        assert len(r["losses"]) == TINY.warmup + TINY.repeats + 1 + profiled  # + the memray and profiled steps
        assert all(math.isfinite(x) for x in r["losses"]), r
        assert r["tokens_per_s"] > 0 and r["peak_mib"] is not None and r["peak_mib"] >= 0
    for r in rows.values():
        if r["status"] != "ok":  # only TRL + Liger may fail (Liger's Triton layer kernels need a GPU driver)
            assert r["trainer"] == "trl+liger" and r["reason"] and r["times_s"] == []


def test_fastpref_and_trl_dpo_agree_at_step_one(results):
    rows = _rows(results)
    ours, trl = rows[("dpo", "fastpref")]["step1_loss"], rows[("dpo", "trl")]["step1_loss"]
    assert ours == pytest.approx(trl, rel=1e-5)
    assert ours == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 1: -log sigmoid(0)
    assert rows[("dpo", "fastpref-4gemm")]["step1_loss"] == pytest.approx(ours, rel=1e-6)  # grad_in_forward
    liger = rows[("dpo", "trl+liger")]
    if liger["status"] == "ok":
        assert liger["step1_loss"] == pytest.approx(trl, rel=1e-5)
    for loss in ("var", "mcpo", "spo"):  # the seed losses against their eager twin (full logits)
        assert rows[(loss, "fastpref")]["step1_loss"] == pytest.approx(rows[(loss, "eager")]["step1_loss"],
                                                                       rel=1e-4), loss


def test_ratios_and_targets_are_derived_from_the_rows(results):
    rows = _rows(results)
    ours, trl = rows[("dpo", "fastpref")], rows[("dpo", "trl")]
    assert ours["x_peer"] == pytest.approx(ours["median_s"] / trl["median_s"], rel=1e-2)
    assert rows[("var", "fastpref")]["peer"] == "eager" and rows[("var", "eager")]["peer"] is None
    targets = results[1]["targets"]
    assert len(targets) == 4  # time and memory against TRL and against TRL + Liger
    assert targets[0]["met"] == (ours["median_s"] / trl["median_s"] <= 1.0)
    assert targets[1]["met"] == (trl["peak_mib"] > ours["peak_mib"])
    if rows[("dpo", "trl+liger")]["status"] != "ok":
        assert targets[2]["met"] is None and rows[("dpo", "trl+liger")]["reason"] in targets[2]["note"]


def test_markdown_parses_and_renders_for_the_readme(results):
    _, written, md, out = results
    parsed = readme.parse_trainer_step_md(md)
    assert len(parsed.table) == 2 + len(trainer_step.TRAINERS)
    assert len(parsed.targets) == len(written["targets"]) and "torch" in parsed.machine
    assert len(parsed.not_measured) == sum(r["status"] != "ok" for r in written["rows"])
    block = readme.render_trainer_step(parsed, "x.md")
    assert all(line in block for line in parsed.table + parsed.targets)
    assert "Profile `dpo/fastpref`" in md and "Profile `dpo/trl`" in md
    assert os.path.exists(out / "trainer_step.png") or "no plot" in md


def test_liger_globals_are_restored():
    """Liger patches modeling_llama's globals; the bench sets them only around the Liger trainer's steps."""
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    values = {"apply_rotary_pos_emb": lambda *a: None}
    with trainer_step.swapped(values):
        assert modeling_llama.apply_rotary_pos_emb is values["apply_rotary_pos_emb"]
    assert dict(vars(modeling_llama)) == before


def test_liger_patches_leave_other_models_alone(results):
    from transformers.models.llama import modeling_llama

    assert not modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert not modeling_llama.LlamaRMSNorm.__module__.startswith("liger_kernel")
