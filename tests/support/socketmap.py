"""poplock-socketmap as the tests run it, and a socketmap client that speaks netstrings to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from .notify import NotifySocket
from .poplock import Setup, _wait_until_ready, command


class SocketmapProcess:
    """poplock-socketmap listening on a loopback port (or the given --listen places).

    `log` holds what it wrote; with `verbose` (-v) that includes every lookup and the
    key as the MTA spelled it.
    """

    def __init__(self, setup: Setup, *listen: str, arguments: tuple[str, ...] = (), verbose: bool = False):
        from .ports import free_port

        self.setup = setup
        self.port = free_port()
        self.listen = list(listen) or [f"127.0.0.1:{self.port}"]
        self.notify = NotifySocket(setup.directory)
        self.log = setup.directory / f"socketmap-{self.port}.log"
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        env.update(self.notify.environment)
        command_line = [command("poplock-socketmap"), "-c", str(setup.config), *arguments]
        if verbose:
            command_line.append("-v")
        for where in self.listen:
            command_line += ["--listen", where]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command_line, stdout=log, stderr=log, env=env)
        _wait_until_ready(self.process, self.notify, self.log)
        # READY=1 goes out just before the line naming the sockets: wait for it too, so that a
        # test counting log lines from now on does not count it.
        deadline = time.monotonic() + 10
        while "answering socketmap lookups" not in self.output():
            if time.monotonic() > deadline:
                raise RuntimeError(f"poplock-socketmap is ready but never said where it listens:\n{self.output()}")
            time.sleep(0.005)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(15)
        self.notify.close()
        return status

    def __enter__(self) -> "SocketmapProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def netstring(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return b"%d:%s," % (len(data), data)


class SocketmapClient:
    """One connection to a socketmap server, over TCP (`where` a port) or a unix socket (a path)."""

    def __init__(self, where: int | str | Path, source: str = "127.0.0.1", timeout: float = 10):
        if isinstance(where, int):
            self.socket = socket.create_connection(("127.0.0.1", where), timeout=timeout, source_address=(source, 0))
        else:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socket.settimeout(timeout)
            self.socket.connect(str(where))
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def reply(self) -> str:
        """The content of the next reply netstring; ConnectionError when the server closes first."""
        while True:
            length, colon, rest = self.pending.partition(b":")
            if colon and len(rest) > int(length):
                if rest[int(length)] != ord(","):
                    raise AssertionError(f"not a netstring: {self.pending[:80]!r}")
                self.pending = rest[int(length) + 1:]
                return rest[:int(length)].decode()
            data = self.socket.recv(4096)
            if not data:
                raise ConnectionError(f"closed by the server after {self.pending!r}")
            self.pending += data

    def ask(self, key: str, name: str = "poplock") -> str:
        self.send(netstring(f"{name} {key}"))
        return self.reply()

    def closed_by_peer(self, timeout: float) -> bool:
        """The server closes the connection within `timeout` seconds (False: it stays open)."""
        self.socket.settimeout(timeout)
        try:
            return self.socket.recv(4096) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.socket.settimeout(10)

    def close(self) -> None:
        self.socket.close()


# Raw socket helpers for the fault tests (the same shapes as tests/integration/test_policy_faults.py).

def connect_tcp(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` from the loopback address `source` (any of 127.0.0.0/8)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def read_until_closed(connection: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closing)."""
    connection.settimeout(timeout)
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def readable(connection: socket.socket, timeout: float) -> bool:
    """Something (data, or the end) can be read within `timeout` seconds; poll(2), as fds pass 1024."""
    import select

    poller = select.poll()
    poller.register(connection, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def closed_now(connection: socket.socket) -> bool:
    """The server has closed this connection (without waiting for it to)."""
    if not readable(connection, 0):
        return False
    try:
        return connection.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def send_ignoring_close(connection: socket.socket, data: bytes) -> None:
    """Send what the server lets through; it may close the connection before the end."""
    try:
        connection.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def split_replies(data: bytes) -> list[bytes]:
    """The contents of the reply netstrings in `data`; AssertionError if anything else is there."""
    replies = []
    while data:
        length, colon, rest = data.partition(b":")
        assert colon and length.isdigit() and len(rest) > int(length) and rest[int(length)] == ord(","), \
            f"not a whole netstring: {data[:80]!r}"
        replies.append(rest[:int(length)])
        data = rest[int(length) + 1:]
    return replies


class AnsweringReader:
    """A stand-in for poplock-reader's ReaderSocket= that answers every `sync` at once with `ok`:
    the fresh look then costs a round trip and no warning, and grants come only from the store."""

    def __init__(self, path: Path):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.questions = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as lines:
            for line in lines:
                if line in (b"sync\n", b"sync grants\n"):  # grants: none to tell, as a reader with nothing new
                    self.questions += 1
                    connection.sendall(b"ok\n")

    def close(self) -> None:
        self.listener.close()
        self.path.unlink(missing_ok=True)
