"""poplock's Debian package, built by `make deb` and installed, upgraded, removed and purged
with apt and dpkg in a container that systemd-nspawn boots, the way an admin would.

The package is built twice: from this tree, and from a copy whose debian/changelog and
poplock/__init__.py say 0.1.0+test1 (the next build). The tests run in order, as one story on
one container: the build is lintian-clean and versioned from one place; installing it makes the
poplock user, enables and starts the reader and the expiry timer, and a real Dovecot login then
grants; upgrading to the next build restarts the reader on the new code and keeps the grants and
the admin's edit of a conffile; removing it stops the reader and keeps the conffiles; purging it
removes them and the enable links.

The container shares the host's /usr read-only, and dpkg installs into /usr: the container gets
an overlay on it (the host's /usr below, a directory of the container's root above), mounted in
its mount namespace before anything is installed, so the package's files land in the container
and the host's /usr is never written. It starts with the host's dpkg database, so the package's
dependencies are found installed, and with the host's man page index (man-db's trigger then
updates it as on any Debian system). /usr/sbin/policy-rc.d, which on a build machine forbids
starting services, is removed from the overlay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.dovecot import container_files
from support.mailclients import pop3_login
from support.nspawn import Container, build_root, wait_until
from support.ports import free_port, wait_for_port

import poplock
from poplock import events

pytestmark = pytest.mark.system

REPOSITORY = Path(__file__).resolve().parents[2]
VERSION = poplock.__version__
NEXT_VERSION = f"{VERSION}+test1"

# In the container's root: the overlay's writable half and its work directory.
USR_UPPER = "/var/lib/poplock-test-usr/upper"
USR_WORK = "/var/lib/poplock-test-usr/work"
# What the container starts with from the host, beside build_root's /etc files (with their owners:
# man-db's trigger runs mandb as the user man).
HOST_STATE = ("var/lib/dpkg", "var/cache/man", "var/lib/man-db")
# apt without sources: it installs the local files, whose dependencies are all installed.
APT_DIRECTORIES = ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d", "etc/apt/trusted.gpg.d")

READER = "poplock-reader.service"
TIMER = "poplock-expire.timer"
ENABLED = (READER, TIMER)
NOT_ENABLED = ("poplock-policy.socket", "poplock-socketmap.socket", "poplock-smtp.socket")
UNITS = (*ENABLED, *NOT_ENABLED, "poplock-expire.service", "poplock-policy.service", "poplock-socketmap.service",
         "poplock-smtp@.service")
PROGRAMS = ("poplock", "poplock-reader", "poplock-policy", "poplock-socketmap", "poplock-smtpd-filter",
            "poplock-logauth", "relaylock")
CONFFILES = ("/etc/poplock/poplock.conf", "/etc/poplock/static-allowed")
ADMIN_EDIT = "\n# kept across upgrades: the admin's own line\n"

# Where the container has a copy of this tree, for `make install`.
SOURCE = "/root/poplock-source"
LOCAL_PROGRAMS = "/usr/local/bin"

USER, PASSWORD = "alice", "secret"
BEFORE_UPGRADE, AFTER_UPGRADE = "127.0.0.5", "127.0.0.6"


@dataclass(frozen=True)
class Build:
    version: str
    deb: Path
    changes: Path


def make_deb(tree: Path, output: Path, *variables: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["make", "-s", "deb", f"DEBBUILD={output}", *variables], cwd=tree, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"make deb failed:\n{result.stdout}{result.stderr}"
    return result


def copy_tree(destination: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", ".pybuild", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache")
    return Path(shutil.copytree(REPOSITORY, destination, ignore=ignore, symlinks=True))


def next_release(tree: Path, version: str) -> None:
    """What a release does in `tree`: the version in poplock/__init__.py, and a changelog entry for it."""
    init = tree / "poplock/__init__.py"
    text, count = re.subn(r'^__version__ = ".*"$', f'__version__ = "{version}"', init.read_text(), flags=re.M)
    assert count == 1
    init.write_text(text)
    changelog = tree / "debian/changelog"
    maintainer = re.search(r"^ -- (.*?>)  ", changelog.read_text(), re.M).group(1)
    date = subprocess.run(["date", "-R", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    changelog.write_text(f"poplock ({version}) unstable; urgency=medium\n\n  * The next build, for the upgrade test."
                         f"\n\n -- {maintainer}  {date}\n\n" + changelog.read_text())


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Build]:
    """This tree's package and the next build's, each made by `make deb` (which fails on a lintian warning)."""
    directory = tmp_path_factory.mktemp("deb")
    make_deb(REPOSITORY, directory / "current")
    tree = copy_tree(directory / "next-tree/poplock")
    next_release(tree, NEXT_VERSION)
    make_deb(tree, directory / "next", "LINTIAN=true")  # lintian has checked this tree's build
    return {version: Build(version, directory / where / f"poplock_{version}_all.deb",
                           next((directory / where).glob(f"poplock_{version}_*.changes")))
            for version, where in ((VERSION, "current"), (NEXT_VERSION, "next"))}


# --- the build -------------------------------------------------------------------------------------

def changelog_version(changelog: str) -> str:
    return re.match(r"poplock \(([^)]+)\) ", changelog).group(1)


def test_the_changelogs_newest_entry_is_the_version_the_programs_report():
    assert changelog_version((REPOSITORY / "debian/changelog").read_text()) == VERSION
    result = subprocess.run([str(REPOSITORY / ".venv/bin/poplock"), "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"poplock {VERSION}"


def test_lintian_finds_no_error_and_no_warning(builds):
    result = subprocess.run(["lintian", "--display-info", "--pedantic", str(builds[VERSION].changes)],
                            capture_output=True, text=True, timeout=300)
    print(result.stdout)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert not [tag for tag in tags if tag[0] in "EW"], tags
    assert result.returncode == 0, result.stderr
    # What is left, informational: a systemd-only daemon has no init.d script.
    assert {tag.split()[2] for tag in tags} <= {"package-supports-alternative-init-but-no-init.d-script"}, tags


def package_file(deb: Path, path: str, tmp_path: Path) -> str:
    """A file of the package, as dpkg would install it (man pages uncompressed)."""
    unpacked = tmp_path / deb.stem
    if not unpacked.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    target = unpacked / path.lstrip("/")
    if target.suffix == ".gz":
        return subprocess.run(["zcat", str(target)], capture_output=True, text=True, check=True).stdout
    return target.read_text()


def test_the_package_is_versioned_and_depends_like_the_tree_says(builds):
    fields = subprocess.run(["dpkg-deb", "--field", str(builds[VERSION].deb), "Version", "Depends", "Architecture"],
                            capture_output=True, text=True, check=True).stdout
    assert f"Version: {VERSION}\n" in fields and "Architecture: all\n" in fields
    depends = {name.strip().split()[0] for name in re.search(r"^Depends: (.*)$", fields, re.M).group(1).split(",")}
    assert {"python3-systemd", "python3-gdbm", "python3:any"} <= depends


def test_the_packaged_man_pages_name_usr_bin_and_carry_the_release_date_and_version(builds, tmp_path):
    deb = builds[VERSION].deb
    changelog = (REPOSITORY / "debian/changelog").read_text()
    released = re.search(r"^ -- .*?>  (.*)$", changelog, re.M).group(1)
    date = subprocess.run(["date", "-u", "-d", released, "+%B %-d, %Y"], capture_output=True, text=True,
                          check=True, env={**os.environ, "LC_ALL": "C"}).stdout.strip()
    for page in sorted((REPOSITORY / "man").glob("*.[0-9]")):
        text = package_file(deb, f"/usr/share/man/man{page.suffix[1:]}/{page.name}.gz", tmp_path)
        assert f"\n.Os poplock {VERSION}\n" in text, page.name
        assert text.startswith(f".Dd {date}\n"), page.name
    relaylock = package_file(deb, "/usr/share/man/man8/relaylock.8.gz", tmp_path)
    assert "ExecStart=/usr/bin/relaylock -- " in relaylock
    assert "/usr/local/bin/relaylock" not in relaylock


# --- the container ---------------------------------------------------------------------------------

@dataclass
class Host:
    """The booted container with a writable /usr, Dovecot running, and the two builds in /root."""

    container: Container
    builds: dict[str, Build]
    pop3_port: int

    def apt_get(self, *arguments: str) -> str:
        result = self.container.run("apt-get", "--yes", *arguments, environment={"DEBIAN_FRONTEND": "noninteractive"},
                                    check=False, timeout=180)
        transcript = f"# apt-get {' '.join(arguments)}\n{result.stdout}{result.stderr}"
        print(transcript)
        assert result.returncode == 0, transcript
        return transcript

    def install(self, version: str) -> str:
        return self.apt_get("install", f"/root/{self.builds[version].deb.name}")

    def status(self) -> str:
        """dpkg's state of the package: `ii` installed, `rc` removed with its conffiles, `` unknown."""
        result = self.container.run("dpkg-query", "--show", "--showformat=${db:Status-Abbrev}${Version}",
                                    "poplock", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def exists(self, path: str) -> bool:
        return self.container.run("test", "-e", path, check=False).returncode == 0

    def unit(self, unit: str) -> dict[str, str]:
        return self.container.show(unit, "LoadState", "ActiveState", "SubState", "UnitFileState", "MainPID",
                                   "FragmentPath")

    def enable_links(self) -> list[str]:
        return self.container.run("find", "/etc/systemd/system", "-name", "poplock*", "-type", "l").stdout.split()

    def grants(self) -> dict[str, dict]:
        output = self.container.run("poplock", "show", "--json").stdout
        records = [json.loads(line) for line in output.splitlines()]
        return {record["address"]: record for record in records if record["kind"] == "grant"}

    def login(self, source: str) -> dict:
        assert pop3_login("127.0.0.1", self.pop3_port, USER, PASSWORD, source=source)
        return wait_until(lambda: self.grants().get(source), f"a grant for {source}", timeout=15)


def dovecot_configuration(pop3_port: int) -> dict[str, str]:
    """Dovecot on a loopback port, logging through syslog into the journal as dovecot.service."""
    return container_files({USER: PASSWORD}, pop3_port)


def prepare_root(root: Path, builds: dict[str, Build], pop3_port: int) -> None:
    for path in HOST_STATE:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", f"/{path}", str(root / path)], check=True)
    for path in APT_DIRECTORIES:
        (root / path).mkdir(parents=True)
    (root / "etc/apt/sources.list").write_text("")
    for path in (USR_UPPER, USR_WORK):
        (root / path.lstrip("/")).mkdir(parents=True)
    for build in builds.values():
        shutil.copy2(build.deb, root / "root")
    for path, text in dovecot_configuration(pop3_port).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    mail = root / "srv/mail"
    mail.mkdir(parents=True)
    os.chown(mail, 65534, 65534)
    copy_tree(root / SOURCE.lstrip("/"))


@pytest.fixture(scope="module")
def host(builds, tmp_path_factory) -> Host:
    root = build_root(tmp_path_factory.mktemp("package") / "root")
    pop3_port = free_port()
    prepare_root(root, builds, pop3_port)
    with Container(root) as container:
        container.run("mount", "-t", "overlay", "overlay", "-o",
                      f"lowerdir=/usr,upperdir={USR_UPPER},workdir={USR_WORK}", "/usr")
        container.run("rm", "-f", "/usr/sbin/policy-rc.d")
        container.systemctl("enable", "--now", "dovecot.service")
        wait_for_port("127.0.0.1", pop3_port)
        yield Host(container, builds, pop3_port)
    # The host's /usr got nothing of it.
    assert not Path("/usr/bin/poplock-reader").exists()


# --- install -----------------------------------------------------------------------------------------

def test_installing_the_package_puts_its_files_in_their_debian_places(host):
    assert host.status() == ""
    transcript = host.install(VERSION)
    assert host.status() == f"ii {VERSION}"
    assert "Processing triggers for man-db" in transcript and "Processing triggers for systemd" in transcript
    for program in PROGRAMS:
        assert host.exists(f"/usr/bin/{program}"), program
    for unit in UNITS:
        assert host.exists(f"/lib/systemd/system/{unit}"), unit
    for path in ("/usr/lib/python3/dist-packages/poplock/reader.py", "/usr/lib/tmpfiles.d/poplock.conf",
                 "/usr/lib/sysusers.d/poplock.conf", "/usr/lib/systemd/catalog/poplock.catalog",
                 "/usr/share/man/man8/poplock-reader.8.gz", "/usr/share/man/man5/poplock.conf.5.gz", *CONFFILES):
        assert host.exists(path), path
    conffiles = host.container.run("dpkg-query", "--show", "--showformat=${Conffiles}", "poplock").stdout
    assert sorted(line.split()[0] for line in conffiles.splitlines() if line.strip()) == sorted(CONFFILES)
    version = host.container.run("poplock", "--version").stdout.strip()
    assert version == f"poplock {VERSION}"


def test_installing_makes_the_poplock_user_and_its_state_directory(host):
    container = host.container
    assert container.run("getent", "passwd", "poplock").stdout.startswith("poplock:x:")
    assert container.run("stat", "--format=%U:%G %a", "/var/lib/poplock").stdout.split() == ["poplock:poplock", "750"]


def test_installing_enables_and_starts_the_reader_and_the_timer_and_no_decision_service(host):
    for unit in ENABLED:
        state = host.unit(unit)
        assert (state["UnitFileState"], state["ActiveState"]) == ("enabled", "active"), (unit, state)
        assert state["FragmentPath"] == f"/lib/systemd/system/{unit}"
    reader = wait_until(lambda: (state := host.unit(READER))["SubState"] == "running" and state, "the reader", 10)
    assert reader["MainPID"] != "0"
    for unit in NOT_ENABLED:
        state = host.unit(unit)
        assert (state["UnitFileState"], state["ActiveState"]) == ("disabled", "inactive"), (unit, state)


def catalog_id(event: events.Event) -> str:
    return event.message_id.replace("-", "").lower()


def catalog_ids(container: Container) -> set[str]:
    """The MESSAGE_IDs journalctl has a catalog entry for."""
    return {line.split()[0].replace("-", "").lower()
            for line in container.run("journalctl", "--list-catalog").stdout.splitlines() if line.strip()}


def test_installing_gives_journalctl_the_catalog_and_man_the_pages(host):
    container = host.container
    assert catalog_id(events.LOGIN_GRANTED) in catalog_ids(container)
    pages = container.run("man", "-k", "poplock").stdout
    assert "poplock-reader (8)" in pages and "poplock.conf (5)" in pages, pages
    result = container.run("man", "relaylock", environment={"MANWIDTH": "80", "MANPAGER": "cat"})
    assert "ExecStart=/usr/bin/relaylock" in result.stdout
    assert f"poplock {VERSION}" in result.stdout.splitlines()[-1]


def test_a_dovecot_login_grants_through_the_installed_reader(host):
    grant = host.login(BEFORE_UPGRADE)
    assert grant["source"] == "dovecot"
    [granted] = [entry for entry in host.container.journal(f"MESSAGE_ID={events.LOGIN_GRANTED.message_id}")
                 if entry.get("POPLOCK_CLIENT_ADDRESS") == BEFORE_UPGRADE]
    assert granted["_SYSTEMD_UNIT"] == READER and granted["POPLOCK_SOURCE_UNIT"] == "dovecot.service"
    assert host.container.run("poplock", "check", BEFORE_UPGRADE, check=False).returncode == 0


# --- upgrade -----------------------------------------------------------------------------------------

def test_upgrading_runs_the_new_code_and_keeps_the_grants_and_the_admins_conffile(host):
    container = host.container
    with open(container.root / "etc/poplock/poplock.conf", "a") as conffile:
        conffile.write(ADMIN_EDIT)
    reader_before, grants_before = host.unit(READER), host.grants()

    transcript = host.install(NEXT_VERSION)
    assert f"Unpacking poplock ({NEXT_VERSION}) over ({VERSION})" in transcript
    assert host.status() == f"ii {NEXT_VERSION}"
    assert container.run("poplock", "--version").stdout.strip() == f"poplock {NEXT_VERSION}"
    reader = wait_until(lambda: (state := host.unit(READER))["SubState"] == "running" and state, "the reader", 10)
    assert reader["MainPID"] != reader_before["MainPID"]  # restarted on the new code
    assert reader["UnitFileState"] == "enabled"
    assert host.grants()[BEFORE_UPGRADE] == grants_before[BEFORE_UPGRADE]
    assert container.read_file("/etc/poplock/poplock.conf").endswith(ADMIN_EDIT)
    assert host.login(AFTER_UPGRADE)["source"] == "dovecot"


# --- remove and purge --------------------------------------------------------------------------------

def test_removing_stops_the_reader_deletes_the_programs_and_keeps_the_conffiles(host):
    container = host.container
    host.apt_get("remove", "poplock")
    assert host.status() == f"rc {NEXT_VERSION}"
    for path in ("/usr/bin/poplock", "/usr/bin/relaylock", "/usr/lib/python3/dist-packages/poplock",
                 f"/lib/systemd/system/{READER}", "/usr/share/man/man8/poplock.8.gz"):
        assert not host.exists(path), path
    for unit in ENABLED:
        state = host.unit(unit)
        assert (state["LoadState"], state["ActiveState"]) == ("not-found", "inactive"), (unit, state)
    assert container.read_file("/etc/poplock/poplock.conf").endswith(ADMIN_EDIT)
    assert host.exists("/etc/poplock/static-allowed")
    assert host.exists("/var/lib/poplock/grants.db")  # the grants are the admin's data


def test_purging_deletes_the_conffiles_the_enable_links_and_the_catalog_and_keeps_the_user(host):
    container = host.container
    assert host.enable_links()  # removal leaves them for a reinstall to find
    host.apt_get("purge", "poplock")
    assert host.status() == ""
    assert not host.exists("/etc/poplock/poplock.conf") and not host.exists("/etc/poplock/static-allowed")
    assert host.enable_links() == []
    assert catalog_id(events.LOGIN_GRANTED) not in catalog_ids(container)
    # man-db's trigger adds pages without purging old entries (mandb --no-purge): its daily run does.
    container.systemctl("start", "man-db.service", timeout=120)
    assert container.run("man", "-k", "poplock", check=False).stdout == ""
    # Debian never deletes a system user: files it owns may remain anywhere.
    assert container.run("getent", "passwd", "poplock").stdout.startswith("poplock:x:")


# --- or make install, from the source ----------------------------------------------------------------

def make(host: Host, target: str) -> str:
    result = host.container.run("make", "-C", SOURCE, target, check=False, timeout=300)
    transcript = f"# make {target}\n{result.stdout}{result.stderr}"
    print(transcript)
    assert result.returncode == 0, transcript
    return transcript


def test_make_install_installs_man_pages_that_name_usr_local_and_indexes_them(host):
    container = host.container
    make(host, "install")
    assert container.run("poplock", "--version").stdout.strip() == f"poplock {VERSION}"
    assert container.run("sh", "-c", "command -v poplock").stdout.strip() == f"{LOCAL_PROGRAMS}/poplock"
    for page, program in (("relaylock", "relaylock"), ("poplock", "relaylock"), ("poplock-logauth", "poplock-logauth")):
        text = container.run("man", page, environment={"MANWIDTH": "200", "MANPAGER": "cat"}).stdout
        assert f"{LOCAL_PROGRAMS}/{program} " in text, page
        assert f"/usr/bin/{program} " not in text, page
        assert f"poplock {VERSION}" in text.splitlines()[-1], page
    found = container.run("sh", "-c", "realpath $(man -w poplock-reader)").stdout.strip()
    assert found == "/usr/local/share/man/man8/poplock-reader.8"
    pages = container.run("man", "-k", "poplock").stdout  # the index, which make install's mandb updated
    assert "poplock-reader (8)" in pages and "poplock.conf (5)" in pages, pages


def test_make_uninstall_stops_and_disables_the_units_before_removing_them(host):
    container = host.container
    container.systemctl("enable", "--now", *ENABLED)
    reader = wait_until(lambda: (state := host.unit(READER))["SubState"] == "running" and state, "the reader", 10)
    assert reader["FragmentPath"] == f"/usr/local/lib/systemd/system/{READER}"
    assert host.enable_links()

    transcript = make(host, "uninstall")
    assert "no running systemd" not in transcript
    for unit in ENABLED:
        state = host.unit(unit)
        assert (state["LoadState"], state["ActiveState"]) == ("not-found", "inactive"), (unit, state)
    assert host.enable_links() == []
    assert not host.exists(f"{LOCAL_PROGRAMS}/poplock") and not host.exists(f"{LOCAL_PROGRAMS}/relaylock")
    assert not host.exists("/usr/local/share/man/man8/poplock-reader.8")
