"""A NOTIFY_SOCKET for tests: receives what a service sends with sd_notify(3)."""

from __future__ import annotations

import socket
import time
from pathlib import Path


class NotifySocket:
    def __init__(self, directory: Path):
        self.path = directory / "notify.sock"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.messages: list[str] = []

    @property
    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def wait_for(self, prefix: str, timeout: float = 15.0) -> str:
        """The first assignment (e.g. "READY=1", "STATUS=") received, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                for line in message.split("\n"):
                    if line.startswith(prefix):
                        return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {prefix!r} from the service; got {self.messages!r}")
            self.socket.settimeout(remaining)
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except socket.timeout:
                pass

    def received(self, prefix: str) -> list[str]:
        """Every line starting with `prefix` received so far (without waiting)."""
        self.socket.setblocking(False)
        try:
            while True:
                self.messages.append(self.socket.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.socket.setblocking(True)
        return [line for message in self.messages for line in message.split("\n") if line.startswith(prefix)]

    def close(self) -> None:
        self.socket.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "NotifySocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
