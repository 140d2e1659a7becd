"""A NOTIFY_SOCKET for tests: receives what a service sends with sd_notify(3).

A thread keeps reading, as systemd does: a full socket would block the service.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path


class NotifySocket:
    def __init__(self, directory: Path):
        self.path = directory / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.socket.settimeout(0.1)
        self.messages: list[str] = []
        self._arrived = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                message = self.socket.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._arrived:
                self.messages.append(message)
                self._arrived.notify_all()

    @property
    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def received(self, prefix: str) -> list[str]:
        """Every line starting with `prefix` received so far."""
        with self._arrived:
            return [line for message in self.messages for line in message.split("\n") if line.startswith(prefix)]

    def wait_for(self, prefix: str, timeout: float = 15.0) -> str:
        """The first line starting with `prefix` (e.g. "READY=1", "STATUS="), waiting for it if need be."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = [line for message in self.messages for line in message.split("\n") if line.startswith(prefix)]
                if found:
                    return found[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {prefix!r} from the service; got {self.messages!r}")
                self._arrived.wait(remaining)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._thread.join()
            self.socket.close()
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "NotifySocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
