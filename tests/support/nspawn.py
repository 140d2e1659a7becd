"""A real systemd as PID 1, booted by systemd-nspawn, for system tests.

The container shares the host's /usr (read-only) and the host's network, and has an
/etc and /var of its own under a root directory the test builds: programs installed
on the host are there, anything else is installed into the root (e.g. by
`make install DESTDIR=ROOT` with paths outside /usr). It runs its own journald, so a
service started inside gets a real _SYSTEMD_UNIT field.

There is no systemd on the host to register the container with, so `machinectl` and
`systemd-run -M` cannot reach it; commands run inside with nsenter(1) into the
container's namespaces (systemctl, journalctl, systemd-run all work from there).
systemd-nspawn reports the container's PID 1 and its readiness over sd_notify
(X_NSPAWN_LEADER_PID=, READY=1). Stopping systemd-nspawn with SIGTERM powers the
container off cleanly; it also gets SIGTERM if the test process dies without
cleaning up, so no container outlives its test run.

Each container runs in a control group of its own, created here: systemd-nspawn puts
the container in a "payload" group beside its own "supervisor" group, under whatever
group it was started in, so two containers started from the same group would share
one. On a host with a cgroup2 hierarchy (hybrid or unified) the container gets a
unified hierarchy (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1): under the legacy one, systemd
in a container hears of no emptied group, and a service whose last processes leave
after its main process (Dovecot's) stays "deactivating" until its stop timeout. Once
the container is off, whatever is left in its group is killed and the group removed.
See systemd-nspawn(1), nsenter(1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Self, TypeVar

from .notify import NotifySocket

NSPAWN = "/usr/bin/systemd-nspawn"
NSENTER = "/usr/bin/nsenter"
SETPRIV = "/usr/bin/setpriv"

# Host files a root starts with: the users and groups of the programs in the shared /usr
# (dovecot, mail, systemd-journal, ...), and the configuration some of them cannot do without.
HOST_ETC = ("passwd", "group", "os-release", "groff", "manpath.config")

# What commands run inside get instead of the test runner's environment.
ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

# Hierarchies a container's own group is made in: the cgroup2 one (hybrid or unified host),
# and the legacy name=systemd one, in which systemd-nspawn places the container too.
CGROUP2_MOUNTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
CGROUP_SYSTEMD_V1 = Path("/sys/fs/cgroup/systemd")

# Moves the shell into the groups listed in $CGROUP_PROCS, then runs the rest of the command line.
ENTER_CGROUPS = 'for procs in $CGROUP_PROCS; do echo $$ > "$procs" || exit 70; done; exec "$@"'

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30.0, pause: float = 0.05) -> T:
    """Poll `condition` until it returns something true, and return that; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)


def build_root(root: Path, host_etc: Iterable[str] = HOST_ETC) -> Path:
    """A minimal bootable root for a container that binds the host's /usr.

    Debian is merged-/usr, so /bin, /sbin and /lib are links into it. /etc starts with
    copies of the named host files and an empty machine-id (systemd then makes up one
    for the boot). No /var/log/journal: the journal stays in /run, as on a host
    without persistent journaling.
    """
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for directory in ("usr", "etc/systemd/system", "proc", "sys", "dev", "run", "tmp", "var/lib", "var/tmp",
                      "root", "srv", "opt"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    for name in ("bin", "sbin", "lib", "lib64"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"usr/{name}")
    for name in host_etc:
        source = Path("/etc") / name
        if source.is_dir():
            shutil.copytree(source, root / "etc" / name, symlinks=True, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, root / "etc" / name)
    (root / "etc/machine-id").write_text("")
    return root


class Container:
    """systemd booted in `root` by systemd-nspawn; a context manager that powers it off on exit.

    `name` is the container's host name. Its console goes to `console` (default: next to the root).
    """

    def __init__(self, root: Path, *, name: str = "poplock-test", target: str = "multi-user.target",
                 console: Path | None = None):
        self.root = root
        self.name = name
        self.target = target
        self.console = console or root.with_name(root.name + ".console")
        self.process: subprocess.Popen | None = None
        self.leader: int | None = None
        self._notify: NotifySocket | None = None
        self._cgroup = _ControlGroup()

    # --- lifetime ---------------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> Self:
        """Start the container and return once its systemd has finished booting."""
        self._notify = NotifySocket(self.root.parent)
        environment = {"PATH": ENVIRONMENT["PATH"], **self._notify.environment}
        self._cgroup.create()
        environment["CGROUP_PROCS"] = " ".join(str(path / "cgroup.procs") for path in self._cgroup.paths)
        if self._cgroup.unified is not None:
            environment["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        command = [
            "/bin/sh", "-c", ENTER_CGROUPS, "sh",
            # The container goes down with the test process, even one killed with SIGKILL.
            SETPRIV, "--pdeathsig", "SIGTERM", "--",
            NSPAWN, "--quiet", f"--directory={self.root}", f"--machine={self.name}",
            # No systemd on the host to register with or to create a scope.
            "--register=no", "--keep-unit",
            "--bind-ro=/usr",
            # The root's /etc stays as the test built it; the container's journal stays its own.
            "--resolv-conf=off", "--timezone=off", "--link-journal=no",
            "--notify-ready=yes",
            "--boot", "--", f"systemd.unit={self.target}",
        ]
        with open(self.console, "ab") as console:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=environment, start_new_session=True,
            )
        try:
            self.leader = int(self._wait_for_notification("X_NSPAWN_LEADER_PID=", timeout).partition("=")[2])
            self._wait_for_notification("READY=1", timeout)
            # READY=1 comes when PID 1 has queued the boot; is-system-running --wait returns once every job is done.
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
            if state not in ("running", "degraded"):
                raise RuntimeError(f"the container did not boot: {state}\n{self.console_tail()}")
        except BaseException:
            self.poweroff()
            raise
        return self

    def _wait_for_notification(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._notify.wait_for(prefix, timeout=0.2)
            except TimeoutError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"systemd-nspawn exited with {self.process.returncode} before "
                                       f"{prefix.rstrip('=')}\n{self.console_tail()}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {prefix!r} from systemd-nspawn within {timeout:.0f}s\n"
                                       f"{self.console_tail()}") from None

    def poweroff(self, timeout: float = 30.0) -> None:
        """Power the container off cleanly (SIGTERM to systemd-nspawn); kill it if that takes too long.

        The container's journal is saved beside the root first (it lives in the container's /run).
        Then nothing of the container may be left: its control group is emptied and removed.
        """
        try:
            if self.process is not None and self.process.poll() is None:
                self._save_journal()
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            self.process = None
            self.leader = None
            if self._notify is not None:
                self._notify.close()
                self._notify = None
            self._cgroup.remove()

    def _save_journal(self) -> None:
        if self.leader is None:
            return
        try:
            text = self.run("journalctl", "--boot", "--no-pager", "--output=short-precise", check=False,
                            timeout=10).stdout
            self.root.with_name(self.root.name + ".journal").write_text(text)
        except (OSError, subprocess.SubprocessError):
            pass

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.boot()

    def __exit__(self, *exc) -> None:
        self.poweroff()

    # --- commands inside --------------------------------------------------------------------

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        """The host command line that runs `argv` inside the container (as `user`, without a login)."""
        if self.leader is None:
            raise RuntimeError("the container is not running")
        enter = [NSENTER, f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
                 "--root", "--wd"]
        if user is not None:
            # setpriv runs inside, so it finds the user in the container's /etc/passwd.
            enter += [SETPRIV, f"--reuid={user}", f"--regid={_primary_group(self.root, user)}", "--init-groups",
                      "--"]
        return [*enter, *argv]

    def run(self, *argv: str, user: str | None = None, check: bool = True, input: str | None = None,
            environment: Mapping[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a command inside the container to completion; its output as text."""
        result = subprocess.run(self.command(*argv, user=user), input=input, capture_output=True, text=True,
                                env={**ENVIRONMENT, **(environment or {})}, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {result.returncode} in the container:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *arguments: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *arguments, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show -p ...`: the unit's properties as a dictionary."""
        output = self.systemctl("show", unit, *(f"--property={name}" for name in properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def status(self, unit: str) -> str:
        """What an admin sees: `systemctl status UNIT`, full lines, whatever the unit's state."""
        return self.systemctl("status", "--full", "--lines=20", unit, check=False).stdout

    def journal(self, *matches: str, after_cursor: str | None = None) -> list[dict[str, str]]:
        """Entries of this boot matching FIELD=value `matches` (journalctl's rules), oldest first;
        with `after_cursor`, those after that entry, whether it matches or not."""
        arguments = ["journalctl", "--boot", "--no-pager", "--output=json", "--all", *matches]
        if after_cursor is not None:
            # Not --after-cursor: it steps over one entry more than --cursor, which with matches is the
            # first matching entry after a cursor entry that does not match.
            arguments.insert(1, f"--cursor={after_cursor}")
        result = self.run(*arguments, check=False)
        if result.returncode != 0 and "No entries" not in result.stderr:
            raise AssertionError(f"journalctl failed: {result.stderr}")
        entries = [_entry(json.loads(line)) for line in result.stdout.splitlines() if line.startswith("{")]
        return [entry for entry in entries if entry["__CURSOR"] != after_cursor]

    def read_file(self, path: str) -> str:
        """A file of the container (the root's /etc, /var, /opt ...; not /run or /tmp, which are its own)."""
        return (self.root / path.lstrip("/")).read_text()

    def write_file(self, path: str, text: str, mode: int = 0o644) -> Path:
        """Write a file into the container's root (its /etc, /var, /opt ...), creating directories."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target


def _entry(record: dict) -> dict[str, str]:
    """journalctl's JSON for one entry, with every value as text (binary values come as byte lists)."""
    entry = {}
    for name, value in record.items():
        if isinstance(value, list):
            value = bytes(value).decode("utf-8", "replace") if all(isinstance(x, int) for x in value) else \
                " ".join(map(str, value))
        entry[name] = value if isinstance(value, str) else str(value)
    return entry


def _primary_group(root: Path, user: str) -> str:
    """The primary group id of `user` in the root's /etc/passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields[3]
    raise KeyError(f"no user {user} in {root}/etc/passwd")


class _ControlGroup:
    """One named group in each hierarchy systemd-nspawn uses; killed and removed as a whole."""

    PREFIX = "poplock-nspawn-"

    def __init__(self):
        self.name = f"{self.PREFIX}{uuid.uuid4().hex[:12]}"
        self.unified: Path | None = None
        self.paths: list[Path] = []

    def create(self) -> None:
        for mount in CGROUP2_MOUNTS:
            if (mount / "cgroup.controllers").exists():
                self.unified = mount / self.name
                break
        legacy = CGROUP_SYSTEMD_V1 / "tasks"
        self.paths = [path for path in (self.unified, CGROUP_SYSTEMD_V1 / self.name if legacy.exists() else None)
                      if path is not None]
        for path in self.paths:
            _remove_finished_groups(path.parent, self.PREFIX)
            path.mkdir()

    def remove(self) -> None:
        """Kill whatever is left in the group, then remove it (and the groups the container made in it)."""
        for path in self.paths:
            if not path.exists():
                continue
            deadline = time.monotonic() + 10
            while True:
                left = _processes(path)
                if not left:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"processes {sorted(left)} of the container survive in {path}")
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            _remove_tree(path)
        self.paths = []


def _remove_tree(group: Path) -> None:
    """rmdir a group and the groups below it, deepest first (the kernel refuses while a process is in one)."""
    for directory in sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: len(d.parts),
                            reverse=True) + [group]:
        directory.rmdir()


def _remove_finished_groups(parent: Path, prefix: str) -> None:
    """Remove the groups of containers whose test process was killed before it could: empty, with a payload.

    A group just made by another test run has no payload group yet, and one whose container runs is not empty.
    """
    for group in parent.glob(prefix + "*"):
        if (group / "payload").is_dir() and not _processes(group):
            try:
                _remove_tree(group)
            except OSError:
                pass


def _processes(group: Path) -> set[int]:
    """Every process in `group` and the groups below it."""
    pids: set[int] = set()
    for procs in group.rglob("cgroup.procs"):
        try:
            pids.update(int(line) for line in procs.read_text().split())
        except OSError:
            pass
    return pids
