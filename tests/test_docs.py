"""The documentation in docs/ and the references to it from the code stay in step.

- Every ``docs/<name>.md`` cited in a .py file under fastpref/, bench/, tests/ or csrc_triton/ exists,
  and every section it cites (``§N`` or a range ``§A-B``) has a heading ``## N.`` in that file.
- No .py file still cites the spec's upper-case file names without the ``docs/`` prefix (those files
  are not part of the repository).
- docs/api.md has sections 1-5 and docs/losses.md sections 0-8.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = ("fastpref", "bench", "tests", "csrc_triton")

# docs/<name>.md, optionally followed by a section "§N" or a range "§A-B" (hyphen or en dash).
CITATION = re.compile(r"docs/([A-Za-z0-9_.\-]+?\.md)(?:[ \t]*§[ \t]*(\d+)(?:[ \t]*[-–][ \t]*(\d+))?)?")
# The old dangling names, upper case, not preceded by "docs/". Spelled in parts so that this file
# does not itself contain them.
DANGLING = re.compile(r"(?<!docs/)\b(?:" + "|".join(("A" + "PI", "LOS" + "SES")) + r")\.md")
HEADING = re.compile(r"^## (\d+)\.", re.MULTILINE)


def python_files() -> List[Path]:
    files: List[Path] = []
    for folder in SCANNED:
        base = ROOT / folder
        if base.is_dir():  # csrc_triton/ may move into the package
            files.extend(sorted(base.rglob("*.py")))
    return files


def sections(doc: Path) -> Set[int]:
    return {int(n) for n in HEADING.findall(doc.read_text(encoding="utf-8"))}


def citations() -> Dict[str, List[Tuple[str, int, List[int]]]]:
    """doc name -> [(file, line, cited section numbers)]."""
    found: Dict[str, List[Tuple[str, int, List[int]]]] = {}
    for path in python_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                name, first, last = match.groups()
                cited: List[int] = []
                if first is not None:
                    lo = int(first)
                    hi = int(last) if last is not None else lo
                    assert lo <= hi, f"{path.relative_to(ROOT)}:{lineno}: bad section range {match.group(0)!r}"
                    cited = list(range(lo, hi + 1))
                found.setdefault(name, []).append((str(path.relative_to(ROOT)), lineno, cited))
    return found


def test_scanned_folders_exist():
    assert python_files(), f"no .py files found under {SCANNED} in {ROOT}"


def test_cited_docs_and_sections_exist():
    problems = []
    for name, uses in sorted(citations().items()):
        doc = DOCS / name
        if not doc.is_file():
            problems += [f"{where}:{line}: cites docs/{name}, which does not exist" for where, line, _ in uses]
            continue
        have = sections(doc)
        for where, line, cited in uses:
            missing = [n for n in cited if n not in have]
            if missing:
                problems.append(f"{where}:{line}: cites docs/{name} §{missing}, which has no heading '## N.' for it")
    assert not problems, "\n".join(problems)


def test_no_dangling_spec_references():
    problems = []
    for path in python_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in DANGLING.finditer(line):
                problems.append(f"{path.relative_to(ROOT)}:{lineno}: {match.group(0)} (cite docs/api.md or "
                                "docs/losses.md instead)")
    assert not problems, "references to files outside the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize("name, expected", [("api.md", range(1, 6)), ("losses.md", range(0, 9))])
def test_docs_have_their_numbered_sections(name, expected):
    doc = DOCS / name
    assert doc.is_file(), f"docs/{name} is missing"
    have = sections(doc)
    missing = [n for n in expected if n not in have]
    assert not missing, f"docs/{name} lacks the sections {missing} (headings '## N. ...')"
