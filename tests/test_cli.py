"""The ``mixtape`` command line: dispatch, help, errors, and each command's entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixtape import cli


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: mixtape COMMAND" in capsys.readouterr().out


def test_unknown_command_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_prints_build_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"compiler", "cxx_flags", "cuda_compiled", "cuda_usable"} <= set(info)
    assert cli.main(["info", "extra"]) == 2


def test_pack_stats_through_the_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pack-stats", "--synthetic", "300", "--max-length", "512", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 300


def test_console_script_module_runs() -> None:
    """``python -m mixtape.cli`` is what the console script runs."""
    done = subprocess.run(
        [sys.executable, "-m", "mixtape.cli", "bench", "--list"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pad-ragged" in done.stdout and "pack-plan" in done.stdout
