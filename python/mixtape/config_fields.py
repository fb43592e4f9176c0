"""Field checks and error locations shared by the config dataclasses (:mod:`mixtape.config`,
:mod:`mixtape.loader_config`).

An error names ``Class.field`` when a dataclass is built in Python, and ``file: key.path`` while
a config file or dict is read (:func:`location` sets where that is).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import numpy as np

from mixtape.schedule import WeightSchedulePoint

__all__ = [
    "SEED_END",
    "check_bool",
    "check_choice",
    "check_int",
    "check_real",
    "check_str",
    "close_matches",
    "field_where",
    "loc",
    "location",
    "optional",
    "plain",
    "plain_fields",
    "set_field",
]

SEED_END = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)

T = TypeVar("T")

_CTX: ContextVar[tuple[str | None, str] | None] = ContextVar("mixtape_config_ctx", default=None)


@contextmanager
def location(file: str | None, prefix: str) -> Iterator[None]:
    """Errors raised inside name ``file: <prefix><key>`` instead of ``Class.key``."""
    token = _CTX.set((file, prefix))
    try:
        yield
    finally:
        _CTX.reset(token)


def loc(file: str | None, path: str) -> str:
    return f"{file}: {path}" if file else path


def field_where(owner: str, key: str) -> str:
    ctx = _CTX.get()
    if ctx is None:
        return f"{owner}.{key}"
    file, prefix = ctx
    return loc(file, prefix + key)


def yaml_hint(value: object) -> str:
    """Why a number arrived as a string: PyYAML (YAML 1.1) reads ``1e-3`` as one."""
    if not isinstance(value, str):
        return ""
    if re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip()):
        return " (YAML 1.1 reads numbers like 1e-3 as strings: write 1.0e-3)"
    try:
        float(value)
    except ValueError:
        return ""
    return " (a string: write the number without quotes)"


def check_int(where: str, value: object, *, minimum: int | None = None,
               below: int | None = None) -> int:  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int, got {value!r}{yaml_hint(value)}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {v}")
    if below is not None and v >= below:
        raise ValueError(f"{where} must be < {below}, got {v}")
    return v


def check_real(where: str, value: object, *, minimum: float | None = None,
                maximum: float | None = None, positive: bool = False,
                below: float | None = None) -> float:  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, got {value!r}{yaml_hint(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{where} must be > 0, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{where} must be <= {maximum}, got {value!r}")
    if below is not None and v >= below:
        raise ValueError(f"{where} must be < {below}, got {value!r}")
    return v


def check_bool(where: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be true or false, got {value!r}")
    return bool(value)


def check_str(where: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{where} must be a non-empty string, got {value!r}")
    return value


def check_choice(where: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}"
                         f"{close_matches(value, choices)}")  # fmt: skip
    return value


def optional(check: Callable[..., T], where: str, value: object, **kw: Any) -> T | None:
    return None if value is None else check(where, value, **kw)


def close_matches(value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    near = difflib.get_close_matches(value, list(choices), n=3)
    return f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""


def set_field(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise their fields once


def plain_fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = plain(obj)
    return out


def plain(value: Any) -> Any:
    """Dataclasses as dicts without their None fields, tuples as lists, schedule points as
    ``{step, weights}``; other values unchanged."""
    if isinstance(value, WeightSchedulePoint):
        return {"step": value.step, "weights": dict(value.weights)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is not None and not (f.name in ("collate_kwargs", "load_kwargs") and not v):
                out[f.name] = plain(v)
        return out
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value
