"""The shipped units, tmpfiles.d and sysusers.d files, checked by systemd's own tools after `make install`."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
UNITS = sorted(path.name for path in (REPOSITORY / "units").iterdir())


def make(*arguments: str) -> None:
    subprocess.run(["make", "-s", *arguments], cwd=REPOSITORY, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A root with poplock installed by `make install DESTDIR=... PREFIX=/usr`, beside the host's systemd units."""
    root = tmp_path_factory.mktemp("root")
    make("install", f"DESTDIR={root}", "PREFIX=/usr")
    # systemd-analyze verify --root needs the targets our units refer to (sysinit.target ...).
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", dirs_exist_ok=True,
                    symlinks=True, ignore=shutil.ignore_patterns("poplock*"))
    return root


def test_make_install_puts_every_piece_in_its_place(installed):
    for path in ["usr/bin/poplock", "usr/bin/poplock-reader", "usr/bin/poplock-policy", "usr/bin/relaylock",
                 "usr/bin/poplock-logauth", "usr/lib/python3/dist-packages/poplock/reader.py",
                 "usr/lib/tmpfiles.d/poplock.conf", "usr/lib/sysusers.d/poplock.conf",
                 "usr/lib/systemd/catalog/poplock.catalog", "etc/poplock/poplock.conf", "etc/poplock/static-allowed",
                 "usr/share/man/man8/poplock.8", "usr/share/man/man5/poplock.conf.5"] + [
                    f"usr/lib/systemd/system/{unit}" for unit in UNITS]:
        assert (installed / path).exists(), path
    assert (installed / "usr/bin/relaylock").read_text().startswith("#!/usr/bin/python3 -IS\n")


def test_systemd_analyze_verify_has_nothing_to_say_about_any_unit(installed):
    # It exits 0 on unknown keys and bad values: any output at all is a failure.
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={installed}", *UNITS],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", ["poplock-reader.service", "poplock-policy.service", "poplock-expire.service"])
def test_the_daemons_are_hardened_to_an_exposure_of_2_or_better(installed, unit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={installed}",
                             "--threshold=20", unit], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overall exposure level" in result.stdout


def test_every_unit_points_at_its_man_page():
    for unit in UNITS:
        text = (REPOSITORY / "units" / unit).read_text()
        assert "\nDocumentation=man:" in text, unit


def test_every_hardening_relaxation_in_the_daemons_is_explained():
    # A setting turned off (=no) carries a comment just above it saying why.
    for unit in ("poplock-reader.service", "poplock-policy.service", "poplock-expire.service"):
        lines = (REPOSITORY / "units" / unit).read_text().splitlines()
        for number, line in enumerate(lines):
            if line.endswith("=no"):
                assert lines[number - 1].startswith("#"), f"{unit}: {line}"


def test_sysusers_and_tmpfiles_make_a_store_directory_only_the_poplock_group_can_read(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
        text = "".join(line for line in (root / "etc" / name).read_text().splitlines(keepends=True)
                       if not line.startswith("poplock:"))
        (root / "etc" / name).write_text(text)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(REPOSITORY / "sysusers.d/poplock.conf")],
                   check=True, capture_output=True)
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", str(REPOSITORY / "tmpfiles.d/poplock.conf")],
                   check=True, capture_output=True)
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    store = (root / "var/lib/poplock").stat()
    assert (store.st_uid, store.st_gid) == (int(users["poplock"][2]), int(groups["poplock"][2]))
    assert store.st_mode & 0o777 == 0o750
    assert users["poplock"][6] in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


def test_make_uninstall_removes_what_make_install_put_and_keeps_the_configuration(tmp_path):
    make("install", f"DESTDIR={tmp_path}", "PREFIX=/usr")
    (tmp_path / "etc/poplock/poplock.conf").write_text("[Grants]\nWindow=1h\n")
    make("install", f"DESTDIR={tmp_path}", "PREFIX=/usr")  # a second install keeps the admin's file
    assert (tmp_path / "etc/poplock/poplock.conf").read_text() == "[Grants]\nWindow=1h\n"
    make("uninstall", f"DESTDIR={tmp_path}", "PREFIX=/usr")
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert left == ["etc/poplock/poplock.conf", "etc/poplock/static-allowed"]


@pytest.mark.parametrize("program", ["poplock", "poplock-reader", "poplock-policy", "poplock-logauth",
                                     "relaylock"])
def test_every_program_tells_its_version_from_the_one_place_it_is_written(program):
    from support.poplock import command

    from poplock import __version__

    result = subprocess.run([command(program), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert __version__ in (result.stdout + result.stderr).split()[-1], result
    assert result.stdout == "" or program.startswith("poplock")  # relaylock: never standard output


def literal_blocks(page: str) -> list[str]:
    """The text of each `.Bd -literal` block of a man page."""
    text = (REPOSITORY / "man" / page).read_text()
    return [block.split("\n.Ed\n")[0] for block in text.split(".Bd -literal -offset indent\n")[1:]]


def test_the_smtp_unit_runs_as_a_user_the_shipped_sysusers_file_makes_and_collects_failed_instances(tmp_path):
    # Debian has no qmaild: a User= that does not exist fails every connection with 217/USER.
    unit = (REPOSITORY / "units/poplock-smtp@.service").read_text()
    [user] = [line.partition("=")[2] for line in unit.splitlines() if line.startswith("User=")]
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        (root / "etc" / name).write_text("".join(
            line for line in Path(f"/etc/{name}").read_text().splitlines(keepends=True)
            if not line.startswith("poplock")))
    subprocess.run(["systemd-sysusers", f"--root={root}", str(REPOSITORY / "sysusers.d/poplock.conf")],
                   check=True, capture_output=True)
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    assert user in users and user != "poplock"  # never the user that writes the store
    assert users[user][3] != groups["poplock"][2]  # the store's group only as SupplementaryGroups=
    assert "\nSupplementaryGroups=poplock\n" in unit
    # Failed instances are removed once they end, instead of piling up one per connection.
    assert unit.startswith("[Unit]\n") and "\nCollectMode=inactive-or-failed\n" in unit.partition("[Service]")[0]


def test_relaylock_8_shows_the_smtp_units_as_they_ship():
    [shipped] = [block for block in literal_blocks("relaylock.8") if block.startswith("# poplock-smtp.socket\n")]
    for part in shipped.split("\n\n# "):
        name, _, lines = part.removeprefix("# ").partition("\n")
        unit = (REPOSITORY / "units" / name).read_text().splitlines()
        for line in lines.split("\n"):
            assert line in unit, f"relaylock(8) shows {line!r}, which {name} does not have"


def test_the_drop_in_relaylock_8_gives_for_another_server_is_one_systemd_takes(installed):
    [drop_in] = [block for block in literal_blocks("relaylock.8") if block.startswith("[Service]\nExecStart=\n")]
    directory = installed / "etc/systemd/system/poplock-smtp@.service.d"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.conf").write_text(drop_in + "\n")
    try:
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={installed}",
                                 "poplock-smtp@.service"], capture_output=True, text=True)
        # Without the empty ExecStart= it would say "Service has more than one ExecStart= setting".
        assert (result.returncode, result.stdout + result.stderr) == (0, "")
    finally:
        (directory / "server.conf").unlink()


def test_the_daemons_only_the_tests_run_are_not_left_enabled_at_boot():
    # Their postinst enables them; `make deps` disables them at boot again after installing them.
    [packages] = re.findall(r"^TEST_ONLY_DAEMONS = (.*)$", (REPOSITORY / "Makefile").read_text(), re.M)
    wanted = {link.name for link in Path("/etc/systemd/system").glob("*.wants/*")}
    started = {link.name[3:] for link in Path("/etc").glob("rc[2-5].d/S*")}
    for package in packages.split():
        listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
        if listed.returncode != 0:
            continue  # not installed here
        files = listed.stdout.splitlines()
        units = {Path(name).name for name in files if re.fullmatch(r"(/usr)?/lib/systemd/system/[^/]+\.service", name)}
        scripts = {name.removeprefix("/etc/init.d/") for name in files if name.startswith("/etc/init.d/")}
        assert not units & wanted, f"{package}: enabled at boot by a wants link (systemctl disable {units & wanted})"
        assert not scripts & started, f"{package}: started at boot by an rc link (update-rc.d ... disable)"
