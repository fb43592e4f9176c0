"""HF transformers ``Trainer`` integration: the mixture's order and state under the Trainer.

Two ways in, both exact:

- ``Trainer(train_dataset=mixed, callbacks=[MixtureCheckpointCallback(mixed)])`` with a
  :class:`~mixtape.MixedDataset` whose ``batch_size`` is ``per_device_train_batch_size``: the
  Trainer's DataLoader (``batch_size`` = per-device batch, any ``dataloader_num_workers``) yields
  the mixture's batches in order. One process only: under several ranks accelerate fetches the
  batches of every rank on rank 0 (``dispatch_batches``, its default for an ``IterableDataset``)
  or re-shards them (``IterableDatasetShard``), both over a mixture that already deals batches to
  ranks, so batches would be lost; that case is refused.
- ``MixtapeTrainer(train_loader=mixtape.get_loader(mixed, B, ...))`` (or
  :class:`MixtapeTrainerMixin` on any Trainer subclass): the Trainer reads the
  :class:`~mixtape.Loader` as it is (not wrapped by accelerate), so ranks, packing and
  ``loader.update_weights`` keep the loader's guarantees.

:class:`MixtureCheckpointCallback` writes ``mixtape_state.json`` next to ``trainer_state.json``
in every checkpoint and loads it when training resumes, before the DataLoader's iterator
exists; it sets ``args.ignore_data_skip = True`` so the Trainer does not also replay the
batches it already trained on.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from mixtape.loader import Loader
from mixtape.mixing import MixedDataset

__all__ = [
    "STATE_FILE",
    "MixtapeTrainer",
    "MixtapeTrainerMixin",
    "MixtureCheckpointCallback",
    "examples_per_step",
]

STATE_FILE = "mixtape_state.json"
STATE_VERSION = 1


def examples_per_step(args: TrainingArguments) -> int:
    """Examples (or packed rows) one optimizer step consumes over all ranks."""
    return int(args.per_device_train_batch_size * args.gradient_accumulation_steps
               * args.world_size)  # fmt: skip


class MixtureCheckpointCallback(TrainerCallback):
    """Saves the mixture's state in each checkpoint and restores it on resume, without skipping.

    Args:
        source: the :class:`~mixtape.MixedDataset` given to the Trainer as ``train_dataset``, or
            the :class:`~mixtape.Loader` a :class:`MixtapeTrainer` reads.
        resume_from: the checkpoint folder training resumes from; by default the one
            :class:`MixtapeTrainer` resumes from, else ``output_dir/checkpoint-<global_step>``,
            else ``args.resume_from_checkpoint``. Resuming without a matching state is an error.
    """

    def __init__(self, source: MixedDataset | Loader, *,
                 resume_from: str | os.PathLike[str] | None = None) -> None:  # fmt: skip
        if not isinstance(source, MixedDataset | Loader):
            raise TypeError(f"MixtureCheckpointCallback takes a MixedDataset or a mixtape Loader, "
                            f"got {type(source).__name__}")  # fmt: skip
        self.source = source
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self.loaded_from: str | None = None  # the checkpoint folder the state came from

    # --- events -----------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:  # fmt: skip
        # Set before train() reads it: the Trainer then neither replays the trained batches nor
        # loses its RNG restore (both depend on this flag when the training state is loaded).
        args.ignore_data_skip = True
        self._init_seen = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        # A callback added after __init__ missed on_init_end; the flag still stops the skip here.
        args.ignore_data_skip = True
        if isinstance(self.source, MixedDataset):
            self._check_dataset_setup(args, kwargs.get("train_dataloader"))
        else:
            self._check_loader_setup(args)
        if state.global_step > 0:
            if not getattr(self, "_init_seen", False):
                raise ValueError("MixtureCheckpointCallback was added after the Trainer was built "
                                 "(add_callback): on resume the Trainer had already decided to "
                                 "skip data and how to restore its RNG before this callback could "
                                 "change it; pass it in Trainer(callbacks=[...])")  # fmt: skip
            self.load(self._find_checkpoint(args, state), args, state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:  # fmt: skip
        record = self.state_dict(args, state)  # every rank checks; the process that saves writes
        if not args.should_save:
            return
        folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            raise ValueError(f"MixtureCheckpointCallback: checkpoint folder {folder} does not "
                             "exist (a hyperparameter-search run dir?); the mixture state "
                             "cannot be saved next to it")  # fmt: skip
        path = os.path.join(folder, STATE_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)

    # --- state ------------------------------------------------------------------------------

    def state_dict(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        """The record saved with a checkpoint after ``state.global_step`` optimizer steps."""
        step = int(state.global_step)
        record: dict[str, Any] = {
            "version": STATE_VERSION,
            "global_step": step,
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "world_size": int(args.world_size),
        }
        if isinstance(self.source, Loader):
            if step > 0 and self.source.batches_consumed == 0:
                raise ValueError("MixtureCheckpointCallback: the Trainer trained "
                                 f"{step} steps but this Loader served no batch; the Trainer "
                                 "reads another DataLoader (use MixtapeTrainer(train_loader="
                                 "loader))")  # fmt: skip
            record["kind"] = "loader"
            record["state"] = self.source.state_dict()
            return record
        mixed = self.source
        examples = step * examples_per_step(args)
        stop = mixed.stop_position()
        if stop is not None and examples >= stop:
            raise ValueError(f"MixtureCheckpointCallback: step {step} is past the first epoch of a "
                             f"finite MixedDataset ({stop} examples); the Trainer restarts the "
                             "dataset each epoch, so its position is not steps x batch. Use "
                             "stop_strategy='restart' with max_steps, or MixtapeTrainer with a "
                             "Loader")  # fmt: skip
        record["kind"] = "dataset"
        record["examples"] = examples
        record["state"] = mixed.state_dict(position=examples)
        return record

    def load(self, checkpoint: str | os.PathLike[str], args: TrainingArguments,
             state: TrainerState) -> None:  # fmt: skip
        """Load the mixture's state saved in ``checkpoint`` (a folder) for ``state.global_step``."""
        folder = os.fspath(checkpoint)
        path = os.path.join(folder, STATE_FILE)
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: mixtape state version {record.get('version')!r}, expected "
                             f"{STATE_VERSION}")  # fmt: skip
        if int(record["global_step"]) != int(state.global_step):
            raise ValueError(f"{path} holds the mixture after step {record['global_step']}, the "
                             f"Trainer resumes at step {state.global_step}")  # fmt: skip
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size"):
            if int(record[key]) != int(getattr(args, key)):
                raise ValueError(f"{path} was saved with {key}={record[key]}, this run has "
                                 f"{getattr(args, key)}: the mixture's batches would differ")
        kind = "loader" if isinstance(self.source, Loader) else "dataset"
        if record["kind"] != kind:
            raise ValueError(f"{path} holds a {record['kind']} state, this callback restores a "
                             f"{kind}")  # fmt: skip
        self.source.load_state_dict(record["state"])
        self._check_mid_epoch(record, args, state)
        self.loaded_from = folder

    def _check_mid_epoch(self, record: dict[str, Any], args: TrainingArguments,
                         state: TrainerState) -> None:  # fmt: skip
        """Resuming a finite mixture mid-epoch is refused where the Trainer's own epoch count
        (which restarts at the resumed epoch's first batch) would train other batches."""
        ga = int(args.gradient_accumulation_steps)
        if isinstance(self.source, Loader):
            per_epoch = self.source._epoch_batches()
            done = self.source.batches_consumed
            if per_epoch and ga > 1 and per_epoch % ga and done % per_epoch:
                raise ValueError(
                    f"resuming mid-epoch a finite mixture whose epoch of {per_epoch} batches is "
                    f"not a multiple of gradient_accumulation_steps={ga}: the Trainer counts "
                    "the resumed epoch from its start and would drop its last, partial step. "
                    "Save at epoch ends (save_strategy='epoch'), use an accumulation that "
                    "divides the epoch, or an infinite mixture (stop_strategy='restart') with "
                    "max_steps")  # fmt: skip
            return
        stop = self.source.stop_position()
        examples = int(record["examples"])
        if stop and examples % stop and int(state.max_steps) * examples_per_step(args) > stop:
            raise ValueError(
                f"resuming mid-epoch a finite MixedDataset ({stop} examples an epoch) as "
                "train_dataset, with training going past the epoch: the Trainer would start the "
                "next epoch at the restored position. Use MixtapeTrainer with a Loader, or "
                "stop_strategy='restart' with max_steps")  # fmt: skip

    def _find_checkpoint(self, args: TrainingArguments, state: TrainerState) -> str:
        candidates = []
        if self.resume_from is not None:
            candidates.append(self.resume_from)
        else:
            candidates.append(os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}"))
            if isinstance(args.resume_from_checkpoint, str):
                candidates.append(args.resume_from_checkpoint)
        other = []
        for folder in candidates:
            if os.path.isfile(os.path.join(folder, STATE_FILE)):
                if self.resume_from is None and not _same_trainer_state(folder, state):
                    other.append(folder)  # another run's checkpoint at the same step
                    continue
                return folder
        why = f" ({other} hold another run's trainer state)" if other else ""
        raise ValueError(f"the Trainer resumes at step {state.global_step} but no {STATE_FILE} "
                         f"was found in {candidates}{why}; give "
                         "MixtureCheckpointCallback(resume_from=checkpoint_dir) or use "
                         "MixtapeTrainer")  # fmt: skip

    # --- checks -----------------------------------------------------------------------------

    def _check_dataset_setup(self, args: TrainingArguments, dataloader: Any) -> None:
        mixed = self.source
        assert isinstance(mixed, MixedDataset)
        if args.world_size > 1:
            raise ValueError("a MixedDataset as train_dataset is exact in one process only "
                             "(accelerate dispatches or re-shards iterable datasets over ranks); "
                             "use MixtapeTrainer(train_loader=mixtape.get_loader(mixed, "
                             "batch_size))")  # fmt: skip
        if dataloader is not None and getattr(dataloader, "dataset", mixed) is not mixed:
            raise ValueError("MixtureCheckpointCallback was given a MixedDataset the Trainer "
                             "does not read (train_dataset is another object)")  # fmt: skip
        base = getattr(dataloader, "base_dataloader", dataloader)  # under accelerate's wrapper
        if base is not None and getattr(base, "generator", None) is None:
            # Else iter() draws the DataLoader's base seed from the global RNG, which a resumed
            # Trainer has just restored: every dropout mask after the resume would shift.
            generator = torch.Generator()
            generator.manual_seed(int(args.seed))
            base.generator = generator
        if mixed.batch_size != args.per_device_train_batch_size:
            raise ValueError(f"MixedDataset.batch_size is {mixed.batch_size}, "
                             f"per_device_train_batch_size {args.per_device_train_batch_size}: "
                             "they must be equal (DataLoader workers deal batches of "
                             "batch_size, and schedules count steps of it)")  # fmt: skip

    def _check_loader_setup(self, args: TrainingArguments) -> None:
        loader = self.source
        assert isinstance(loader, Loader)
        _check_loader(loader, args)


def _same_trainer_state(folder: str, state: TrainerState) -> bool:
    """Whether ``folder``'s trainer_state.json is the one the Trainer resumed from (a plain
    Trainer's ``train(resume_from_checkpoint=path)`` does not tell callbacks the path)."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return True  # nothing to compare with: the folder naming is all there is
    return bool(saved.get("global_step") == state.global_step
                and saved.get("total_flos") == state.total_flos
                and saved.get("log_history") == state.log_history)


def _check_loader(loader: Loader, args: TrainingArguments) -> None:
    if loader.config.batch_size != args.per_device_train_batch_size:
        raise ValueError(f"the Loader's batch_size is {loader.config.batch_size}, "
                         f"per_device_train_batch_size {args.per_device_train_batch_size}: they "
                         "must be equal (the Trainer counts examples with it)")  # fmt: skip
    if (loader.rank, loader.world_size) != (args.process_index, args.world_size):
        raise ValueError(f"the Loader serves rank {loader.rank} of {loader.world_size}, this "
                         f"process is rank {args.process_index} of {args.world_size}")


class MixtapeTrainerMixin:
    """Makes a Trainer read ``self.train_loader`` (a :class:`~mixtape.Loader`) as it is.

    Put it before the Trainer class (``class T(MixtapeTrainerMixin, SFTTrainer)``) and set
    ``train_loader``; add a :class:`MixtureCheckpointCallback` of the loader to checkpoint it.
    """

    train_loader: Loader

    def get_train_dataloader(self) -> Any:
        # Not passed through accelerator.prepare: the loader deals batches to ranks itself, and
        # the Trainer moves each batch to the device in _prepare_inputs.
        _check_loader(self.train_loader, self.args)  # type: ignore[attr-defined]
        return self.train_loader

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:  # fmt: skip
        """``Trainer.train``; the checkpoint folder it resumes from is given to the callbacks."""
        if resume_from_checkpoint is True:
            out = self.args.output_dir  # type: ignore[attr-defined]
            resume_from_checkpoint = get_last_checkpoint(out)  # type: ignore[no-untyped-call]
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({out})")
        if isinstance(resume_from_checkpoint, str | os.PathLike):
            for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]
                if isinstance(cb, MixtureCheckpointCallback):
                    cb.resume_from = os.fspath(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]


class MixtapeTrainer(MixtapeTrainerMixin, Trainer):
    """A ``Trainer`` that trains on a :class:`~mixtape.Loader` and checkpoints its state.

    ``train_loader``'s ``batch_size`` must be ``per_device_train_batch_size`` and its rank and
    world size the Trainer's; ``train_dataset`` defaults to the loader's dataset. A
    :class:`MixtureCheckpointCallback` of the loader is added unless one is given.
    """

    def __init__(self, *args: Any, train_loader: Loader, **kwargs: Any) -> None:
        if not isinstance(train_loader, Loader):
            raise TypeError(f"train_loader must be a mixtape Loader (mixtape.get_loader), got "
                            f"{type(train_loader).__name__}")  # fmt: skip
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(cb, MixtureCheckpointCallback) for cb in callbacks):
            callbacks.append(MixtureCheckpointCallback(train_loader))
        kwargs.setdefault("train_dataset", train_loader.dataset)
        kwargs["callbacks"] = callbacks
        self.train_loader = train_loader
        super().__init__(*args, **kwargs)
        _check_loader(train_loader, self.args)
