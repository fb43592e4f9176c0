"""Sources read from files: ``.npy`` token files, data files and globs, ``save_to_disk``
directories, ``datasets`` builders, and :class:`DatasetMixture` (one source's lazily loaded config).

Data files go through ``datasets.load_dataset`` (parquet, json/jsonl, csv, arrow, text; compressed
too): map-style by default (converted once to HF's Arrow cache, then memory-mapped), streaming
with ``streaming=True``. No hand-written parsers. The sources themselves are the kinds of
:mod:`mixtape.sources`; what is added here is how to open them and a file fingerprint (absolute
path, size and modification time of every file).
"""

from __future__ import annotations

import glob
import hashlib
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch

from mixtape.gather import list_array, ragged_gather
from mixtape.ops import Int64Array
from mixtape.sources import (
    BaseSource,
    HFIterableSource,
    as_source,
    check_source_name,
    hf_source,
)

__all__ = [
    "FILE_BUILDERS",
    "DatasetMixture",
    "NumpyTokenSource",
    "file_fingerprint",
    "open_files",
    "open_path",
]

#: File suffix -> the ``datasets`` packaged builder that reads it (compressed json/csv too).
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def file_fingerprint(paths: Sequence[str], *extra: object) -> str:
    """Hash of each file's absolute path, size and modification time (and ``extra``)."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Numpy token files
# --------------------------------------------------------------------------------------------


def _load_array(arr: Any, what: str) -> tuple[npt.NDArray[Any], str | None, str]:
    """(array, path or None, name for messages): a path is memory-mapped read-only."""
    if isinstance(arr, (str, os.PathLike)):
        path = os.fspath(arr)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file {path!r} does not exist")
        try:
            loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{what} file {path!r} is not a .npy array: {e}") from e
        return loaded, path, f"{what} file {path!r}"
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what} must be a .npy path or a numpy array, got {type(arr).__name__}")
    return arr, None, f"{what} array"


def _check_offsets(offsets: npt.NDArray[Any], n_tokens: int, where: str) -> Int64Array:
    """Offsets as int64 (n + 1 entries from 0 to n_tokens, non-decreasing), read in blocks."""
    if offsets.ndim != 1 or offsets.size < 1:
        raise ValueError(f"{where}: offsets must be 1-D with n + 1 entries, "
                         f"got shape {offsets.shape}")  # fmt: skip
    if offsets.dtype.kind not in "iu" or offsets.dtype.itemsize > 8:
        raise TypeError(f"{where}: offsets must be integers, got dtype {offsets.dtype}")
    if offsets.dtype == np.uint64 and int(offsets[-1]) > np.iinfo(np.int64).max:
        raise ValueError(f"{where}: last offset {int(offsets[-1])} does not fit in int64")
    if int(offsets[0]) != 0:
        raise ValueError(f"{where}: offsets must start at 0, got {int(offsets[0])}")
    if int(offsets[-1]) != n_tokens:
        raise ValueError(f"{where}: offsets must end at the token count {n_tokens}, "
                         f"got {int(offsets[-1])}")  # fmt: skip
    block = 1 << 22
    for lo in range(0, offsets.size - 1, block):
        d = np.diff(np.asarray(offsets[lo : lo + block + 1], dtype=np.int64))
        if (d < 0).any():
            i = lo + int(np.argmax(d < 0))
            raise ValueError(f"{where}: offsets decrease at row {i} "
                             f"({int(offsets[i])} -> {int(offsets[i + 1])})")  # fmt: skip
    return offsets if offsets.dtype == np.int64 else np.asarray(offsets, dtype=np.int64)


class NumpyTokenSource(BaseSource):
    """Pre-tokenized documents in a flat 1-D token array and an offsets array (n + 1 int64).

    ``tokens`` and ``offsets`` are ``.npy`` paths (memory-mapped read-only, reopened rather than
    copied when pickled) or arrays. Row i is ``tokens[offsets[i]:offsets[i+1]]`` as
    ``{column: array}``. Token ids come out as int32 when the stored type is at most 16 bits or
    int32, else int64 (uint64 ids beyond int64 are an error). ``take_arrow`` is one vectorised
    gather into a list column, no Python loop per row.
    """

    def __init__(self, tokens: Any, offsets: Any, *, name: str | None = None,
                 column: str = "input_ids", text_field: str | None = None) -> None:  # fmt: skip
        tok, tok_path, tok_where = _load_array(tokens, "tokens")
        if name is None:
            name = Path(tok_path).stem if tok_path else "tokens"
        super().__init__(name, text_field=text_field)
        off, off_path, off_where = _load_array(offsets, "offsets")
        if tok.ndim != 1:
            raise ValueError(f"{self._where}: {tok_where} must be 1-D, got shape {tok.shape}")
        if tok.dtype.kind not in "iu":
            raise TypeError(f"{self._where}: {tok_where} must hold integer token ids, "
                            f"got dtype {tok.dtype}")  # fmt: skip
        self.offsets = _check_offsets(off, int(tok.size), f"{self._where}: {off_where}")
        self.tokens, self.column = tok, column
        self.paths = (tok_path, off_path)
        self.num_rows = int(self.offsets.size - 1)
        self._check_not_empty()
        small = tok.dtype.itemsize <= 2 or tok.dtype == np.int32
        self.dtype: np.dtype[Any] = np.dtype(np.int32 if small else np.int64)
        self.fingerprint = (file_fingerprint([tok_path, off_path], column)
                            if tok_path and off_path else None)  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.paths[0] is not None:
            state["tokens"] = None
        if self.paths[1] is not None:
            state["offsets"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        tok_path, off_path = self.paths
        fp = self.fingerprint  # set only when both arrays are files
        if fp is not None and fp != file_fingerprint([str(tok_path), str(off_path)], self.column):
            raise ValueError(f"{self._where}: {tok_path!r} or {off_path!r} changed since "
                             f"the source was made")  # fmt: skip
        if tok_path is not None:
            self.tokens = np.load(tok_path, mmap_mode="r", allow_pickle=False)
        if off_path is not None:
            off = np.load(off_path, mmap_mode="r", allow_pickle=False)
            self.offsets = off if off.dtype == np.int64 else np.asarray(off, dtype=np.int64)

    def _ids(self, values: npt.NDArray[Any], offsets: Int64Array,
             rows: Int64Array) -> npt.NDArray[Any]:  # fmt: skip
        """Token ids in the output dtype; a uint64 id beyond int64 is named with its row."""
        if values.dtype == np.uint64 and values.size:
            big = values > np.iinfo(np.int64).max
            if big.any():
                j = int(np.argmax(big))
                row = int(rows[int(np.searchsorted(offsets, j, side="right")) - 1])
                raise ValueError(f"{self._where}: row {row} holds token id {int(values[j])}, "
                                 f"which does not fit in int64")  # fmt: skip
        return values.astype(self.dtype, copy=False)

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        tok, off, col = self.tokens, self.offsets, self.column
        out = []
        for r in rows.tolist():
            ids = np.asarray(tok[off[r] : off[r + 1]])
            out.append({col: self._ids(ids, np.array([0, ids.size]), np.array([r]))})
        return out

    def _take_arrow(self, rows: Int64Array) -> pa.Table:
        values, offsets = ragged_gather(self.tokens, self.offsets, rows)
        return pa.table({self.column: list_array(offsets, self._ids(values, offsets, rows))})

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        return self._stream_rows(start)


# --------------------------------------------------------------------------------------------
# Paths, globs and DatasetMixture
# --------------------------------------------------------------------------------------------


def _builder_of(path: str) -> str | None:
    p = path.lower()
    for c in _COMPRESSIONS:
        if p.endswith(c):
            p = p[: -len(c)]
            break
    if p.endswith(".npy"):
        return "numpy"
    return next((b for suffix, b in FILE_BUILDERS.items() if p.endswith(suffix)), None)


def _expand(patterns: Any, where: str) -> list[str]:
    """Files named by a path, glob or list of them (each glob sorted), in the given order."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise ValueError(f"{where}: data files must be a path, a glob or a non-empty list of "
                         f"them, got {patterns!r}")  # fmt: skip
    files: list[str] = []
    for pat in map(os.fspath, patterns):
        if glob.has_magic(pat):
            found = sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"{where}: no file matches {pat!r}")
            files.extend(found)
        elif os.path.isfile(pat):
            files.append(pat)
        else:
            raise FileNotFoundError(f"{where}: {pat!r} is not a file")
    return files


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def open_files(files: Any, name: str, *, split: str = "train", streaming: bool = False,
               text_field: str | None = None, **load_kwargs: Any) -> BaseSource:  # fmt: skip
    """Data files (a path, glob or list; one format, told by the suffix) as one source:
    ``datasets.load_dataset(<format>, data_files=..., split=...)``, or a ``.npy`` token file
    with ``offsets=`` as a :class:`NumpyTokenSource`."""
    where = f"source {name!r}"
    paths = _expand(files, where)
    builders = {f: _builder_of(f) for f in paths}
    unknown = [f for f, b in builders.items() if b is None]
    if unknown:
        raise ValueError(f"{where}: cannot tell the format of {unknown[0]!r} from its suffix; "
                         f"known: {sorted(FILE_BUILDERS)} and .npy, optionally compressed "
                         f"({', '.join(_COMPRESSIONS)})")  # fmt: skip
    kinds = sorted({str(b) for b in builders.values()})
    if len(kinds) > 1:
        raise ValueError(f"{where}: files of different formats {kinds} in one source; make one "
                         f"source per format")  # fmt: skip
    if kinds[0] == "numpy":
        offsets = load_kwargs.pop("offsets", None)
        if offsets is None or len(paths) != 1:
            raise ValueError(f"{where}: a .npy token file is one file read with offsets=<.npy "
                             f"of n + 1 offsets>; got {paths}, offsets={offsets!r}")  # fmt: skip
        if streaming:
            raise ValueError(f"{where}: numpy token files are random access; streaming=True "
                             f"is not supported")  # fmt: skip
        return NumpyTokenSource(paths[0], offsets, name=name, text_field=text_field, **load_kwargs)
    import datasets

    ds = datasets.load_dataset(kinds[0], data_files=paths, split=split, streaming=streaming,
                               **load_kwargs)  # fmt: skip
    fp = file_fingerprint(paths, kinds[0], split, sorted(load_kwargs.items(), key=str))
    return hf_source(ds, name, text_field=text_field, fingerprint=fp)


def open_path(path: str | os.PathLike[str], name: str, *, split: str = "train",
              streaming: bool = False, text_field: str | None = None, data_files: Any = None,
              data_dir: str | None = None, allow_builder: bool = False,
              **load_kwargs: Any) -> BaseSource:  # fmt: skip
    """A ``save_to_disk`` directory (a ``DatasetDict`` one at ``split``), a data file or glob,
    a local data directory, or (``allow_builder``) a ``datasets`` builder or Hub name read with
    ``load_dataset(path, split=, data_files=, data_dir=, name=config_name, ...)``."""
    path = os.fspath(path)
    where = f"source {name!r}"
    plain = data_files is None and data_dir is None
    if plain and os.path.isdir(path) and _is_saved_dataset(path):
        import datasets

        ds = datasets.load_from_disk(path, **load_kwargs)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{where}: split {split!r} not found in {path!r}; splits are "
                                 f"{list(ds)}")  # fmt: skip
            ds = ds[split]
        fp = ds._fingerprint
        if streaming:
            ds = ds.to_iterable_dataset()
        return hf_source(ds, name, text_field=text_field, fingerprint=fp)
    if plain and (os.path.isfile(path) or glob.has_magic(path)):
        return open_files(path, name, split=split, streaming=streaming, text_field=text_field,
                          **load_kwargs)  # fmt: skip
    # a data-file suffix or a path prefix means a local path, never a Hub name to download
    local = _builder_of(path) is not None or path.startswith(("/", "./", "../", "~"))
    if (not allow_builder or local) and not os.path.isdir(path):
        hint = ("" if allow_builder else "; for a datasets builder or Hub name use "
                "DatasetMixture(name, path=...)")  # fmt: skip
        raise FileNotFoundError(f"{where}: {path!r} is not a file, a matching glob or a "
                                f"directory{hint}")  # fmt: skip
    import datasets

    files = None if data_files is None else _expand(data_files, where)
    if "config_name" in load_kwargs:
        load_kwargs["name"] = load_kwargs.pop("config_name")
    ds = datasets.load_dataset(path, split=split, data_files=files, data_dir=data_dir,
                               streaming=streaming, **load_kwargs)  # fmt: skip
    fp = None if files is None else file_fingerprint(files, path, split, data_dir)
    return hf_source(ds, name, text_field=text_field, fingerprint=fp, split=split)


class DatasetMixture:
    """One source of a mixture: where its data is, its weight, and how to read it.

    Where the data is: ``dataset`` (any object :func:`~mixtape.sources.as_source` accepts; a
    ``DatasetDict`` is read at ``split``), or ``path``: a ``save_to_disk`` directory, a data
    file or glob (.parquet, .jsonl / .json, .csv, .arrow, .txt, or .npy tokens with ``offsets=``),
    a local data directory, or a ``datasets`` builder / Hub name (with ``data_files``,
    ``data_dir``, ``config_name`` and other ``load_dataset`` keyword arguments); or
    ``data_files`` alone (paths or globs whose suffix picks the builder).

    Nothing is opened until :meth:`load` (or ``as_source(mixture)``); the source is then kept.
    ``streaming=True`` gives a streaming source. ``text_field``: the field every record must
    have (checked as records are read). ``weight``: finite and >= 0.
    """

    name: str
    path: str | None
    dataset: Any
    weight: float
    split: str
    text_field: str | None
    streaming: bool
    data_files: Any
    data_dir: str | None
    load_kwargs: dict[str, Any]

    def __init__(self, name: str, path: str | os.PathLike[str] | None = None, dataset: Any = None,
                 weight: float = 1.0, split: str = "train", text_field: str | None = None,
                 streaming: bool = False, data_files: Any = None, data_dir: str | None = None,
                 **load_kwargs: Any) -> None:  # fmt: skip
        self.name = check_source_name(name)
        where = f"DatasetMixture {name!r}"
        if dataset is not None and (path is not None or data_files is not None
                                    or data_dir is not None):  # fmt: skip
            raise ValueError(f"{where}: give dataset alone, or path / data_files / data_dir")
        if path is None and data_dir is not None:
            raise ValueError(f"{where}: data_dir is read by a builder: give path= too (e.g. "
                             f"'parquet' or a Hub name)")  # fmt: skip
        if dataset is None and path is None and data_files is None:
            raise ValueError(f"{where}: say where the data is: path=, data_files= or dataset=")
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not math.isfinite(float(weight)) or float(weight) < 0):  # fmt: skip
            raise ValueError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
        if text_field is not None and (not isinstance(text_field, str) or not text_field):
            raise ValueError(f"{where}: text_field must be a non-empty string, got {text_field!r}")
        self.path = None if path is None else os.fspath(path)
        self.dataset = dataset
        self.weight = float(weight)
        self.split, self.text_field, self.streaming = split, text_field, bool(streaming)
        self.data_files, self.data_dir = data_files, data_dir
        self.load_kwargs = dict(load_kwargs)
        self._source: BaseSource | None = None

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has run (the data has been opened)."""
        return self._source is not None

    def load(self) -> BaseSource:
        """Open the data (once) and return it as a source named after this entry."""
        if self._source is None:
            self._source = self._open()
        return self._source

    def _open(self) -> BaseSource:
        kw: dict[str, Any] = {"split": self.split, "streaming": self.streaming,
                              "text_field": self.text_field, **self.load_kwargs}  # fmt: skip
        if self.path is not None:
            return open_path(self.path, self.name, data_files=self.data_files,
                             data_dir=self.data_dir, allow_builder=True, **kw)  # fmt: skip
        if self.data_files is not None:
            return open_files(self.data_files, self.name, **kw)
        import datasets

        ds = self.dataset
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if self.split not in ds:
                raise ValueError(f"source {self.name!r}: split {self.split!r} not found; "
                                 f"splits are {list(ds)}")  # fmt: skip
            ds = ds[self.split]
        if self.streaming and isinstance(ds, datasets.Dataset):
            fp = ds._fingerprint
            return HFIterableSource(ds.to_iterable_dataset(), self.name,
                                    text_field=self.text_field, fingerprint=fp)  # fmt: skip
        if self.streaming and not isinstance(ds, datasets.IterableDataset):
            raise ValueError(f"source {self.name!r}: streaming=True applies to paths, files and "
                             f"HF datasets, not to a {type(ds).__name__}")  # fmt: skip
        return as_source(ds, self.name, text_field=self.text_field, **self.load_kwargs)

    def __repr__(self) -> str:
        where = (f"path={self.path!r}" if self.path is not None else
                 f"data_files={self.data_files!r}" if self.data_files is not None else
                 f"dataset={type(self.dataset).__name__}")  # fmt: skip
        extra = "".join(f", {k}={v!r}" for k, v in (
            ("text_field", self.text_field), ("streaming", self.streaming)) if v)  # fmt: skip
        return (f"DatasetMixture({self.name!r}, {where}, weight={self.weight}, "
                f"split={self.split!r}{extra}, loaded={self.loaded})")  # fmt: skip
