"""DataConfig and its sections: automatic choices, validation, the YAML form, the cascade."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import mixtape
from mixtape.config import (
    DataConfig,
    DataLoaderConfig,
    InfluenceSection,
    MixtureConfig,
    PackingConfig,
    SourceConfig,
    dump_data_config,
    load_data_config,
)
from mixtape.schedule import WeightSchedulePoint, WeightScheduler
from mixtape.source_files import DatasetMixture

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def write_example_data(folder: Path) -> None:
    """The three files configs/example.yaml reads, under folder/data."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("web", "code"):
        lines = [json.dumps({"text": f"{name} document {i}"}) for i in range(5)]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [f"book {i}" for i in range(4)]}), data / "books.parquet")


def minimal(**sections: Any) -> dict[str, Any]:
    """A small valid config as a dict, with sections replaced or added."""
    d: dict[str, Any] = {
        "mixture": {
            "sources": [{"name": "a", "data_files": "a.jsonl"},
                        {"name": "b", "data_files": "b.jsonl"}],
        },
        "loader": {"batch_size": 4},
    }
    d.update(sections)
    return d


def write_yaml(tmp_path: Path, d: Any, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def sources(*names: str, **weights: float) -> tuple[SourceConfig, ...]:
    return tuple(SourceConfig(n, data_files=f"{n}.jsonl", weight=weights.get(n)) for n in names)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "best"}, r"PackingConfig\.strategy must be one of"),
        ({"max_length": 0}, r"max_length must be >= 1"),
        ({"overflow": "wrap"}, r"overflow must be one of"),
        ({"align": 3}, r"align must divide max_length=64, got 3"),
        ({"min_fill": 0.0}, r"min_fill must be in \(0, 1\]"),
        ({"min_fill": 1.5}, r"min_fill must be <= 1.0"),
        ({"buffer_size": 0}, r"buffer_size must be >= 1"),
        ({"max_docs_per_row": 0}, r"max_docs_per_row must be >= 1"),
    ],
)
def test_packing_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        PackingConfig(**{"strategy": "bfd", "max_length": 64, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probe": None}, r"InfluenceSection\.probe is required when influence is enabled"),
        ({"method": "datinf"},
         r"method must be one of \['datainf', 'grad_dot', 'cosine'\].*did you mean 'datainf'"),
        ({"update_interval": 0}, r"update_interval must be >= 1"),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0"),
        ({"learning_rate": 0}, r"learning_rate must be > 0"),
        ({"learning_rate": "1e-3"}, r"must be a number, got '1e-3' \(YAML 1.1 reads"),
        ({"smoothing": 1.5}, r"smoothing must be <= 1.0"),
        ({"floor": 1.0}, r"floor must be < 1.0"),
        ({"damping": -1.0}, r"damping must be > 0"),
        ({"damping": float("nan")}, r"damping must be finite"),
        ({"params": "*.mlp.*"}, r"params must be a list of parameter-name patterns"),
        ({"params": []}, r"params is empty"),
        ({"projection_dim": 0}, r"projection_dim must be >= 1"),
    ],
)
def test_influence_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        InfluenceSection(**{"probe": "a", **kwargs})


def test_influence_section_is_a_mapping() -> None:
    sec = InfluenceSection(probe="a", params=["*.mlp.*"])
    assert sec.params == ("*.mlp.*",)
    kwargs = dict(**sec)  # what InfluenceConfig(**section) receives
    assert kwargs["probe"] == "a" and kwargs["update_interval"] == 100
    assert set(kwargs) == {f.name for f in dataclasses.fields(InfluenceSection)}
    assert InfluenceSection(enabled=False).probe is None  # a disabled section needs no probe


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, r"SourceConfig\.name must be a non-empty string"),
        ({"data_files": None}, r"say where the data is"),
        ({"dataset": [{"x": 1}]}, r"give dataset alone"),
        ({"data_files": []}, r"data_files must be a path, a glob or a non-empty list"),
        ({"data_files": ["a", 3]}, r"data_files\[1\] must be a non-empty string"),
        ({"data_dir": "en"}, r"data_dir is read by a builder: give path"),
        ({"weight": -1}, r"SourceConfig\('s'\)\.weight must be >= 0.0"),
        ({"weight": float("inf")}, r"weight must be finite"),
        ({"streaming": 1}, r"streaming must be true or false"),
        ({"load_kwargs": {"split": "x"}}, r"load_kwargs sets \['split'\]"),
    ],
)
def test_source_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        SourceConfig(**{"name": "s", "data_files": "s.jsonl", **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": {"a": 1, "c": 1}}, r"weights names 'c', which is not a source"),
        ({"weights": {"a": 1, "web": 1, "b": 1}}, r"names 'web'.*sources: \['a', 'b', 'wbe'\]"),
        ({"weights": {"a": 1}}, r"weights gives no weight to source\(s\) \['b', 'wbe'\]"),
        ({"weights": {"a": 0, "b": 0, "wbe": 0}}, r"all weights are zero"),
        ({"weights": {"a": -1, "b": 0, "wbe": 0}}, r"weights\.a must be >= 0"),
        ({"weight_schedule": [(10, {"a": 1, "b": 1, "wbe": 1}), (5, {"a": 1, "b": 0, "wbe": 0})]},
         r"weight_schedule\[1\]\.step 5 comes before the previous point's step 10"),
        ({"weight_schedule": [(0, {"a": 1, "b": 1, "wbe": 1}), (0, {"a": 1, "b": 0, "wbe": 0})]},
         r"weight_schedule\[1\]\.step 0 repeats"),
        ({"weight_schedule": [(0, {"a": 1, "b": 1, "web": 1})]},
         r"weight_schedule\[0\]\.weights names 'web'.*did you mean 'wbe'"),
        ({"weight_schedule": [(-1, {"a": 1, "b": 1, "wbe": 1})]},
         r"weight_schedule\[0\]\.step must be >= 0"),
        ({"weight_schedule": [{"step": 0, "weight": {}}]},
         r"weight_schedule\[0\]: unknown key 'weight' \(did you mean 'weights'"),
        ({"weight_schedule": []}, r"weight_schedule is empty"),
        ({"weight_schedule": [(0, {"a": 1, "b": 1, "wbe": 1})], "weights": {"a": 1, "b": 1,
          "wbe": 1}}, r"weight_schedule and weights are both given"),
        ({"weight_schedule_type": "linear"}, r"weight_schedule_type is 'linear' but there is no"),
        ({"weight_schedule": [(0, {"a": 1, "b": 1, "wbe": 1})], "weight_schedule_type": "cos"},
         r"weight_schedule_type must be one of"),
        ({"mode": "blocks"}, r"mode must be one of.*did you mean 'block'"),
        ({"stop_strategy": "first"}, r"stop_strategy must be one of"),
        ({"block_size": 0}, r"block_size must be >= 1"),
        ({"seed": -3}, r"MixtureConfig\.seed must be >= 0"),
    ],
)  # fmt: skip
def test_mixture_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        MixtureConfig(sources("a", "b", "wbe"), **kwargs)


def test_mixture_weight_places() -> None:
    with pytest.raises(ValueError, match=r"weights and the weight of source\(s\) \['a'\] are both"):
        MixtureConfig(sources("a", "b", a=2.0), weights={"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"weight_schedule and the weight of \['b'\]"):
        MixtureConfig(sources("a", "b", b=2.0), weight_schedule=[(0, {"a": 1, "b": 1})])
    with pytest.raises(ValueError, match=r"every source has weight 0"):
        MixtureConfig(sources("a", "b", a=0.0, b=0.0))
    with pytest.raises(ValueError, match=r"sources\[1\]\.name 'a' repeats sources\[0\]"):
        MixtureConfig(sources("a", "a"))
    with pytest.raises(ValueError, match=r"sources is empty"):
        MixtureConfig(())
    # each source's weight; all or none (a default of 1 beside 0.7 / 0.3 would dominate)
    assert MixtureConfig(sources("a", "b", a=3.0, b=1.0)).static_weights() == {"a": 3.0, "b": 1.0}
    assert MixtureConfig(sources("a", "b")).static_weights() == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"source\(s\) \['web', 'code'\] have a weight but "
                                         r"\['math'\] do not"):  # fmt: skip
        MixtureConfig(sources("web", "code", "math", web=0.7, code=0.3))
    m = MixtureConfig(sources("a", "b"), weights={"b": 1, "a": 2})
    assert list(m.static_weights() or {}) == ["a", "b"]  # source order
    points: list[Any] = [{"step": 0, "weights": {"a": 1, "b": 0}}, (10, {"a": 0, "b": 1})]
    sched = MixtureConfig(sources("a", "b"), weight_schedule=points, weight_schedule_type="cosine")
    assert sched.static_weights() is None
    expected = WeightScheduler([(0, {"a": 1, "b": 0}), (10, {"a": 0, "b": 1})], "cosine")
    assert sched.build_schedule() == expected
    assert all(isinstance(p, WeightSchedulePoint) for p in sched.weight_schedule or ())


# --------------------------------------------------------------------------------------------
# DataConfig: cross-section rules, the cascade, build_mixture
# --------------------------------------------------------------------------------------------


def test_cascade() -> None:
    cfg = DataConfig.from_dict(minimal(loader={"batch_size": 6, "seed": 42},
                                       influence={"probe": "b"},
                                       packing={"strategy": "ffd", "max_length": 128}))  # fmt: skip
    assert cfg.mixture.seed is None and cfg.loader.packing is None  # stored as given
    r = cfg.resolved()
    assert r.mixture.seed == 42
    assert r.influence is not None and (r.influence.seed, r.influence.batch_size) == (42, 6)
    assert (r.loader.packing, r.loader.max_length) == ("ffd", 128)
    assert cfg.build_mixture()["seed"] == 42
    # a changed parent is followed: nothing was baked in
    moved = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, seed=7))
    assert moved.resolved().mixture.seed == 7 and moved.build_mixture()["seed"] == 7
    # explicit values win over the inherited ones
    own = DataConfig.from_dict(minimal(mixture={**minimal()["mixture"], "seed": 5},
                                       loader={"batch_size": 6, "seed": 42},
                                       influence={"probe": "b", "batch_size": 2}))  # fmt: skip
    r = own.resolved()
    assert r.mixture.seed == 5 and r.influence is not None
    assert (r.influence.seed, r.influence.batch_size) == (5, 2)
    own_seed = dataclasses.replace(own, influence=InfluenceSection(probe="b", seed=9))
    assert own_seed.resolved().influence.seed == 9  # type: ignore[union-attr]


def test_packing_given_twice_must_agree() -> None:
    same = minimal(packing={"strategy": "bfd", "max_length": 64},
                   loader={"batch_size": 2, "packing": "bfd", "max_length": 64})  # fmt: skip
    assert DataConfig.from_dict(same).resolved().loader.max_length == 64
    with pytest.raises(ValueError, match=r"^loader\.packing is 'ffd' but packing\.strategy is "
                       r"'bfd'"):  # fmt: skip
        DataConfig.from_dict(minimal(packing={"strategy": "bfd", "max_length": 64},
                                     loader={"batch_size": 2, "packing": "ffd",
                                             "max_length": 64}))  # fmt: skip
    with pytest.raises(ValueError, match=r"loader\.max_length is 32 but packing\.max_length is 64"):
        DataConfig.from_dict(minimal(packing={"strategy": "bfd", "max_length": 64},
                                     loader={"batch_size": 2, "max_length": 32}))  # fmt: skip
    # packing on the loader alone is enough
    alone = DataConfig.from_dict(minimal(loader={"batch_size": 2, "packing": "wrapped",
                                                 "max_length": 16}))  # fmt: skip
    assert alone.packing is None and alone.resolved().loader.packing == "wrapped"


def test_probe_and_floor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"influence\.probe 'bb' is neither a source of the "
                       r"mixture \(did you mean 'b'\?\).*nor an existing path"):  # fmt: skip
        DataConfig.from_dict(minimal(influence={"probe": "bb"}))
    with pytest.raises(ValueError, match=r"influence\.floor is 0\.5 with 2 sources"):
        DataConfig.from_dict(minimal(influence={"probe": "a", "floor": 0.5}))
    (tmp_path / "probe.jsonl").write_text('{"text": "x"}\n')
    cfg = DataConfig.from_dict(minimal(influence={"probe": "probe.jsonl"}), base_dir=tmp_path)
    assert cfg.influence is not None and cfg.influence.probe == str(tmp_path / "probe.jsonl")
    assert cfg.probe_source is None
    cfg = DataConfig.from_dict(minimal(influence={"probe": "a"}), base_dir=tmp_path)
    assert cfg.influence is not None and cfg.influence.probe == "a" and cfg.probe_source == "a"


def test_data_config_types() -> None:
    m = MixtureConfig(sources("a"))
    with pytest.raises(TypeError, match=r"DataConfig\.loader must be a DataLoaderConfig"):
        DataConfig(mixture=m, loader={"batch_size": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"DataConfig\.packing must be a PackingConfig or None"):
        DataConfig(mixture=m, loader=DataLoaderConfig(2), packing="bfd")  # type: ignore[arg-type]


def test_build_mixture_static_and_scheduled(tmp_path: Path) -> None:
    cfg = DataConfig(mixture=MixtureConfig(sources("a", "b", a=3.0, b=1.0), mode="block",
                                           block_size=50,
                                           stop_strategy="all_exhausted"),
                     loader=DataLoaderConfig(4, seed=8))  # fmt: skip
    args = cfg.build_mixture()
    assert set(args) == {"sources", "weights", "schedule", "seed", "mode", "block_size",
                         "stop_strategy"}  # fmt: skip
    assert args["weights"] == {"a": 3.0, "b": 1.0} and args["schedule"] is None
    assert (args["seed"], args["mode"], args["block_size"], args["stop_strategy"]) == (
        8, "block", 50, "all_exhausted")
    assert all(isinstance(m, DatasetMixture) and not m.loaded for m in args["sources"].values())
    assert [(m.name, m.weight) for m in args["sources"].values()] == [("a", 3.0), ("b", 1.0)]

    sched = dataclasses.replace(cfg, mixture=MixtureConfig(
        sources("a", "b"), weight_schedule=[(0, {"a": 3, "b": 1}), (100, {"a": 1, "b": 1})],
        weight_schedule_type="linear"))  # fmt: skip
    args = sched.build_mixture()
    assert args["weights"] is None
    assert isinstance(args["schedule"], WeightScheduler)
    assert args["schedule"].get_weights(50) == pytest.approx({"a": 0.625, "b": 0.375})
    # each DatasetMixture carries the schedule's step-0 weight, so every reader agrees
    assert [m.weight for m in args["sources"].values()] == [0.75, 0.25]


# --------------------------------------------------------------------------------------------
# YAML: errors name the file and the key path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "key", "near"),
    [
        (lambda d: d.update(mixtur={}), "mixtur", "mixture"),
        (lambda d: d["mixture"].update(wieghts={}), "mixture.wieghts", "weights"),
        (lambda d: d["mixture"]["sources"][1].update(text_feild="t"),
         r"mixture.sources\[1\].text_feild", "text_field"),
        (lambda d: d["loader"].update(num_worker=2), "loader.num_worker", "num_workers"),
        (lambda d: d.update(packing={"strategy": "bfd", "max_len": 3}), "packing.max_len",
         "max_length"),
        (lambda d: d.update(influence={"enabled": False, "updat_interval": 3}),
         "influence.updat_interval", "update_interval"),
    ],
)  # fmt: skip
def test_unknown_keys_name_file_and_path(tmp_path: Path, edit: Any, key: str, near: str) -> None:
    d = minimal()
    edit(d)
    p = write_yaml(tmp_path, d)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(p))}: {key}: unknown key .*did you "
                       rf"mean '{near}'"):  # fmt: skip
        load_data_config(p)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda d: d["loader"].update(num_workers=-1), ValueError,
         r"loader\.num_workers must be >= 0, got -1"),
        (lambda d: d["loader"].update(batch_size="8"), TypeError,
         r"loader\.batch_size must be an int, got '8' \(a string: write the number without"),
        (lambda d: d["loader"].pop("batch_size"), ValueError, r"loader\.batch_size is required"),
        (lambda d: d.pop("loader"), ValueError, r"loader is required"),
        (lambda d: d["mixture"]["sources"][0].update(weight=-2), ValueError,
         r"mixture\.sources\[0\]\.weight must be >= 0\.0, got -2"),
        (lambda d: d["mixture"]["sources"][1].update(streaming="no"), TypeError,
         r"mixture\.sources\[1\]\.streaming must be true or false"),
        (lambda d: d["mixture"]["sources"][0].update(dataset="x"), ValueError,
         r"mixture\.sources\[0\]\.dataset: unknown key"),
        (lambda d: d["mixture"].update(sources={"a": {}}), TypeError,
         r"mixture\.sources must be a list"),
        (lambda d: d["mixture"].update(weights={"a": 1, "c": 2}), ValueError,
         r"mixture\.weights names 'c', which is not a source"),
        (lambda d: d["mixture"].update(weight_schedule=[{"step": 5, "weights": {"a": 1, "b": 1}},
                                                        {"step": 2, "weights": {"a": 1, "b": 2}}]),
         ValueError, r"mixture\.weight_schedule\[1\]\.step 2 comes before"),
        (lambda d: d.update(packing={"strategy": "bfd", "max_length": 10, "align": 4}),
         ValueError, r"packing\.align must divide max_length=10"),
        (lambda d: d.update(influence={"probe": "a", "learning_rate": "1e-3"}), TypeError,
         r"influence\.learning_rate must be a number.*write 1\.0e-3"),
        (lambda d: d.update(influence={"probe": "c"}), ValueError,
         r"influence\.probe 'c' is neither a source"),
        (lambda d: d.update(loader=[1]), TypeError, r"loader must be a mapping"),
        (lambda d: d.update(tokenizer=3), TypeError, r"tokenizer must be a non-empty string"),
    ],
)  # fmt: skip
def test_bad_yaml_values(tmp_path: Path, edit: Any, error: type[Exception], match: str) -> None:
    d = minimal()
    edit(d)
    p = write_yaml(tmp_path, d)
    with pytest.raises(error, match=rf"^{re.escape(str(p))}: .*{match}"):
        load_data_config(p)


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match=r"empty\.yaml: the file is empty"):
        load_data_config(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("loader: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_data_config(bad)
    top = write_yaml(tmp_path, [1, 2], "top.yaml")
    with pytest.raises(TypeError, match=r"top\.yaml: the config must be a mapping"):
        load_data_config(top)
    dup = tmp_path / "dup.yaml"
    dup.write_text("mixture:\n  sources: [{name: a, data_files: a.jsonl}]\n"
                   "loader:\n  batch_size: 4\n  batch_size: 8\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"dup\.yaml: not valid YAML.*duplicate key "
                       r"'batch_size' \(first at line 4\)"):  # fmt: skip
        load_data_config(dup)
    merge = tmp_path / "merge.yaml"  # YAML merge keys still work, explicit keys override them
    text = ("mixture:\n  sources: [{name: a, data_files: a.jsonl}]\n"
            "loader:\n  <<: {batch_size: 4, seed: 3}\n  batch_size: 8\n")  # fmt: skip
    merge.write_text(text)
    loader = load_data_config(merge).loader
    assert (loader.batch_size, loader.seed) == (8, 3)


def test_paths_resolve_against_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "tok").mkdir()
    d = minimal(tokenizer="tok")
    d["mixture"]["sources"] = [
        {"name": "files", "data_files": ["x/*.jsonl", "/abs/y.jsonl"]},
        {"name": "tokens", "path": "t/ids.npy", "offsets": "t/off.npy"},
        {"name": "hub", "path": "allenai/c4", "data_dir": "en"},
        {"name": "builder", "path": "parquet", "data_files": "p.parquet"},
        {"name": "home", "path": "~/data.jsonl"},
    ]
    cfg = load_data_config(write_yaml(sub, d))
    s = {x.name: x for x in cfg.mixture.sources}
    assert s["files"].data_files == (str(sub / "x/*.jsonl"), "/abs/y.jsonl")
    assert (s["tokens"].path, s["tokens"].offsets) == (str(sub / "t/ids.npy"),
                                                       str(sub / "t/off.npy"))  # fmt: skip
    assert (s["hub"].path, s["hub"].data_dir) == ("allenai/c4", "en")  # a Hub name stays a name
    assert (s["builder"].path, s["builder"].data_files) == ("parquet", str(sub / "p.parquet"))
    assert s["home"].path == str(Path("~/data.jsonl").expanduser())
    assert cfg.tokenizer == str(sub / "tok")  # exists there: a local tokenizer
    assert load_data_config(write_yaml(sub, minimal(tokenizer="gpt2"))).tokenizer == "gpt2"
    assert load_data_config(write_yaml(sub, minimal(tokenizer="./gpt2"))).tokenizer == str(
        sub / "gpt2")
    # from_dict without base_dir leaves relative paths alone
    assert DataConfig.from_dict(d).mixture.sources[1].path == "t/ids.npy"


# --------------------------------------------------------------------------------------------
# Round trips and the example file
# --------------------------------------------------------------------------------------------


def full_dict() -> dict[str, Any]:
    return {
        "mixture": {
            "sources": [
                {"name": "a", "data_files": ["a1.jsonl", "a2.jsonl"], "text_field": "text",
                 "load_kwargs": {"encoding": "utf-8"}},
                {"name": "b", "path": "b.npy", "offsets": "b_off.npy"},
            ],
            "weight_schedule": [{"step": 0, "weights": {"a": 1.0, "b": 0.0}},
                                {"step": 10, "weights": {"a": 0.5, "b": 0.5}}],
            "weight_schedule_type": "cosine", "mode": "random", "block_size": 7,
            "stop_strategy": "first_exhausted", "seed": 99,
        },
        "packing": {"strategy": "next_fit", "max_length": 32, "overflow": "truncate", "align": 8,
                    "max_docs_per_row": 4},
        "loader": {"batch_size": 3, "num_workers": 1, "prefetch_factor": 3, "pin_memory": False,
                   "horizon": 9, "rank": 0, "world_size": 1, "collate_fn": "causal_lm",
                   "collate_kwargs": {"pad_token_id": 0}},
        "influence": {"probe": "a", "params": ["*.mlp.*"], "damping": 0.01, "projection_dim": 64,
                      "seed": 1, "floor": 0.1},
        "tokenizer": "gpt2",
    }  # fmt: skip


def test_dict_round_trip() -> None:
    cfg = DataConfig.from_dict(full_dict())
    d = cfg.to_dict()
    assert DataConfig.from_dict(d) == cfg
    assert d["mixture"]["weight_schedule"][1] == {"step": 10, "weights": {"a": 0.5, "b": 0.5}}
    assert d["mixture"]["sources"][0]["data_files"] == ["a1.jsonl", "a2.jsonl"]
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain YAML-safe values only
    small = DataConfig.from_dict(minimal())
    assert small.to_dict() == {
        "mixture": {"sources": [{"name": "a", "data_files": "a.jsonl", "split": "train",
                                 "streaming": False},
                                {"name": "b", "data_files": "b.jsonl", "split": "train",
                                 "streaming": False}],
                    "block_size": 1000, "stop_strategy": "restart", "mode": "greedy"},
        "loader": {"batch_size": 4, "shuffle": True, "num_workers": 0, "seed": 0,
                   "drop_last": False},
    }  # fmt: skip


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = DataConfig.from_dict(full_dict())
    dump_data_config(cfg, tmp_path / "out.yaml")
    # the relative paths now resolve against the dump's folder
    assert load_data_config(tmp_path / "out.yaml") == DataConfig.from_dict(full_dict(),
                                                                           base_dir=tmp_path)
    absolute = DataConfig.from_dict(full_dict(), base_dir=tmp_path)
    dump_data_config(absolute, tmp_path / "abs.yaml")
    assert load_data_config(tmp_path / "abs.yaml") == absolute
    with_object = DataConfig(mixture=MixtureConfig((SourceConfig("x", dataset=[{"t": 1}]),)),
                             loader=DataLoaderConfig(2))  # fmt: skip
    assert DataConfig.from_dict(with_object.to_dict()) == with_object  # in Python, fine
    with pytest.raises(ValueError, match=r"mixture\.sources\[0\]\.dataset holds a Python"):
        dump_data_config(with_object, tmp_path / "obj.yaml")
    with pytest.raises(ValueError, match=r"loader\.collate_fn holds a builtin_function"):
        dump_data_config(dataclasses.replace(cfg, loader=DataLoaderConfig(2, collate_fn=len)),
                         tmp_path / "fn.yaml")  # fmt: skip
    assert not (tmp_path / "fn.yaml").exists()  # nothing half-written


def test_example_file(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "example.yaml")
    write_example_data(tmp_path)
    cfg = load_data_config(tmp_path / "example.yaml")
    assert cfg.mixture.source_names == ["web", "code", "books"]
    assert cfg.mixture.sources[0].data_files == str(tmp_path / "data" / "web.jsonl")
    assert cfg.mixture.sources[2].path == str(tmp_path / "data" / "books.parquet")
    assert cfg.packing == PackingConfig("bfd", 1024)
    assert cfg.influence is not None and not cfg.influence.enabled
    assert cfg.probe_source == "books"
    r = cfg.resolved()
    assert (r.loader.num_workers, r.loader.prefetch_factor, r.loader.batches_per_task,
            r.loader.horizon) == (2, 2, 4, 20)  # fmt: skip
    assert (r.loader.packing, r.loader.max_length) == ("bfd", 1024)
    assert r.influence is not None and (r.influence.seed, r.influence.batch_size) == (1234, 8)

    args = cfg.build_mixture()
    sched = args["schedule"]
    assert isinstance(sched, WeightScheduler) and sched.interpolation == "linear"
    assert sched.get_weights(500) == pytest.approx({"web": 0.5, "code": 0.3, "books": 0.2})
    assert args["weights"] is None and args["seed"] == 1234
    web, books = args["sources"]["web"].load(), args["sources"]["books"].load()
    assert web.num_rows == 5 and web.take([4])[0]["text"] == "web document 4"
    assert books.take([0, 3]) == [{"text": "book 0"}, {"text": "book 3"}]

    dump_data_config(cfg, tmp_path / "again.yaml")
    assert load_data_config(tmp_path / "again.yaml") == cfg


def test_exported() -> None:
    for name in ("DataConfig", "DataLoaderConfig", "MixtureConfig", "PackingConfig",
                 "SourceConfig", "InfluenceSection", "load_data_config", "dump_data_config",
                 "seed_worker", "make_generator"):  # fmt: skip
        assert name in mixtape.__all__ and getattr(mixtape, name) is getattr(
            mixtape.config, name)
