"""Integrations with training frameworks; each submodule imports its framework when used."""

from __future__ import annotations

__all__: list[str] = []
