"""Shared fixtures: the embedded model's tokenizer and model (converted once, cached on disk)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, every Triton kernel runs in the interpreter (correctness only). This must be set before any test
# module imports triton: the choice is made when a kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every selection whose kept counts a policy states (to skip the device sync) checks them against its mask.
import methods.formats  # noqa: E402

methods.formats.CHECK_KEPT = True


@pytest.fixture(scope="session")
def tokenizer():
    from harness.models import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def embedded():
    from harness.models import load

    return load(None, "cpu", "float32")


@pytest.fixture
def gluon_strict(monkeypatch):
    """The Gluon kernel module with its fallback switched off: a kernel that fails to build or launch raises (and
    fails the test) instead of quietly handing the plan to the Triton kernel."""
    ga = pytest.importorskip("kernels.gluon_attention", reason="this Triton has no Gluon")

    def _raise(exc: Exception) -> None:
        raise exc

    monkeypatch.setattr(ga, "disable", _raise)
    return ga
