"""Shared fixtures: a real journald, the POP3/IMAP servers besides Dovecot, and a poplock
configuration in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.journald import ensure_journald
from support.poplock import Setup
from support.popservers import install_servers


@pytest.fixture(scope="session")
def journald() -> None:
    """A running journald (started here when none runs) with /dev/log linked to it."""
    ensure_journald()


@pytest.fixture(scope="session")
def unpacked_servers() -> None:
    """Courier, Cyrus, mailutils, popa3d and solid-pop3d unpacked under /opt/poplock-test-servers.

    `make check` unpacks them before the tests start; here it is a no-op then (milliseconds),
    and on a machine where nobody has, the first test that needs them does it.
    """
    install_servers()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)
