"""Source ids: each example's ``__source__`` (the name of the mixture source it came from) as an
integer id, so training code can report the loss per source.

The id of a name is its index in ``source_names`` (the mixture's names, in mixture order), never
the order in which names happen to appear in a batch: ids must mean the same source in every
batch, every worker and every run. Without ``source_names`` there are no ids and ``__source__``
is passed through unchanged (as a list).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from mixtape.ragged import Columns, example_of, is_arrow

__all__ = ["DOC_SOURCE_IDS", "SOURCE_IDS", "SOURCE_KEY", "SourceNames", "check_source_names"]

#: The example field naming its source (what a mixture yields).
SOURCE_KEY = "__source__"
#: The collators' output: int64 source ids ([B] per example, or per token with -1 on padding).
SOURCE_IDS = "source_ids"
#: Packed rows' per-document source ids (a list per row, aligned with ``seq_lengths``).
DOC_SOURCE_IDS = "doc_source_ids"
#: The source id of tokens that belong to no document (padding).
NO_SOURCE = -1


def check_source_names(source_names: Sequence[str] | None) -> tuple[str, ...] | None:
    """``source_names`` validated: a sequence of distinct, non-empty strings (or None)."""
    if source_names is None:
        return None
    if isinstance(source_names, str | bytes):
        raise TypeError(f"source_names must be a sequence of names, got the string "
                        f"{source_names!r}")  # fmt: skip
    names = tuple(source_names)
    if not names:
        raise ValueError("source_names is empty: pass the mixture's source names in order")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise TypeError(f"source_names[{i}] must be a non-empty string, got {name!r}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"source_names[{i}] repeats {name!r} (also source_names"
                             f"[{seen[name]}]): each source needs one id")  # fmt: skip
        seen[name] = i
    return names


class SourceNames:
    """The mixture's source names and their ids (index in the sequence); picklable."""

    def __init__(self, source_names: Sequence[str] | None) -> None:
        self.names = check_source_names(source_names)
        self.index = {n: i for i, n in enumerate(self.names or ())}

    def __repr__(self) -> str:
        return f"SourceNames({list(self.names) if self.names is not None else None})"

    def take(self, c: Columns) -> npt.NDArray[np.int64] | None:
        """With names, pop ``__source__`` from ``c`` and return one int64 id per example; else
        None (no names: the column stays, passed through as a list by ``stack_other``)."""
        if self.names is None or SOURCE_KEY not in c.cols:
            return None
        if SOURCE_IDS in c.cols:
            raise ValueError(f"batch has both {SOURCE_KEY!r} and {SOURCE_IDS!r}: the collator "
                             f"writes {SOURCE_IDS!r} from {SOURCE_KEY!r}; drop one")  # fmt: skip
        return self.ids(c.cols.pop(SOURCE_KEY))

    def ids(self, col: Any, field: str = SOURCE_KEY) -> npt.NDArray[np.int64]:
        """One int64 id per example from a column of names (or of ids already)."""
        assert self.names is not None
        if is_arrow(col):
            return self._arrow_ids(col, field)
        if hasattr(col, "detach") and hasattr(col, "numpy"):
            col = col.detach().cpu().numpy()
        if isinstance(col, np.ndarray) and col.dtype.kind in "iu":
            if col.ndim != 1:
                raise ValueError(f"{field}: expected one source per example, got shape "
                                 f"{col.shape}")  # fmt: skip
            return self.check_ids(col, field)
        rows = col.tolist() if isinstance(col, np.ndarray) else list(col)
        if all(type(v) is str for v in rows):
            index = self.index
            got = np.fromiter((index.get(v, -1) for v in rows), dtype=np.int64, count=len(rows))
            if got.size and int(got.min()) < 0:
                i = int(np.argmax(got < 0))
                self._unknown(i, rows[i], field)
            return got
        kinds: list[type] = []
        for i, v in enumerate(rows):
            if v is None:
                raise ValueError(f"{field}: example {i} has no source (None)")
            if isinstance(v, str):
                kinds.append(str)
            elif isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_):
                kinds.append(int)
            else:
                raise TypeError(f"{field}: example {i} has source {v!r}; expected a source "
                                f"name (str) or id (int)")  # fmt: skip
            if kinds[i] is not kinds[0]:
                raise TypeError(f"{field}: example {i} has source {v!r} but example 0 has "
                                f"{rows[0]!r}: give names or ids, not both")  # fmt: skip
        if rows and kinds[0] is str:  # str subclasses (numpy str_)
            return self.ids([str(v) for v in rows], field)
        return self.check_ids(np.asarray(rows, dtype=np.int64), field)

    def check_ids(
        self, ids: npt.NDArray[Any], field: str, offsets: npt.NDArray[np.int64] | None = None
    ) -> npt.NDArray[np.int64]:
        """Ids given as integers, checked to name a source (``0 <= id < len(source_names)``, or
        ``>= 0`` without names); ``offsets`` when they are per-document lists of the rows."""
        n = len(self.names) if self.names is not None else None
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            i = int(np.argmax(ids > np.iinfo(np.int64).max))
            raise ValueError(f"{field}: {where(i, offsets)} has source id {int(ids[i])}, beyond "
                             "int64")  # fmt: skip
        out = ids.astype(np.int64)  # a copy: never the caller's (or Arrow's read-only) memory
        bad = (out < 0) if n is None else ((out < 0) | (out >= n))
        if np.any(bad):
            i = int(np.argmax(bad))
            known = "" if self.names is None else (
                f" (source_names has {n}: {list(self.names)})")  # fmt: skip
            raise ValueError(f"{field}: {where(i, offsets)} has source id {int(out[i])}, which "
                             f"names no source{known}")  # fmt: skip
        return out

    def _arrow_ids(self, col: Any, field: str) -> npt.NDArray[np.int64]:
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if col.null_count:
            i = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise ValueError(f"{field}: example {i} has no source (null)")
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = col.dictionary_decode(), t.value_type
        if pa.types.is_integer(t):
            return self.check_ids(col.to_numpy(zero_copy_only=False), field)
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise TypeError(f"{field}: expected source names (strings) or ids (integers), got "
                            f"Arrow type {t}")  # fmt: skip
        assert self.names is not None
        found = pc.index_in(col, value_set=pa.array(self.names, type=t))
        if found.null_count:
            i = int(np.argmax(found.is_null().to_numpy(zero_copy_only=False)))
            self._unknown(i, col[i].as_py(), field)
        return np.asarray(found.to_numpy(zero_copy_only=False), dtype=np.int64)

    def _unknown(self, i: int, name: Any, field: str) -> None:
        raise ValueError(f"{field}: example {i} has source {name!r}, which is not in "
                         f"source_names {list(self.names or ())}")  # fmt: skip


def where(i: int, offsets: npt.NDArray[np.int64] | None) -> str:
    """``example i``, or ``example r document j`` for entry i of per-row lists."""
    if offsets is None:
        return f"example {i}"
    r = example_of(offsets, i)
    return f"example {r} document {i - int(offsets[r])}"


def column_list(col: Any) -> list[Any]:
    """A column as a plain list (Arrow, numpy and tensors converted), for passing it through."""
    if is_arrow(col) or isinstance(col, np.ndarray) or (
            hasattr(col, "detach") and hasattr(col, "tolist")):  # fmt: skip
        got: list[Any] = col.to_pylist() if is_arrow(col) else col.tolist()
        return got
    return list(col)
