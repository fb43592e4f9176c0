"""One rank of tests/test_distributed.py (run by torchrun): writes the batches it served.

Rank and world size come from the gloo process group only (the loaders are not told them).
Output: ``<out>/rank<r>.json`` with, per case, the batches' input_ids and source_ids.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import datasets

from mixtape import MixedDataset
from mixtape.loader import get_loader

B = 4
BATCHES = 10  # per rank
SWITCH_AFTER = 4  # local batches received before update_weights
PACKED = {"packing": "bfd", "max_length": 16, "collate_fn": "packed",
          "collate_kwargs": {"attention": "flash"}}  # fmt: skip
RANK_WEIGHTS = [{"a": 0.0, "b": 1.0, "c": 0.0}, {"a": 1.0, "b": 0.0, "c": 0.0}]  # by rank


def ds(base: int, n: int) -> Any:
    """Document i of a source is [base + i] repeated 1 + i % 7 times (its origin is readable)."""
    return datasets.Dataset.from_dict({"input_ids": [[base + i] * (1 + i % 7) for i in range(n)]})


def make() -> MixedDataset:
    return MixedDataset({"a": ds(0, 200), "b": ds(1000, 100), "c": ds(2000, 50)},
                        {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)  # fmt: skip


def plain(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k].tolist() for k in ("input_ids", "source_ids")}


def main(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size()}

    loader = get_loader(make(), B, num_workers=rank)  # worker counts differ on purpose
    result["padded"] = [plain(b) for _, b in zip(range(BATCHES), loader, strict=False)]
    assert (loader.rank, loader.world_size) == (rank, dist.get_world_size())

    loader = get_loader(make(), B, **PACKED)
    result["packed"] = [plain(b) for _, b in zip(range(BATCHES), loader, strict=False)]

    loader = get_loader(make(), B)
    got: list[dict[str, Any]] = []
    for b in loader:
        got.append(plain(b))
        if len(got) == SWITCH_AFTER:
            # every rank at the same step, each with other weights: rank 0's are broadcast
            result["effect"] = loader.update_weights(RANK_WEIGHTS[rank])
        if len(got) == BATCHES:
            break
    result["update"] = got

    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def trainer(out: str) -> None:
    """MixtapeTrainer under DDP (gloo): the input_ids each rank's model was fed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from mixtape.integrations.hf import MixtapeTrainer

    args = TrainingArguments(out, per_device_train_batch_size=B, max_steps=TRAINER_STEPS,
                             use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
                             save_strategy="no", logging_steps=1000)  # fmt: skip
    import torch.distributed as dist

    assert dist.is_initialized()  # by the Trainer's arguments (accelerate), from torchrun's env
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2100, n_positions=16, n_embd=16, n_layer=1,
                                       n_head=2))  # fmt: skip
    seen: list[Any] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].tolist()),
                                    with_kwargs=True)  # fmt: skip
    loader = get_loader(make(), B, num_workers=1)
    MixtapeTrainer(model=model, args=args, train_loader=loader).train()
    with open(os.path.join(out, f"trainer{dist.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(seen, f)


TRAINER_STEPS = 3

if __name__ == "__main__":
    if sys.argv[2:] == ["trainer"]:
        trainer(sys.argv[1])
    else:
        main(sys.argv[1])
