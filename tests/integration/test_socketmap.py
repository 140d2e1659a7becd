"""poplock-socketmap on real sockets: the MTAs' requests and spellings, map names, errors, postmap -q."""

import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from support.journald import send_until_readable
from support.poplock import ReaderProcess, Setup, command
from support.ports import free_port, wait_for_port
from support.processes import reachable_by_everyone
from support.socketmap import SocketmapClient, SocketmapProcess, netstring

REPOSITORY = Path(__file__).resolve().parents[2]
PAGE = REPOSITORY / "man" / "poplock-socketmap.8"


@pytest.fixture
def service(setup):
    setup.run("add", "192.0.2.7", check=True)
    setup.run("add", "2001:db8::5", check=True)
    setup.write(extra="\n[Socketmap]\nRequestTimeout=500ms\n")
    with SocketmapProcess(setup, verbose=True) as socketmap:
        yield socketmap


def connect(service) -> SocketmapClient:
    return SocketmapClient(service.port)


def test_a_granted_address_gets_ok_and_others_notfound_on_one_connection(service):
    client = connect(service)
    assert client.ask("192.0.2.7") == "OK OK"
    assert client.ask("192.0.2.8") == "NOTFOUND "
    assert client.ask("::ffff:192.0.2.7") == "OK OK"
    client.close()
    assert "relay allowed for 192.0.2.7: manual grant (map poplock, asked as 192.0.2.7)" in service.output()


def test_postfix_asks_for_the_host_name_first_and_that_is_simply_not_found(service):
    client = connect(service)
    for _ in range(30):  # more than the unreadable requests a connection may send: these are not unreadable
        assert client.ask("unknown") == "NOTFOUND "
        assert client.ask("client.example.org") == "NOTFOUND "
        assert client.ask("192.0.2.7") == "OK OK"
    assert "cannot read a request" not in service.output()


@pytest.mark.parametrize("key", ["2001:db8::5", "2001:db8:0:0:0:0:0:5", "2001:0db8:0000:0000:0000:0000:0000:0005"])
def test_every_spelling_of_an_ipv6_address_the_mtas_send_finds_its_grant(service, key):
    assert connect(service).ask(key) == "OK OK"


@pytest.mark.parametrize("key", ["2001:DB8::5", "2001:db8:0::5", "[2001:db8::5]", "IPv6:2001:db8::5", "192.0.2.7 ",
                                 "192.0.2.07", "192.0.2.7/32", "connect:192.0.2.7"])
def test_a_key_that_names_a_granted_address_in_no_mtas_spelling_is_not_found(service, key):
    assert connect(service).ask(key) == "NOTFOUND "


def test_pipelined_requests_are_answered_in_order(service):
    client = connect(service)
    keys = ["192.0.2.7", "192.0.2.8", "unknown", "2001:db8::5"] * 5
    client.send(b"".join(netstring(f"poplock {key}") for key in keys))
    assert [client.reply() for _ in keys] == ["OK OK", "NOTFOUND ", "NOTFOUND ", "OK OK"] * 5


def test_a_request_split_into_single_bytes_is_still_answered(service):
    client = connect(service)
    for byte in netstring("poplock 192.0.2.7"):
        client.send(bytes([byte]))
    assert client.reply() == "OK OK"


def test_an_unknown_map_name_gets_perm_and_the_connection_goes_on(service):
    client = connect(service)
    assert client.ask("192.0.2.7", name="relay") == "PERM poplock serves no map of that name"
    client.send(netstring("poplock"))
    assert client.reply() == "PERM poplock cannot read this request"
    assert client.ask("192.0.2.7") == "OK OK"
    assert "unknown map name 'relay'" in service.output()


def test_bytes_that_are_not_a_netstring_close_the_connection_without_an_answer(service):
    client = connect(service)
    client.send(b"poplock 192.0.2.7\n")
    assert client.closed_by_peer(5)
    assert connect(service).ask("192.0.2.7") == "OK OK"
    assert "not a netstring" in service.output()


def test_an_oversized_length_closes_the_connection_before_its_bytes_arrive(service):
    client = connect(service)
    client.send(b"100000:poplock ")
    assert client.closed_by_peer(5)
    assert "request larger than 1024 bytes" in service.output()


def test_a_client_that_stalls_half_way_is_closed_after_the_request_timeout(service):
    client = connect(service)
    client.send(b"17:poplock 192.0")
    assert client.closed_by_peer(10)
    assert "did not end within [Socketmap] RequestTimeout=500ms" in service.output()


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
    assert len(answers) == 600 and answers.count("OK OK") == 300 and answers.count("NOTFOUND ") == 300


def test_changes_to_the_store_and_allow_list_are_seen_without_a_restart(service, setup):
    client = connect(service)
    assert client.ask("192.0.2.50") == "NOTFOUND "
    setup.run("add", "192.0.2.50", check=True)
    assert client.ask("192.0.2.50") == "OK OK"
    setup.run("remove", "192.0.2.50", check=True)
    assert client.ask("192.0.2.50") == "NOTFOUND "
    setup.static.write_text("192.0.2.48/29\n")
    assert client.ask("192.0.2.50") == "OK OK"


def test_a_store_that_cannot_be_read_gives_temp_never_ok(service, setup):
    client = connect(service)
    assert client.ask("192.0.2.7") == "OK OK"
    setup.store.unlink()
    setup.store.write_bytes(b"this is not a gdbm file" * 100)
    assert client.ask("192.0.2.7") == "TEMP poplock cannot read its grants now"
    assert client.ask("192.0.2.8").startswith("TEMP ")
    assert client.ask("unknown") == "NOTFOUND "  # no lookup needed
    assert "cannot decide for 192.0.2.7, answering TEMP" in service.output()


def test_a_static_list_that_breaks_while_running_gives_temp_and_a_configuration_event(service, setup):
    client = connect(service)
    setup.static.write_text("192.0.2.0/24\n")
    assert client.ask("192.0.2.99") == "OK OK"
    setup.static.write_text("192.0.2.0/24/8\n")
    assert client.ask("192.0.2.99").startswith("TEMP ")
    assert client.ask("192.0.2.7").startswith("TEMP ")
    assert "invalid configuration" in service.output()


def test_each_map_name_answers_the_value_the_configuration_gives_it(setup):
    setup.run("add", "192.0.2.7", check=True)
    setup.write(extra="\n[Socketmap]\nMaps=poplock:OK sendmail:RELAY postfix:relay_from_poplock\n")
    with SocketmapProcess(setup) as socketmap:
        client = connect(socketmap)
        assert client.ask("192.0.2.7", name="poplock") == "OK OK"
        assert client.ask("192.0.2.7", name="sendmail") == "OK RELAY"
        assert client.ask("192.0.2.7", name="postfix") == "OK relay_from_poplock"
        assert client.ask("192.0.2.8", name="sendmail") == "NOTFOUND "
        assert client.ask("192.0.2.7", name="other").startswith("PERM ")


def test_it_listens_on_a_unix_socket_and_a_port_at_once(setup, tmp_path):
    setup.run("add", "192.0.2.7", check=True)
    path = tmp_path / "socketmap.sock"
    port = free_port()
    with SocketmapProcess(setup, str(path), f"127.0.0.1:{port}"):
        assert SocketmapClient(path).ask("192.0.2.7") == "OK OK"
        assert SocketmapClient(port).ask("192.0.2.7") == "OK OK"


def test_it_takes_its_socket_from_systemd_socket_activation(setup):
    setup.run("add", "192.0.2.7", check=True)
    port = free_port()
    launcher = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                                 command("poplock-socketmap"), "-c", str(setup.config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port)
        assert SocketmapClient(port).ask("192.0.2.7") == "OK OK"
    finally:
        launcher.terminate()
        launcher.wait(10)


def test_a_bad_configuration_stops_start_up_with_exit_78(setup):
    setup.write(extra="\n[Socketmap]\nMaps=poplock\n")
    result = subprocess.run([command("poplock-socketmap"), "-c", str(setup.config), "--listen", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "[Socketmap] Maps=poplock: 'poplock': expected NAME:VALUE" in result.stderr


def test_without_a_socket_it_exits_64_and_says_where_sockets_come_from(setup):
    result = subprocess.run([command("poplock-socketmap"), "-c", str(setup.config)], capture_output=True, text=True,
                            timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 64
    assert "poplock-socketmap.socket or give --listen" in result.stderr


def test_refusals_are_logged_only_when_asked_for(setup):
    setup.write(extra="\n[Socketmap]\nLogRefused=yes\n")
    with SocketmapProcess(setup) as socketmap:
        assert connect(socketmap).ask("192.0.2.8") == "NOTFOUND "
        assert connect(socketmap).ask("unknown") == "NOTFOUND "
    assert "no relay for 192.0.2.8: no grant (map poplock, asked as 192.0.2.8)" in socketmap.output()
    assert "unknown" not in socketmap.output()


def postmap_query(tmp_path: Path, key: str, table: str) -> subprocess.CompletedProcess:
    """`postmap -q KEY TABLE`, with a main.cf of its own: postmap needs one, any one."""
    config = tmp_path / "postmap"
    config.mkdir(exist_ok=True)
    (config / "main.cf").touch()
    return subprocess.run(["postmap", "-c", str(config), "-q", key, table], capture_output=True, text=True,
                          timeout=30)


def test_postmap_q_as_the_manual_shows_it_prints_ok_for_a_grant_and_nothing_for_others(setup, tmp_path):
    text = PAGE.read_text()
    shown = re.search(r"^\.Dl postmap -q 192\.0\.2\.7 socketmap:unix:(\S+):poplock$", text, re.M)
    assert shown, "poplock-socketmap(8) does not show the postmap -q check"
    assert re.search(r"^\.Dl OK$", text[shown.end():], re.M)
    setup.run("add", "192.0.2.7", check=True)
    path = reachable_by_everyone(tmp_path) / "poplock-socketmap"
    with SocketmapProcess(setup, str(path)):
        found = postmap_query(tmp_path, "192.0.2.7", f"socketmap:unix:{path}:poplock")
        assert (found.returncode, found.stdout, found.stderr) == (0, "OK\n", "")
        missing = postmap_query(tmp_path, "192.0.2.8", f"socketmap:unix:{path}:poplock")
        assert (missing.returncode, missing.stdout) == (1, "")
    gone = postmap_query(tmp_path, "192.0.2.7", f"socketmap:unix:{path}:poplock")
    assert gone.returncode == 1 and gone.stdout == "" and "query error" in gone.stderr


# --- the fresh look: a NOTFOUND first asks poplock-reader to read the journal up to now ----------

FRESH_TRIALS = 30


def login_line(address: str) -> str:
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture
def fresh(journald, tmp_path):
    """A configuration whose lookups ask a real poplock-reader, following a real journald, before NOTFOUND."""
    from support.journald import unique_tag

    tag = unique_tag()
    setup = Setup(tmp_path, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    setup.config.write_text(setup.config.read_text().replace(
        "[Store]\n", f"[Store]\nReaderSocket={tmp_path / 'reader.sock'}\nReaderWait=1s\n"))
    setup.tag = tag
    return setup


def logged_and_readable(setup, address: str) -> None:
    """Log a trusted login, and return once any journal reader can read it."""
    send_until_readable(login_line(address), setup.tag)


def ask_as_exim(port: int, key: str) -> bytes:
    """One lookup the way Exim's ${readsocket} makes it: a new connection, the request, a half
    close, then everything until the server closes."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(netstring(f"poplock {key}"))
    connection.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := connection.recv(4096):
        received += chunk
    connection.close()
    return received


def test_right_after_a_login_the_socketmap_answers_ok_every_time_even_to_a_half_closed_connection(fresh):
    with ReaderProcess(fresh), SocketmapProcess(fresh) as socketmap:
        client = connect(socketmap)
        refused = []
        for index in range(FRESH_TRIALS):
            address = f"10.85.{index >> 8}.{index & 255}"
            logged_and_readable(fresh, address)
            if client.ask(address) != "OK OK":
                refused.append(address)
            other = f"10.86.{index >> 8}.{index & 255}"
            logged_and_readable(fresh, other)
            if ask_as_exim(socketmap.port, other) != b"5:OK OK,":
                refused.append(other)
        assert client.ask("10.87.0.1") == "NOTFOUND "  # no login: the reader read, and still nothing
        assert ask_as_exim(socketmap.port, "10.87.0.2") == b"9:NOTFOUND ,"
    assert refused == []


def test_with_the_reader_down_notfound_comes_within_the_wait_and_pipelined_answers_stay_in_order(fresh):
    (fresh.directory / "reader.sock").touch()  # not a socket anyone answers on
    fresh.run("add", "10.88.0.1", check=True)
    with SocketmapProcess(fresh) as socketmap:
        client = connect(socketmap)
        client.send(netstring("poplock 10.88.0.2") + netstring("poplock 10.88.0.1") + netstring("poplock x"))
        assert [client.reply() for _ in range(3)] == ["NOTFOUND ", "OK OK", "NOTFOUND "]
        assert ask_as_exim(socketmap.port, "10.88.0.3") == b"9:NOTFOUND ,"
        assert "poplock-reader did not read the journal for a refusal" in socketmap.output()


# --- the manual and the command line ----------------------------------------------------------------

def documented_options() -> set[str]:
    items = "\n".join(line for line in PAGE.read_text().splitlines() if line.startswith(".It "))
    return {"-" + flag for flag in re.findall(r"\bFl (-?[A-Za-z][\w-]*)", items)}


@pytest.mark.parametrize("program", ["poplock-socketmap", "poplock-smtpd-filter"])
def test_every_option_of_both_programs_is_documented_in_poplock_socketmap_8(program):
    result = subprocess.run([command(program), "--help"], capture_output=True, text=True, check=True, timeout=30)
    options = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", result.stdout.partition("options:")[2]))
    assert options and options <= documented_options(), options - documented_options()


@pytest.mark.parametrize("program", ["poplock-socketmap", "poplock-smtpd-filter"])
def test_a_usage_error_exits_64_as_the_page_says_and_version_comes_from_the_one_place(program):
    from poplock import __version__

    result = subprocess.run([command(program), "--no-such-option"], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 64 and "usage" in result.stderr
    assert re.search(r"^\.It 64\nUsage error", PAGE.read_text(), re.M)
    version = subprocess.run([command(program), "--version"], capture_output=True, text=True, timeout=30)
    assert (version.returncode, version.stdout) == (0, f"{program} {__version__}\n")


def test_the_socket_unit_listens_where_the_manuals_postfix_lines_look():
    unit = (REPOSITORY / "units" / "poplock-socketmap.socket").read_text()
    assert "\nListenStream=/var/spool/postfix/private/poplock-socketmap\n" in unit
    assert "socketmap:unix:private/poplock-socketmap:poplock" in PAGE.read_text()
    service = (REPOSITORY / "units" / "poplock-socketmap.service").read_text()
    assert "\nExecStart=/usr/bin/poplock-socketmap\n" in service and "\nRestartPreventExitStatus=78\n" in service
