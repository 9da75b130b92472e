"""The harness of the interpreter tests: run a script under Triton's interpreter in a subprocess.

``TRITON_INTERPRET`` is read when the kernels are first imported, so a test process that has already imported
them cannot switch; each interpreter test runs its own file (or a case script) as a script that writes JSON to
``out``, and asserts on what it wrote.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: Any, out: Path, *args: str, timeout: int = 300) -> Any:
    """``python script out *args`` with ``TRITON_INTERPRET=1`` from the repository root; the JSON it wrote."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script), str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(Path(out).read_text())
