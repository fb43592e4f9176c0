"""source_ids: every collator turns each example's ``__source__`` into ids by ``source_names``,
checked against plain Python references in every input form, and the per-source loss they give
against each source's documents run alone through a tiny model."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixtape
from mixtape.collate import (
    PackedCollator,
    VisionCollator,
    create_causal_lm_collate,
    create_collate_fn,
    create_flattening_collate,
    create_packed_collate,
    create_seq2seq_collate,
    get_collator,
)
from mixtape.packing import pack_sequences

datasets = pytest.importorskip("datasets")

NAMES = ("web", "code", "math")

# ---------------------------------------------------------------------------------------------
# Plain Python references and input forms
# ---------------------------------------------------------------------------------------------


def ref_example_ids(sources: list[Any], names: tuple[str, ...] = NAMES) -> list[int]:
    return [s if isinstance(s, int) else names.index(s) for s in sources]


def ref_token_ids(seqs: list[list[int]], sources: list[Any]) -> list[list[int]]:
    """Flattening: one [1, T] row, each token its example's id."""
    return [[i for s, i in zip(seqs, ref_example_ids(sources), strict=True) for _ in s]]


SOURCE_FORMS = ["dicts", "record_batch", "table", "columns", "columns_numpy", "arrow_dictionary",
                "dicts_ids", "columns_tensor_ids"]  # fmt: skip


def make_batch(seqs: list[list[int]], sources: list[str], form: str,
               extra: dict[str, list[Any]] | None = None) -> Any:  # fmt: skip
    """``{"input_ids": seqs, "__source__": sources, **extra}`` in one input form; ``*_ids``
    forms give the sources as ids already (their index in NAMES)."""
    cols: dict[str, Any] = {"input_ids": seqs, **(extra or {})}
    if form in ("record_batch", "table", "arrow_dictionary"):
        arrays = {k: pa.array(v, pa.list_(pa.int64()) if isinstance(v[0], list) else None)
                  for k, v in cols.items()}  # fmt: skip
        src = pa.array(sources)
        arrays["__source__"] = src.dictionary_encode() if form == "arrow_dictionary" else src
        table = pa.table(arrays)
        return table.to_batches()[0] if form == "record_batch" else table
    if form == "columns":
        return {**cols, "__source__": list(sources)}
    if form == "columns_numpy":
        return {**cols, "__source__": np.array(sources)}
    if form == "columns_tensor_ids":
        return {**cols, "__source__": torch.tensor(ref_example_ids(sources))}
    values = ref_example_ids(sources) if form == "dicts_ids" else sources
    return [{**{k: v[i] for k, v in cols.items()}, "__source__": values[i]}
            for i in range(len(seqs))]  # fmt: skip


seqs_and_sources = st.lists(
    st.tuples(st.lists(st.integers(0, 500), min_size=1, max_size=12), st.sampled_from(NAMES)),
    min_size=1, max_size=6,
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Padded batches: one id per example; flattening: one per token
# ---------------------------------------------------------------------------------------------


def padded_collators(names: Any = NAMES) -> dict[str, Any]:
    return {
        "padding": create_collate_fn(0, source_names=names),
        "causal_lm": create_causal_lm_collate(0, source_names=names),
        "seq2seq": create_seq2seq_collate(0, source_names=names),
        "left_truncating": create_collate_fn(0, padding_side="left", max_length=3,
                                             truncation_side="left", source_names=names),
    }  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(examples=seqs_and_sources, form=st.sampled_from(SOURCE_FORMS))
def test_padded_and_flattened_source_ids_match_reference(
    examples: list[tuple[list[int], str]], form: str
) -> None:
    seqs = [s for s, _ in examples]
    sources = [n for _, n in examples]
    want = ref_example_ids(sources)
    for name, collate in padded_collators().items():
        out = collate(make_batch(seqs, sources, form))
        assert "__source__" not in out, name
        assert out["source_ids"].dtype == torch.int64, name
        assert out["source_ids"].tolist() == want, name
    flat = create_flattening_collate(source_names=NAMES)(make_batch(seqs, sources, form))
    assert flat["source_ids"].dtype == torch.int64
    assert flat["source_ids"].shape == flat["input_ids"].shape
    assert flat["source_ids"].tolist() == ref_token_ids(seqs, sources)
    numpy_out = create_collate_fn(0, return_tensors="np", source_names=NAMES)(
        make_batch(seqs, sources, form))  # fmt: skip
    assert isinstance(numpy_out["source_ids"], np.ndarray)
    assert numpy_out["source_ids"].dtype == np.int64 and numpy_out["source_ids"].tolist() == want


@pytest.mark.parametrize("form", SOURCE_FORMS)
def test_vision_source_ids(form: str) -> None:
    images = [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(3)]
    sources = ["math", "web", "math"]
    batch = make_batch([[0], [0], [0]], sources, form)
    if isinstance(batch, list):
        for ex, img in zip(batch, images, strict=True):
            ex["pixel_values"] = img
            del ex["input_ids"]
    elif isinstance(batch, dict):
        batch = {"pixel_values": images, "__source__": batch["__source__"]}
    else:
        batch = batch.drop_columns(["input_ids"]) if isinstance(batch, pa.Table) else \
            pa.Table.from_batches([batch]).drop_columns(["input_ids"])  # fmt: skip
        batch = batch.append_column("pixel_values", pa.array([i.tolist() for i in images]))
    out = VisionCollator("cifar10", source_names=NAMES)(batch)
    assert out["source_ids"].dtype == torch.int64 and out["source_ids"].tolist() == [2, 0, 2]
    assert "__source__" not in out


def test_ids_never_depend_on_which_names_a_batch_holds() -> None:
    collate = create_collate_fn(0, source_names=NAMES)
    a = collate([{"input_ids": [1], "__source__": "math"}])
    b = collate([{"input_ids": [1], "__source__": "code"},
                 {"input_ids": [2], "__source__": "math"}])
    assert a["source_ids"].tolist() == [2] and b["source_ids"].tolist() == [1, 2]


@pytest.mark.parametrize("form", ["dicts", "table", "columns", "columns_numpy"])
def test_without_source_names_the_names_pass_through(form: str) -> None:
    seqs, sources = [[1, 2], [3]], ["code", "web"]
    collators = [create_collate_fn(0), create_causal_lm_collate(0), create_seq2seq_collate(0),
                 create_flattening_collate(), create_packed_collate(attention="none")]  # fmt: skip
    for collate in collators:
        out = collate(make_batch(seqs, sources, form))
        assert "source_ids" not in out, type(collate).__name__
        assert out["__source__"] == ["code", "web"], type(collate).__name__
    # Ids given already are passed through unchanged too (a list, not a model input tensor).
    ids = create_collate_fn(0)(make_batch(seqs, sources, "dicts_ids"))
    assert ids["__source__"] == [1, 0] and "source_ids" not in ids


COLLATOR_FACTORIES = {
    "padding": lambda names: create_collate_fn(0, source_names=names),
    "causal_lm": lambda names: create_causal_lm_collate(0, source_names=names),
    "seq2seq": lambda names: create_seq2seq_collate(0, source_names=names),
    "flattening": lambda names: create_flattening_collate(source_names=names),
    "packed": lambda names: create_packed_collate(attention="none", source_names=names),
}


@pytest.mark.parametrize("name", sorted(COLLATOR_FACTORIES))
@pytest.mark.parametrize("form", ["dicts", "table", "columns", "columns_numpy",
                                  "arrow_dictionary"])  # fmt: skip
def test_unknown_source_name_is_an_error(name: str, form: str) -> None:
    collate = COLLATOR_FACTORIES[name](NAMES)
    batch = make_batch([[1, 2], [3], [4]], ["web", "wiki", "code"], form)
    with pytest.raises(ValueError, match=r"__source__: example 1 has source 'wiki', which is not "
                                         r"in source_names \['web', 'code', 'math'\]"):  # fmt: skip
        collate(batch)


@pytest.mark.parametrize(("sources", "exc", "message"), [
    ([0, 3], ValueError, r"example 1 has source id 3, which names no source \(source_names has 3"),
    ([0, -1], ValueError, "example 1 has source id -1, which names no source"),
    (["web", None], ValueError, "example 1 has no source"),
    (["web", 1], TypeError, "example 1 has source 1 but example 0 has 'web'"),
    ([True, 0], TypeError, "example 0 has source True; expected a source name"),
    ([1.0, 0], TypeError, "example 0 has source 1.0"),
])  # fmt: skip
def test_bad_sources(sources: list[Any], exc: type[Exception], message: str) -> None:
    batch = [{"input_ids": [1], "__source__": s} for s in sources]
    with pytest.raises(exc, match=message):
        create_collate_fn(0, source_names=NAMES)(batch)


def test_bad_sources_in_arrow_and_tensors() -> None:
    collate = create_collate_fn(0, source_names=NAMES)
    with pytest.raises(ValueError, match="example 1 has no source"):
        collate(pa.table({"input_ids": [[1], [2]], "__source__": pa.array(["web", None])}))
    with pytest.raises(ValueError, match="example 0 has source id 7"):
        collate(pa.table({"input_ids": [[1], [2]], "__source__": pa.array([7, 1])}))
    with pytest.raises(TypeError, match="expected source names"):
        collate(pa.table({"input_ids": [[1], [2]], "__source__": pa.array([0.5, 1.0])}))
    with pytest.raises(ValueError, match="example 1 has source id 5"):
        collate({"input_ids": [[1], [2]], "__source__": torch.tensor([0, 5])})
    with pytest.raises(ValueError, match="both '__source__' and 'source_ids'"):
        collate([{"input_ids": [1], "__source__": "web", "source_ids": 0}])


@pytest.mark.parametrize(("names", "exc", "message"), [
    ("web", TypeError, "source_names must be a sequence of names, got the string 'web'"),
    ([], ValueError, "source_names is empty"),
    (["web", "code", "web"], ValueError, r"source_names\[2\] repeats 'web' \(also "
                                         r"source_names\[0\]\)"),
    (["web", 3], TypeError, r"source_names\[1\] must be a non-empty string, got 3"),
    (["web", ""], TypeError, r"source_names\[1\] must be a non-empty string"),
])  # fmt: skip
def test_bad_source_names(names: Any, exc: type[Exception], message: str) -> None:
    for make in (*COLLATOR_FACTORIES.values(), lambda n: VisionCollator(source_names=n)):
        with pytest.raises(exc, match=message):
            make(names)


def test_registry_factories_and_pickling_keep_source_names() -> None:
    batch = [{"input_ids": [1, 2], "__source__": "math"}, {"input_ids": [3], "__source__": "web"}]
    for name in ("padding", "causal_lm", "seq2seq", "flattening", "packed"):
        kwargs: dict[str, Any] = {"attention": "none"} if name == "packed" else (
            {} if name == "flattening" else {"pad_token_id": 0})  # fmt: skip
        collate = get_collator(name, source_names=list(NAMES), **kwargs)
        assert collate.source_names == NAMES
        again = pickle.loads(pickle.dumps(collate))
        assert again.source_names == NAMES
        want = collate(batch)["source_ids"].tolist()
        assert again(batch)["source_ids"].tolist() == want
        per_name = {"flattening": [[2, 2, 0]], "packed": [[2, 2], [0, -1]]}
        assert want == per_name.get(name, [2, 0]), (name, want)
    vision = get_collator("vision", source_names=NAMES)
    again = pickle.loads(pickle.dumps(vision))
    img = np.zeros((2, 2, 3), np.uint8)
    assert again([{"pixel_values": img, "__source__": "code"}])["source_ids"].tolist() == [1]


def test_per_token_source_ids_column_pads_with_minus_one() -> None:
    """A per-token ``source_ids`` column the rows carry pads with -1, since 0 names a source."""
    rows = [{"input_ids": [1, 2, 3], "source_ids": [0, 0, 1]},
            {"input_ids": [4], "source_ids": [0]}]
    out = create_collate_fn(0)(rows)
    assert out["source_ids"].tolist() == [[0, 0, 1], [0, -1, -1]]
    packed = create_packed_collate(attention="none", pad_to_multiple_of=4)(rows)
    assert packed["source_ids"].tolist() == [[0, 0, 1, -1], [0, -1, -1, -1]]


# ---------------------------------------------------------------------------------------------
# Packed rows: each token its document's source, -1 on padding
# ---------------------------------------------------------------------------------------------


def ref_packed_source_ids(rows: list[dict[str, Any]], padding_free: bool = False,
                          multiple: int | None = None) -> list[list[int]]:  # fmt: skip
    """Per-token source ids of packed rows, document by document, token by token."""
    width = max(len(r["input_ids"]) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    out: list[list[int]] = []
    for r in rows:
        lens = list(r["seq_lengths"])
        starts = list(r["seq_starts"]) if r.get("seq_starts") is not None else None
        if starts is None:
            starts, at = [], 0
            for n in lens:
                starts.append(at)
                at += n
        srcs = list(r["doc_source_ids"])
        row = [-1] * width
        for s, n, src in zip(starts, lens, srcs, strict=True):
            for t in range(n):
                row[s + t] = src
        out.append([x for x in row if x >= 0] if padding_free else row)
    if padding_free:
        flat = [x for row in out for x in row]
        if multiple:
            flat += [-1] * (-len(flat) % multiple)
        return [flat]
    return out


HAND_ROWS = [
    {"input_ids": [11, 12, 13, 14, 10, 0], "seq_lengths": [4, 1], "doc_source_ids": [2, 0]},
    {"input_ids": [5, 6, 7, 8, 9, 3], "seq_lengths": [3, 0, 2, 1], "doc_source_ids": [1, 2, 0, 1]},
    {"input_ids": [4, 4, 0], "seq_lengths": [2], "doc_source_ids": [1]},
]


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("multiple", [None, 4])
@pytest.mark.parametrize("attention", ["flash", "sdpa", "none"])
@pytest.mark.parametrize("form", ["dicts", "table", "columns"])
def test_packed_hand_made_rows(padding_free: bool, multiple: int | None, attention: str,
                               form: str) -> None:  # fmt: skip
    batch: Any = HAND_ROWS
    if form == "table":
        batch = pa.Table.from_pylist(HAND_ROWS)
    elif form == "columns":
        batch = {k: [r[k] for r in HAND_ROWS] for k in HAND_ROWS[0]}
    collate = create_packed_collate(attention=attention, padding_free=padding_free,
                                    pad_to_multiple_of=multiple)  # fmt: skip
    out = collate(batch)
    want = ref_packed_source_ids(HAND_ROWS, padding_free, multiple)
    assert out["source_ids"].dtype == torch.int64
    assert out["source_ids"].shape == out["input_ids"].shape
    assert out["source_ids"].tolist() == want
    assert "doc_source_ids" not in out
    # source_names checks the ids and changes nothing else.
    named = create_packed_collate(attention=attention, padding_free=padding_free,
                                  pad_to_multiple_of=multiple, source_names=NAMES)
    named = named(batch)
    assert named["source_ids"].tolist() == want


def test_packed_rows_with_gaps_and_one_source_per_row() -> None:
    rows = [{"input_ids": [1, 2, 0, 0, 3, 4, 5, 0], "seq_lengths": [2, 3], "seq_starts": [0, 4],
             "doc_source_ids": [1, 0]}]  # fmt: skip
    out = create_packed_collate(attention="sdpa", source_names=NAMES)(rows)
    assert out["source_ids"].tolist() == [[1, 1, -1, -1, 0, 0, 0, -1]]
    # A row of one source (its __source__) gives every document of the row that id.
    rows = [{"input_ids": [1, 2, 3, 0], "seq_lengths": [2, 1], "__source__": "math"},
            {"input_ids": [4, 5], "seq_lengths": [2], "__source__": "web"}]  # fmt: skip
    out = create_packed_collate(attention="none", source_names=NAMES)(rows)
    assert out["source_ids"].tolist() == [[2, 2, 2, -1], [0, 0, -1, -1]]
    assert "__source__" not in out
    plain = create_packed_collate(attention="none")(rows)
    assert "source_ids" not in plain and plain["__source__"] == ["math", "web"]


def test_packed_bad_source_columns() -> None:
    collate = create_packed_collate(attention="none", source_names=NAMES)
    with pytest.raises(ValueError, match=r"doc_source_ids: example 1 document 1 has source id 3, "
                                         r"which names no source"):  # fmt: skip
        collate([{"input_ids": [1], "seq_lengths": [1], "doc_source_ids": [0]},
                 {"input_ids": [1, 2], "seq_lengths": [1, 1], "doc_source_ids": [0, 3]}])
    with pytest.raises(ValueError, match="doc_source_ids: example 0 has 1 source ids but 2 "
                                         "seq_lengths"):  # fmt: skip
        collate([{"input_ids": [1, 2], "seq_lengths": [1, 1], "doc_source_ids": [0]}])
    with pytest.raises(ValueError, match="no seq_lengths"):
        collate([{"input_ids": [1, 2], "doc_source_ids": [0]}])
    with pytest.raises(ValueError, match="both '__source__' and 'doc_source_ids'"):
        collate([{"input_ids": [1], "seq_lengths": [1], "doc_source_ids": [0],
                  "__source__": "web"}])  # fmt: skip
    with pytest.raises(ValueError, match="source id -1"):  # without names: ids must be >= 0
        create_packed_collate(attention="none")(
            [{"input_ids": [1], "seq_lengths": [1], "doc_source_ids": [-1]}])  # fmt: skip


def test_packed_collator_pickles_with_source_names() -> None:
    collate = PackedCollator(attention="none", source_names=NAMES)
    again = pickle.loads(pickle.dumps(collate))
    assert again(HAND_ROWS)["source_ids"].tolist() == collate(HAND_ROWS)["source_ids"].tolist()


def source_dataset(lengths: list[int], seed: int, vocab: int = 256) -> tuple[Any, list[str]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, n).tolist() for n in lengths]
    sources = [NAMES[int(i)] for i in rng.integers(0, len(NAMES), len(lengths))]
    return datasets.Dataset.from_dict({"input_ids": docs, "__source__": sources}), sources


@pytest.mark.parametrize(("layout", "align"), [("padded", 1), ("padded", 4), ("ragged", 1)])
@pytest.mark.parametrize("padding_free", [False, True])
def test_packed_rows_from_pack_sequences(layout: str, padding_free: bool, align: int) -> None:
    """Every token of the batch carries the source of the input document it came from."""
    lengths = [int(n) for n in np.random.default_rng(5).integers(1, 30, 50)]
    ds, sources = source_dataset(lengths, seed=5)
    packed = pack_sequences(ds, 40, layout=layout, align=align, source_names=NAMES,
                            fields=("input_ids", "position_ids", "seq_lengths", "doc_ids"))
    rows = packed.to_list()
    collate = create_packed_collate(attention="none", padding_free=padding_free,
                                    source_names=NAMES)  # fmt: skip
    for lo, hi in ((0, 3), (3, 9), (len(rows) - 2, len(rows))):
        batch = rows[lo:hi]
        want = ref_packed_source_ids(batch, padding_free)
        for form in (batch, packed.with_format("arrow")[lo:hi], packed[lo:hi]):
            got = collate(form)
            assert got["source_ids"].tolist() == want
        # Against the input: each document's tokens, wherever they landed, carry its source.
        for r in batch:
            assert r["doc_source_ids"] == [NAMES.index(sources[d]) for d in r["doc_ids"]]


# ---------------------------------------------------------------------------------------------
# Training: per-source loss from source_ids equals each source's documents run alone
# ---------------------------------------------------------------------------------------------


def tiny_gpt2(attn: str) -> Any:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                           bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = tf.GPT2LMHeadModel(config)
    model.set_attn_implementation(attn)
    return model.eval()


def per_source_loss(model: Any, batch: dict[str, Any], sums: np.ndarray,
                    counts: np.ndarray) -> None:  # fmt: skip
    """Add the batch's per-token loss to its tokens' sources, as a training loop would."""
    source_ids = batch.pop("source_ids")
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none",
        ignore_index=-100,
    ).view(labels.shape[0], -1)  # fmt: skip
    if source_ids.dim() == 1:  # one per example: every token of the row
        source_ids = source_ids[:, None].expand_as(labels)
    src = source_ids[:, 1:]  # the source of the token each position predicts
    real = labels[:, 1:] != -100
    assert torch.all(src[real] >= 0)
    n = len(NAMES)
    sums += torch.bincount(src[real], weights=token_loss[real].double(), minlength=n).numpy()
    counts += torch.bincount(src[real], minlength=n).numpy()


def alone_loss(model: Any, docs: list[list[int]], sources: list[str]) -> np.ndarray:
    """Each source's mean token loss from its documents run one by one."""
    sums, counts = np.zeros(len(NAMES)), np.zeros(len(NAMES))
    with torch.no_grad():
        for d, s in zip(docs, sources, strict=True):
            if len(d) > 1:
                t = torch.tensor(d)[None]
                i = NAMES.index(s)
                sums[i] += float(model(input_ids=t, labels=t).loss) * (len(d) - 1)
                counts[i] += len(d) - 1
    assert np.all(counts > 0)
    return sums / counts


@pytest.mark.parametrize("padding_free", [False, True])
def test_per_source_loss_of_packed_rows_equals_documents_alone(padding_free: bool) -> None:
    model = tiny_gpt2("sdpa")
    lengths = [7, 12, 20, 5, 30, 9, 3, 17, 25, 1, 11, 14, 6, 22]
    ds, sources = source_dataset(lengths, seed=11)
    packed = pack_sequences(ds, 32, source_names=NAMES).with_format("arrow")
    assert packed.num_rows < len(lengths)  # documents of several sources share rows
    rows_sources = [set(r) for r in packed["doc_source_ids"].to_pylist()]
    assert any(len(s) > 1 for s in rows_sources)
    collate = create_packed_collate(attention="sdpa", padding_free=padding_free,
                                    source_names=NAMES)  # fmt: skip
    sums, counts = np.zeros(len(NAMES)), np.zeros(len(NAMES))
    for lo in range(0, packed.num_rows, 2):
        per_source_loss(model, collate(packed[lo : lo + 2]), sums, counts)
    docs = ds["input_ids"]
    assert counts.tolist() == [sum(len(d) - 1 for d, s in zip(docs, sources, strict=True)
                                   if s == name) for name in NAMES]  # fmt: skip
    np.testing.assert_allclose(sums / counts, alone_loss(model, docs, sources), rtol=1e-5)


def test_per_source_loss_of_padded_batches_equals_documents_alone() -> None:
    model = tiny_gpt2("eager")
    lengths = [7, 12, 20, 5, 9, 3, 17]
    ds, sources = source_dataset(lengths, seed=3)
    collate = mixtape.create_causal_lm_collate(0, source_names=NAMES)
    sums, counts = np.zeros(len(NAMES)), np.zeros(len(NAMES))
    for lo in range(0, len(lengths), 3):
        per_source_loss(model, collate(ds.with_format("arrow")[lo : lo + 3]), sums, counts)
    np.testing.assert_allclose(sums / counts, alone_loss(model, ds["input_ids"], sources),
                               rtol=1e-5)  # fmt: skip
