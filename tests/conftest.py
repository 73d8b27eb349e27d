"""Shared test fixtures. Helpers (input factories, tolerances, comparisons, skip marks) live in
``lasnn.testing`` so that benchmarks and other packages can reuse them."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def nan_fill():
    """Fill every freshly allocated tensor with NaN (integers with their max) for the test's duration.

    ``torch.use_deterministic_algorithms(True)`` with ``fill_uninitialized_memory`` makes
    ``at::empty``/``at::empty_like`` (which the C++/CUDA launchers call) fill their result, so a kernel
    that leaves part of an output unwritten shows NaN instead of stale memory that happens to be right.
    ``tests/test_lif.py::test_nan_fill_reaches_dispatcher_allocations`` checks this really happens.
    """
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def no_backend_env(monkeypatch):
    """Run with ``LASNN_BACKEND`` unset, whatever the calling shell exported."""
    monkeypatch.delenv("LASNN_BACKEND", raising=False)
    return os.environ
