"""Shared test setup: GPU cases carry the ``cuda`` marker and skip when no GPU is usable."""

from __future__ import annotations

import pytest

from mixtape.ops import cuda_available

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no usable CUDA GPU (mixtape.build_info()['cuda_usable'])")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
