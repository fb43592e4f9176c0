"""DataLoaderBuilder and UniversalDataModule: both fill a DataLoaderConfig and go through
DataLoaderFactory, so their loaders are get_loader's loaders for the same settings."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from stateful_helpers import same_batches
from stateful_helpers import take_batches as take

from mixtape import (
    DataLoaderBuilder,
    DataLoaderConfig,
    DataModuleProtocol,
    Loader,
    MixedDataset,
    TensorListDataset,
    UniversalDataModule,
    get_loader,
)

datasets = pytest.importorskip("datasets")


def hf(base: int, n: int) -> Any:
    return datasets.Dataset.from_dict({"input_ids": [[base + i] * (1 + i % 7) for i in range(n)]})


def mixed() -> MixedDataset:
    return MixedDataset({"a": hf(0, 60), "b": hf(1000, 40)}, {"a": 0.6, "b": 0.4}, seed=1)


def first_ids(batches: list[dict[str, Any]]) -> list[int]:
    """The first token of every example: names the example (hf() rows repeat one id)."""
    return [int(r[0]) for b in batches for r in b["input_ids"]]


# --------------------------------------------------------------------------------------------
# DataLoaderBuilder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_builder_gives_get_loaders_batches(packed: bool) -> None:
    opts: dict[str, Any] = {"seed": 5, "horizon": 3}
    b = DataLoaderBuilder().with_dataset(mixed()).with_batch_size(4).with_seed(5).with_horizon(3)
    if packed:
        opts.update(packing="bfd", max_length=16, collate_fn="packed",
                    collate_kwargs={"attention": "flash"})  # fmt: skip
        b = b.with_packing("bfd", max_length=16, attention="flash")
    loader = b.build()
    assert isinstance(loader, Loader) and loader.horizon == 3
    assert same_batches(take(loader, 12), take(get_loader(mixed(), 4, **opts), 12))
    if packed:
        assert loader.config.packing == "bfd" and loader.config.max_length == 16
        assert take(loader, 1)[0]["input_ids"].shape == (4, 16)


def test_builder_fills_the_config() -> None:
    b = (DataLoaderBuilder().with_batch_size(32).with_workers(4, pin_memory=True)
         .with_distributed(1, 2).with_seed(7).with_horizon(9)
         .with_collator("causal_lm", pad_token_id=3))  # fmt: skip
    assert b.config() == DataLoaderConfig(batch_size=32, num_workers=4, pin_memory=True, rank=1,
                                          world_size=2, seed=7, horizon=9,
                                          collate_fn="causal_lm",
                                          collate_kwargs={"pad_token_id": 3})  # fmt: skip
    # each step returns a new builder: a half-built one can be branched
    small = b.with_batch_size(2)
    assert b.config().batch_size == 32 and small.config().batch_size == 2
    tasks = b.with_workers(2, prefetch_factor=3, persistent_workers=False,
                           batches_per_task=2).with_horizon(14)
    assert (tasks.config().prefetch_factor, tasks.config().persistent_workers,
            tasks.config().batches_per_task) == (3, False, 2)  # fmt: skip


def test_builder_errors_name_the_missing_call() -> None:
    with pytest.raises(ValueError, match=r"with_dataset"):
        DataLoaderBuilder().with_batch_size(4).build()
    with pytest.raises(ValueError, match=r"with_batch_size"):
        DataLoaderBuilder().with_dataset(mixed()).build()
    with pytest.raises(ValueError, match=r"attention"):
        DataLoaderBuilder().with_packing("bfd", max_length=16)
    with pytest.raises(ValueError, match=r"'packed' collator"):
        DataLoaderBuilder().with_packing("bfd", max_length=16, attention="sdpa").with_collator(
            "causal_lm", pad_token_id=0)
    with pytest.raises(ValueError, match=r"callable"):
        DataLoaderBuilder().with_collator(lambda rows: rows, pad_token_id=0)
    with pytest.raises(ValueError, match=r"DataLoaderConfig.batch_size"):
        DataLoaderBuilder().with_dataset(mixed()).with_batch_size(0).build()
    with pytest.raises(ValueError, match=r"not DataLoaderConfig fields"):
        DataLoaderBuilder().with_options(batchsize=3)
    with pytest.raises(ValueError, match=r"overflow='drop'"):
        DataLoaderBuilder().with_packing("bfd", max_length=16, attention="sdpa", overflow="drop")
    with pytest.raises(ValueError, match=r"causal_lm' collator does not read"):
        DataLoaderBuilder().with_dataset(mixed()).with_batch_size(2).with_options(
            packing="bfd", max_length=16, collate_fn="causal_lm",
            collate_kwargs={"pad_token_id": 0}).build()


def test_builder_distributed_ranks_interleave_the_single_process_batches() -> None:
    ref = take(DataLoaderBuilder().with_dataset(mixed()).with_batch_size(4).build(), 8)
    ranks = [take(DataLoaderBuilder().with_dataset(mixed()).with_batch_size(4)
                  .with_distributed(r, 2).build(), 4) for r in range(2)]  # fmt: skip
    assert same_batches([ranks[k % 2][k // 2] for k in range(8)], ref)


def test_builder_shuffles_a_map_style_dataset_reproducibly() -> None:
    data = hf(0, 30)
    a = take(DataLoaderBuilder().with_dataset(data).with_batch_size(5)
             .with_collator("causal_lm", pad_token_id=0).with_seed(3).build())  # fmt: skip
    b = take(DataLoaderBuilder().with_dataset(data).with_batch_size(5)
             .with_collator("causal_lm", pad_token_id=0).with_seed(3).build())  # fmt: skip
    assert same_batches(a, b)
    order = first_ids(a)
    assert sorted(order) == list(range(30)) and order != list(range(30))
    plain = take(DataLoaderBuilder().with_dataset(data).with_batch_size(5).with_shuffle(False)
                 .with_collator("causal_lm", pad_token_id=0).build())  # fmt: skip
    assert first_ids(plain) == list(range(30))


# --------------------------------------------------------------------------------------------
# UniversalDataModule
# --------------------------------------------------------------------------------------------


def test_is_a_data_module() -> None:
    dm = UniversalDataModule(hf(0, 20))
    assert isinstance(dm, DataModuleProtocol)


def test_split_is_seeded_disjoint_and_complete() -> None:
    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = UniversalDataModule(hf(0, 50), val_split=0.2, batch_size=4, seed=seed)
        return first_ids(take(dm.train_dataloader())), first_ids(take(dm.val_dataloader()))

    train, val = split(0)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == list(range(50))
    assert val == sorted(val)  # the validation loader is not shuffled
    assert train != sorted(train)  # the training loader is
    assert split(0) == (train, val)  # same seed: same split, same order
    assert split(1)[1] != val


def test_train_batches_are_reproducible_and_match_the_config() -> None:
    def batches() -> list[dict[str, Any]]:
        dm = UniversalDataModule(hf(0, 40), val_split=4, batch_size=6, seed=11)
        return take(dm.train_dataloader())

    a = batches()
    assert same_batches(a, batches())
    assert sum(len(b["input_ids"]) for b in a) == 36
    assert set(a[0]) >= {"input_ids", "attention_mask", "labels"}


def test_int_val_split_and_rounding() -> None:
    dm = UniversalDataModule(hf(0, 25), val_split=3)
    dm.setup("fit")
    assert len(dm.val_dataset) == 3 and len(dm.train_dataset) == 22
    dm = UniversalDataModule(hf(0, 25), val_split=0.1)  # 2.5 -> 3 (half up)
    dm.setup()
    assert len(dm.val_dataset) == 3
    assert isinstance(dm.train_dataset, datasets.Dataset)  # HF data keeps its type


def test_external_val_set_wins() -> None:
    train, val = hf(0, 20), hf(500, 7)
    dm = UniversalDataModule(train, val_data=val, val_split=0.5, batch_size=4)
    assert first_ids(take(dm.val_dataloader())) == list(range(500, 507))
    assert sorted(first_ids(take(dm.train_dataloader()))) == list(range(20))


def test_no_validation_set() -> None:
    dm = UniversalDataModule(hf(0, 20), val_split=None)
    assert len(take(dm.train_dataloader())) == 3
    with pytest.raises(ValueError, match=r"no validation set"):
        dm.val_dataloader()


def test_list_of_tensors() -> None:
    seqs = [torch.arange(1, 2 + i) for i in range(10)]
    dm = UniversalDataModule(seqs, val_split=None, batch_size=10)
    (batch,) = take(dm.train_dataloader())
    lengths = batch["attention_mask"].sum(1).tolist()
    assert sorted(lengths) == list(range(1, 11))
    for row, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 strict=True):  # fmt: skip
        n = int(mask.sum())
        assert torch.equal(row[:n], torch.arange(1, 1 + n))
        assert (row[n:] == 0).all() and (labels[n:] == -100).all()  # pad 0 without a tokenizer
    with pytest.raises(ValueError, match=r"item 1 has shape"):
        TensorListDataset([torch.arange(3), torch.zeros(2, 2)])


def test_tokenizer_pad_id_is_used() -> None:
    seqs = [torch.arange(1, 2 + i) for i in range(4)]
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=9)  # GPT-2 style: no pad token
    dm = UniversalDataModule(seqs, val_split=None, tokenizer=tok, batch_size=4, shuffle=False)
    (batch,) = take(dm.train_dataloader())
    assert dm.pad_token_id == 9
    assert batch["input_ids"][0].tolist() == [1, 9, 9, 9]
    assert batch["labels"][0].tolist() == [1, -100, -100, -100]


@pytest.mark.parametrize("cuda", [True, False])
def test_pin_memory_follows_cuda(monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dm = UniversalDataModule(hf(0, 20), batch_size=4)
    assert dm.train_dataloader().dataloader.pin_memory is cuda
    assert dm.val_dataloader().dataloader.pin_memory is cuda
    forced = UniversalDataModule(hf(0, 20), batch_size=4, pin_memory=False)
    assert forced.train_dataloader().dataloader.pin_memory is False


def test_workers_give_the_same_batches() -> None:
    def batches(workers: int) -> list[dict[str, Any]]:
        dm = UniversalDataModule(hf(0, 30), batch_size=4, num_workers=workers, seed=2)
        return take(dm.train_dataloader())

    assert same_batches(batches(0), batches(2))


def test_empty_data_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"train_data is empty"):
        UniversalDataModule([])
    with pytest.raises(ValueError, match=r"train_data is empty"):
        UniversalDataModule(hf(0, 0)).train_dataloader()
    with pytest.raises(ValueError, match=r"val_data is empty"):
        UniversalDataModule(hf(0, 5), val_data=hf(0, 0)).val_dataloader()


def test_batch_size_larger_than_the_data() -> None:
    dm = UniversalDataModule(hf(0, 5), val_split=None, batch_size=8)
    (batch,) = take(dm.train_dataloader())  # one short batch, as torch gives
    assert len(batch["input_ids"]) == 5
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 5 training"):
        UniversalDataModule(hf(0, 5), val_split=None, batch_size=8,
                            drop_last=True).train_dataloader()  # fmt: skip


def test_bad_splits_are_errors() -> None:
    with pytest.raises(ValueError, match=r"val_split=1.5"):
        UniversalDataModule(hf(0, 10), val_split=1.5)
    with pytest.raises(ValueError, match=r"gives 10 validation and 0 training"):
        UniversalDataModule(hf(0, 10), val_split=10).setup()
    with pytest.raises(ValueError, match=r"gives 0 validation"):
        UniversalDataModule(hf(0, 4), val_split=0.1).setup()
    with pytest.raises(TypeError, match=r"val_split"):
        UniversalDataModule(hf(0, 10), val_split="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cannot be split"):
        UniversalDataModule(mixed())


def test_mixture_as_training_data() -> None:
    dm = UniversalDataModule(mixed(), val_data=hf(500, 6), batch_size=4)
    assert same_batches(take(dm.train_dataloader(), 5), take(get_loader(mixed(), 4), 5))
    assert first_ids(take(dm.val_dataloader())) == list(range(500, 506))


class Images(torch.utils.data.Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = np.full((4, 4, 3), i * 10, dtype=np.uint8)
        return {"pixel_values": img, "label": i}


def test_vision_modality_picks_the_vision_collator() -> None:
    dm = UniversalDataModule(Images(), val_split=None, batch_size=6, modality="vision",
                             shuffle=False, collate_kwargs={"normalization": None})  # fmt: skip
    (batch,) = take(dm.train_dataloader())
    assert batch["pixel_values"].shape == (6, 3, 4, 4)
    assert batch["labels"].tolist() == list(range(6))
    assert torch.allclose(batch["pixel_values"][2], torch.full((3, 4, 4), 20 / 255))
    with pytest.raises(ValueError, match=r"no collator for modality 'audio'"):
        UniversalDataModule(Images(), modality="audio")


def test_text_is_tokenized_with_the_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.ByT5Tokenizer()
    texts = [f"doc {i} " + "x" * i for i in range(12)]
    dm = UniversalDataModule(datasets.Dataset.from_dict({"text": texts}), val_split=2,
                             tokenizer=tok, batch_size=5)  # fmt: skip
    got = [tuple(ids[: int(m.sum())].tolist())
           for b in take(dm.train_dataloader()) + take(dm.val_dataloader())
           for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)]  # fmt: skip
    assert sorted(got) == sorted(tuple(tok(t)["input_ids"]) for t in texts)
    with pytest.raises(ValueError, match=r"train_data has no 'input_ids' field.*tokenizer="):
        UniversalDataModule(datasets.Dataset.from_dict({"text": texts}))


def test_each_pass_is_the_next_epoch_and_state_resumes() -> None:
    def module() -> UniversalDataModule:
        return UniversalDataModule(hf(0, 40), val_split=0.25, batch_size=4, seed=6)

    dm = module()
    assert dm.train_dataloader() is dm.train_dataloader()
    epoch0 = first_ids(take(dm.train_dataloader()))
    epoch1 = first_ids(take(dm.train_dataloader()))  # a trainer asking again each epoch
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    part = take(dm.train_dataloader(), 3)  # epoch 2, 3 batches in
    state = dm.state_dict()
    rest = take(dm.train_dataloader())
    fresh = module()
    fresh.load_state_dict(state)
    assert same_batches(take(fresh.train_dataloader()), rest)
    assert len(part) + len(rest) == 8
    with pytest.raises(ValueError, match=r"expected a state_dict"):
        fresh.load_state_dict({})


def test_validation_over_ranks_serves_each_example_once() -> None:
    # Padding every rank to the same count (as DistributedSampler does) would count some
    # validation examples twice in a metric; training keeps even shares.
    seqs = [torch.arange(1, 2 + i) for i in range(10)]
    served: list[int] = []
    train: list[int] = []
    for rank in range(2):
        dm = UniversalDataModule(seqs[:5], val_data=seqs[5:], batch_size=2, rank=rank,
                                 world_size=2)  # fmt: skip
        served += [int(n) for b in dm.val_dataloader() for n in b["attention_mask"].sum(1)]
        train += [int(n) for b in dm.train_dataloader() for n in b["attention_mask"].sum(1)]
    assert sorted(served) == [6, 7, 8, 9, 10]
    assert len(train) == 6 and set(train) == {1, 2, 3, 4, 5}  # one example twice, as torch
