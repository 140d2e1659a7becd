"""`poplock scan` on real journal files holding the recorded corpus: it prints exactly the successful logins.

Each recorded file (tests/corpus/*.jsonl) is written, fields and all, into a journal
file with systemd-journal-remote, and `poplock scan` reads it as it would read any
journal. With --all-sources every pattern is tried on every entry, whoever wrote it;
without it the sources' trust rules apply, with the recording machine's settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.journald import write_journal_file

from poplock.servers import SERVERS

CORPUS = Path(__file__).parents[1] / "corpus"
RECORDED = sorted(path for path in CORPUS.glob("*.jsonl") if path.name != "documented.jsonl")
MAIL_USERS = " ".join(str(uid) for uid in range(20000, 20010))
# The recording machine's cyrus uid and mail users (tests/corpus/README.md).
RECORDING_SETTINGS = "[Source:cyrus]\nUsers=107\n" + "".join(
    f"[Source:{name}]\nLoginUsers={MAIL_USERS}\n" for name in ("popa3d", "mailutils", "solid-pop3d"))
EVERY_SOURCE = [argument for name in SERVERS for argument in ("--source", name)]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def journal_entry(fields: dict) -> dict:
    # What journald computed stays; the cursor is the journal file's own business.
    return {name: value for name, value in fields.items() if name != "__CURSOR"}


def write(tmp_path: Path, path: Path) -> Path:
    entries = [journal_entry(record["fields"]) for record in records(path)]
    return write_journal_file(tmp_path / f"{path.stem}.journal", entries)


def scanned(setup, *arguments: str) -> list[dict]:
    result = setup.run("scan", "--json", *EVERY_SOURCE, *arguments)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def successful_logins(path: Path) -> list[str]:
    """The addresses the recorded file's labels say its entries grant, in journal order."""
    return [record["grants"] for record in records(path) if record["grants"]]


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_scan_all_sources_prints_exactly_the_logins_that_succeeded(setup, tmp_path, path):
    journal = write(tmp_path, path)
    found = scanned(setup, "--all-sources", "--file", str(journal))
    assert [login["address"] for login in found] == successful_logins(path)


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_scan_with_trust_checking_prints_exactly_the_logins_that_succeeded(setup, tmp_path, path):
    setup.write(extra=RECORDING_SETTINGS)
    journal = write(tmp_path, path)
    found = scanned(setup, "--file", str(journal))
    assert [login["address"] for login in found] == successful_logins(path)


def test_scan_of_every_recorded_journal_at_once_prints_every_successful_login(setup, tmp_path):
    journals = [write(tmp_path, path) for path in RECORDED]
    files = [argument for journal in journals for argument in ("--file", str(journal))]
    found = scanned(setup, "--all-sources", *files)
    wanted = sorted(address for path in RECORDED for address in successful_logins(path))
    assert sorted(login["address"] for login in found) == wanted
    assert all(login["source"] in SERVERS for login in found)
