"""Benchmark cases of padding and collation against torch and transformers."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt

from mixtape.bench.core import Measurement, case, gbps, peer_import, ragged_batch, skipped, timeit

# --- cases -------------------------------------------------------------------------------------


@case("pad-ragged")
def pad_ragged(quick: bool) -> list[Measurement]:
    """4096 int64 sequences, lengths uniform 16..2048 -> dense [n, L] ids (same data for all)."""
    from mixtape import ops

    name = "pad-ragged"
    n = 512 if quick else 4096
    repeat = 3 if quick else 15
    values, offsets = ragged_batch(0, n, 16, 2048)
    length = int(np.diff(offsets).max())
    nbytes = n * length * values.itemsize
    out: list[Measurement] = []

    def fresh() -> object:
        return ops.pad(values, offsets, return_attention_mask=False)

    buf = {"input_ids": np.empty((n, length), dtype=np.int64)}

    def reused() -> object:
        return ops.pad(values, offsets, return_attention_mask=False, out=buf)

    t = timeit(fresh, repeat)
    out.append(Measurement(name, "mixtape pad (fresh output)", t, True, gbps(nbytes, t)))
    t = timeit(reused, repeat)
    out.append(Measurement(name, "mixtape pad (reused output)", t, True, gbps(nbytes, t)))

    torch, missing = peer_import(name, "torch pad_sequence", "torch")
    if missing:
        out.append(missing)
    else:
        seqs = [torch.from_numpy(values[offsets[i] : offsets[i + 1]]) for i in range(n)]
        t = timeit(lambda: torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), repeat)
        out.append(Measurement(name, "torch pad_sequence", t, False, "list of tensors"))

    rows = [values[offsets[i] : offsets[i + 1]] for i in range(n)]

    def numpy_rows() -> object:
        dense = np.zeros((n, length), dtype=np.int64)
        for i, row in enumerate(rows):
            dense[i, : row.size] = row
        return dense

    out.append(Measurement(name, "numpy per-row copy", timeit(numpy_rows, repeat), False))

    src = np.random.default_rng(1).integers(0, 50_000, (n, length))
    dst = np.empty_like(src)
    t = timeit(lambda: np.copyto(dst, src), repeat)
    out.append(
        Measurement(name, "numpy.copyto, same bytes (limit)", t, False, gbps(nbytes, t))
    )
    return out


def python_lists(values: npt.NDArray[Any], offsets: npt.NDArray[np.int64]) -> list[list[int]]:
    """The ragged batch as lists of Python ints (what a HF Dataset row holds)."""
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(offsets.size - 1)]


def micro_batch_docs(seed: int = 2) -> list[list[int]]:
    """~100 documents totalling ~32k tokens (lengths uniform 64..576), as Python int lists."""
    return python_lists(*ragged_batch(seed, 100, 64, 576, vocab=256))


def pylist_batch(seed: int = 3) -> list[list[int]]:
    """64 examples, lengths uniform 32..2048, as Python int lists."""
    return python_lists(*ragged_batch(seed, 64, 32, 2048, vocab=256))


def _byt5() -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@case("flatten-microbatch")
def flatten_microbatch(quick: bool) -> list[Measurement]:
    """~32k tokens in ~100 documents -> one padding-free [1, T] row (DataCollatorWithFlattening)."""
    import pyarrow as pa

    from mixtape.collate import create_flattening_collate

    name = "flatten-microbatch"
    repeat = 5 if quick else 25
    docs = micro_batch_docs()
    tokens = sum(len(d) for d in docs)
    examples = [{"input_ids": d} for d in docs]
    # As a pre-tokenized HF Dataset stores them (list<int32>), one Arrow batch from the loader.
    record_batch = pa.RecordBatch.from_pydict(
        {"input_ids": pa.array(docs, type=pa.list_(pa.int32()))}
    )
    ours = create_flattening_collate()
    note = f"{len(docs)} docs, {tokens} tokens"
    fast = 20 if quick else 200  # sub-millisecond: more calls for a stable median
    out = [
        Measurement(name, "mixtape flatten (Arrow batch)",
                    timeit(lambda: ours(record_batch), fast, warmup=5), True, note),
        Measurement(name, "mixtape flatten (list of dicts)",
                    timeit(lambda: ours(examples), fast, warmup=5), True),
    ]  # fmt: skip
    tf, missing = peer_import(name, "transformers DataCollatorWithFlattening", "transformers")
    if missing:
        out.append(missing)
        out.append(skipped(name, "transformers DataCollatorWithPadding", missing.note[9:]))
        return out
    flattening = tf.DataCollatorWithFlattening()
    out.append(
        Measurement(name, "transformers DataCollatorWithFlattening",
                    timeit(lambda: flattening(examples), repeat), False, "list of dicts")
    )  # fmt: skip
    padding = tf.DataCollatorWithPadding(_byt5())
    out.append(
        Measurement(name, "transformers DataCollatorWithPadding",
                    timeit(lambda: padding(examples), repeat), False, "list of dicts, pads")
    )  # fmt: skip
    return out


@case("pad-pylists")
def pad_pylists(quick: bool) -> list[Measurement]:
    """64 examples given as lists of Python ints, lengths uniform 32..2048 -> padded batch."""
    from mixtape.collate import create_collate_fn

    name = "pad-pylists"
    repeat = 5 if quick else 25
    ids = pylist_batch()
    examples = [{"input_ids": x} for x in ids]
    total = sum(map(len, ids))
    ours = create_collate_fn(pad_token_id=0)
    fast = 10 if quick else 100
    out = [
        Measurement(name, "mixtape collate (list of dicts)",
                    timeit(lambda: ours(examples), fast, warmup=5), True),
    ]  # fmt: skip
    tf, missing = peer_import(name, "transformers DataCollatorWithPadding", "transformers")
    if missing:
        out.append(missing)
    else:
        padding = tf.DataCollatorWithPadding(_byt5())
        out.append(
            Measurement(name, "transformers DataCollatorWithPadding",
                        timeit(lambda: padding(examples), repeat), False, "ByT5Tokenizer")
        )  # fmt: skip
    torch, missing = peer_import(name, "pad_sequence([torch.tensor(x) ...])", "torch")
    if missing:
        out.append(missing)
    else:

        def one_liner() -> object:
            return torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(x) for x in ids], batch_first=True, padding_value=0
            )

        out.append(
            Measurement(name, "pad_sequence([torch.tensor(x) ...])", timeit(one_liner, repeat),
                        False, "ids only, no mask")
        )  # fmt: skip

    def floor() -> object:
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)

    out.append(
        Measurement(name, "numpy reads the same ints (floor)", timeit(floor, fast, 5), False,
                    f"{total} ints")
    )  # fmt: skip
    return out


# --- output ------------------------------------------------------------------------------------


