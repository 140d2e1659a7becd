"""poplock-policy on real sockets: Postfix's own requests, pipelining, garbage, slow and oversized peers."""

import json
import socket
import subprocess
import threading
import time

import pytest
from support.poplock import PolicyProcess, command
from support.ports import free_port

from poplock.logs import iso_time

# Attributes Postfix 3.7 sent for a relay check (../shared/recipes/postfix.md), in order.
POSTFIX_REQUEST = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\n"
    "client_name=unknown\nclient_port=41234\nreverse_client_name=unknown\nserver_address=127.0.0.1\n"
    "server_port=11225\nhelo_name=client.poplock.test\nsender=sender@poplock.test\n"
    "recipient=someone@elsewhere.example\nrecipient_count=0\nqueue_id=\ninstance=2b5e.6612e9c3.e1b1.0\n"
    "size=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\n"
    "ccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=\n"
    "encryption_cipher=\nencryption_keysize=0\npolicy_context=\n\n"
)


class Client:
    def __init__(self, host: str, port: int):
        self.socket = socket.create_connection((host, port), timeout=10)
        self.pending = b""

    def send(self, text: str | bytes) -> None:
        self.socket.sendall(text.encode() if isinstance(text, str) else text)

    def reply(self) -> str:
        while b"\n\n" not in self.pending:
            data = self.socket.recv(4096)
            if not data:
                raise ConnectionError("closed by the service")
            self.pending += data
        reply, _, self.pending = self.pending.partition(b"\n\n")
        return reply.decode()

    def ask(self, client: str) -> str:
        self.send(POSTFIX_REQUEST.format(client=client))
        return self.reply()

    def closed_by_peer(self, timeout: float) -> bool:
        """The service closes the connection within `timeout` seconds (False: it stays open)."""
        self.socket.settimeout(timeout)
        try:
            return self.socket.recv(4096) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.socket.settimeout(10)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def service(setup):
    setup.run("add", "192.0.2.7", check=True)
    setup.write(extra="\n[Policy]\nRequestTimeout=500ms\n")
    with PolicyProcess(setup) as policy:
        yield policy


def connect(service) -> Client:
    return Client("127.0.0.1", service.port)


def test_a_granted_client_gets_ok_and_others_dunno_on_one_connection(service):
    client = connect(service)
    assert client.ask("192.0.2.7") == "action=OK"
    assert client.ask("192.0.2.8") == "action=DUNNO"
    assert client.ask("::ffff:192.0.2.7") == "action=OK"
    client.close()
    assert "relay allowed for 192.0.2.7: manual grant (someone@elsewhere.example)" in service.output()


def test_pipelined_requests_are_answered_in_order(service):
    client = connect(service)
    clients = ["192.0.2.7", "192.0.2.8", "192.0.2.7", "203.0.113.1"] * 5
    client.send("".join(POSTFIX_REQUEST.format(client=c) for c in clients))
    assert [client.reply() for _ in clients] == ["action=OK", "action=DUNNO", "action=OK", "action=DUNNO"] * 5


def test_a_request_split_into_tiny_pieces_is_still_answered(service):
    client = connect(service)
    for character in POSTFIX_REQUEST.format(client="192.0.2.7"):
        client.send(character)
    assert client.reply() == "action=OK"


def test_garbage_gets_dunno_and_the_connection_goes_on(service):
    client = connect(service)
    client.send("this is not a policy request\n\n")
    assert client.reply() == "action=DUNNO"
    client.send("request=smtpd_access_policy\nclient_address=not-an-address\n\n")
    assert client.reply() == "action=DUNNO"
    client.send(b"request=smtpd_access_policy\nclient_address=192.0.2.7\nhelo_name=\xff\xfe\n\n")
    assert client.reply() == "action=OK"
    assert client.ask("192.0.2.8") == "action=DUNNO"


def test_an_oversized_request_closes_the_connection_and_the_service_goes_on(service):
    client = connect(service)
    client.send("request=smtpd_access_policy\nclient_address=192.0.2.7\nhelo_name=" + "x" * 100_000)
    assert client.closed_by_peer(5)
    assert connect(service).ask("192.0.2.7") == "action=OK"


def test_a_client_that_stalls_half_way_is_closed_after_the_request_timeout(service):
    client = connect(service)
    client.send("request=smtpd_access_policy\nclient_address=192.0.2.7\n")
    started = time.monotonic()
    assert client.closed_by_peer(10)
    assert time.monotonic() - started < 5
    assert "sent half a request and stalled" in service.output()


def test_the_request_timeout_bounds_each_request_not_the_connection(service):
    client = connect(service)
    started = time.monotonic()
    answers = []
    while time.monotonic() - started < 1.5:  # three times RequestTimeout=500ms, one request at a time
        answers.append(client.ask("192.0.2.7"))
        time.sleep(0.05)  # between requests: idle time, which IdleTimeout bounds
    assert set(answers) == {"action=OK"} and len(answers) >= 3


def test_an_idle_connection_is_closed_after_the_idle_timeout_and_not_before_the_request_timeout(setup):
    setup.run("add", "192.0.2.7", check=True)
    setup.write(extra="\n[Policy]\nRequestTimeout=200ms\nIdleTimeout=2s\n")
    with PolicyProcess(setup) as policy:
        client = connect(policy)
        assert client.ask("192.0.2.7") == "action=OK"
        assert not client.closed_by_peer(0.6)  # idle three times RequestTimeout: still open
        assert client.ask("192.0.2.8") == "action=DUNNO"
        assert client.closed_by_peer(10)
        assert "that stayed idle for [Policy] IdleTimeout=2s" in policy.output()


def test_many_connections_at_once_are_all_answered(service):
    answers = []

    def one_connection(index: int) -> None:
        client = connect(service)
        for _ in range(20):
            answers.append(client.ask("192.0.2.7" if index % 2 else "192.0.2.99"))
        client.close()

    threads = [threading.Thread(target=one_connection, args=(index,)) for index in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(answers)) == ["action=DUNNO", "action=OK"] and len(answers) == 600
    assert answers.count("action=OK") == 300


def test_changes_to_the_store_are_seen_without_a_restart(service, setup):
    client = connect(service)
    assert client.ask("192.0.2.50") == "action=DUNNO"
    setup.run("add", "192.0.2.50", check=True)
    assert client.ask("192.0.2.50") == "action=OK"
    setup.run("remove", "192.0.2.50", check=True)
    assert client.ask("192.0.2.50") == "action=DUNNO"
    setup.static.write_text("192.0.2.48/29\n")
    assert client.ask("192.0.2.50") == "action=OK"


def test_a_store_that_cannot_be_read_gives_dunno_never_ok(service, setup):
    client = connect(service)
    assert client.ask("192.0.2.7") == "action=OK"
    setup.store.unlink()
    setup.store.write_bytes(b"this is not a gdbm file" * 100)
    assert client.ask("192.0.2.7") == "action=DUNNO"
    assert "cannot decide for 192.0.2.7, answering DUNNO" in service.output()


def test_the_action_for_allowed_clients_is_configurable(setup):
    setup.run("add", "192.0.2.7", check=True)
    setup.write(extra="\n[Policy]\nAction=relay_from_poplock\n")
    with PolicyProcess(setup) as policy:
        client = connect(policy)
        assert client.ask("192.0.2.7") == "action=relay_from_poplock"
        assert client.ask("192.0.2.8") == "action=DUNNO"


def test_it_listens_on_a_unix_socket_too(setup, tmp_path):
    setup.run("add", "192.0.2.7", check=True)
    path = tmp_path / "policy.sock"
    with PolicyProcess(setup, str(path)):
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.connect(str(path))
        unix.sendall(POSTFIX_REQUEST.format(client="192.0.2.7").encode())
        assert unix.recv(4096) == b"action=OK\n\n"
        unix.close()


def test_it_takes_its_socket_from_systemd_socket_activation(setup):
    setup.run("add", "192.0.2.7", check=True)
    port = free_port()
    launcher = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                                 command("poplock-policy"), "-c", str(setup.config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        from support.ports import wait_for_port

        wait_for_port("127.0.0.1", port)
        assert Client("127.0.0.1", port).ask("192.0.2.7") == "action=OK"
    finally:
        launcher.terminate()
        launcher.wait(10)


def test_a_bad_configuration_stops_start_up_with_exit_78(setup):
    setup.static.write_text("192.0.2.0/24/7\n")
    result = subprocess.run([command("poplock-policy"), "-c", str(setup.config), "--listen", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert f"{setup.static}:1:" in result.stderr


def test_refusals_are_logged_only_when_asked_for(setup):
    setup.write(extra="\n[Policy]\nLogRefused=yes\n")
    with PolicyProcess(setup) as policy:
        assert connect(policy).ask("192.0.2.8") == "action=DUNNO"
    assert "no relay for 192.0.2.8: no grant" in policy.output()


def test_a_static_list_that_breaks_while_running_is_a_configuration_event_and_refuses(service, setup):
    client = connect(service)
    setup.static.write_text("192.0.2.0/24\n")
    assert client.ask("192.0.2.99") == "action=OK"
    setup.static.write_text("192.0.2.0/24/8\n")
    assert client.ask("192.0.2.99") == "action=DUNNO"
    assert "invalid configuration" in service.output()


def test_a_unix_socket_another_instance_listens_on_is_not_taken_over(setup, tmp_path):
    path = tmp_path / "policy.sock"
    with PolicyProcess(setup, str(path)):
        second = subprocess.run([command("poplock-policy"), "-c", str(setup.config), "--listen", str(path)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 71 and "another process is listening there" in second.stderr
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.connect(str(path))  # still the first instance's
        unix.close()


def test_trouble_that_repeats_is_logged_once_not_per_request(service, setup):
    client = connect(service)
    setup.static.write_text("192.0.2.0/24/8\n")
    for _ in range(20):
        assert client.ask("192.0.2.99") == "action=DUNNO"
    assert service.output().count("invalid configuration") == 1


def test_with_a_header_configured_the_header_context_gets_a_prepend_naming_the_login(setup, tmp_path):
    now = int(time.time())
    listing = tmp_path / "grants.jsonl"  # a grant opened by alice's login, as `show --json` prints it
    listing.write_text(json.dumps({"kind": "grant", "address": "192.0.2.9", "expires": iso_time(now + 1800),
                                   "source": "dovecot", "user": "alice", "login_time": iso_time(now - 60)}) + "\n")
    setup.run("import", str(listing), check=True)
    setup.run("add", "192.0.2.10", check=True)  # by hand: no login to name
    setup.write(extra="\n[Policy]\nHeader=X-PopBeforeSMTP\n")
    with PolicyProcess(setup) as policy:
        client = Client("127.0.0.1", policy.port)
        header = "policy_context=poplock-header\n\n"
        client.send(POSTFIX_REQUEST.format(client="192.0.2.9").replace("policy_context=\n\n", header))
        assert client.reply() == (f"action=PREPEND X-PopBeforeSMTP: alice (dovecot login from 192.0.2.9 at "
                                  f"{iso_time(now - 60)})")
        client.send(POSTFIX_REQUEST.format(client="192.0.2.10").replace("policy_context=\n\n", header))
        assert client.reply() == "action=DUNNO"
        assert client.ask("192.0.2.9") == "action=OK"  # the relay decision itself is unchanged
        client.close()


def test_the_commands_poplock_policy_8_asks_the_service_with_work_as_shown(setup, tmp_path):
    # Run as the page writes them, with this test's port and socket: commands a default Debian has.
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "man/poplock-policy.8").read_text()
    blocks = [block.split("\n.Ed\n")[0] for block in page.split(".Bd -literal -offset indent\n")[1:]]
    examples = [(command, expected) for block in blocks
                for command, expected in re.findall(r"^\$ (printf .*?\n(?:    .*\n|[^$].*\n)*?)(action=.*)$",
                                                    block + "\n", re.M)]
    assert len(examples) == 3 and not any(" nc " in command for command, _ in examples)
    now = int(time.time())
    listing = tmp_path / "grants.jsonl"
    listing.write_text(json.dumps({"kind": "grant", "address": "192.0.2.7", "expires": iso_time(now + 1800),
                                   "source": "dovecot", "user": "alice", "login_time": iso_time(now - 60)}) + "\n")
    setup.run("import", str(listing), check=True)
    setup.write(extra="\n[Policy]\nHeader=X-PopBeforeSMTP\n")
    unix = tmp_path / "policy.sock"
    port = free_port()
    with PolicyProcess(setup, f"127.0.0.1:{port}", str(unix)):
        for command, expected in examples:
            command = (command.replace("\\en", "\\n").replace("10040", str(port))
                       .replace("/var/spool/postfix/private/poplock", str(unix)))
            result = subprocess.run(["sh", "-c", command.replace("python3 ", "/usr/bin/python3 ")],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            assert result.stdout == re.sub(r" at \S+\)$", f" at {iso_time(now - 60)})", expected) + "\n"
