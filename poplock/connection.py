"""What the per-connection programs (relaylock, poplock-logauth) share: who the client is,
reporting without the journal module, and chain-loading the next program.

They run once per connection, so this module keeps clear of `os`, `socket` and
systemd.journal. Reports carry MESSAGE_ID and POPLOCK_* fields all the same: the native
journal protocol is one datagram of FIELD=value lines to journald's socket
(sd_journal_sendv(3)). Under inetd, standard error is the client's connection like
standard input and output: then nothing may be written to it.
"""

import _socket
import posix


def client_address(environment: dict) -> str | None:
    """The peer of standard input, else $REMOTE_ADDR, else $TCPREMOTEIP (raw text)."""
    try:
        connection = _socket.socket(fileno=0)
    except OSError:  # not a socket: a pipe, a terminal
        connection = None
    if connection is not None:
        try:
            if connection.family in (_socket.AF_INET, _socket.AF_INET6):
                return connection.getpeername()[0]
        except OSError:
            pass
        finally:
            connection.detach()  # fd 0 belongs to the SMTP server
    for name in (b"REMOTE_ADDR", b"TCPREMOTEIP"):
        value = environment.get(name)
        if value:
            return value.decode("ascii", "replace")
    return None


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


def stderr_is_connection() -> bool:
    """Standard error is the same socket as standard input (inetd hands the client all three)."""
    try:
        error, connection = posix.fstat(2), posix.fstat(0)
    except OSError:
        return False
    is_socket = error.st_mode & 0o170000 == 0o140000
    return is_socket and (error.st_dev, error.st_ino) == (connection.st_dev, connection.st_ino)


def report(identifier: str, message: str, priority: int = 6, event=None, address: str | None = None,
           user: str | None = None) -> None:
    """One line: to the journal when stderr is a journal stream or the client's connection, else stderr.

    `user` (the login that opened the grant) goes into the journal entry's POPLOCK_USER
    field only, never into the line on stderr."""
    if stderr_is_journal():
        if send_entry(identifier, message, priority, event, address, user):
            return
    elif stderr_is_connection():
        send_entry(identifier, message, priority, event, address, user)  # the journal, or nowhere
        return
    try:
        posix.write(2, f"{identifier}: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def send_entry(identifier: str, message: str, priority: int, event=None, address: str | None = None,
               user: str | None = None) -> bool:
    fields = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", identifier)]
    if event is not None:
        fields += [("MESSAGE_ID", event.message_id), ("POPLOCK_EVENT", event.name)]
    if address is not None:
        fields.append(("POPLOCK_CLIENT_ADDRESS", address))
    if user is not None:
        fields.append(("POPLOCK_USER", user))
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


def ask_reader(path: str, timeout: float) -> bool:
    """Ask poplock-reader to read the journal up to now and commit (reader.py's SyncListener);
    True once it has, False when it did not answer within `timeout` seconds in all."""
    return _ask_reader(path, timeout, False) is not None


def ask_reader_for_grants(path: str, timeout: float) -> dict[str, bytes] | None:
    """As ask_reader(), and when the reader runs as root or as this process's user (SO_PEERCRED),
    ask for the grants the read made: key -> encoded grant, which the reader tells before its
    commit is synced and published. {} when it told none; None when it did not answer in time."""
    return _ask_reader(path, timeout, True)


def _ask_reader(path: str, timeout: float, grants: bool) -> dict[str, bytes] | None:
    import time

    deadline = time.monotonic() + timeout
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path)
        told = grants and peer_is_us(connection)
        connection.sendall(b"sync grants\n" if told else b"sync\n")
        answer = b""
        while not answer.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            connection.settimeout(remaining)
            data = connection.recv(65536)
            if not data:
                return None
            answer += data
        if answer == b"ok\n":
            return {}
        if told and answer.startswith(b"ok {"):
            import json

            try:
                found = json.loads(answer[3:])
            except ValueError:
                return None
            return {key: value.encode("utf-8", "surrogateescape") for key, value in found.items()
                    if isinstance(key, str) and isinstance(value, str)} if isinstance(found, dict) else None
        return None
    except OSError:
        return None
    finally:
        connection.close()


def peer_is_us(connection) -> bool:
    """The socket's peer runs as root or as this process's user (SO_PEERCRED: the kernel's word)."""
    import struct

    try:
        _, uid, _ = struct.unpack("3i", connection.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
    except OSError:
        return False
    return uid in (0, posix.geteuid())


def execute(program: list[str], environment: dict) -> str:
    """Exec `program` as execvpe(3) would, searching $PATH like a shell; returns only when
    nothing could be executed, with the reason."""
    name = program[0]
    if "/" in name:
        candidates = [name]
    else:
        path = environment.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin").decode("utf-8", "replace")
        candidates = [f"{directory or '.'}/{name}" for directory in path.split(":")]
    error = None
    for candidate in candidates:
        try:
            posix.execve(candidate, program, environment)
        except OSError as failure:
            if error is None or failure.errno != 2:  # keep the most telling error (not ENOENT)
                error = failure
    return error.strerror if error is not None else "not found"
