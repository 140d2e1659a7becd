"""Shared fixtures: a real journald, poplock's executables, and a configuration in a temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.journald import ensure_journald

BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parent.parent


def poplock_command(name: str) -> str:
    """The path of one of poplock's executables in the environment running the tests."""
    path = BIN / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run the tests with the README's test command")
    return str(path)


@pytest.fixture(scope="session")
def journald() -> None:
    """A running journald (started here when none runs) with /dev/log linked to it."""
    ensure_journald()


class Setup:
    """A configuration file and the store, cursor and allow list it points at, all under one directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.config = directory / "poplock.conf"
        self.store = directory / "grants.db"
        self.cursor = directory / "cursor"
        self.static = directory / "static-allowed"
        self.write()

    def write(self, extra: str = "", window: str = "30min") -> Path:
        self.config.write_text(
            f"[Grants]\nWindow={window}\nStaticAllowFile={self.static}\n\n"
            f"[Store]\nPath={self.store}\n\n"
            f"[Reader]\nCursorPath={self.cursor}\n" + extra
        )
        return self.config

    def run(self, *arguments: str, check: bool = False) -> subprocess.CompletedProcess:
        """Run `poplock -c CONFIG ARGUMENTS...`."""
        return subprocess.run([poplock_command("poplock"), "-c", str(self.config), *arguments],
                              capture_output=True, text=True, check=check, timeout=60)

    def run_reader(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run `poplock-reader -c CONFIG --once ARGUMENTS...` to completion."""
        environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        return subprocess.run([poplock_command("poplock-reader"), "-c", str(self.config), "--once", *arguments],
                              capture_output=True, text=True, check=check, timeout=120, env=environment)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)
