"""poplock-logauth in a real checkpassword chain under tcpserver, read back by poplock-reader.

The chain is the one qmail-pop3d sites run:  tcpserver ... CHECKPASSWORD poplock-logauth NEXT
A checkpassword-compatible program reads "user\\0password\\0timestamp\\0" on descriptor 3 and
runs the rest of its command line only when the password is right (here a small script
that accepts one password, fed by the client over the connection, as qmail-popup would).
"""

import json
import socket
import subprocess
import textwrap

import pytest
from support.poplock import ReaderProcess, Setup, command, command_for_everyone
from support.ports import free_port, wait_for_port

CHECKPASSWORD = textwrap.dedent("""\
    #!/usr/bin/python3
    # checkpassword(8) interface: credentials on fd 3; exec argv[1:] on success, exit 1 otherwise.
    import os, sys
    user, password = os.read(3, 512).split(b"\\0")[:2]
    if (user, password) != (b"alice", b"secret"):
        sys.exit(1)
    os.environ.update(USER="alice", HOME="/nonexistent", SHELL="/bin/false")
    os.execvp(sys.argv[1], sys.argv[1:])
""")

REPORTER = "#!/bin/sh\necho \"mail session ran for $USER from $TCPREMOTEIP\"\n"


@pytest.fixture
def chain(tmp_path, journald):
    checkpassword = tmp_path / "checkpassword"
    checkpassword.write_text(CHECKPASSWORD)
    reporter = tmp_path / "mail-session"
    reporter.write_text(REPORTER)
    for program in (checkpassword, reporter):
        program.chmod(0o755)
    port = free_port()
    # fd 3 is the connection itself: the client sends the credentials first, as qmail-popup
    # would pass them on after reading USER and PASS.
    server = subprocess.Popen(
        ["tcpserver", "-R", "-H", "-l", "0", "127.0.0.1", str(port), "sh", "-c",
         f'exec {checkpassword} {command("poplock-logauth")} {reporter} 3<&0'],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_port("127.0.0.1", port)
    yield port
    server.terminate()
    server.wait(10)


def log_in(port: int, source: str, password: str) -> str:
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=10) as connection:
        connection.sendall(b"alice\0" + password.encode() + b"\0" + b"20261126\0")
        connection.shutdown(socket.SHUT_WR)
        return connection.recv(4096).decode()


def test_a_successful_login_in_the_chain_is_logged_granted_and_the_session_goes_on(chain, tmp_path):

    setup = Setup(tmp_path, extra="Sources=logauth\n\n[Source:logauth]\nUsers=root\n")
    assert log_in(chain, "127.0.0.5", "secret") == "mail session ran for alice from 127.0.0.5\n"
    assert log_in(chain, "127.0.0.6", "wrong") == ""  # checkpassword refused: nothing after it ran
    with ReaderProcess(setup):
        setup.wait_until_allowed("127.0.0.5")
        assert not setup.may_relay("127.0.0.6")
    scan = setup.run("scan", "--json", "--since=-5min", check=True).stdout.splitlines()
    assert {json.loads(line)["address"] for line in scan} >= {"127.0.0.5"}
    assert "127.0.0.6" not in {json.loads(line)["address"] for line in scan}



def test_poplock_logauth_run_by_another_user_grants_nothing(tmp_path, journald):
    setup = Setup(tmp_path, extra="Sources=logauth\n\n[Source:logauth]\nUsers=root\n")
    # Any local user can run the program; only entries from the POP3 service's uid count.
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env",
                    "TCPREMOTEIP=203.0.113.77", "USER=mallory", command_for_everyone("poplock-logauth"), "true"],
                   check=True)
    subprocess.run(["env", "TCPREMOTEIP=127.0.0.8", "USER=alice", command("poplock-logauth"), "true"], check=True)
    with ReaderProcess(setup):
        setup.wait_until_allowed("127.0.0.8")
    assert not setup.may_relay("203.0.113.77")


def test_the_next_program_runs_even_when_the_journal_cannot_be_reached(tmp_path):
    result = subprocess.run(["unshare", "--mount", "sh", "-c",
                             "mount -t tmpfs none /run && env TCPREMOTEIP=127.0.0.9 USER=alice "
                             f"{command('poplock-logauth')} echo next ran"], capture_output=True, text=True)
    assert result.stdout == "next ran\n"
    assert "poplock-logauth: cannot reach the journal; no login recorded" in result.stderr


def test_help_and_options_are_read_like_relaylocks():
    assert subprocess.run([command("poplock-logauth"), "--help"], capture_output=True).returncode == 0
    result = subprocess.run(["env", "TCPREMOTEIP=127.0.0.10", "USER=alice", command("poplock-logauth"),
                             "--protocol=IMAP", "echo", "ran"], capture_output=True, text=True)
    assert result.stdout == "ran\n"
    bad = subprocess.run([command("poplock-logauth"), "--protocol=SMTP", "true"], capture_output=True, text=True)
    assert bad.returncode == 64 and "--protocol is POP3 or IMAP" in bad.stderr
