"""Preprocessed datasets: raw records -> model-ready examples, map-style (cached) or streaming.

``preprocess`` is either a callable on a batch (``dict[str, list] -> dict[str, list]``, as
``Dataset.map(batched=True)`` takes it) or a ``transformers`` tokenizer with ``text_field``: the
batch's texts are tokenized in one call (``input_ids``; ``attention_mask`` on request), truncated
to ``max_length`` when given, and EOS is appended when the tokenizer does not add it itself (told
by tokenizing a probe text; ``add_eos=False`` never appends, ``True`` requires an EOS token). The
output columns replace the text field; the record's other columns are kept unless named in
``remove_columns`` (a callable's output is merged over all the record's columns, as in HF's
``map``, minus ``remove_columns``).

:class:`PreprocessedDataset` is map-style and a :class:`~mixtape.sources.Source`: with
``cache_enabled`` the whole dataset goes once through ``Dataset.map(batched=True)`` (HF's cache,
fingerprinted, ``num_proc``) and rows are read from the memory-mapped Arrow result; without, rows
are preprocessed when read (in DataLoader workers), with the same result. It must keep one record
one row (a preprocess that splits or filters records needs the cache).

:class:`StreamingPreprocessedDataset` is a torch ``IterableDataset`` over an HF
``IterableDataset`` / ``Dataset`` or any re-iterable of dicts: sharded across DataLoader workers
and ranks, preprocessed in batches in the workers, shuffled by a seeded buffer, with bad records
skipped and counted (``skip_errors``), and resumable (``state_dict``) with ``num_workers=0``.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import itertools
import logging
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch.utils.data

from mixtape.ops import Int64Array
from mixtape.sources import BaseSource, HFDatasetSource, check_source_name
from mixtape.state import IterationOwner, SharedInt

__all__ = [
    "PreprocessError",
    "PreprocessedDataset",
    "StreamingPreprocessedDataset",
    "create_preprocessed_dataset",
]

logger = logging.getLogger(__name__)

Batch = dict[str, list[Any]]
_ErrorHook = Callable[[BaseException], None]


class PreprocessError(ValueError):
    """A record could not be preprocessed; the message names the source and the record, and the
    preprocess function's own exception is the ``__cause__``."""


# --------------------------------------------------------------------------------------------
# The preprocessing function: a callable on batches or a tokenizer + text field
# --------------------------------------------------------------------------------------------


def _is_tokenizer(obj: object) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: obj cannot be one of its own
    return transformers is not None and isinstance(obj, transformers.PreTrainedTokenizerBase)


def _is_raw_tokenizer(obj: object) -> bool:
    tokenizers = sys.modules.get("tokenizers")
    return tokenizers is not None and isinstance(obj, tokenizers.Tokenizer)


def _hash(obj: object) -> str | None:
    """HF's hash of ``obj`` (dill), or None when it cannot be hashed (then nothing is cached)."""
    from datasets.fingerprint import Hasher

    try:
        return str(Hasher.hash(obj))
    except Exception:  # any failure: no stable hash, as in datasets
        return None


def _tokenizer_hash(tok: Any) -> str | None:
    """A hash of what the tokenizer computes, stable across calls: a fast tokenizer's backend
    JSON without its truncation / padding state (which every call with ``max_length`` changes)."""
    import json

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return _hash(tok)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    extra = (type(tok).__name__, tok.all_special_tokens, tok.all_special_ids,
             getattr(tok, "add_bos_token", None), getattr(tok, "add_eos_token", None))  # fmt: skip
    return hashlib.sha256(json.dumps([spec, repr(extra)], sort_keys=True).encode()).hexdigest()


def _rows(batch: Mapping[str, Sequence[Any]], where: str) -> int:
    """The row count of a dict of columns (all of one length), else PreprocessError."""
    lengths = {k: len(v) for k, v in batch.items()}
    if len(set(lengths.values())) > 1:
        raise PreprocessError(f"{where}: the preprocess output's columns have different lengths "
                              f"{lengths}")  # fmt: skip
    return next(iter(lengths.values()), 0)


def _subset(batch: Mapping[str, Sequence[Any]], positions: Sequence[int]) -> Batch:
    return {k: [v[i] for i in positions] for k, v in batch.items()}


def _concat(parts: list[Batch], where: str) -> Batch:
    parts = [p for p in parts if p]
    if not parts:
        return {}
    keys = list(parts[0])
    for p in parts[1:]:
        if list(p) != keys:
            raise PreprocessError(f"{where}: the preprocess gave different fields for different "
                                  f"records: {keys} vs {list(p)}")  # fmt: skip
    return {k: [x for p in parts for x in p[k]] for k in keys}


class Preprocessor:
    """One preprocessing spec, applied to batches of records (picklable, for workers and
    ``num_proc``; hashed once for the cache fingerprint).

    ``run(batch, indices, where)`` checks the records, applies the function, merges the kept
    input columns and returns the output batch. A failing batch is re-run record by record to
    name the failing record; with ``on_error`` the failing records are handed to it and dropped
    instead of raising.
    """

    def __init__(self, preprocess: Any, *, text_field: str | None = None,
                 max_length: int | None = None, add_eos: bool | None = None,
                 return_attention_mask: bool = False,
                 remove_columns: Sequence[str] | None = None) -> None:  # fmt: skip
        if isinstance(remove_columns, str):
            remove_columns = [remove_columns]
        self.remove_columns = tuple(remove_columns or ())
        self.text_field: str | None
        self.max_length: int | None
        self.tokenizer: Any = None
        self.fn: Callable[[Batch], Any] | None = None
        self.eos_id: int | None = None
        if _is_raw_tokenizer(preprocess):
            raise TypeError("preprocess: a tokenizers.Tokenizer has no EOS or special-token "
                            "settings; wrap it: transformers.PreTrainedTokenizerFast("
                            "tokenizer_object=tok, eos_token=...)")  # fmt: skip
        if _is_tokenizer(preprocess):
            self.tokenizer = preprocess
            self.text_field = "text" if text_field is None else text_field
            if not isinstance(self.text_field, str) or not self.text_field:
                raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
            if max_length is not None and (isinstance(max_length, bool) or not isinstance(
                    max_length, numbers.Integral) or max_length < 2):  # fmt: skip
                raise ValueError(f"max_length must be an int >= 2 (room for EOS), got "
                                 f"{max_length!r}")  # fmt: skip
            self.max_length = None if max_length is None else int(max_length)
            self.return_attention_mask = bool(return_attention_mask)
            spec_hash = _tokenizer_hash(preprocess)  # before any call changes its state
            self.eos_id = self._eos_to_append(add_eos)
            parts: tuple[Any, ...] = ("tokenizer", spec_hash, self.text_field, self.max_length,
                                      self.eos_id, self.return_attention_mask)  # fmt: skip
        elif callable(preprocess):
            for key, value in (("max_length", max_length), ("add_eos", add_eos)):
                if value is not None:
                    raise TypeError(f"preprocess: {key}={value!r} applies to a tokenizer, not to "
                                    f"the callable {preprocess!r}")  # fmt: skip
            if return_attention_mask:
                raise TypeError("preprocess: return_attention_mask applies to a tokenizer")
            if text_field is not None and (not isinstance(text_field, str) or not text_field):
                raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
            self.fn = preprocess
            self.text_field = text_field  # checked present in every record when given
            self.max_length, self.return_attention_mask = None, False
            spec_hash = _hash(preprocess)
            parts = ("callable", spec_hash, text_field)
        else:
            raise TypeError(f"preprocess must be a callable on a batch (dict of lists -> dict of "
                            f"lists) or a transformers tokenizer, got {type(preprocess).__name__}")
        self.fingerprint: str | None = None
        if spec_hash is not None:
            spec = repr((*parts, self.remove_columns)).encode()
            self.fingerprint = hashlib.sha256(spec).hexdigest()[:32]

    def _eos_to_append(self, add_eos: bool | None) -> int | None:
        """The EOS id to append to every text, or None (the tokenizer adds it, or add_eos=False)."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        if add_eos is False:
            return None
        if add_eos not in (None, True):
            raise TypeError(f"add_eos must be None (automatic), True or False, got {add_eos!r}")
        if eos is None:
            if add_eos:
                raise ValueError(f"add_eos=True but the tokenizer {type(tok).__name__} has no "
                                 f"eos_token; set one (tokenizer.eos_token = ...)")  # fmt: skip
            logger.warning("the tokenizer %s has no eos_token: documents are not separated by "
                           "EOS (set tokenizer.eos_token, or add_eos=False to silence this)",
                           type(tok).__name__)  # fmt: skip
            return None
        probe = tok(["a"], truncation=False)["input_ids"][0]
        adds_itself = bool(probe) and probe[-1] == eos
        return None if adds_itself else int(eos)

    @property
    def is_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def removed(self, columns: Iterable[str]) -> list[str]:
        """The input columns dropped from the output (the text field replaced by tokens, and
        ``remove_columns``); names not in ``columns`` are an error."""
        columns = list(columns)
        missing = [c for c in self.remove_columns if c not in columns]
        if missing:
            raise ValueError(f"remove_columns {missing} are not fields of the records "
                             f"(fields: {columns})")  # fmt: skip
        drop = set(self.remove_columns)
        if self.is_tokenizer:
            drop.add(str(self.text_field))
        return [c for c in columns if c in drop]

    # ---- checks -------------------------------------------------------------------------------

    def check_record(self, record: Any, index: Any, where: str) -> None:
        """A record's shape errors: not a mapping, no text field, a text that is not a string."""
        if not isinstance(record, Mapping):
            raise TypeError(f"{where}: record {index} is a {type(record).__name__}, not a dict")
        field = self.text_field
        if field is None:
            return
        if field not in record:
            raise ValueError(f"{where}: record {index} has no field {field!r} "
                             f"(fields: {sorted(record)})")  # fmt: skip
        value = record[field]
        if value is None:
            raise ValueError(f"{where}: record {index} has {field!r} = None")
        if self.is_tokenizer and not isinstance(value, str):
            raise TypeError(f"{where}: record {index}: {field!r} is a {type(value).__name__}, "
                            f"not a string")  # fmt: skip

    def _check_batch(self, batch: Batch, indices: Sequence[Any], where: str,
                     on_error: _ErrorHook | None) -> tuple[Batch, list[Any]]:  # fmt: skip
        field = self.text_field
        if field is None:
            return batch, list(indices)
        if field not in batch:
            if indices:
                raise ValueError(f"{where}: record {indices[0]} has no field {field!r} "
                                 f"(fields: {sorted(batch)})")  # fmt: skip
            return batch, []
        values = batch[field]
        bad = [i for i, v in enumerate(values) if v is None or (self.is_tokenizer
                                                                 and not isinstance(v, str))]
        if not bad:
            return batch, list(indices)
        for i in bad:
            try:
                self.check_record({field: values[i]}, indices[i], where)
            except (TypeError, ValueError) as e:
                if on_error is None:
                    raise
                on_error(e)
        keep = sorted(set(range(len(values))) - set(bad))
        return _subset(batch, keep), [indices[i] for i in keep]

    # ---- applying -----------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> Batch:
        tok = self.tokenizer
        limit = self.max_length
        if limit is not None and self.eos_id is not None:
            limit -= 1  # room for the EOS appended below
        enc = tok(texts, truncation=limit is not None, max_length=limit, padding=False,
                  return_attention_mask=self.return_attention_mask,
                  return_token_type_ids=False)  # fmt: skip
        ids = [list(x) for x in enc["input_ids"]]
        if self.eos_id is not None:
            for x in ids:
                x.append(self.eos_id)
        out: Batch = {"input_ids": ids}
        if self.return_attention_mask:
            out["attention_mask"] = [[1] * len(x) for x in ids]
        return out

    def _apply(self, batch: Batch, n: int, where: str) -> Batch:
        """The function's output merged over the kept input columns (HF ``map``'s rule)."""
        if self.is_tokenizer:
            out: Any = self._tokenize(batch[str(self.text_field)])
        else:
            assert self.fn is not None
            out = self.fn(batch)
        if out is None:
            out = {}
        if not isinstance(out, Mapping) or not all(isinstance(k, str) for k in out):
            raise PreprocessError(f"{where}: preprocess must return a dict of columns (str -> "
                                  f"list), got {type(out).__name__}")  # fmt: skip
        out = {k: v if isinstance(v, list) else list(v) for k, v in out.items()}
        removed = set(self.removed(batch))
        inputs = {k: v for k, v in batch.items() if k not in removed}
        kept = [k for k in inputs if k not in out]
        rows = _rows(out, where) if out else n
        if kept and rows != n:
            raise PreprocessError(
                f"{where}: preprocess returned {rows} rows for {n} records while the input "
                f"columns {kept} are kept; a preprocess that changes the number of rows must "
                f"drop them (remove_columns=...)")  # fmt: skip
        merged = {**inputs, **out}  # HF map's rule: inputs in place (updated), then new columns
        if not merged and n:
            raise PreprocessError(f"{where}: the preprocess output has no fields (a batch of "
                                  f"{n} records)")  # fmt: skip
        return merged

    def run(self, batch: Batch, indices: Sequence[Any], where: str,
            on_error: _ErrorHook | None = None) -> Batch:  # fmt: skip
        """The preprocessed batch of the records ``indices`` (named in errors)."""
        batch, idx = self._check_batch(batch, indices, where, on_error)
        if not idx:
            return {}
        try:
            return self._apply(batch, len(idx), where)
        except PreprocessError:
            raise
        except Exception as batch_error:  # re-run record by record to name it
            if len(idx) == 1:
                return self._failed(batch_error, idx[0], where, on_error)
            parts: list[Batch] = []
            failed = False
            for i, index in enumerate(idx):
                try:
                    parts.append(self._apply(_subset(batch, [i]), 1, where))
                except PreprocessError:
                    raise
                except Exception as e:
                    failed = True
                    self._failed(e, index, where, on_error)
            if not failed:
                raise PreprocessError(
                    f"{where}: preprocess failed on records {idx[0]}..{idx[-1]} (a batch of "
                    f"{len(idx)}) but on none of them alone: {type(batch_error).__name__}: "
                    f"{batch_error}") from batch_error  # fmt: skip
            return _concat(parts, where)

    @staticmethod
    def _failed(error: BaseException, index: Any, where: str,
                on_error: _ErrorHook | None) -> Batch:  # fmt: skip
        if on_error is None:
            raise PreprocessError(f"{where}: preprocess failed on record {index}: "
                                  f"{type(error).__name__}: {error}") from error  # fmt: skip
        on_error(error)
        return {}


class _MapFunction:
    """``Dataset.map(batched=True, with_indices=True)``'s function (picklable for num_proc)."""

    def __init__(self, pre: Preprocessor, where: str) -> None:
        self.pre, self.where = pre, where

    def __call__(self, batch: Batch, indices: list[int]) -> Batch:
        return self.pre.run(dict(batch), indices, self.where)


def _hf_types() -> tuple[Any, Any, Any, Any]:
    import datasets

    return (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict,
            datasets.IterableDatasetDict)  # fmt: skip


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or (
            batch_size < 1):  # fmt: skip
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return int(batch_size)


def _combine(*parts: object) -> str | None:
    if any(p is None for p in parts):
        return None
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:32]


def _arrow(batch: Batch) -> pa.Table:
    """A preprocessed batch as Arrow, with HF's type inference (as ``Dataset.map`` writes it)."""
    from datasets.arrow_writer import OptimizedTypedSequence

    return pa.table({k: pa.array(OptimizedTypedSequence(v, col=k)) for k, v in batch.items()})


# --------------------------------------------------------------------------------------------
# Map-style
# --------------------------------------------------------------------------------------------


class PreprocessedDataset(BaseSource, torch.utils.data.Dataset[dict[str, Any]]):
    """A HF ``Dataset`` preprocessed by ``preprocess``: a torch map-style dataset and a Source.

    ``cache_enabled=True``: preprocessed once with ``Dataset.map(batched=True)`` (``batch_size``,
    ``num_proc``, ``cache_file_name``, ``load_from_cache_file`` as in HF); the cache file is named
    by a fingerprint of the input's fingerprint and the preprocess spec (the tokenizer's
    vocabulary and settings, or the callable's HF hash), so a changed tokenizer or function is
    never served a stale cache. ``cache_enabled=False``: rows are preprocessed when read
    (``__getitems__`` preprocesses a DataLoader batch in one call, in the worker); the rows equal
    the cached ones. The input is read as Python values (its ``with_format`` is not applied).

    ``ds[i]`` / ``ds.__getitems__(rows)`` give example dicts as ``datasets.Dataset`` does;
    ``take`` / ``take_arrow`` / ``stream`` make it a mixer source (``as_source`` accepts it as it
    is). ``select(indices)`` is another ``PreprocessedDataset`` over those rows.
    """

    def __init__(self, dataset: Any, preprocess: Any, *, cache_enabled: bool = True,
                 text_field: str | None = None, max_length: int | None = None,
                 add_eos: bool | None = None, return_attention_mask: bool = False,
                 remove_columns: Sequence[str] | None = None, batch_size: int = 1000,
                 num_proc: int | None = None, cache_file_name: str | None = None,
                 load_from_cache_file: bool | None = None,
                 name: str = "preprocessed") -> None:  # fmt: skip
        super().__init__(check_source_name(name))
        dataset_t, iterable_t, dict_t, iter_dict_t = _hf_types()
        if isinstance(dataset, (dict_t, iter_dict_t)):
            raise ValueError(f"{self._where}: a {type(dataset).__name__} holds the splits "
                             f"{list(dataset)}; pass one (ds['train'])")  # fmt: skip
        if isinstance(dataset, iterable_t):
            raise TypeError(f"{self._where}: a datasets.IterableDataset has no random access; "
                            f"use StreamingPreprocessedDataset")  # fmt: skip
        if not isinstance(dataset, dataset_t):
            raise TypeError(f"{self._where}: expected a datasets.Dataset, got "
                            f"{type(dataset).__name__} (create_preprocessed_dataset also takes "
                            f"paths and lists)")  # fmt: skip
        self.batch_size = _check_batch_size(batch_size)
        self.preprocessor = Preprocessor(preprocess, text_field=text_field, max_length=max_length,
                                         add_eos=add_eos, remove_columns=remove_columns,
                                         return_attention_mask=return_attention_mask)  # fmt: skip
        self.raw = dataset.with_format(None)
        self.cache_enabled = bool(cache_enabled)
        self.preprocessor.removed(self.raw.column_names)  # unknown remove_columns: an error now
        field = self.preprocessor.text_field
        if field is not None and field not in self.raw.column_names:
            raise ValueError(f"{self._where}: record 0 has no field {field!r} (fields: "
                             f"{self.raw.column_names})")  # fmt: skip
        self.fingerprint = _combine(getattr(dataset, "_fingerprint", None),
                                    self.preprocessor.fingerprint)  # fmt: skip
        self.processed: Any = None  # the cached HF Dataset (cache_enabled)
        self._cached: HFDatasetSource | None = None
        if self.cache_enabled:
            kwargs: dict[str, Any] = {}
            if self.fingerprint is not None:
                kwargs["new_fingerprint"] = self.fingerprint
            processed = self.raw.map(
                _MapFunction(self.preprocessor, self._where), batched=True, with_indices=True,
                batch_size=self.batch_size, remove_columns=self.raw.column_names,
                num_proc=num_proc, cache_file_name=cache_file_name,
                load_from_cache_file=load_from_cache_file, desc=f"Preprocessing {name}", **kwargs,
            )  # fmt: skip
            self._set_processed(processed)
        else:
            self.num_rows = len(self.raw)
        self._check_not_empty()

    def _set_processed(self, processed: Any) -> None:
        self.processed = processed
        self.num_rows = len(processed)
        if self.num_rows:
            self._cached = HFDatasetSource(processed, self.name, fingerprint=self.fingerprint)

    # ---- Source ---------------------------------------------------------------------------

    def _preprocess_rows(self, rows: Int64Array) -> pa.Table:
        idx = rows.tolist()
        out = self.preprocessor.run(self.raw[idx], idx, self._where)
        if _rows(out, self._where) != len(idx):  # e.g. a preprocess that filters records
            raise PreprocessError(
                f"{self._where}: preprocess gave {_rows(out, self._where)} rows for the "
                f"{len(idx)} records {idx[:5]}{'...' if len(idx) > 5 else ''}; with "
                f"cache_enabled=False every record must give one row (use the cache)")  # fmt: skip
        return _arrow(out)

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        if self._cached is not None:
            return self._cached.take(rows)
        return list(self._preprocess_rows(rows).to_pylist())

    def _take_arrow(self, rows: Int64Array) -> pa.Table:
        if self._cached is not None:
            return self._cached.take_arrow(rows)
        return self._preprocess_rows(rows).combine_chunks()

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        return self._stream_rows(start)

    # ---- torch / datasets ---------------------------------------------------------------------

    def __len__(self) -> int:
        assert self.num_rows is not None
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"{self._where}: index must be an int, got {type(index).__name__} "
                            f"(use __getitems__ / take for several rows)")  # fmt: skip
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self._where}: index {i} is out of range for {n} rows")
        return self.take([i % n])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The examples at ``indices`` in one batched read (what torch's DataLoader calls)."""
        return self.take(list(indices))

    def select(self, indices: Any) -> PreprocessedDataset:
        """The rows at ``indices`` (any order, repeats allowed) as another PreprocessedDataset."""
        rows = self._rows(np.asarray(list(indices) if isinstance(indices, range) else indices))
        other = copy.copy(self)
        if self.processed is not None:
            other._set_processed(self.processed.select(rows))
        else:
            other.raw = self.raw.select(rows)
            other.num_rows = int(rows.size)
        digest = hashlib.sha256(rows.tobytes()).hexdigest()
        other.fingerprint = _combine(self.fingerprint, digest)
        if other._cached is not None:
            other._cached.fingerprint = other.fingerprint
        other._check_not_empty()
        return other

    def __repr__(self) -> str:
        mode = "cached" if self.cache_enabled else "on access"
        return f"PreprocessedDataset(name={self.name!r}, num_rows={self.num_rows}, {mode})"


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class StreamingPreprocessedDataset(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Records of an iterable, preprocessed in batches, sharded, shuffled by a bounded buffer.

    Sharding: worker ``w`` of ``W`` DataLoader workers on rank ``r`` of ``world_size`` reads shard
    ``r * W + w`` of ``world_size * W``, so every record is read once per pass. ``rank`` /
    ``world_size`` are given, else taken from ``torch.distributed`` when its process group is
    initialised at iteration time, else 0 / 1. An HF ``IterableDataset`` is split with
    ``datasets.distributed.split_dataset_by_node`` (whole shards when its ``n_shards`` is a
    multiple of the shard count; otherwise every reader reads all and keeps one record in
    ``world_size * W``); an HF ``Dataset`` in contiguous row ranges (``Dataset.shard``); any other
    re-iterable (a list, a torch ``IterableDataset`` that does not shard itself) is read whole by
    every reader, which keeps records ``i`` with ``i % (world_size * W) == r * W + w``.

    Shuffling: a buffer of ``buffer_size`` examples (``0`` / ``None``: the source's order); once
    full, each new example replaces a random one that is emitted; at the end the buffer is drained
    in random order. The generator is seeded by ``(seed, epoch, shard, shard count)``: the same
    seed and worker count give the same order. ``set_epoch(e)`` changes the order per epoch (the
    epoch is shared with persistent workers).

    Errors: with ``skip_errors=False`` a record the preprocess fails on (or one without
    ``text_field``) raises :class:`PreprocessError` naming the source and the record; with
    ``skip_errors=True`` it is dropped and counted by exception type: ``error_counts`` /
    ``skipped`` in the process iterating (not the main process of a DataLoader with workers:
    there, each worker logs a warning with its counts at the end of its pass, and the counts are
    in each worker's ``state_dict()``).

    State (``num_workers=0``): ``state_dict()`` holds the records consumed, the examples
    preprocessed but not yet buffered, the buffer, the generator state and the error counts;
    ``load_state_dict`` on a fresh object continues with exactly the examples the uninterrupted
    one would have yielded (the consumed records are re-read and discarded, not preprocessed).
    With workers, ``state_dict()`` in the main process raises (its copy never advanced).
    """

    name: str
    source: Any
    preprocessor: Preprocessor
    batch_size: int
    buffer_size: int
    seed: int
    skip_errors: bool
    rank: int | None
    world_size: int | None
    _kind: str
    _epoch: SharedInt
    _iterated_by: IterationOwner

    def __init__(self, source: Any, preprocess: Any, *, text_field: str | None = None,
                 max_length: int | None = None, add_eos: bool | None = None,
                 return_attention_mask: bool = False,
                 remove_columns: Sequence[str] | None = None, batch_size: int = 1000,
                 buffer_size: int | None = 1000, seed: int = 0, skip_errors: bool = False,
                 rank: int | None = None, world_size: int | None = None,
                 name: str = "preprocessed") -> None:  # fmt: skip
        self.name = check_source_name(name)
        where = self._where
        dataset_t, iterable_t, dict_t, iter_dict_t = _hf_types()
        if isinstance(source, (dict_t, iter_dict_t)):
            raise ValueError(f"{where}: a {type(source).__name__} holds the splits "
                             f"{list(source)}; pass one (ds['train'])")  # fmt: skip
        if isinstance(source, iterable_t):
            if getattr(source, "_distributed", None) is not None:
                raise ValueError(f"{where}: the IterableDataset is already split by node; pass "
                                 f"the whole dataset (it is split across ranks and workers "
                                 f"here) or rank=0, world_size=1")  # fmt: skip
            self._kind = "hf_iterable"
        elif isinstance(source, dataset_t):
            self._kind = "hf_dataset"
            source = source.with_format(None)
        elif isinstance(source, (str, bytes, Mapping)) or not isinstance(source, Iterable):
            raise TypeError(f"{where}: expected a datasets IterableDataset / Dataset or an "
                            f"iterable of dicts, got {type(source).__name__}")  # fmt: skip
        elif iter(source) is source:
            raise TypeError(f"{where}: a {type(source).__name__} is an iterator, readable once; "
                            f"pass a re-iterable (a list, datasets.IterableDataset.from_generator"
                            f", a torch IterableDataset)")  # fmt: skip
        else:
            self._kind = "iterable"
        self.source = source
        self.preprocessor = Preprocessor(preprocess, text_field=text_field, max_length=max_length,
                                         add_eos=add_eos, remove_columns=remove_columns,
                                         return_attention_mask=return_attention_mask)  # fmt: skip
        self.batch_size = _check_batch_size(batch_size)
        if buffer_size is None:
            buffer_size = 0
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, numbers.Integral) or (
                buffer_size < 0):  # fmt: skip
            raise ValueError(f"{where}: buffer_size must be an int >= 0 or None, got "
                             f"{buffer_size!r}")  # fmt: skip
        self.buffer_size = int(buffer_size)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"{where}: seed must be an int >= 0, got {seed!r}")
        self.seed = int(seed)
        self.skip_errors = bool(skip_errors)
        if (rank is None) != (world_size is None):
            raise ValueError(f"{where}: give both rank and world_size or neither, got "
                             f"rank={rank!r}, world_size={world_size!r}")  # fmt: skip
        if world_size is not None:
            if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or (
                    world_size < 1):  # fmt: skip
                raise ValueError(f"{where}: world_size must be an int >= 1, got {world_size!r}")
            if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not (
                    0 <= rank < world_size):  # fmt: skip
                raise ValueError(f"{where}: rank must be an int in [0, {world_size}), got "
                                 f"{rank!r}")  # fmt: skip
        self.rank = None if rank is None else int(rank)
        self.world_size = None if world_size is None else int(world_size)
        self._epoch = SharedInt(0)
        self._iterated_by = IterationOwner()
        self._reset()

    @property
    def _where(self) -> str:
        return f"source {self.name!r}"

    def _reset(self) -> None:
        self._layout: tuple[int, int] | None = None  # (shard, shard count) of the pass
        self._consumed = 0  # records of this shard read (preprocessed or skipped)
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._buffer: list[dict[str, Any]] = []
        self._rng: np.random.Generator | None = None
        self._errors: collections.Counter[str] = collections.Counter()
        self._exhausted = False
        self._finished = False
        self._yielded = 0
        self._pass_epoch = self.epoch

    # ---- epochs and layout ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """The epoch seeding the next pass's shuffle (and an HF source's shard shuffle)."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"{self._where}: epoch must be an int >= 0, got {epoch!r}")
        self._epoch.value = int(epoch)

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def shard_layout(self) -> tuple[int, int]:
        """(this reader's shard, the shard count) in the current process."""
        rank, world = self._rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return rank * workers + worker, world * workers

    # ---- reading --------------------------------------------------------------------------

    def _records(self, shard: int, shards: int) -> tuple[Iterator[tuple[Any, Any]], str]:
        """(index, record) pairs of the shard from the first not consumed, and where they are."""
        where = self._where if shards == 1 else f"{self._where} (shard {shard} of {shards})"
        start = self._consumed
        if self._kind == "hf_iterable":
            from datasets.distributed import split_dataset_by_node

            part = split_dataset_by_node(self.source, rank=shard, world_size=shards)
            if self._pass_epoch:
                part.set_epoch(self._pass_epoch)
            whole = _num_shards(self.source) % shards == 0
            rows = (row for batch in part.iter(batch_size=self.batch_size)
                    for row in _batch_rows(batch))  # fmt: skip
            pairs: Iterator[tuple[Any, Any]] = (
                (i if whole else i * shards + shard, rec)
                for i, rec in itertools.islice(enumerate(rows), start, None)
            )  # fmt: skip
            if whole and shards > 1:
                where = (f"{self._where} (shard {shard} of {shards}, records numbered within "
                         f"the shard)")  # fmt: skip
            return pairs, where
        if self._kind == "hf_dataset":
            n = len(self.source)
            lo, hi = n * shard // shards, n * (shard + 1) // shards  # contiguous, balanced
            return self._dataset_rows(lo + start, hi), self._where
        selected = ((i, rec) for i, rec in enumerate(self.source) if i % shards == shard)
        return itertools.islice(selected, start, None), self._where

    def _dataset_rows(self, lo: int, hi: int) -> Iterator[tuple[int, Any]]:
        for a in range(lo, hi, self.batch_size):
            b = min(a + self.batch_size, hi)
            yield from zip(range(a, b), _batch_rows(self.source[a:b]), strict=True)

    def _read_batch(self, records: Iterator[tuple[Any, Any]], where: str) -> None:
        """Read up to batch_size records, preprocess them, queue the examples (no yield inside,
        so the state is whole between examples)."""
        chunk = list(itertools.islice(records, self.batch_size))
        if len(chunk) < self.batch_size:
            self._exhausted = True
        if not chunk:
            return
        self._consumed += len(chunk)
        on_error = self._count if self.skip_errors else None
        good: list[tuple[Any, Any]] = []
        keys: list[str] | None = None
        for index, rec in chunk:
            try:
                self.preprocessor.check_record(rec, index, where)
                if keys is None:
                    keys = list(rec)
                elif list(rec) != keys and set(rec) != set(keys):
                    raise ValueError(f"{where}: record {index} has fields {sorted(rec)}, the "
                                     f"records before it {sorted(keys)}")  # fmt: skip
            except (TypeError, ValueError) as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            good.append((index, rec))
        if not good:
            return
        assert keys is not None
        batch = {k: [rec[k] for _, rec in good] for k in keys}
        out = self.preprocessor.run(batch, [i for i, _ in good], where, on_error)
        self._pending.extend(_batch_rows(out))

    def _count(self, error: BaseException) -> None:
        self._errors[type(error).__name__] += 1
        n = sum(self._errors.values())
        if n == 10 ** (len(str(n)) - 1):  # the 1st, 10th, 100th, ... skip of the pass, as it
            # happens: a worker's end-of-pass summary never comes when training stops first
            logger.warning("%s: skipped %d record(s) so far this pass (skip_errors=True), the "
                           "latest: %s: %s", self._where, n, type(error).__name__,
                           str(error)[:200])  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        layout = self.shard_layout()
        self._iterated_by.claim()
        if self._finished:
            self._reset()
        if self._layout is None:
            self._layout = layout
            self._pass_epoch = self.epoch
            seq = np.random.SeedSequence([self.seed, self._pass_epoch, layout[0], layout[1]])
            self._rng = np.random.default_rng(seq)
        elif self._layout != layout:
            raise ValueError(
                f"{self._where}: the state is for shard {self._layout[0]} of {self._layout[1]} "
                f"but this reader is shard {layout[0]} of {layout[1]} (another worker count or "
                f"world size); resume with the layout the state was taken with")  # fmt: skip
        return self._generate(*layout)

    def _generate(self, shard: int, shards: int) -> Iterator[dict[str, Any]]:
        records, where = self._records(shard, shards)
        rng = self._rng
        assert rng is not None
        size = self.buffer_size
        buf = self._buffer
        while True:
            while self._pending:
                example = self._pending.popleft()
                if size == 0:
                    self._yielded += 1
                    yield example
                elif len(buf) < size:
                    buf.append(example)
                else:
                    j = int(rng.integers(size))
                    example, buf[j] = buf[j], example
                    self._yielded += 1
                    yield example
            if self._exhausted:
                break
            self._read_batch(records, where)
        while buf:
            j = int(rng.integers(len(buf)))
            example = buf[j]
            buf[j] = buf[-1]
            buf.pop()
            self._yielded += 1
            yield example
        self._finished = True
        if self._errors:
            logger.warning("%s: skipped %d records this pass (skip_errors=True): %s", where,
                           sum(self._errors.values()), dict(self._errors))  # fmt: skip

    # ---- errors and state -----------------------------------------------------------------

    def _check_owner(self, what: str) -> None:
        owner = self._iterated_by.elsewhere()
        if owner:
            raise ValueError(
                f"StreamingPreprocessedDataset.{what}: {self._where} is iterated in another "
                f"process (pid {owner}, a DataLoader worker); this copy (pid {os.getpid()}) has "
                "not advanced. Each worker logs its skipped records at the end of its pass and "
                "holds its own state: use num_workers=0 to checkpoint or count here")  # fmt: skip

    @property
    def error_counts(self) -> dict[str, int]:
        """Records skipped this pass, by exception type (in the process iterating)."""
        self._check_owner("error_counts")
        return dict(self._errors)

    @property
    def skipped(self) -> int:
        """The number of records skipped this pass (in the process iterating)."""
        return sum(self.error_counts.values())

    def state_dict(self) -> dict[str, Any]:
        """What the consumer has received, for an exact continuation (plain Python values).

        Raises ValueError in a process other than the one iterating (the main process of a
        DataLoader with workers)."""
        self._check_owner("state_dict()")
        return {
            "name": self.name, "seed": self.seed, "buffer_size": self.buffer_size,
            "epoch": self._pass_epoch, "layout": self._layout, "consumed": self._consumed,
            "pending": copy.deepcopy(list(self._pending)), "buffer": copy.deepcopy(self._buffer),
            "rng": None if self._rng is None else copy.deepcopy(self._rng.bit_generator.state),
            "errors": dict(self._errors), "exhausted": self._exhausted,
            "finished": self._finished, "next_epoch": self.epoch, "yielded": self._yielded,
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``iter()`` continues where it was taken."""
        for key in ("seed", "buffer_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{self._where}: the state is for {key}={state[key]!r}, this "
                                 f"dataset has {key}={getattr(self, key)!r}")  # fmt: skip
        self._reset()
        self._iterated_by.claim()  # this process holds the state now
        layout = state["layout"]
        self._layout = None if layout is None else (int(layout[0]), int(layout[1]))
        self._pass_epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])
        self._pending = collections.deque(copy.deepcopy(list(state["pending"])))
        self._buffer = copy.deepcopy(list(state["buffer"]))
        if state["rng"] is not None:
            bit_generator = getattr(np.random, state["rng"]["bit_generator"])()
            bit_generator.state = copy.deepcopy(state["rng"])
            self._rng = np.random.Generator(bit_generator)
        self._errors = collections.Counter({str(k): int(v) for k, v in state["errors"].items()})
        self._exhausted = bool(state["exhausted"])  # a finished pass resumes to its end: nothing
        # Taken after the pass ended: the next iter() starts the next pass, as on the original.
        self._finished = bool(state.get("finished", False))
        self._epoch.value = int(state.get("next_epoch", state["epoch"]))  # set_epoch carries on
        self._yielded = int(state["yielded"])

    def __repr__(self) -> str:
        return (f"StreamingPreprocessedDataset(name={self.name!r}, source={self._kind}, "
                f"buffer_size={self.buffer_size}, seed={self.seed})")  # fmt: skip


def _batch_rows(batch: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(batch)
    if not keys:
        return []
    return [dict(zip(keys, values, strict=True))
            for values in zip(*(batch[k] for k in keys), strict=True)]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def create_preprocessed_dataset(
    dataset_or_path: Any, preprocess: Any, *, streaming: bool | None = None,
    split: str | None = None, **kwargs: Any,
) -> PreprocessedDataset | StreamingPreprocessedDataset:  # fmt: skip
    """The preprocessed dataset of the right kind for ``dataset_or_path``.

    An HF ``Dataset`` gives a :class:`PreprocessedDataset` (``streaming=True``: a
    :class:`StreamingPreprocessedDataset` reading it in contiguous shards); an HF
    ``IterableDataset`` or another iterable a :class:`StreamingPreprocessedDataset`
    (``streaming=False`` is then an error, except for a list of dicts, made a ``Dataset``); a
    ``DatasetDict`` needs ``split``; a local path (data file, glob or ``save_to_disk``
    directory) is opened with ``datasets.load_dataset`` / ``load_from_disk`` as the sources open
    it (``split`` default ``"train"``). ``kwargs`` go to the class.
    """
    import datasets

    dataset_t, _, dict_t, iter_dict_t = _hf_types()
    obj = dataset_or_path
    if isinstance(obj, (str, os.PathLike)):
        from mixtape.source_files import open_path
        from mixtape.sources import HFIterableSource

        src = open_path(obj, kwargs.get("name", "preprocessed"), split=split or "train",
                        streaming=bool(streaming))  # fmt: skip
        if not isinstance(src, (HFDatasetSource, HFIterableSource)):
            raise TypeError(f"create_preprocessed_dataset: {os.fspath(obj)!r} opens as a "
                            f"{type(src).__name__} (already tokens), which has no records to "
                            f"preprocess")  # fmt: skip
        obj = src.dataset
    elif isinstance(obj, (dict_t, iter_dict_t)):
        if split is None or split not in obj:
            raise ValueError(f"create_preprocessed_dataset: a {type(obj).__name__} holds the "
                             f"splits {list(obj)}; pass split= one of them (got "
                             f"{split!r})")  # fmt: skip
        obj = obj[split]
    elif split is not None:
        raise TypeError(f"create_preprocessed_dataset: split={split!r} applies to a path or a "
                        f"DatasetDict, not a {type(obj).__name__}")  # fmt: skip
    if isinstance(obj, list) and not streaming:
        if not all(isinstance(r, Mapping) for r in obj):
            raise TypeError("create_preprocessed_dataset: a list must hold record dicts")
        obj = datasets.Dataset.from_list(obj)
    if isinstance(obj, dataset_t):
        if streaming:
            return StreamingPreprocessedDataset(obj, preprocess, **kwargs)
        return PreprocessedDataset(obj, preprocess, **kwargs)
    if streaming is False:
        raise ValueError(f"create_preprocessed_dataset: a {type(obj).__name__} is read as a "
                         f"stream; streaming=False needs a datasets.Dataset or a path")  # fmt: skip
    return StreamingPreprocessedDataset(obj, preprocess, **kwargs)


def _num_shards(ds: Any) -> int:
    """An HF IterableDataset's shard count (``num_shards``; ``n_shards`` before datasets 3)."""
    n = getattr(ds, "num_shards", None)
    return int(n if n is not None else ds.n_shards)
