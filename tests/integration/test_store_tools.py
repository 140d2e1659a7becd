"""The store read with the stock gdbm tools, as poplock(8) shows: its top and its base, read-only.

The commands are the ones the manual displays, run on a store of a base (a bulk import) and a
top (a grant added since), with the manual's paths and placeholders replaced by this store's.
"""

import shlex
import subprocess
from pathlib import Path

from poplock.grants import decode_grant

MANUAL = Path(__file__).resolve().parents[2] / "man" / "poplock.8"
SHOWN_STORE = "/var/lib/poplock/grants.db"


def manual_commands() -> list[str]:
    """The display that follows "Both files can be read with the stock gdbm tools"."""
    lines = MANUAL.read_text(encoding="utf-8").splitlines()
    start = next(index for index, line in enumerate(lines) if "read with the stock gdbm tools" in line)
    begin = next(index for index in range(start, len(lines)) if lines[index].startswith(".Bd -literal"))
    end = next(index for index in range(begin, len(lines)) if lines[index] == ".Ed")
    return lines[begin + 1:end]


def run(command: str) -> str:
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def test_the_manuals_gdbmtool_commands_read_the_top_and_the_base(setup, tmp_path):
    bulk = tmp_path / "bulk"
    bulk.write_text("".join(f"10.7.{index >> 8}.{index & 255}\n" for index in range(5000)))
    setup.run("import", "--no-journal", str(bulk), check=True)
    setup.run("add", "192.0.2.99", check=True)  # in the top, over the base
    [base] = setup.directory.glob("grants.db.base-*")
    generation = base.name.removeprefix("grants.db.base-")
    list_top, fetch_base_name, fetch_from_base = [
        command.replace(SHOWN_STORE, str(setup.store)).replace("base-ID", f"base-{generation}")
        .replace("192.0.2.7", "10.7.3.4") for command in manual_commands()]

    listed = dict(line.split(" ", 1) for line in run(list_top).splitlines())
    assert listed["#base"] == base.name
    assert decode_grant("192.0.2.99", listed["192.0.2.99"].encode()).source == "manual"
    assert "10.7.3.4" not in listed  # the base's, not the top's
    assert run(fetch_base_name).strip() == base.name
    grant = decode_grant("10.7.3.4", run(fetch_from_base).rstrip("\n").encode())
    assert grant.address == "10.7.3.4" and grant.source == "manual"

    dumped = run(f"gdbm_dump {base}")
    assert dumped.startswith("# GDBM dump file") and "#:format=standard" in dumped
