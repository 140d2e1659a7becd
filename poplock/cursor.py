"""The reader's journal position in a file of its own: an opaque journal cursor, replaced atomically.

The cursor is first committed inside the store snapshot together with the grants it
covers (see reader.py); this file is written after that, and is what the reader
resumes from when the store has no cursor (a new or removed store), so that old
logins are not read again.
"""

from __future__ import annotations

import os


class CursorFileError(ValueError):
    """The cursor file exists but does not hold a cursor."""


def load_cursor(path: str) -> str | None:
    """The saved cursor, None when there is none yet; CursorFileError when unusable."""
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise CursorFileError(f"{path}: cannot read the saved journal cursor: {error}") from None
    cursor = text.strip()
    if not cursor or "\n" in cursor or "=" not in cursor:
        raise CursorFileError(f"{path}: does not hold a journal cursor")
    return cursor


def save_cursor(path: str, cursor: str) -> None:
    """Replace the cursor file atomically and durably (temp file, fsync, rename, fsync dir)."""
    temporary = f"{path}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, cursor.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
