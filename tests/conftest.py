"""Shared fixtures: the embedded model's tokenizer and model (converted once, cached on disk)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from harness.models import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def embedded():
    from harness.models import load

    return load(None, "cpu", "float32")
