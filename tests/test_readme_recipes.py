"""The README's "Paper recipes, end to end" blocks run as written (one namespace, in a temporary folder): VAR with a
reward model, alpha-DPO under accumulation, OnMC-PO and SPO on the toy model, each asserting what its metrics do."""
import re
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import one_thread  # noqa: E402,F401  (autouse)

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe_blocks() -> list:
    text = README.read_text()
    begin, end = text.index("<!-- recipes:begin -->"), text.index("<!-- recipes:end -->")
    return re.findall(r"```python\n(.*?)```", text[begin:end], flags=re.S)


def test_readme_has_a_recipe_per_seed_method():
    blocks = recipe_blocks()
    assert len(blocks) == 5
    for loss in ("var", "alpha_dpo", "mcpo", "spo"):
        assert any(f'fastpref_loss="{loss}"' in b and "assert" in b for b in blocks[1:]), loss


def test_readme_recipes_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_recipes"}
    for block in recipe_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (the README's own code)
