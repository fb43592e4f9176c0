"""Influence of training samples on a probe set (DataInf) and the mixture weights it implies."""

from __future__ import annotations

from mixtape.influence.datainf import (
    METHODS,
    DataInfCalculator,
    GhostLinear,
    ghost_linear_solve,
    ghost_linear_stats,
)
from mixtape.influence.weights import NORMALIZATIONS, MixtureWeightCalculator, WeightUpdate

__all__ = [
    "METHODS",
    "NORMALIZATIONS",
    "DataInfCalculator",
    "GhostLinear",
    "MixtureWeightCalculator",
    "WeightUpdate",
    "ghost_linear_solve",
    "ghost_linear_stats",
]
