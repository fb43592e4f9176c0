"""The README's quickstart runs as written (so the first thing users copy keeps working)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no python block"
    namespace: dict[str, object] = {}
    for block in blocks:  # every python block, in order, as a reader would paste them
        exec(compile(block, str(README), "exec"), namespace)
    assert "efficiency" in capsys.readouterr().out
