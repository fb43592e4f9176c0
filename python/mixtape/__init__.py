"""mixtape: fast, reproducible data mixing, packing and collation for language-model training."""

from __future__ import annotations

from mixtape.ops import build_info

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
]
