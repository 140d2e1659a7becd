"""poplock's exceptions. Library code raises these; only each executable's main() catches them."""


class PoplockError(Exception):
    """A problem poplock reports to the user in one line, without a traceback."""

    hint = ""


class ConfigError(PoplockError):
    """The configuration (or the static allow list) is invalid.

    Carries every problem found, each already prefixed with its file and line, so that
    all of them are reported at once.
    """

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join("  " + p for p in self.problems))


class AddressError(PoplockError, ValueError):
    """Text that should be an IP address or network is not one."""


class StoreError(PoplockError):
    """The grant store cannot be read or written."""


class StoreCorruptError(StoreError):
    """The store file exists but is not a gdbm file this gdbm can read."""


class StoreBusyError(StoreError):
    """The store stayed locked by another program for longer than the reader's bound."""


class JournalError(PoplockError):
    """The journal (or the journal files named) cannot be opened."""


class InputError(PoplockError):
    """A file the user named cannot be read (`poplock import FILE`)."""


class ProtocolError(PoplockError):
    """A peer broke the Postfix policy protocol."""
