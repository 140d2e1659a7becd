"""poplock-smtpd-filter: an OpenSMTPD filter (protocol 0.6) that asks poplock-socketmap at RCPT TO.

OpenSMTPD 6.8 cannot decide relaying from a socketmap table (its table-socketmap speaks
lines, not netstrings, and implements no check for `match from src <table>`), so its
smtpd.conf relays for anyone and this filter refuses:

    filter "poplock" proc-exec "/usr/bin/poplock-smtpd-filter --local-domain example.org /run/poplock-socketmap.sock"
    listen on 0.0.0.0 filter "poplock"

smtpd starts it once and speaks to it on its standard input and output. At CONNECT it
notes the client's address; at each RCPT TO outside the --local-domain domains it asks
poplock-socketmap `NAME ADDRESS` on a new connection: `OK ...` proceeds, `NOTFOUND`
rejects with 550, and anything else (no answer within --timeout, TEMP, PERM, a
connection refused, garbage) with 451. It never proceeds on an error of its own, and
never exits on one: when the filter dies, smtpd exits too.
"""

from __future__ import annotations

import socket
import sys

from poplock.arguments import ArgumentParser
from poplock.errors import ProtocolError
from poplock.socketmapprotocol import NOTFOUND, OK, format_request, parse_reply

PROTOCOL = "0.6"
REFUSED = "reject|550 5.7.1 Relaying denied"
UNAVAILABLE = "reject|451 4.3.0 Relay check unavailable, try again later"
MAX_REPLY_BYTES = 4096


def client_key(source: str) -> str:
    """The socketmap key for the client address smtpd 6.8 gives at CONNECT: 192.0.2.7 as it is,
    IPv6 without the brackets smtpd puts around it ([::1]). poplock-socketmap checks the rest."""
    return source[1:-1] if source.startswith("[") and source.endswith("]") else source


def recipient_domain(recipient: str) -> str:
    return recipient.strip().strip("<>").rpartition("@")[2].rstrip(".").lower()


class Filter:
    """The filter's state: the client of each session, and how to ask poplock."""

    def __init__(self, where: str, name: str, timeout: float, local_domains: list[str], output=sys.stdout,
                 errors=sys.stderr):
        self.where = where
        self.name = name
        self.timeout = timeout
        self.local_domains = {domain.rstrip(".").lower() for domain in local_domains}
        self.output = output
        self.errors = errors
        self.clients: dict[str, str] = {}

    def say(self, line: str) -> None:
        self.output.write(line + "\n")
        self.output.flush()

    def warn(self, message: str) -> None:
        try:
            self.errors.write(f"poplock-smtpd-filter: {message}\n")
            self.errors.flush()
        except (OSError, ValueError):
            pass

    def handle(self, line: str) -> None:
        """One line from smtpd."""
        fields = line.split("|", 7)
        kind = fields[0]
        if kind == "config":
            if fields[1:2] == ["ready"]:
                for phase in ("connect", "rcpt-to"):
                    self.say(f"register|filter|smtp-in|{phase}")
                self.say("register|report|smtp-in|link-disconnect")
                self.say("register|ready")
        elif kind == "filter" and len(fields) == 8:
            _, version, _, _, phase, session, token, parameters = fields
            if version != PROTOCOL:
                self.warn(f"smtpd speaks filter protocol {version}, this filter {PROTOCOL}")
            if phase == "connect":  # rdns|address
                self.clients[session] = parameters.rpartition("|")[2]
                self.say(f"filter-result|{session}|{token}|proceed")
            elif phase == "rcpt-to":
                try:
                    decision = self.decide(session, parameters)
                except Exception as error:  # noqa: BLE001 -- a bug of ours must not let the recipient through
                    self.warn(f"cannot decide for session {session}: {error!r}; answering 451")
                    decision = UNAVAILABLE
                self.say(f"filter-result|{session}|{token}|{decision}")
            else:  # a phase this filter did not register: let it through, smtpd's rules decide
                self.say(f"filter-result|{session}|{token}|proceed")
        elif kind == "report" and len(fields) >= 6 and fields[4] == "link-disconnect":
            self.clients.pop(fields[5], None)

    def decide(self, session: str, recipient: str) -> str:
        if recipient_domain(recipient) in self.local_domains:
            return "proceed"
        client = self.clients.get(session)
        if client is None:
            self.warn(f"session {session}: RCPT TO before CONNECT; answering 451")
            return UNAVAILABLE
        try:
            status, text = self.ask(client_key(client))
        except (OSError, ProtocolError, ValueError) as error:
            self.warn(f"cannot ask {self.where} about {client}: {error}; answering 451")
            return UNAVAILABLE
        if status == OK:
            return "proceed"
        if status == NOTFOUND:
            return REFUSED
        self.warn(f"{self.where} answered {status} {text!r} for {client}; answering 451")
        return UNAVAILABLE

    def ask(self, key: str) -> tuple[str, str]:
        """One lookup on a new connection: the request, then the reply until the server closes
        or a whole netstring has come."""
        if self.where.startswith("/"):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = self.where
        else:
            host, _, port = self.where.rpartition(":")
            host = host.strip("[]")
            connection = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            address = (host, int(port))
        with connection:
            connection.settimeout(self.timeout)
            connection.connect(address)
            connection.sendall(format_request(self.name, key))
            reply = b""
            while len(reply) < MAX_REPLY_BYTES:
                chunk = connection.recv(MAX_REPLY_BYTES)
                if not chunk:
                    break
                reply += chunk
                length, colon, rest = reply.partition(b":")
                if colon and length.isdigit() and len(rest) > int(length):
                    break
            return parse_reply(reply)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="poplock-smtpd-filter",
                            description="OpenSMTPD filter: refuse RCPT TO for relaying unless poplock-socketmap "
                                        "says the client may relay")
    parser.add_argument("socket", metavar="PATH|HOST:PORT", help="where poplock-socketmap listens")
    parser.add_argument("--map", default="poplock", help="the map name to ask (default poplock)")
    parser.add_argument("--local-domain", action="append", default=[], metavar="DOMAIN",
                        help="recipients in DOMAIN are never checked (repeatable)")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                        help="how long to wait for an answer (default 2)")
    arguments = parser.parse_args(argv)
    if not arguments.socket.startswith("/") and not arguments.socket.rpartition(":")[2].isdigit():
        parser.error(f"{arguments.socket}: expected an absolute socket path or HOST:PORT")
    if not 0 < arguments.timeout <= 60:
        parser.error("--timeout: expected more than 0 and at most 60 seconds")
    state = Filter(arguments.socket, arguments.map, arguments.timeout, arguments.local_domain)
    for line in sys.stdin:
        try:
            state.handle(line.rstrip("\n"))
        except Exception as error:  # noqa: BLE001 -- the filter must outlive any one line
            state.warn(f"cannot handle {line[:80]!r}: {error!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
