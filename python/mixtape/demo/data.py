"""The demo's data: corpora that ship with Python or are generated, and a tokenizer trained on them.

Nothing is downloaded. Three sources of different character: ``code`` (the standard library's own
Python sources, cut at top-level definitions), ``prose`` (the reference topics of ``pydoc_data``,
cut at paragraphs) and ``arithmetic`` (generated sums and products with their results). Their
content depends only on the Python version and the seed, so a demo run is reproducible.
"""

from __future__ import annotations

import itertools
import random
import re
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SOURCE_NAMES",
    "arithmetic_documents",
    "code_documents",
    "demo_corpora",
    "prose_documents",
    "tokenize_corpora",
    "train_tokenizer",
]

SOURCE_NAMES = ("code", "prose", "arithmetic")
_TOP_LEVEL = re.compile(r"^(?:def |class |async def |@)", re.M)


def _pieces(text: str, starts: Sequence[int], max_chars: int) -> Iterator[str]:
    """``text`` cut at ``starts``; pieces longer than ``max_chars`` are cut again at line ends."""
    bounds = [0, *[s for s in starts if 0 < s < len(text)], len(text)]
    for a, b in itertools.pairwise(bounds):
        piece = text[a:b]
        while len(piece) > max_chars:
            cut = piece.rfind("\n", 0, max_chars)
            cut = max_chars if cut <= 0 else cut + 1
            yield piece[:cut]
            piece = piece[cut:]
        if piece.strip():
            yield piece


def code_documents(max_docs: int | None = None, max_chars: int = 3000) -> list[str]:
    """Top-level blocks of the standard library's ``*.py`` files, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        starts = [m.start() for m in _TOP_LEVEL.finditer(text)]
        docs.extend(_pieces(text, starts, max_chars))
        if max_docs is not None and len(docs) >= max_docs:
            return docs[:max_docs]
    return docs


def prose_documents(max_chars: int = 2000) -> list[str]:
    """Paragraph groups of the ``pydoc_data`` reference topics (the text of ``help('TOPIC')``)."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        text = topics[name]
        starts = [m.end() for m in re.finditer(r"\n\s*\n", text)]
        merged: list[int] = []
        last = 0
        for s in starts:  # cut at paragraph ends, but only once a piece has some length
            if s - last >= max_chars // 3:
                merged.append(s)
                last = s
        docs.extend(_pieces(text, merged, max_chars))
    return docs


def arithmetic_documents(n: int = 20_000, seed: int = 0, per_doc: int = 8) -> list[str]:
    """``n`` documents of ``per_doc`` exact equations (``a + b = c``, ``a * b = c``), seeded."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(per_doc):
            a, b = rng.randrange(1000), rng.randrange(1000)
            op = rng.choice("+-*")
            c = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {c}")
        docs.append("\n".join(lines) + "\n")
    return docs


def demo_corpora(seed: int = 0, arithmetic_docs: int = 20_000) -> dict[str, list[str]]:
    """The three demo sources as lists of documents, in :data:`SOURCE_NAMES` order."""
    return {
        "code": code_documents(),
        "prose": prose_documents(),
        "arithmetic": arithmetic_documents(arithmetic_docs, seed=seed),
    }


def train_tokenizer(corpora: Mapping[str, Sequence[str]], vocab_size: int = 2048,
                    sample_per_source: int = 2000, seed: int = 0) -> Any:  # fmt: skip
    """A byte-level BPE tokenizer trained here, on a seeded sample of every source (seconds).

    Returns a ``tokenizers.Tokenizer`` with ``<|endoftext|>`` (id 0) as its only special token;
    byte-level, so any text encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    sample: list[str] = []
    for docs in corpora.values():
        k = min(sample_per_source, len(docs))
        sample.extend(rng.sample(list(docs), k))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(sample, trainer=trainer)
    return tok


def tokenize_corpora(corpora: Mapping[str, Sequence[str]], tokenizer: Any,
                     max_tokens: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Each source as a pre-tokenized HF ``Dataset`` (``input_ids``: int32 lists ending in EOS).

    Documents longer than ``max_tokens`` are cut (the packer would split them anyway).
    """
    import datasets
    import pyarrow as pa

    eos = tokenizer.token_to_id("<|endoftext|>")
    out = {}
    for name, docs in corpora.items():
        encoded = tokenizer.encode_batch(list(docs))
        keep = None if max_tokens is None else max_tokens - 1
        rows = [[*e.ids[:keep], eos] for e in encoded]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        out[name] = datasets.Dataset(pa.table({"input_ids": column}))
    return out
