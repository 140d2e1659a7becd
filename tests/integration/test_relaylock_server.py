"""relaylock on a host without the store ([Relaylock] Server=): it asks a real poplock-socketmap
over TCP, IPv6 or a unix socket, bounds the question by ServerTimeout=, and always runs the
SMTP server, relaying only on an `OK` answer."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support.poplock import REPOSITORY, Setup, command
from support.ports import free_port
from support.smtpservers import TcpServer, mailfront, try_relay
from support.socketmap import AnsweringReader, SocketmapProcess, netstring

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"
RELAYED = 250
MANUAL_SERVER = "192.0.2.25:7025"  # where relaylock(8)'s example asks


class SmtpHost:
    """The configuration of an SMTP host without the store: Server= and whatever else is given.

    It still names a store and a reader socket of its own, so that a test can prove relaylock
    reads neither: the store holds a grant for STRANGER, and `reader` counts questions."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.config = directory / "poplock.conf"
        self.static = directory / "static-allowed"
        (directory / "local").mkdir()
        self.local = Setup(directory / "local")  # the store a host without one must not read
        self.local.run("add", STRANGER, check=True)
        self.reader = AnsweringReader(directory / "reader.sock")

    def write(self, relaylock_section: str) -> None:
        self.config.write_text(
            f"[Grants]\nStaticAllowFile={self.static}\n\n"
            f"[Store]\nPath={self.local.store}\nReaderSocket={self.reader.path}\n\n" + relaylock_section)

    def run(self, client: str, program: tuple[str, ...] = ("/usr/bin/env",), **environment: str):
        """relaylock for a connection from `client` (REMOTE_ADDR), with an inherited RELAYCLIENT
        that must never survive: (the process, seconds it took)."""
        env = {"PATH": os.environ["PATH"], "REMOTE_ADDR": client, "RELAYCLIENT": "inherited", **environment}
        started = time.monotonic()
        result = subprocess.run([command("relaylock"), "-c", str(self.config), "--", *program], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        return result, time.monotonic() - started


def relayclient(result: subprocess.CompletedProcess) -> str | None:
    """The RELAYCLIENT the SMTP server (env) was given, None when it had none."""
    for line in result.stdout.splitlines():
        if line.startswith("RELAYCLIENT="):
            return line.partition("=")[2]
    return None


def manual_relaylock_section(server: str) -> str:
    """relaylock(8)'s [Relaylock] example for a host without the store, asking `server` instead."""
    text = (REPOSITORY / "man" / "relaylock.8").read_text()
    start = text.index("\n.Ss A host without the store\n")
    end = min(index for index in (text.find("\n.Ss ", start + 1), text.find("\n.Sh ", start + 1)) if index > 0)
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", text[start:end], re.M | re.S)
    [block] = [block for block in blocks if "[Relaylock]" in block]
    assert MANUAL_SERVER in block
    section = block[block.index("[Relaylock]"):].replace("\\&", "").replace("\\e", "\\")
    return section.replace(MANUAL_SERVER, server)


@pytest.fixture
def deciding(tmp_path):
    """The deciding host: a store with a grant for GRANTED and for an IPv6 client."""
    (tmp_path / "deciding").mkdir()
    setup = Setup(tmp_path / "deciding")
    setup.run("add", GRANTED, check=True)
    setup.run("add", "2001:db8::5", check=True)
    return setup


@pytest.fixture
def host(tmp_path):
    smtp_host = SmtpHost(tmp_path / "smtp-host")
    yield smtp_host
    smtp_host.reader.close()


def test_a_granted_client_relays_and_a_stranger_does_not_without_the_local_store_or_reader(deciding, host):
    with SocketmapProcess(deciding) as service:
        server = f"127.0.0.1:{service.port}"
        host.write(manual_relaylock_section(server))
        granted, _ = host.run(GRANTED)
        stranger, _ = host.run(STRANGER)  # granted in the local store, which must not count
    assert granted.returncode == 0 and relayclient(granted) == ""
    assert granted.stderr == f"relaylock: relay allowed for {GRANTED}: server {server} answers OK\n"
    assert stranger.returncode == 0 and relayclient(stranger) is None
    assert stranger.stderr == f"relaylock: no relay for {STRANGER}: server {server} answers NOTFOUND\n"
    assert host.reader.questions == 0  # the deciding host makes the fresh look, not this one
    assert f"relay allowed for {GRANTED}: manual grant (map poplock, asked as {GRANTED})" in service.output()


def test_relayclient_is_the_smtp_hosts_own_value_and_servermap_picks_the_map(deciding, host):
    deciding.write(extra="\n[Socketmap]\nMaps=relay:YES\n")
    with SocketmapProcess(deciding) as service:
        server = f"127.0.0.1:{service.port}"
        host.write(f"[Relaylock]\nServer={server}\nServerMap=relay\nRelayClient=1\n")
        granted, _ = host.run(GRANTED)
        host.write(f"[Relaylock]\nServer={server}\n")  # the default map name, which this server lacks
        unknown_map, _ = host.run(GRANTED)
    assert relayclient(granted) == "1"
    assert relayclient(unknown_map) is None
    assert unknown_map.stderr == (f"relaylock: cannot decide, not relaying: server {server} answered PERM "
                                  "'poplock serves no map of that name'\n")


def test_a_server_on_ipv6_is_sent_the_client_address_compressed(deciding, host):
    port = free_port("::1")
    with SocketmapProcess(deciding, f"[::1]:{port}") as service:
        host.write(f"[Relaylock]\nServer=[0:0::1]:{port}\n")  # written loosely, as an admin might
        full, _ = host.run("2001:db8:0:0:0:0:0:5")
        mapped, _ = host.run(f"::ffff:{GRANTED}")
    assert relayclient(full) == "" and relayclient(mapped) == ""
    assert f"relaylock: relay allowed for 2001:db8::5: server [::1]:{port} answers OK\n" == full.stderr
    assert "(map poplock, asked as 2001:db8::5)" in service.output()
    assert f"(map poplock, asked as {GRANTED})" in service.output()


def test_a_server_on_a_unix_socket_answers_too(deciding, host, tmp_path):
    path = tmp_path / "socketmap.sock"
    with SocketmapProcess(deciding, str(path)):
        host.write(f"[Relaylock]\nServer={path}\n")
        granted, _ = host.run(GRANTED)
        stranger, _ = host.run(STRANGER)
    assert relayclient(granted) == "" and relayclient(stranger) is None


def test_a_server_that_is_down_runs_the_smtp_server_at_once_without_relayclient(host):
    port = free_port()  # nothing listens there
    host.write(f"[Relaylock]\nServer=127.0.0.1:{port}\n")
    result, elapsed = host.run(GRANTED)
    assert result.returncode == 0 and relayclient(result) is None
    assert result.stderr == (f"relaylock: cannot decide, not relaying: server 127.0.0.1:{port} refused the "
                             "connection (is poplock-socketmap running there?)\n")
    assert elapsed < 5  # no waiting at all: a refused connection is an answer
    missing = host.directory / "no-such.sock"
    host.write(f"[Relaylock]\nServer={missing}\n")
    result, _ = host.run(GRANTED)
    assert relayclient(result) is None
    assert result.stderr == (f"relaylock: cannot decide, not relaying: cannot ask server {missing}: "
                             "No such file or directory\n")


@pytest.fixture
def silent_server():
    """A listening socket that takes connections and never says a word."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_server_that_never_answers_costs_at_most_the_bound(host, silent_server):
    host.write(f"[Relaylock]\nServer={silent_server}\n")
    result, elapsed = host.run(GRANTED)
    assert result.returncode == 0 and relayclient(result) is None
    assert result.stderr == (f"relaylock: cannot decide, not relaying: server {silent_server} did not answer "
                             "within 100ms\n")
    assert elapsed < 1  # the default bound is 100ms; the rest is starting Python twice


def test_the_bound_is_servertimeout(host, silent_server):
    host.write(f"[Relaylock]\nServer={silent_server}\nServerTimeout=1.5s\n")
    result, elapsed = host.run(GRANTED)
    assert relayclient(result) is None and "did not answer within 1500ms" in result.stderr
    assert 1.5 <= elapsed < 10


class ScriptedServer:
    """A real listening socket that answers every connection's first bytes with `reply`, then closes."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.where = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                self.requests.append(connection.recv(1024))
                connection.sendall(self.reply)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("reply, complaint", [
    (netstring("TEMP poplock cannot read its grants now"), "answered TEMP 'poplock cannot read its grants now'"),
    (netstring("PERM poplock cannot read this request"), "answered PERM 'poplock cannot read this request'"),
    (b"220 mail.example.org ESMTP\r\n", "sent a bad reply: not one netstring: '220 mail.example.org ESMTP\\r\\n'"),
    (netstring("OK"), "sent a bad reply: not a socketmap reply: 'OK,'"),
    (netstring("YES please"), "sent a bad reply: not a socketmap reply: 'YES please,'"),
    (b"3:OK OK,", "sent a bad reply: not one netstring: '3:OK OK,'"),
    (b"99999999:OK", "sent a bad reply: not one netstring: '99999999:OK'"),
    (b"5:OK O", "closed the connection without answering (after b'5:OK O')"),
    (b"", "closed the connection without answering"),
], ids=["TEMP", "PERM", "SMTP greeting", "no space", "unknown status", "wrong length", "huge length",
        "cut short", "nothing"])
def test_any_answer_but_ok_or_notfound_relays_nothing_and_is_told_in_one_line(host, reply, complaint):
    server = ScriptedServer(reply)
    try:
        host.write(f"[Relaylock]\nServer={server.where}\n")
        result, _ = host.run(GRANTED)
    finally:
        server.close()
    assert server.requests == [b"17:poplock 127.0.0.5,"]
    assert result.returncode == 0 and relayclient(result) is None
    assert result.stderr == f"relaylock: cannot decide, not relaying: server {server.where} {complaint}\n"


def test_a_real_temp_from_a_server_that_cannot_read_its_store_relays_nothing(deciding, host):
    with SocketmapProcess(deciding) as service:
        deciding.store.write_bytes(b"\x13\x57\x9a\xce" + os.urandom(4000))  # the deciding host's store breaks
        host.write(f"[Relaylock]\nServer=127.0.0.1:{service.port}\n")
        result, _ = host.run(GRANTED)
    assert relayclient(result) is None
    assert result.stderr == (f"relaylock: cannot decide, not relaying: server 127.0.0.1:{service.port} "
                             "answered TEMP 'poplock cannot read its grants now'\n")  # as relaylock(8) shows it


def test_the_local_static_allow_list_still_relays_without_asking(host, silent_server):
    host.static.write_text("10.9.0.0/16\n")
    host.write(f"[Relaylock]\nServer={silent_server}\n")
    result, elapsed = host.run("10.9.1.1")
    assert relayclient(result) == ""
    assert result.stderr == "relaylock: relay allowed for 10.9.1.1: static network 10.9.0.0/16\n"
    assert elapsed < 1  # the silent server was never asked


@pytest.mark.parametrize("setting, complaint", [
    ("Server=mail.example.org:7025", "mail.example.org is not an IP address"),
    ("Server=::1:7025", "an IPv6 address goes in brackets"),
    ("Server=127.0.0.1", "expected ADDRESS:PORT"),
    ("Server=127.0.0.1:0", "expected ADDRESS:PORT"),
    ("Server=run/socketmap.sock", "expected ADDRESS:PORT"),
    ("ServerTimeout=0", "must be longer than 0 and at most 5s"),
    ("ServerTimeout=10s", "must be longer than 0 and at most 5s"),
    ("ServerMap=pop lock", "expected a map name"),
])
def test_an_invalid_server_setting_relays_nothing_and_the_server_still_runs(host, setting, complaint):
    host.write(f"[Relaylock]\nServer=127.0.0.1:7025\n{setting}\n")
    result, _ = host.run(GRANTED)
    assert result.returncode == 0 and relayclient(result) is None  # env ran: the exit status is its own
    [line] = result.stderr.splitlines()
    assert line.startswith(f"relaylock: cannot decide, not relaying: invalid configuration: {host.config}:")
    assert f"[Relaylock] {setting}: {complaint}" in line


def test_mailfront_under_tcpserver_relays_for_a_client_the_deciding_host_granted(deciding, host, tmp_path):
    with SocketmapProcess(deciding) as service:
        host.write(manual_relaylock_section(f"127.0.0.1:{service.port}"))
        wrapper = [command("relaylock"), "-c", str(host.config), "--"]
        with TcpServer(mailfront(tmp_path / "mailfront"), wrapper=wrapper, environment={"RELAYCLIENT": ""}) as smtp:
            assert try_relay(smtp.host, smtp.port, source=GRANTED)[0] == RELAYED
            code, text = try_relay(smtp.host, smtp.port, source=STRANGER)
            assert (code, text) == (550, "5.1.0 Mail system is not configured to accept that recipient")
        service.stop()
        with TcpServer(mailfront(tmp_path / "mailfront"), wrapper=wrapper) as stranded:
            # the deciding host is gone: local mail still flows, relaying does not
            assert try_relay(stranded.host, stranded.port, source=GRANTED)[0] == 550
            assert try_relay(stranded.host, stranded.port, source=GRANTED,
                             recipient="postmaster@poplock.test")[0] == 250
    assert f"relaylock: relay allowed for {GRANTED}: server 127.0.0.1:{service.port} answers OK" in smtp.log.read_text()
    assert f"server 127.0.0.1:{service.port} refused the connection" in stranded.log.read_text()


def test_relaylock_with_a_server_imports_nothing_heavy_and_not_the_store(deciding, host):
    heavy = ["re", "os", "socket", "ipaddress", "dataclasses", "typing", "systemd", "systemd.journal",
             "argparse", "logging", "json", "dbm", "_gdbm", "poplock.store", "poplock.access"]
    with SocketmapProcess(deciding) as service:
        host.write(f"[Relaylock]\nServer=127.0.0.1:{service.port}\n")
        probe = (
            f"import sys; sys.path.insert(0, {str(REPOSITORY)!r})\n"
            "from poplock import relaylock\n"
            f"address = relaylock.find_address({{b'REMOTE_ADDR': b'{GRANTED}'}})\n"
            f"print(relaylock.decide({str(host.config)!r}, None, address)[0] == '')\n"
            f"print(sorted(set({heavy!r}) & set(sys.modules)))\n"
        )
        result = subprocess.run(["/usr/bin/python3", "-IS", "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["True", "[]"]
