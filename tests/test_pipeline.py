"""The Pipeline API and build_from_config: local jsonl / parquet files, a tokenizer that needs no
download (ByT5's byte tokenizer), checked against the records tokenized directly."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from stateful_helpers import same_batches
from stateful_helpers import take_batches as take

from mixtape import (
    DataConfig,
    DataLoaderConfig,
    DatasetConfig,
    Loader,
    LoadStageConfig,
    MixedDataset,
    MixStageConfig,
    PackStageConfig,
    Pipeline,
    PipelineConfig,
    build_from_config,
    load_data_config,
)

transformers = pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def tok() -> Any:
    return transformers.ByT5Tokenizer()


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {i} " + " ".join(WORDS[: 1 + i % len(WORDS)]) for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {"web": write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in texts("web", 30)]),
            "code": write_jsonl(tmp_path / "code.jsonl",
                                [{"body": t} for t in texts("def", 20)])}  # fmt: skip


def reference(tok: Any) -> dict[str, set[tuple[int, ...]]]:
    """Every source's documents tokenized directly (ByT5 appends its EOS itself)."""
    return {name: {tuple(tok(t)["input_ids"]) for t in texts(prefix, n)}
            for name, prefix, n in (("web", "web", 30), ("code", "def", 20))}  # fmt: skip


def examples(batches: list[dict[str, Any]], names: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(source name, unpadded ids) of every example of padded batches."""
    out = []
    for b in batches:
        for ids, mask, s in zip(b["input_ids"], b["attention_mask"], b["source_ids"],
                                strict=True):  # fmt: skip
            out.append((names[int(s)], tuple(ids[: int(mask.sum())].tolist())))
    return out


def pipeline_config(files: dict[str, str], tok: Any, **load: Any) -> PipelineConfig:
    return PipelineConfig(
        datasets=[DatasetConfig("web", data_files=files["web"], text_field="text", tokenizer=tok),
                  DatasetConfig("code", data_files=files["code"], text_field="body",
                                tokenizer=tok)],
        mix=MixStageConfig(weights={"web": 0.75, "code": 0.25}, seed=3),
        load=LoadStageConfig(batch_size=4, **load))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def test_from_config_yields_the_tokenized_records_of_each_source(files: dict[str, str],
                                                                 tok: Any) -> None:  # fmt: skip
    loader = Pipeline.from_config(pipeline_config(files, tok)).build()
    assert isinstance(loader, Loader) and loader.source_names == ["web", "code"]
    batches = take(loader, 10)
    got = examples(batches, loader.source_names)
    ref = reference(tok)
    assert all(ids in ref[name] for name, ids in got)
    counts = {n: sum(1 for name, _ in got if name == n) for n in ("web", "code")}
    assert counts == {"web": 30, "code": 10}  # greedy mixing: exactly 3:1 over 40 examples
    assert (batches[0]["labels"][batches[0]["attention_mask"] == 0] == -100).all()


def test_fluent_equals_from_config(files: dict[str, str], tok: Any) -> None:
    fluent = (Pipeline()
              .source("web", data_files=files["web"], text_field="text")
              .source("code", data_files=files["code"], text_field="body")
              .tokenize(tok)
              .mix([0.75, 0.25], seed=3)
              .load(batch_size=4)
              .build())  # fmt: skip
    ref = Pipeline.from_config(pipeline_config(files, tok)).build()
    assert same_batches(take(fluent, 8), take(ref, 8))


def test_packed_pipeline(files: dict[str, str], tok: Any) -> None:
    loader = (Pipeline()
              .source("web", data_files=files["web"]).source("code", data_files=files["code"],
                                                             text_field="body")
              .tokenize(tok).mix({"web": 1, "code": 1})
              .pack("bfd", max_length=64, attention="eager")
              .load(batch_size=3).build())  # fmt: skip
    ref = reference(tok)
    seen = 0
    for b in take(loader, 6):
        assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] <= 64
        pad = b["source_ids"] == -1
        assert (b["labels"][pad] == -100).all() and (b["input_ids"][pad] == 0).all()
        assert b["attention_mask"].shape[:2] == (3, 1)  # eager: a block-causal mask per row
        for row, sid, pos in zip(b["input_ids"], b["source_ids"], b["position_ids"],
                                 strict=True):  # fmt: skip
            # Documents (all shorter than a row, so never split) restart the positions.
            real = (sid != -1).nonzero().flatten().tolist()
            starts = [i for i in real if pos[i] == 0] + [len(real)]
            for a, z in itertools.pairwise(starts):
                doc = tuple(row[a:z].tolist())
                names = set(sid[a:z].tolist())
                assert len(names) == 1
                assert doc in ref[loader.source_names[names.pop()]]
                seen += 1
    assert seen >= 18


def test_weight_schedule_switches_sources_at_its_step(files: dict[str, str], tok: Any) -> None:
    sched = [{"step": 0, "weights": {"web": 1, "code": 0}},
             {"step": 5, "weights": {"web": 0, "code": 1}}]  # fmt: skip
    loader = (Pipeline().source("web", data_files=files["web"])
              .source("code", data_files=files["code"], text_field="body").tokenize(tok)
              .mix(weight_schedule=sched, weight_schedule_type="step", seed=0)
              .load(batch_size=4).build())  # fmt: skip
    batches = take(loader, 10)
    names = [[loader.source_names[int(s)] for s in b["source_ids"]] for b in batches]
    assert all(set(n) == {"web"} for n in names[:5])
    assert all(set(n) == {"code"} for n in names[5:])


def test_first_exhausted_stops(files: dict[str, str], tok: Any) -> None:
    pc = pipeline_config(files, tok)
    pc = PipelineConfig(pc.datasets, pc.load, MixStageConfig(weights={"web": 0.5, "code": 0.5},
                                                             stop_strategy="first_exhausted"))
    got = examples(take(Pipeline.from_config(pc).build(), 1000), ["web", "code"])
    # code (20 records) runs out first, having given each of its records once
    assert sorted(ids for n, ids in got if n == "code") == sorted(reference(tok)["code"])


def test_resume_in_a_fresh_loader(files: dict[str, str], tok: Any) -> None:
    p = Pipeline.from_config(pipeline_config(files, tok))
    ref = take(p.build(), 9)
    first = p.build()
    take(first, 4)
    state = first.state_dict()
    again = p.build()
    again.load_state_dict(state)
    assert same_batches(take(again, 5), ref[4:])


def test_pretokenized_source_needs_no_tokenizer(tmp_path: Path) -> None:
    rows = [{"input_ids": [7] * (1 + i % 4)} for i in range(12)]
    f = write_jsonl(tmp_path / "ids.jsonl", rows)
    loader = Pipeline().source("ids", data_files=f).load(batch_size=12).build()
    (batch,) = take(loader, 1)
    assert sorted(batch["attention_mask"].sum(1).tolist()) == sorted(len(r["input_ids"])
                                                                     for r in rows)


def test_errors(files: dict[str, str], tok: Any) -> None:
    with pytest.raises(ValueError, match=r"source 'web' has no 'input_ids' field.*tokenizer"):
        Pipeline().source("web", data_files=files["web"]).load(batch_size=2).build()
    with pytest.raises(ValueError, match=r"call .load"):
        Pipeline().source("web", data_files=files["web"]).build()
    with pytest.raises(ValueError, match=r"no datasets"):
        Pipeline().load(batch_size=2).build()
    with pytest.raises(ValueError, match=r"added already"):
        Pipeline().source("web", data_files=files["web"]).source("web", data_files=files["web"])
    with pytest.raises(ValueError, match=r"one weight per dataset"):
        Pipeline().source("web", data_files=files["web"]).tokenize(tok).mix([1, 2]).load(
            batch_size=2).build()
    with pytest.raises(ValueError, match=r"attention"):
        Pipeline().source("web", data_files=files["web"]).tokenize(tok).pack(
            max_length=32).load(batch_size=2).build()
    with pytest.raises(ValueError, match=r"record 0 has no field 'text'"):
        Pipeline().source("code", data_files=files["code"]).tokenize(tok).load(
            batch_size=2).build()


def test_config_maps_onto_data_config(files: dict[str, str], tok: Any) -> None:
    pc = PipelineConfig(
        datasets=[DatasetConfig("web", data_files=files["web"], tokenizer=tok)],
        pack=PackStageConfig("bfd", 32, attention="sdpa"), load=DataLoaderConfig(batch_size=2))
    dc = pc.to_data_config()
    assert isinstance(dc, DataConfig) and dc.packing is not None and dc.packing.max_length == 32
    assert dc.loader.collate_fn == "packed" and dc.loader.collate_kwargs == {"attention": "sdpa"}
    assert dc.mixture.source_names == ["web"] and dc.mixture.sources[0].data_files == files["web"]


# --------------------------------------------------------------------------------------------
# build_from_config: a YAML file in one call
# --------------------------------------------------------------------------------------------


def write_example_data(base: Path) -> None:
    write_jsonl(base / "data" / "web.jsonl", [{"text": t} for t in texts("web", 30)])
    write_jsonl(base / "data" / "code.jsonl", [{"text": t} for t in texts("def", 20)])
    pq.write_table(pa.table({"text": texts("book", 10)}), base / "data" / "books.parquet")


def test_the_shipped_example_yaml_builds(tmp_path: Path, tok: Any) -> None:
    shutil.copy(ROOT / "configs" / "example.yaml", tmp_path / "example.yaml")
    write_example_data(tmp_path)
    mixed, loader = build_from_config(tmp_path / "example.yaml", tokenizer=tok, attention="sdpa")
    assert isinstance(mixed, MixedDataset) and loader.dataset is mixed
    assert mixed.source_names == ["web", "code", "books"]
    assert loader.config.num_workers == 2 and loader.config.packing == "bfd"
    for b in take(loader, 2):
        assert b["input_ids"].shape == (8, 1024)
        assert b["attention_mask"].shape == (8, 1, 1024, 1024)  # sdpa: block-causal masks


YAML = """\
tokenizer: ./tok
mixture:
  sources:
    - {name: web, data_files: data/web.jsonl, text_field: text}
    - {name: code, data_files: data/code.jsonl}
    - {name: books, path: data/books.parquet}
  weights: {web: 2, code: 1, books: 1}
  seed: 9
loader:
  batch_size: 4
"""


def test_yaml_to_loader_in_one_call(tmp_path: Path, tok: Any) -> None:
    write_example_data(tmp_path)
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "data.yaml").write_text(YAML, encoding="utf-8")
    _, loader = build_from_config(tmp_path / "data.yaml")  # the YAML's tokenizer, loaded
    batches = take(loader, 8)
    ref = reference(tok)
    ref["books"] = {tuple(tok(t)["input_ids"]) for t in texts("book", 10)}
    got = examples(batches, loader.source_names)
    assert all(ids in ref[name] for name, ids in got)
    assert {n: sum(1 for name, _ in got if name == n) for n in ref} == \
        {"web": 16, "code": 8, "books": 8}  # fmt: skip
    # The same config through DataConfig.build_loader, and through an explicit tokenizer.
    cfg = load_data_config(tmp_path / "data.yaml")
    assert same_batches(take(cfg.build_loader(), 8), batches)
    assert same_batches(take(build_from_config(cfg, tokenizer=tok)[1], 8), batches)
    assert cfg.build_dataset(tok).source_names == ["web", "code", "books"]


def test_build_from_config_errors(tmp_path: Path, tok: Any) -> None:
    write_example_data(tmp_path)
    (tmp_path / "data.yaml").write_text(YAML.replace("tokenizer: ./tok\n", "") + (
        "packing: {strategy: bfd, max_length: 64}\n"), encoding="utf-8")  # fmt: skip
    with pytest.raises(ValueError, match=r"attention"):
        build_from_config(tmp_path / "data.yaml", tokenizer=tok)
    with pytest.raises(ValueError, match=r"no 'input_ids' field"):
        build_from_config(tmp_path / "data.yaml", attention="flash")
    (tmp_path / "drop.yaml").write_text(YAML.replace("tokenizer: ./tok\n", "") + (
        "packing: {strategy: bfd, max_length: 64, overflow: drop}\n"),
        encoding="utf-8")  # fmt: skip
    with pytest.raises(ValueError, match=r"packing.overflow='drop'"):
        build_from_config(tmp_path / "drop.yaml", tokenizer=tok, attention="flash")
    _, loader = build_from_config(tmp_path / "data.yaml", tokenizer=tok, attention="flash")
    b = take(loader, 1)[0]
    assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 64
    assert "cu_seq_lens_q" in b and "attention_mask" not in b  # flash: varlen kwargs


def test_packing_given_in_the_loader_section(tmp_path: Path, tok: Any) -> None:
    write_example_data(tmp_path)
    extra = "  packing: bfd\n  max_length: 48\n"
    (tmp_path / "data.yaml").write_text(YAML.replace("tokenizer: ./tok\n", "") + extra,
                                        encoding="utf-8")  # fmt: skip
    _, loader = build_from_config(tmp_path / "data.yaml", tokenizer=tok, attention="eager")
    b = take(loader, 1)[0]
    assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 48
    assert b["attention_mask"].dim() == 4 and b["source_ids"].shape == b["input_ids"].shape
    (tmp_path / "bad.yaml").write_text(
        YAML.replace("tokenizer: ./tok\n", "") + extra + "  collate_fn: causal_lm\n",
        encoding="utf-8")  # fmt: skip
    with pytest.raises(ValueError, match=r"collate_fn='causal_lm' with packing"):
        build_from_config(tmp_path / "bad.yaml", tokenizer=tok)


def test_token_files_are_skipped_by_the_shared_tokenizer(tmp_path: Path, tok: Any) -> None:
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "ids.npy", np.arange(2000, 2020, dtype=np.int32))
    np.save(tmp_path / "offsets.npy", np.array([0, 5, 12, 20], dtype=np.int64))
    docs = {(*range(2000, 2005),), (*range(2005, 2012),), (*range(2012, 2020),)}
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts("web", 30)])
    npy = {"path": str(tmp_path / "ids.npy"), "offsets": str(tmp_path / "offsets.npy")}
    loader = (Pipeline().source("ids", **npy).source("web", data_files=text).tokenize(tok)
              .mix({"ids": 1, "web": 1}).load(batch_size=6).build())  # fmt: skip
    got = examples(take(loader, 4), loader.source_names)
    assert {n for n, _ in got} == {"ids", "web"}
    assert all(ids in (docs if n == "ids" else reference(tok)["web"]) for n, ids in got)
    with pytest.raises(TypeError, match=r"'ids' opens as a NumpyTokenSource"):
        Pipeline().source("ids", tokenizer=tok, **npy).load(batch_size=2).build()
