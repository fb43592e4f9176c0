"""The contract every source keeps, checked against a plain reference (shared by the tests)."""

from __future__ import annotations

import itertools
import pickle
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from mixtape import Source
from mixtape.sources import take_ragged


def make_docs(n: int = 37, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 1000, int(rng.integers(1, 9))).tolist(), "id": i,
             "text": f"doc {i}"} for i in range(n)]  # fmt: skip


def plain(x: Any) -> Any:
    """numpy arrays and tensors as lists, recursively, for comparison with a reference."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    return x


def check_map_source(src: Source, ref: list[dict[str, Any]], seed: int = 0) -> None:
    """The contract of a map-style source against the expected rows ``ref``."""
    n = len(ref)
    assert src.num_rows == n
    assert plain(list(src.stream())) == ref
    for start in sorted({0, 1, n // 2, n - 1, n, n + 5}):
        assert plain(list(src.stream(start))) == ref[start:], start
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.integers(0, n, 40), [n - 1, 0, 0, n - 1], np.arange(n)[::-1]])
    expected = [ref[i] for i in rows]
    assert plain(src.take(rows)) == expected
    table = src.take_arrow(rows)
    assert isinstance(table, pa.Table) and table.num_rows == rows.size
    assert all(c.num_chunks == 1 for c in table.columns)
    assert table.to_pylist() == expected
    assert plain(src.take(rows.tolist())) == expected  # a Python list of rows
    lists = [k for k, v in ref[0].items() if isinstance(v, list)]
    for column in lists[:1]:  # the packing loader's read of a token column
        values, offsets = take_ragged(src, rows, column)
        assert offsets[0] == 0 and offsets.size == rows.size + 1
        assert [values[a:b].tolist() for a, b in itertools.pairwise(offsets)] == [
            ref[i][column] for i in rows]
    assert src.take(np.zeros(0, np.int64)) == [] and src.take_arrow([]).num_rows == 0
    name = re.escape(src.name)
    with pytest.raises(ValueError, match=rf"source '{name}': row {n} \(position 1\) is out"):
        src.take([0, n])
    with pytest.raises(ValueError, match=rf"source '{name}': row -1 \(position 0\)"):
        src.take_arrow(np.array([-1]))
    again = pickle.loads(pickle.dumps(src))
    assert plain(again.take(rows)) == expected
    assert again.fingerprint == src.fingerprint


def check_streaming_source(src: Source, ref: list[dict[str, Any]]) -> None:
    assert src.num_rows is None
    assert plain(list(src.stream())) == ref
    for start in (1, len(ref) // 2, len(ref) - 1, len(ref), len(ref) + 3):
        assert plain(list(src.stream(start))) == ref[start:], start
    name = re.escape(src.name)
    with pytest.raises(TypeError, match=rf"source '{name}' is streaming .* no random access"):
        src.take([0])
    with pytest.raises(TypeError, match="is streaming"):
        src.take_arrow([0])
    assert plain(list(pickle.loads(pickle.dumps(src)).stream(2))) == ref[2:]
