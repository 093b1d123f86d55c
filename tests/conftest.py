"""Fixtures shared by the integration tests that run engine processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.test_sidecar_support import unique_model


@pytest.fixture
def model() -> Iterator[str]:
    """A model name unique to the test; engines left running under it fail the test (and are killed)."""
    yield from unique_model()
