"""The two commands README.md gives a new user must stay true."""

import re
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (REPOSITORY / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_gives_a_demo_command_and_a_test_command_and_ci_runs_the_latter():
    assert readme_commands() == ["make demo", "make check"]
    assert "make check" in (REPOSITORY / ".ci" / "run").read_text()


def test_the_readme_demo_shows_a_login_becoming_a_grant(journald):
    result = subprocess.run(["make", "demo"], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "POP3 login from 127.0.0.5 with the right password: accepted" in result.stdout
    assert "127.0.0.5 may relay: grant until" in result.stdout
    assert "127.0.0.6 may not relay" in result.stdout
    assert "SMTP from 127.0.0.5: RCPT TO:<someone@elsewhere.example> -> 250" in result.stdout
    assert "SMTP from 127.0.0.7: RCPT TO:<someone@elsewhere.example> -> 554" in result.stdout
    assert "demo passed" in result.stdout
