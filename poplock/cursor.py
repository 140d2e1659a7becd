"""A copy of the reader's journal position in a file of its own, replaced atomically.

The cursor is committed inside the store snapshot together with the grants it covers
(see reader.py), and only that one is resumed from: a store without a cursor (new,
removed or damaged) is rebuilt from the journal one window back. This file is written
after each commit for people and tools that want to see where the reader is.
"""

from __future__ import annotations

import os


def save_cursor(path: str, cursor: str) -> None:
    """Replace the cursor file atomically (temp file, rename). Not synced: the store holds
    the position durably, and a login's commit must not pay for a second copy's syncs."""
    temporary = f"{path}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, cursor.encode("ascii") + b"\n")
    finally:
        os.close(fd)
    os.replace(temporary, path)
