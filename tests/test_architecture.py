"""The package's structure as tests: layers import only downward and never in a circle, the library
never loads its CLI, files and functions stay small, and a wheel adds only ``fastpref`` to the
top-level import names."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folders and the package each installs as (setup.py's package_dir).
FOLDERS = {"fastpref": "fastpref", "csrc_triton": "fastpref.kernels", "bench": "fastpref.bench"}

# Layers, lowest first. A module may import its own layer or lower ones, never a higher one. The first
# matching prefix decides a module's layer ("fastpref" alone is the package root, which re-exports the API).
LAYERS: List[Tuple[str, ...]] = [
    ("fastpref._types", "fastpref._checks", "fastpref._hf"),
    ("fastpref._prepare", "fastpref.kernels"),
    ("fastpref.backends",),
    ("fastpref.ops",),
    ("fastpref.losses",),
    ("fastpref.modules",),
    ("fastpref.reference",),
    ("fastpref",),  # the package root: the public API, above everything it re-exports
    ("fastpref.integrations",),
    ("fastpref.testing",),
    ("fastpref.device_check",),  # the GPU device check (fastpref check --device cuda), built on the testing helpers
    ("fastpref.bench",),
    ("fastpref.commands", "fastpref.cli", "fastpref.demo", "fastpref.__main__"),
]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80  # code lines: from the end of the docstring to the end of the function


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def library_files() -> Iterator[Tuple[str, Path]]:
    """(dotted module name, path) of every Python file that installs under ``fastpref``."""
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: Set[str]) -> List[str]:
    """``from base import a, b``: the submodules ``base.a`` ... that exist, and ``base`` itself when a
    name is an attribute of it rather than a submodule."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" for a in node.names]
    return [s for s in subs if s in known] + ([base] if any(s not in known for s in subs) else [])


def fastpref_imports(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The fastpref modules ``module`` imports (anywhere in the file, lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(module, path.name == "__init__.py", node, known)
        else:
            continue
        for name in names:
            # "from pkg import name": name may be a submodule or an attribute of pkg.
            if name in known:
                found.add(name)
    found.discard(module)
    return found


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    files = dict(library_files())
    known = set(files)
    return {m: fastpref_imports(m, p, known) for m, p in files.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_import_of_a_higher_layer(graph):
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def find_circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components; any component of two or more modules is a circle."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    circles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle(graph):
    assert not find_circles(graph)


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    """The graph code itself: a planted upward import and a planted circle are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from fastpref.commands import check\nimport fastpref.ops\n")
    b.write_text("from . import ops\n")
    known = {"fastpref.commands.check", "fastpref.commands", "fastpref.ops", "fastpref.backends.torch_backend"}
    found = fastpref_imports("fastpref.backends.torch_backend", a, known)
    assert found == {"fastpref.commands.check", "fastpref.ops"}
    assert any(layer_of(t) > layer_of("fastpref.backends.torch_backend") for t in found)
    assert fastpref_imports("fastpref.backends.torch_backend", b, known | {"fastpref.backends.ops"}) == \
        {"fastpref.backends.ops"}
    assert find_circles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert find_circles({"x": {"y"}, "y": set()}) == []


def test_import_fastpref_loads_no_cli_and_no_kernels():
    code = ("import sys, fastpref; print(sorted(m for m in sys.modules if m.startswith(('fastpref.commands', "
            "'fastpref.cli', 'fastpref.testing', 'fastpref.bench', 'fastpref.kernels', 'fastpref.demo', 'triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def _functions(tree: ast.AST) -> Iterator[ast.AST]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_library_files_and_functions_stay_small():
    too_long = []
    for module, path in library_files():
        if module.startswith("fastpref.bench"):
            continue  # the benchmark suite is tooling, not the library
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for fn in _functions(ast.parse(text)):
            body = fn.body[1:] if ast.get_docstring(fn) is not None and len(fn.body) > 1 else fn.body
            lines = fn.end_lineno - body[0].lineno + 1
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


@pytest.mark.slow
def test_wheel_adds_only_fastpref_to_the_top_level(tmp_path):
    """A non-editable build installs csrc_triton/ as fastpref/kernels and bench/ as fastpref/bench."""
    env = dict(os.environ, PIP_NO_INDEX="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, env=env, capture_output=True)
    (wheel,) = tmp_path.glob("fastpref-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"fastpref"}, top
    assert "fastpref/kernels/logprobs_fwd.py" in names and "fastpref/bench/runner.py" in names
    assert "fastpref/data/progressions.jsonl" in names
