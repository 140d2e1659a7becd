"""relaylock: decide RELAYCLIENT for one SMTP connection, then exec the SMTP server.

    relaylock [-c CONFIG] [--relayclient VALUE] [--] PROGRAM [ARGS...]

For qmail-style servers (qmail-smtpd, mailfront, qpsmtpd, courier esmtpd) started per
connection by a systemd Accept=yes socket, tcpserver or inetd. The client address is
getpeername() of standard input when that is an inet socket, else $REMOTE_ADDR
(systemd), else $TCPREMOTEIP (tcpserver). A client with a live grant or in the static
allow list gets RELAYCLIENT (empty unless configured: qpsmtpd needs a true value);
any other client has an inherited RELAYCLIENT removed. On a host without the store,
[Relaylock] Server= names a poplock-socketmap to ask instead (ask_server), for at most
ServerTimeout= in all; the static allow list is still this host's. Then PROGRAM always runs:
whatever goes wrong here grants nothing, is told in one line on standard error, and
mail keeps flowing. Standard output is the client's connection: nothing is written to it.

This runs once per SMTP connection, so its imports are a budget: the interpreter is
started with -I -S, and this module and everything it imports stay clear of `os`,
`re`, `socket`, `ipaddress`, `dataclasses`, `typing` and the journal module. poplock's
own modules are imported only inside the decision, so that even a broken install
still execs the server.
"""

import _socket
import posix
import sys

USAGE = "usage: relaylock [-c CONFIG] [--relayclient VALUE] [--] PROGRAM [ARGS...]"
EX_USAGE = 64
EX_OSERR = 71
RELAYCLIENT = b"RELAYCLIENT"


def parse_arguments(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(config path, RELAYCLIENT override, program argv); ValueError on a usage error."""
    config = relay_client = None
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if word in ("-c", "--config", "--relayclient"):
            if index + 1 >= len(argv):
                raise ValueError(f"{word} needs a value")
            if word == "--relayclient":
                relay_client = argv[index + 1]
            else:
                config = argv[index + 1]
            index += 2
        elif word.startswith("--config="):
            config = word.partition("=")[2]
            index += 1
        elif word.startswith("--relayclient="):
            relay_client = word.partition("=")[2]
            index += 1
        elif word.startswith("-") and word != "-":
            raise ValueError(f"unknown option {word}")
        else:
            break
    program = argv[index:]
    if not program:
        raise ValueError("no SMTP server to run")
    return config, relay_client, program


def find_address(environment: dict) -> str:
    """The client's canonical address. Raises when there is none to be had."""
    from poplock.addresses import normalize_address
    from poplock.connection import client_address

    raw = client_address(environment)
    if raw is None:
        raise LookupError("cannot tell the client's address (standard input is not a socket, "
                          "and neither REMOTE_ADDR nor TCPREMOTEIP is set)")
    return normalize_address(raw)


def decide(config_path: str | None, relay_client: str | None, address: str):
    """(RELAYCLIENT value or None, the event, log message, the account). Raises on any failure."""
    from poplock.config import load_config

    config = load_config(config_path, sections=("Grants", "Store", "Relaylock"))
    value = relay_client if relay_client is not None else config.relay_client
    if config.relaylock_server:
        return decide_remotely(config, value, address)
    import time

    from poplock import events
    from poplock.access import check_relay_in_files, describe, grant_user

    now = time.time()
    decision = check_relay_in_files(config, address, now)
    if decision.allowed:
        return value, events.RELAY_ALLOWED, describe(decision, now), grant_user(decision)
    return None, events.RELAY_REFUSED, describe(decision, now), None


def decide_remotely(config, value: str, address: str):
    """decide() on a host without the store: the static allow list here, then the answer of the
    poplock-socketmap at [Relaylock] Server=, which makes the rest of the decision (its store,
    its deny list, its fresh look). The local store and poplock-reader are never asked."""
    from poplock import events
    from poplock.addresses import find_network, load_allow_list

    network = find_network(load_allow_list(config.static_allow_file), address)
    if network is not None:
        return value, events.RELAY_ALLOWED, f"relay allowed for {address}: static network {network.text}", None
    server = config.relaylock_server
    status, _ = ask_server(server, config.relaylock_server_map, address, config.relaylock_server_timeout)
    if status == "OK":
        return value, events.RELAY_ALLOWED, f"relay allowed for {address}: server {server} answers OK", None
    return None, events.RELAY_REFUSED, f"no relay for {address}: server {server} answers NOTFOUND", None


MAX_REPLY_BYTES = 4096  # poplock-socketmap's replies are OK and a value of up to 200 characters


def ask_server(server: str, name: str, address: str, timeout: float) -> tuple[str, str]:
    """("OK", value) or ("NOTFOUND", "") from the socketmap server at `server` (ADDRESS:PORT,
    [IPV6]:PORT or a unix socket path), asked `NAME ADDRESS` within `timeout` seconds in all.
    LookupError, naming the server, for anything else: TEMP, PERM, no answer in time, a
    refused connection, bytes that are no reply."""
    import time

    from poplock.errors import ProtocolError
    from poplock.socketmapprotocol import format_request, parse_reply

    deadline = time.monotonic() + timeout
    if server.startswith("/"):
        connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        where = server
    else:
        host, _, port = server.rpartition(":")
        connection = _socket.socket(_socket.AF_INET6 if host.startswith("[") else _socket.AF_INET,
                                    _socket.SOCK_STREAM)
        where = (host.strip("[]"), int(port))
    try:
        connection.settimeout(timeout)
        connection.connect(where)
        connection.sendall(format_request(name, address))
        reply = b""
        while (size := _reply_size(reply)) is None or len(reply) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            connection.settimeout(remaining)
            data = connection.recv(MAX_REPLY_BYTES)
            if not data:
                raise LookupError(f"server {server} closed the connection without answering" +
                                  (f" (after {reply[:40]!r})" if reply else ""))
            reply += data
        # what follows a whole reply is ignored; a reply not ended where its length says is shown whole
        status, text = parse_reply(reply[:size] if reply[size - 1:size] == b"," else reply)
    except TimeoutError:
        raise LookupError(f"server {server} did not answer within {round(timeout * 1000)}ms") from None
    except ConnectionRefusedError:
        raise LookupError(f"server {server} refused the connection (is poplock-socketmap running there?)") from None
    except OSError as error:
        raise LookupError(f"cannot ask server {server}: {error.strerror or error}") from None
    except ProtocolError as error:
        raise LookupError(f"server {server} sent a bad reply: {error}") from None
    finally:
        connection.close()
    if status in ("OK", "NOTFOUND"):
        return status, text
    raise LookupError(f"server {server} answered {status} {text[:200]!r}")


def _reply_size(data: bytes) -> int | None:
    """The size of the netstring `data` starts with, once its length has arrived (None before);
    len(data) when it cannot be the start of a reply, for parse_reply to say why."""
    colon = data.find(b":", 0, 8)
    if colon < 0:
        return None if len(data) < 7 and (not data or data.isdigit()) else len(data)
    digits = data[:colon]
    if not digits.isdigit() or int(digits) > MAX_REPLY_BYTES:
        return len(data)
    return colon + 1 + int(digits) + 1


def report(message: str, event=None, address: str | None = None, priority: int = 6, user: str | None = None) -> None:
    """One line to the journal or standard error (never to the client; see connection.report)."""
    try:
        from poplock.connection import report as send_report

        send_report("relaylock", message, priority, event, address, user)
    except Exception:  # noqa: BLE001 - reporting must never stop the server from running
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from poplock import __version__

        report(f"version {__version__}")  # on standard error, like --help: standard output is the client's
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        report(USAGE)
        return 0
    try:
        config_path, relay_client, program = parse_arguments(argv)
    except ValueError as error:
        report(f"{error}\n{USAGE}", priority=3)
        return EX_USAGE
    environment = dict(posix.environ)
    environment.pop(RELAYCLIENT, None)  # whatever happens next, nothing inherited opens the relay
    address = None
    try:
        address = find_address(environment)
        value, event, message, user = decide(config_path, relay_client, address)
        if value is not None:
            environment[RELAYCLIENT] = value.encode()
        report(message, event, address, user=user)
    except BaseException as error:  # noqa: BLE001 - every failure here must still run the server
        report(f"cannot decide, not relaying: {_describe(error)}", _failure_event(error), address, priority=3)
    from poplock.connection import execute

    error = execute(program, environment)
    report(f"cannot run {program[0]}: {error}", priority=3)
    return EX_OSERR


def _failure_event(error: BaseException):
    """The MESSAGE_ID an admin alerts on for this failure (None if even that cannot be told)."""
    try:
        from poplock import events
        from poplock.errors import ConfigError, StoreBusyError, StoreError
    except BaseException:  # noqa: BLE001 - a broken install still runs the server
        return None
    if isinstance(error, StoreBusyError):
        return events.STORE_BUSY
    if isinstance(error, StoreError):
        return events.STORE_FAILED
    if isinstance(error, ConfigError):
        return events.CONFIG_INVALID
    return None


def _describe(error: BaseException) -> str:
    problems = getattr(error, "problems", None)
    if problems:
        return "invalid configuration: " + "; ".join(problems)
    return str(error) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
