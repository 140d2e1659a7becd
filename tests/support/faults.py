"""Faults on demand: a full disk at any write point, a really full filesystem, and store commits in child processes.

The disk-full tests fail a commit at each call that changes the disk, one after the other,
with enospc.c (an LD_PRELOAD shim, built here with gcc), and check what is left on disk from
other processes. Commits run in a child process, this very file run as a script,

    python -P faults.py writer PATH

which keeps one StoreWriter and takes steps on stdin, one line each: "commit CHANGE", "dump",
"arm" and "disarm" (the shim's count); WriterProcess drives it.

A store's state is plain data, so that old and new can be compared value by value:
{"grants": {address: [expires_at, login_at, source]}, "metadata": {name: text}}. A change is
{"clear": bool, "extend_all": seconds, "grants": {address: [...]}, "metadata": {name: text}},
applied in that order (apply_change, the same code in the tests and in the child).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve()
# -P: not this directory first on sys.path, where support/poplock.py would hide the poplock package.
SCRIPT = (sys.executable, "-P", str(HERE))
SHIM_SOURCE = HERE.with_name("enospc.c")
# What may be next to the store (store.py): PATH, the writers' PATH.lock, the temporary PATH.new that a
# failed commit may leave behind (the next commit replaces it), and the base that PATH names, if any.
DOCUMENTED_SUFFIXES = ("", ".lock", ".new")
BASE_KEY = b"#base"  # in PATH: the name of its base, a file in the same directory (store.py)
SHIM_VARIABLES = ("LD_PRELOAD", "ENOSPC_FAIL_AT", "ENOSPC_PERSIST", "ENOSPC_LOG")


# ---- plain-data states and changes ----

def apply_change(state: dict, change: dict) -> dict:
    """The state after `change` (pure: the tests predict with it what the child commits)."""
    grants = {} if change.get("clear") else {address: list(value) for address, value in state["grants"].items()}
    extend = change.get("extend_all", 0)
    if extend:
        grants = {address: [expires_at + extend, login_at, source]
                  for address, (expires_at, login_at, source) in grants.items()}
    grants.update({address: list(value) for address, value in change.get("grants", {}).items()})
    metadata = dict(state["metadata"])
    metadata.update(change.get("metadata", {}))
    return {"grants": grants, "metadata": metadata}


def describe_difference(found: dict, expected: dict) -> str:
    """A short account of how two states differ, for assertion messages."""
    found_grants, expected_grants = found["grants"], expected["grants"]
    missing = sorted(expected_grants.keys() - found_grants.keys())
    extra = sorted(found_grants.keys() - expected_grants.keys())
    changed = sorted(address for address in expected_grants.keys() & found_grants.keys()
                     if list(found_grants[address]) != list(expected_grants[address]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} grants missing (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} grants extra (e.g. {extra[:3]})")
    if changed:
        parts.append(f"{len(changed)} grants with other values (e.g. {changed[0]}: "
                     f"{found_grants[changed[0]]} instead of {expected_grants[changed[0]]})")
    if found["metadata"] != expected["metadata"]:
        parts.append(f"metadata {found['metadata']} instead of {expected['metadata']}")
    return "; ".join(parts) or "no difference"


# ---- the shim ----

def build_enospc_shim(directory: Path) -> Path:
    """enospc.so compiled from enospc.c into `directory`."""
    return build_shim(SHIM_SOURCE, directory)


def build_shim(source: Path, directory: Path) -> Path:
    """An LD_PRELOAD shim compiled from `source` (tests/support/*.c) into `directory` (warnings are errors)."""
    output = directory / source.with_suffix(".so").name
    result = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                             "-o", str(output), str(source), "-ldl"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"cannot build {source.name}:\n{result.stderr}")
    return output


def clean_environment() -> dict[str, str]:
    """This process's environment without the shim and without writing .pyc files into the tree."""
    environment = {key: value for key, value in os.environ.items() if key not in SHIM_VARIABLES}
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    return environment


def shim_environment(shim: Path, fail_at: int, *, persist: bool = False, log: Path | None = None) -> dict[str, str]:
    environment = clean_environment()
    environment.update(LD_PRELOAD=str(shim), ENOSPC_FAIL_AT=str(fail_at), ENOSPC_PERSIST="1" if persist else "0")
    if log is not None:
        environment["ENOSPC_LOG"] = str(log)
    return environment


def stray_files(store: Path, state: dict) -> list[str]:
    """Files next to the store other than the documented ones, from a dump() (which lists the directory, so
    that it works in a private mount too); the store must have a directory of its own."""
    documented = {store.name + suffix for suffix in DOCUMENTED_SUFFIXES}
    if state["base"] is not None:
        documented.add(state["base"])
    return sorted(name for name in state["files"] if name not in documented)


# ---- the writer processes, seen from the tests ----

class WriterProcess:
    """A Python process with one StoreWriter for `store` that does one step at a time when told.

    Steps answer with one JSON line each: commit() gives {"outcome": "committed"} or {"outcome":
    "failed", "error": class name, "message": text, "store_error": bool}, or None when the process
    died (crash() says of what); dump() gives the store's state as read_snapshot() reads it;
    arm() and disarm() start and stop enospc.so's count (disarm returns how many write points it saw).
    """

    def __init__(self, store: Path, *, environment: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
        self.store = store
        self.process = subprocess.Popen([*prefix, *SCRIPT, "writer", str(store)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=environment or clean_environment())
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _step(self, command: str, argument=None, timeout: float = 60.0):
        try:
            self.process.stdin.write(command + ("" if argument is None else " " + json.dumps(argument)) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: the answer is None
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"the writer process did not answer {command!r} within {timeout}s; "
                                 f"stderr:\n{self.stderr()}") from None
        return json.loads(line) if line is not None else None

    def commit(self, change: dict) -> dict | None:
        return self._step("commit", change)

    def dump(self) -> dict:
        """The store's state as read_snapshot() reads it, with what store.py's invariants need besides:
        "undecodable" (how many entries it could not read), "files" (the store directory's listing)
        and "base" (the base file PATH names, or None)."""
        state = self._step("dump")
        if state is None or "error" in state:
            raise AssertionError(f"reading {self.store} failed: {state}\n{self.stderr()}")
        return state

    def arm(self) -> None:
        self._step("arm")

    def disarm(self) -> int:
        return self._step("disarm")["points"]

    def close(self, timeout: float = 60.0) -> int:
        """Ends it; returns its exit status (negative: killed by that signal)."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(15)

    def stderr(self) -> str:
        return "".join(self._stderr)

    def crash(self) -> str | None:
        """How the process died, if a signal ended it: e.g. "SIGBUS"."""
        code = self.process.poll()
        if code is None:
            try:
                code = self.process.wait(15)
            except subprocess.TimeoutExpired:
                return None
        return signal.Signals(-code).name if code < 0 else None

    def __enter__(self) -> "WriterProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state(store: Path, *, prefix: tuple[str, ...] = ()) -> dict:
    """The store's grants and metadata as a fresh process without the shim reads them (`prefix`: e.g.
    nsenter into a namespace); AssertionError if it holds entries that cannot be read."""
    with WriterProcess(store, prefix=prefix) as reader:
        return whole(reader.dump())


def whole(state: dict) -> dict:
    """The grants and metadata of a dump(), once checked that nothing in it was unreadable."""
    assert state["undecodable"] == 0, f"{state['undecodable']} entries cannot be read"
    return {"grants": state["grants"], "metadata": state["metadata"]}


def commit(store: Path, change: dict, *, prefix: tuple[str, ...] = ()) -> dict:
    """One clean commit of `change` by a fresh writer process without the shim; returns its outcome."""
    with WriterProcess(store, prefix=prefix) as writer:
        outcome = writer.commit(change)
        if outcome is None:
            raise AssertionError(f"a clean commit to {store} crashed ({writer.crash()}):\n{writer.stderr()}")
        return outcome


class PrivateTmpfs:
    """A small tmpfs mounted at `mount_point` in a mount namespace of its own (unshare(1)), which other
    processes can't see; commands run inside it through `prefix` (nsenter(1)). Needs root."""

    def __init__(self, mount_point: Path, size: str):
        mount_point.mkdir(parents=True, exist_ok=True)
        self.mount_point = mount_point
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             f"mount -t tmpfs -o size={size},mode=0755 poplock-test-tmpfs '{mount_point}' && echo mounted "
             "&& exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()  # waits for the mount, or for the shell to fail
        if line.strip() != "mounted":
            self.stop()
            raise RuntimeError(f"cannot mount a tmpfs in a private namespace: {self.process.stderr.read()}")
        self.prefix = ("nsenter", f"--target={self.process.pid}", "--mount", "--")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *command], capture_output=True, text=True, check=check, timeout=60,
                              env=clean_environment())

    def python(self, code: str, *arguments: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-c", code, *arguments)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the last process in the namespace: the tmpfs goes with it
        self.process.wait(15)

    def __enter__(self) -> "PrivateTmpfs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the child processes, from inside ----

def _state_of(snapshot) -> dict:
    return {"grants": {address: [grant.expires_at, grant.login_at, grant.source]
                       for address, grant in snapshot.grants.items()},
            "metadata": dict(snapshot.metadata)}


def _base_named(path: str) -> str | None:
    import _gdbm

    try:
        top = _gdbm.open(path, "r")
    except _gdbm.error:
        return None
    try:
        name = top.get(BASE_KEY)
    finally:
        top.close()
    return name.decode() if name is not None else None


def _apply_to_transaction(transaction, change: dict) -> None:
    from poplock.grants import Grant

    before = {address: [grant.expires_at, grant.login_at, grant.source]
              for address, grant in transaction.grants.items()}
    after = apply_change({"grants": before, "metadata": dict(transaction.metadata)}, change)
    for address in before.keys() - after["grants"].keys():
        del transaction.grants[address]
    for address, value in after["grants"].items():
        if before.get(address) != value:
            transaction.grants[address] = Grant(address, *value)
    transaction.metadata.update(after["metadata"])


def _commit_once(writer, change: dict) -> dict:
    from poplock.errors import StoreError

    try:
        with writer.transaction() as transaction:
            _apply_to_transaction(transaction, change)
    except Exception as error:  # noqa: BLE001 - anything but a StoreError is what the tests look for
        return {"outcome": "failed", "error": type(error).__name__, "message": str(error),
                "store_error": isinstance(error, StoreError)}
    return {"outcome": "committed"}


def _serve(path: str) -> int:
    """The writer process's loop: one step per line on stdin, one JSON line per step on stdout."""
    import ctypes

    from poplock.store import read_snapshot
    from poplock.storewriter import StoreWriter

    writer = StoreWriter(path)
    shim = None
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "commit":
            answer = _commit_once(writer, json.loads(argument))
        elif command == "dump":
            try:
                snapshot = read_snapshot(path, busy_timeout=1.0)
            except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
                answer = {"error": f"{type(error).__name__}: {error}"}
            else:
                answer = {**_state_of(snapshot), "undecodable": len(snapshot.undecodable),
                          "files": sorted(os.listdir(os.path.dirname(path))), "base": _base_named(path)}
        elif command == "arm":
            shim = ctypes.CDLL(None)  # enospc.so's functions, through LD_PRELOAD
            shim.enospc_disarm.restype = ctypes.c_long
            shim.enospc_arm()
            answer = {}
        elif command == "disarm":
            answer = {"points": shim.enospc_disarm()}
        else:
            answer = {"error": f"unknown step {command!r}"}
        print(json.dumps(answer), flush=True)
    return 0


def main(arguments: list[str]) -> int:
    command, path = arguments
    if command != "writer":
        raise SystemExit(f"unknown command {command!r}")
    return _serve(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
