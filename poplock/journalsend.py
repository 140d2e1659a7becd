"""A native journal entry from relaylock, without the journal module (see sd_journal_sendv(3)).

relaylock runs once per SMTP connection and cannot afford to import systemd.journal,
yet its events should carry their MESSAGE_ID and POPLOCK_* fields like everyone else's.
The native protocol is one datagram of FIELD=value lines to journald's socket.
"""

import _socket
import posix

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def stderr_is_journal() -> bool:
    stream = posix.environ.get(b"JOURNAL_STREAM", b"")
    device, _, inode = stream.partition(b":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = posix.fstat(2)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def encode_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:  # the binary form: name, newline, 64-bit little-endian length, data
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def send_if_journal(message: str, priority: int, identifier: str, event=None, address: str | None = None) -> bool:
    """Send the entry when stderr is a journal stream; False (nothing sent) otherwise."""
    if not stderr_is_journal():
        return False
    fields = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", identifier)]
    if event is not None:
        fields += [("MESSAGE_ID", event.message_id), ("POPLOCK_EVENT", event.name)]
    if address is not None:
        fields.append(("POPLOCK_CLIENT_ADDRESS", address))
    return send(fields)


def send(fields: list[tuple[str, str]]) -> bool:
    """Send one entry to journald; False when journald cannot be reached."""
    datagram = b"".join(encode_field(name, value) for name, value in fields)
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        connection.sendto(datagram, JOURNAL_SOCKET)
    except OSError:
        return False
    finally:
        connection.close()
    return True
