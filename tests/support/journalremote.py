"""A real systemd-journal-remote on loopback, and senders posing as POP hosts by source address.

The receiver runs with --split-mode=host, as an aggregating host would: each sender's
entries land in `remote-ADDRESS.journal` under the output directory, ADDRESS being the
TCP peer's. A "POP host" here is a source address on loopback (127.0.0.5, ::1), which
is all journal-remote looks at; uploads are Journal Export Format over HTTP, as
systemd-journal-upload sends (journal-remote.md in the recipes; the HTTPS path with the
real uploader is the cluster test's).
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from .journald import export_entry
from .ports import free_port, wait_for_port
from .processes import Service

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"


class JournalReceiver(Service):
    """systemd-journal-remote --listen-http on 127.0.0.1 (or ::1), writing under `directory`;
    `host=None` listens on every address, IPv6 and IPv4 on one socket (only inside a private
    network namespace: tests.support.netns)."""

    def __init__(self, directory: Path, *, host: str | None = "127.0.0.1"):
        self.directory = directory
        self.host = host
        self.port = free_port(host or "::")
        self.process: subprocess.Popen | None = None

    def start(self) -> "JournalReceiver":
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.host is None:
            listen = str(self.port)
        else:
            listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.log = open(self.directory.parent / f"journal-remote-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [JOURNAL_REMOTE, f"--listen-http={listen}", "--split-mode=host", "-o", f"{self.directory}/"],
            stdout=self.log, stderr=self.log, start_new_session=True)
        wait_for_port(self.host or "::1", self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.process is not None:
            self.log.close()
        self.process = None

    def upload(self, sender: str, entries: Iterable[Mapping[str, object]]) -> None:
        """Send entries from source address `sender`, as that host's uploader would."""
        body = b"".join(export_entry(_complete(fields)) for fields in entries)
        host = self.host or ("::1" if ":" in sender else "127.0.0.1")
        connection = http.client.HTTPConnection(host, self.port, timeout=10, source_address=(sender, 0))
        try:
            connection.request("POST", "/upload", body=body,
                               headers={"Content-Type": "application/vnd.fdo.journal"})
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        if response.status != 202 and response.status != 200:
            raise RuntimeError(f"journal-remote refused the upload from {sender}: {response.status} {answer!r}")

    def file_of(self, sender: str) -> Path:
        return self.directory / f"remote-{sender}.journal"

    def wait_for_file(self, sender: str, timeout: float = 10.0) -> Path:
        path = self.file_of(sender)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear")
            time.sleep(0.02)
        return path


def _complete(fields: Mapping[str, object]) -> dict:
    complete = {"__MONOTONIC_TIMESTAMP": fields["__REALTIME_TIMESTAMP"],
                "_BOOT_ID": "5eed" + "0" * 28}
    complete.update(fields)
    return complete
