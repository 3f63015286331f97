"""Fixtures for the trainer's tests: ``kernel`` turns the CPU kernels (``_fused``) on for one test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trainer.models import _fused


@pytest.fixture
def kernel() -> Iterator[None]:
    """The kernels on for the test (built once per clone, ~30-40 s), off again afterwards."""
    if not set(_fused._CPU_FLAGS) <= _fused._cpu_flags():
        pytest.skip(f"the CPU kernels need {', '.join(_fused._CPU_FLAGS)}")
    used, why = _fused.prepare()
    assert used, f"an AVX-512 CPU, but the kernels were not built: {why}"
    yield
    _fused.prepare(False)
