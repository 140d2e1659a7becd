"""`make install` into a staging directory (DESTDIR): what it refuses, and the man pages it writes.

Installing for real, stopping and disabling units on `make uninstall`, and `man -k` are proven
in a booted container by tests/system/test_debian_package.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import poplock

REPOSITORY = Path(__file__).resolve().parents[2]
# Pages that show the programs in run scripts, inetd lines and units.
PAGES_WITH_PATHS = {"relaylock.8": "relaylock", "poplock.8": "relaylock", "poplock-logauth.8": "poplock-logauth"}


def make(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *arguments], cwd=REPOSITORY, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("staged")
    result = make("install", f"DESTDIR={destination}")
    assert result.returncode == 0, result.stdout + result.stderr
    return destination


def test_make_install_refuses_a_python_without_python3_systemd_and_says_which_package_it_lacks(tmp_path):
    # A virtual environment without the system's site packages has the standard library (dbm.gnu
    # included: python3-gdbm puts it there) but not Debian's python3-systemd.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv/bin/python"
    result = make("install", f"DESTDIR={tmp_path / 'root'}", f"PYTHON={python}")
    assert result.returncode != 0
    assert f"make install: poplock's programs would run with {python}, which lacks: python3-systemd\n" in result.stderr
    assert "install them first (apt-get install python3-systemd)" in result.stderr
    assert not (tmp_path / "root").exists()  # checked before anything is installed


def test_make_install_accepts_a_python_with_what_the_programs_import():
    result = make("install-check")
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("page", sorted(PAGES_WITH_PATHS))
def test_installed_man_pages_name_the_programs_where_make_install_put_them(staged, page):
    program = PAGES_WITH_PATHS[page]
    source = (REPOSITORY / "man" / page).read_text()
    installed = (staged / "usr/local/share/man/man8" / page).read_text()
    assert f"/usr/bin/{program} " in source
    assert f"/usr/local/bin/{program} " in installed
    assert not re.search(r"/usr/bin/(poplock|relaylock)", installed), page
    assert "/usr/bin/tcpserver" in installed or page == "relaylock.8"  # other programs keep their paths


def test_installed_man_pages_carry_the_version_and_the_date_of_the_release(staged):
    released = re.search(r"^ -- .*?>  (.*)$", (REPOSITORY / "debian/changelog").read_text(), re.M).group(1)
    date = subprocess.run(["date", "-u", "-d", released, "+%B %-d, %Y"], capture_output=True, text=True, check=True,
                          env={**os.environ, "LC_ALL": "C"}).stdout.strip()
    pages = sorted((staged / "usr/local/share/man").glob("man*/*.[0-9]"))
    assert {page.name for page in pages} >= {page.name for page in (REPOSITORY / "man").glob("*.[0-9]")}
    for page in pages:
        text = page.read_text()
        assert text.startswith(f".Dd {date}\n"), page.name
        assert f"\n.Os poplock {poplock.__version__}\n" in text, page.name


def test_installed_man_pages_render_with_man_without_a_warning(staged):
    environment = {"PATH": os.environ["PATH"], "MANPAGER": "cat", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    for page in sorted((staged / "usr/local/share/man").glob("man*/*.[0-9]")):
        result = subprocess.run(["man", "--warnings=all", "-l", str(page)], capture_output=True, text=True,
                                env=environment)
        assert (result.returncode, result.stderr) == (0, ""), page.name
        assert result.stdout.rstrip().splitlines()[-1].split()[:2] == ["poplock", poplock.__version__], page.name


def test_installed_units_name_the_programs_where_make_install_put_them(staged):
    unit = (staged / "usr/local/lib/systemd/system/poplock-reader.service").read_text()
    assert "ExecStart=/usr/local/bin/poplock-reader\n" in unit
