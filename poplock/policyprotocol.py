"""Postfix's SMTP access policy delegation protocol, without I/O (see SMTPD_POLICY_README).

A request is `name=value` lines ended by an empty line; the reply is `action=...` and an
empty line. Postfix keeps a connection open and sends many requests on it, one at a
time. RequestBuffer takes bytes as they arrive and hands back complete requests; it
holds at most MAX_REQUEST_BYTES of an unfinished one, so a peer cannot grow the
service's memory. A request that is malformed gets DUNNO, never OK; a peer that sends
more than that without ending its request is a ProtocolError (close the connection).

This is the codec of poplock-policy: bytes to requests, actions to bytes. It never
touches a socket or a clock; poplock.service owns the connections and their bounds.
"""

from __future__ import annotations

from poplock.errors import ProtocolError

MAX_REQUEST_BYTES = 16384  # Postfix 3.7 sends about 1 KB; certificates and SASL names fit easily
MAX_ATTRIBUTES = 100

DUNNO = "DUNNO"


class Request:
    """One request: its attributes, or why it cannot be answered with anything but DUNNO."""

    __slots__ = ("attributes", "problem")

    def __init__(self, attributes: dict[str, str], problem: str | None = None):
        self.attributes = attributes
        self.problem = problem


EMPTY_REQUEST = Request({}, "empty request")  # a lone empty line; one object however many arrive


class RequestBuffer:
    """The decoder of one connection (the interface poplock.service expects of a codec)."""

    __slots__ = ("max_request_bytes", "_pending")

    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.max_request_bytes = max_request_bytes
        self._pending = b""

    @property
    def in_request(self) -> bool:
        """Part of a request has arrived and its end has not."""
        return bool(self._pending)

    def feed(self, data: bytes) -> list[Request]:
        """The requests that `data` completes, in order. ProtocolError if one grows too big."""
        pending = self._pending
        if pending:
            text = pending + data
            scan = len(pending) - 1  # the part already searched holds no end, but may hold its first "\n"
        else:
            text = data
            scan = 0
        requests = []
        start = 0
        limit = self.max_request_bytes
        while True:
            if text.startswith(b"\n", start):  # a request with no attributes at all
                requests.append(EMPTY_REQUEST)
                start += 1
                scan = start
                continue
            end = text.find(b"\n\n", scan)
            if end < 0:
                break
            if end - start > limit:
                raise ProtocolError(f"request larger than {limit} bytes")
            requests.append(parse_request(text[start:end]))
            start = scan = end + 2
        self._pending = text[start:] if start else text
        if len(self._pending) > limit:
            raise ProtocolError(f"request larger than {limit} bytes")
        return requests


def parse_request(block: bytes) -> Request:
    """The lines of one request, without the empty line that ends it."""
    lines = block.decode("utf-8", "replace").split("\n")
    if len(lines) > MAX_ATTRIBUTES:
        return Request({}, f"more than {MAX_ATTRIBUTES} attributes")
    try:
        attributes = dict([line.split("=", 1) for line in lines])
    except ValueError:  # a line without "="
        attributes = {"": ""}
    if "" in attributes:
        bad = next(line for line in lines if not line.partition("=")[0] or "=" not in line)
        return Request({}, f"not a name=value line: {bad[:60]!r}")
    request = attributes.get("request")
    if request != "smtpd_access_policy":
        return Request(attributes, f"not an smtpd_access_policy request: {request!r}")
    if not attributes.get("client_address"):
        return Request(attributes, "no client_address")
    return Request(attributes)


def format_reply(action: str) -> bytes:
    return b"action=" + action.encode() + b"\n\n"
