"""poplock-logauth: record a successful POP3/IMAP login in a checkpassword chain, then go on.

    qmail-popup HOST checkpassword poplock-logauth qmail-pop3d Maildir

checkpassword(8) runs the next program only after the password was right, so running
at all means the login succeeded. This writes one journal entry,

    successful POP3 login from 192.0.2.7 (user alice)

with SYSLOG_IDENTIFIER=poplock-logauth and POPLOCK_CLIENT_ADDRESS, then execs the rest
of the chain. The client address is getpeername() of standard input, else $REMOTE_ADDR
(systemd), else $TCPREMOTEIP (tcpserver), as for relaylock. Any local user can run this program, so
poplock-reader trusts its entries only from the POP3 service's own unit or uid (the
[Source:logauth] section). Whatever goes wrong here, the mail session goes on.
"""

import posix
import sys

USAGE = "usage: poplock-logauth [--protocol POP3|IMAP] [--] PROGRAM [ARGS...]"
EX_USAGE = 64
EX_OSERR = 71


def parse_arguments(argv: list[str]) -> tuple[str, list[str]]:
    protocol = "POP3"
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        if argv[index] == "--":
            index += 1
            break
        if argv[index] == "--protocol" and index + 1 < len(argv):
            protocol = argv[index + 1].upper()
            index += 2
        elif argv[index].startswith("--protocol="):
            protocol = argv[index].partition("=")[2].upper()
            index += 1
        elif argv[index] == "--protocol":
            raise ValueError("--protocol needs a value, POP3 or IMAP")
        else:
            raise ValueError(f"unknown option {argv[index]}")
    if protocol not in ("POP3", "IMAP"):
        raise ValueError("--protocol is POP3 or IMAP")
    if index >= len(argv):
        raise ValueError("no program to run after the login")
    return protocol, argv[index:]


def login_message(protocol: str, address: str, user: str) -> str:
    return f"successful {protocol} login from {address} (user {user})"


def record_login(protocol: str, environment: dict) -> str | None:
    """Send the entry; returns a problem to report, or None."""
    from poplock.addresses import normalize_address
    from poplock.connection import client_address, send

    text = client_address(environment)
    if text is None:
        return "cannot tell the client's address; no login recorded"
    address = normalize_address(text)
    user = environment.get(b"USER", b"").decode("utf-8", "replace")
    fields = [("MESSAGE", login_message(protocol, address, user)), ("PRIORITY", "6"),
              ("SYSLOG_IDENTIFIER", "poplock-logauth"), ("POPLOCK_CLIENT_ADDRESS", address),
              ("POPLOCK_USER", user)]
    if not send(fields):
        return "cannot reach the journal; no login recorded"
    return None


def report(message: str, priority: int = 4) -> None:
    """One line to the journal or standard error, never to the client (see connection.report)."""
    try:
        from poplock.connection import report as send_report

        send_report("poplock-logauth", message, priority=priority)
    except Exception:  # noqa: BLE001 - the mail session must go on
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from poplock import __version__

        report(f"version {__version__}")  # on standard error, like --help: standard output is the client's
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        report(USAGE, priority=6)
        return 0
    try:
        protocol, program = parse_arguments(argv)
    except ValueError as error:
        report(f"{error}\n{USAGE}", priority=3)
        return EX_USAGE
    environment = dict(posix.environ)
    try:
        problem = record_login(protocol, environment)
    except BaseException as error:  # noqa: BLE001 - the mail session must go on
        problem = f"no login recorded: {error}"
    if problem:
        report(problem)
    from poplock.connection import execute

    report(f"cannot run {program[0]}: {execute(program, environment)}")
    return EX_OSERR


if __name__ == "__main__":
    sys.exit(main())
