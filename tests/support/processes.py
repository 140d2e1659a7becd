"""Processes the tests start: whole process groups, and services used as context managers."""

from __future__ import annotations

import os
from pathlib import Path


def group_running(group: int) -> bool:
    """True while a process of `group` runs. Zombies do not count: once their parent has
    gone they wait for PID 1 to reap them, which some init processes do only every few seconds."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _parent, process_group = stat.rsplit(")", 1)[1].split()[:3]
        if int(process_group) == group and state not in ("Z", "X"):
            return True
    return False


def signal_group(group: int, signal_number: int) -> None:
    try:
        os.killpg(group, signal_number)
    except ProcessLookupError:
        pass


class Service:
    """Something with start() and stop(), used as a context manager; a failed start stops what it began."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def reachable_by_everyone(path: Path) -> Path:
    """Let other users reach `path` through its parents (o+x on each: traverse, not list).

    Servers that switch users, and tests that run programs as `nobody`, must get to files
    under temporary directories (and clones) that are private to root.
    """
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if parent.is_dir() and not mode & 0o001:
            parent.chmod(mode | 0o001)
    return path
