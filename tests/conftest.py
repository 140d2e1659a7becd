"""Shared fixtures: a real journald and a poplock configuration in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.journald import ensure_journald
from support.poplock import Setup


@pytest.fixture(scope="session")
def journald() -> None:
    """A running journald (started here when none runs) with /dev/log linked to it."""
    ensure_journald()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)
