"""relaylock: decide RELAYCLIENT for one SMTP connection, then exec the SMTP server.

    relaylock [-c CONFIG] [--relayclient VALUE] [--] PROGRAM [ARGS...]

For qmail-style servers (qmail-smtpd, mailfront, qpsmtpd, courier esmtpd) started per
connection by a systemd Accept=yes socket, tcpserver or inetd. The client address is
getpeername() of standard input when that is an inet socket, else $REMOTE_ADDR
(systemd), else $TCPREMOTEIP (tcpserver). A client with a live grant or in the static
allow list gets RELAYCLIENT (empty unless configured: qpsmtpd needs a true value);
any other client has an inherited RELAYCLIENT removed. Then PROGRAM always runs:
whatever goes wrong here grants nothing, is told in one line on standard error, and
mail keeps flowing. Standard output is the client's connection: nothing is written to it.

This runs once per SMTP connection, so its imports are a budget: the interpreter is
started with -I -S, and this module and everything it imports stay clear of `os`,
`re`, `socket`, `ipaddress`, `dataclasses`, `typing` and the journal module. poplock's
own modules are imported only inside the decision, so that even a broken install
still execs the server.
"""

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
    import time

    from poplock import events
    from poplock.access import check_relay_in_files, describe, grant_user
    from poplock.config import load_config

    config = load_config(config_path, sections=("Grants", "Store", "Relaylock"))
    now = time.time()
    decision = check_relay_in_files(config, address, now)
    value = relay_client if relay_client is not None else config.relay_client
    if decision.allowed:
        return value, events.RELAY_ALLOWED, describe(decision, now), grant_user(decision)
    return None, events.RELAY_REFUSED, describe(decision, now), None


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
