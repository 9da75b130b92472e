"""The fastpref command line: help lists the subcommands, and `check` passes on this machine."""
import subprocess
import sys

from fastpref.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fastpref", "--help"], capture_output=True, text=True, check=True)
    for name in ("check", "kernels", "bench"):
        assert name in out.stdout


def test_check_passes(capsys):
    assert main(["check", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "fused_logprobs[torch]" in out and "FAIL" not in out and "all passed" in out


def test_check_reports_failures(capsys, monkeypatch):
    import fastpref.commands.check as check

    monkeypatch.setitem(check.SUITES, "broken", check.Suite(lambda dtype, seed: [("case", 1.0)]))
    assert main(["check", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_device_flags_are_documented():
    out = subprocess.run([sys.executable, "-m", "fastpref", "check", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--device", "--out", "--budget-s"):
        assert flag in out
    assert "--tiny" not in out  # test-only
