"""Shared fixtures (only fixtures: plain helpers such as toy_texts and make_tiny_encoder are in helpers.py,
the serving ones in serving_helpers.py, and the commons' fixtures in commons/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_tiny_encoder, toy_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture
def toy_data():
    return toy_texts(120)
