"""Influence of training samples on a probe set (DataInf), the mixture weights it implies, and
the tracker that steers a mixture with them during training."""

from __future__ import annotations

from typing import Any

from mixtape.influence.config import BACKENDS, InfluenceConfig
from mixtape.influence.datainf import (
    METHODS,
    DataInfCalculator,
    GhostLinear,
    ghost_linear_solve,
    ghost_linear_stats,
)
from mixtape.influence.gradients import (
    GhostGradientExtractor,
    causal_lm_loss,
    mean_gradient,
    per_sample_gradients,
    select_parameters,
)
from mixtape.influence.tracker import InfluenceTracker, LightningAdapter, TrainerCallbackAdapter
from mixtape.influence.weights import NORMALIZATIONS, MixtureWeightCalculator, WeightUpdate

__all__ = [
    "BACKENDS",
    "METHODS",
    "NORMALIZATIONS",
    "DataInfCalculator",
    "GhostGradientExtractor",
    "GhostLinear",
    "InfluenceConfig",
    "InfluenceLightningCallback",
    "InfluenceTracker",
    "InfluenceTrainerCallback",
    "LightningAdapter",
    "MixtureWeightCalculator",
    "TrainerCallbackAdapter",
    "WeightUpdate",
    "causal_lm_loss",
    "ghost_linear_solve",
    "ghost_linear_stats",
    "mean_gradient",
    "per_sample_gradients",
    "select_parameters",
]


def __getattr__(name: str) -> Any:
    """The trainer callbacks, built on first use (they import transformers / Lightning)."""
    if name == "InfluenceTrainerCallback":
        from mixtape.influence.callbacks import InfluenceTrainerCallback

        return InfluenceTrainerCallback
    if name == "InfluenceLightningCallback":
        from mixtape.influence.callbacks import lightning_callback_class

        return lightning_callback_class()
    raise AttributeError(f"module 'mixtape.influence' has no attribute {name!r}")
