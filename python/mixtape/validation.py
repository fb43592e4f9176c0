"""Argument checks shared by every stage, with messages that name the argument and the value."""

from __future__ import annotations

from typing import Any

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


def check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = False
) -> None:
    """``value`` is an int (not a bool) that fits int64 and is at least ``minimum``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:  # else the kernel call fails, at collate time
        raise ValueError(f"{name} must fit in int64, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
