"""Shared fixtures: tiny models and data built in milliseconds (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TinyMLP

__all__ = ["TinyMLP"]  # re-exported: older imports read it from here; new code imports tests.helpers


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    return TinyMLP()
