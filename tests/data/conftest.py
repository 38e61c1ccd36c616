"""Fixtures of the data tests: a small source folder in each layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def classes_dir(make_dataset: Callable[..., Path]) -> Path:
    return make_dataset("classes")


@pytest.fixture
def industrial_dir(make_dataset: Callable[..., Path]) -> Path:
    return make_dataset("industrial")
