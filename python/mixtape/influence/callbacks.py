"""Trainer adapters of :class:`~mixtape.influence.tracker.InfluenceTracker`: transformers'
``TrainerCallback`` and Lightning's ``Callback``. Imported only when used (the frameworks load
lazily; Lightning is optional)."""

from __future__ import annotations

from typing import Any

from mixtape.influence.tracker import LightningAdapter, TrainerCallbackAdapter

__all__ = ["InfluenceTrainerCallback", "lightning_callback_class"]

from transformers import TrainerCallback


class InfluenceTrainerCallback(TrainerCallbackAdapter, TrainerCallback):
    """``Trainer(..., callbacks=[InfluenceTrainerCallback(tracker)])``: probe gradients at
    train begin, an influence update after every ``update_interval``-th optimizer step."""


_LIGHTNING: type | None = None


def lightning_callback_class() -> type:
    """``InfluenceLightningCallback``: :class:`LightningAdapter` on Lightning's ``Callback``
    (``lightning.pytorch`` or ``pytorch_lightning``); ImportError when neither is installed."""
    global _LIGHTNING
    if _LIGHTNING is None:
        import importlib

        base: Any = None
        for module in ("lightning.pytorch", "pytorch_lightning"):
            try:
                base = importlib.import_module(module).Callback
                break
            except ImportError:
                continue
        if base is None:
            raise ImportError("InfluenceLightningCallback needs lightning (pip install "
                              "lightning) or pytorch_lightning")  # fmt: skip
        _LIGHTNING = type("InfluenceLightningCallback", (LightningAdapter, base),
                          {"__doc__": LightningAdapter.__doc__,
                           "__module__": __name__})  # fmt: skip
    return _LIGHTNING
