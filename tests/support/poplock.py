"""poplock's own programs as the tests run them: a configuration under a temporary
directory, the CLI, and poplock-reader as a daemon that reports readiness over sd_notify."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .notify import NotifySocket

BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parents[2]


def command(name: str) -> str:
    """The path of one of poplock's executables in the environment running the tests."""
    path = BIN / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run the tests with the README's test command")
    return str(path)


def command_for_everyone(name: str) -> str:
    """command(), reachable by other users too (tests run some programs as `nobody`)."""
    from .processes import reachable_by_everyone

    reachable_by_everyone(REPOSITORY)  # relaylock's script imports the package from here
    return str(reachable_by_everyone(Path(command(name))))


def faketime(offset: str, *command_line: str) -> subprocess.CompletedProcess:
    """COMMAND_LINE run under libfaketime with its clock moved by OFFSET (faketime -f, e.g. "+41m")."""
    return subprocess.run(["faketime", "-f", offset, *command_line], capture_output=True, text=True, timeout=60)


def grant_keys(snapshot) -> list[bytes]:
    """The keys of an open store snapshot that are grants (not "#" bookkeeping)."""
    return [key for key in snapshot.keys() if not key.startswith((b"#", b"~"))]


class Setup:
    """A configuration file and the store, cursor and allow list it points at, all under one directory."""

    def __init__(self, directory: Path, window: str = "30min", extra: str = ""):
        self.directory = directory
        self.config = directory / "poplock.conf"
        self.store = directory / "grants.db"
        self.cursor = directory / "cursor"
        self.static = directory / "static-allowed"
        self.write(window=window, extra=extra)

    def write(self, window: str = "30min", extra: str = "") -> Path:
        self.config.write_text(
            f"[Grants]\nWindow={window}\nStaticAllowFile={self.static}\n\n"
            f"[Store]\nPath={self.store}\nReaderSocket={self.directory / 'reader.sock'}\n\n"
            f"[Reader]\nCursorPath={self.cursor}\n" + extra
        )
        return self.config

    def run(self, *arguments: str, check: bool = False) -> subprocess.CompletedProcess:
        """`poplock -c CONFIG ARGUMENTS...`, run to completion."""
        return subprocess.run([command("poplock"), "-c", str(self.config), *arguments],
                              capture_output=True, text=True, check=check, timeout=60)

    def run_reader(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        """`poplock-reader -c CONFIG --once ARGUMENTS...`, run to completion."""
        environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        return subprocess.run([command("poplock-reader"), "-c", str(self.config), "--once", *arguments],
                              capture_output=True, text=True, check=check, timeout=120, env=environment)

    def may_relay(self, address: str) -> bool:
        return self.run("check", address).returncode == 0

    def wait_until_allowed(self, address: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.may_relay(address):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} was not granted within {timeout}s")
            time.sleep(0.02)


class ReaderProcess:
    """poplock-reader following the journal, started and stopped like systemd would."""

    def __init__(self, setup: Setup, *arguments: str, environment: dict[str, str] | None = None,
                 journal: bool = False):
        self.setup = setup
        self.notify = NotifySocket(setup.directory)
        env = {key: value for key, value in os.environ.items() if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(self.notify.environment)
        env.update(environment or {})
        self.log = setup.directory / f"reader-{len(list(setup.directory.glob('reader-*.log')))}.log"
        with open(self.log, "wb") as log:
            if journal:
                env["JOURNAL_STREAM"] = journal_stream(log)
            self.process = subprocess.Popen(
                [command("poplock-reader"), "-c", str(setup.config), *arguments],
                stdout=log, stderr=log, env=env,
            )
        _wait_until_ready(self.process, self.notify, self.log)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, as `systemctl stop` sends; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would end it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(15)

    def __enter__(self) -> "ReaderProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.stop()
        self.notify.close()


class PolicyProcess:
    """poplock-policy listening on a loopback port (or the given --listen places)."""

    def __init__(self, setup: Setup, *listen: str, arguments: tuple[str, ...] = (), journal: bool = False):
        from .ports import free_port

        self.setup = setup
        self.port = free_port()
        self.listen = list(listen) or [f"127.0.0.1:{self.port}"]
        self.notify = NotifySocket(setup.directory)
        self.log = setup.directory / f"policy-{self.port}.log"
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        env.update(self.notify.environment)
        command_line = [command("poplock-policy"), "-c", str(setup.config), *arguments]
        for where in self.listen:
            command_line += ["--listen", where]
        with open(self.log, "wb") as log:
            if journal:
                env["JOURNAL_STREAM"] = journal_stream(log)
            self.process = subprocess.Popen(command_line, stdout=log, stderr=log, env=env)
        _wait_until_ready(self.process, self.notify, self.log)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(15)
        self.notify.close()
        return status

    def __enter__(self) -> "PolicyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def journal_stream(log) -> str:
    """$JOURNAL_STREAM naming the open file `log`: the program takes its standard error (that
    file) for a journal stream, as under systemd, and logs to journald natively, fields and all.
    (Lines journald cannot take still land in the file.)"""
    status = os.fstat(log.fileno())
    return f"{status.st_dev}:{status.st_ino}"


def _wait_until_ready(process: subprocess.Popen, notify: NotifySocket, log: Path, timeout: float = 15.0) -> None:
    """Until the service sends READY=1; fails at once, with its log, if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            notify.wait_for("READY=1", timeout=0.05)
            return
        except TimeoutError:
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    process.kill()
                process.wait(15)
                notify.close()
                raise RuntimeError(f"{process.args[0]} did not become ready (exit status {process.returncode}):\n"
                                   f"{log.read_text()}") from None
