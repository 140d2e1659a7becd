"""Postfix's SMTP access policy delegation protocol, without I/O (see SMTPD_POLICY_README).

A request is `name=value` lines ended by an empty line; the reply is `action=...` and an
empty line. Postfix keeps a connection open and sends many requests on it, one at a
time. RequestBuffer takes bytes as they arrive and hands back complete requests; it
holds at most MAX_REQUEST_BYTES of an unfinished one, so a peer cannot grow the
service's memory. A request that is malformed gets DUNNO, never OK; a peer that sends
more than that without ending its request is a ProtocolError (close the connection).
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


class RequestBuffer:
    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.max_request_bytes = max_request_bytes
        self._pending = b""

    @property
    def in_request(self) -> bool:
        """Part of a request has arrived and its end has not."""
        return bool(self._pending)

    def feed(self, data: bytes) -> list[Request]:
        """The requests that `data` completes, in order. ProtocolError if one grows too big."""
        text = self._pending + data if self._pending else data
        requests = []
        start = 0
        while True:
            if text.startswith(b"\n", start):  # a request with no attributes at all
                requests.append(Request({}, "empty request"))
                start += 1
                continue
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            if end - start > self.max_request_bytes:
                raise ProtocolError(f"request larger than {self.max_request_bytes} bytes")
            requests.append(parse_request(text[start:end]))
            start = end + 2
        self._pending = text[start:]
        if len(self._pending) > self.max_request_bytes:
            raise ProtocolError(f"request larger than {self.max_request_bytes} bytes")
        return requests


def parse_request(block: bytes) -> Request:
    """The lines of one request, without the empty line that ends it."""
    lines = block.split(b"\n")
    if len(lines) > MAX_ATTRIBUTES:
        return Request({}, f"more than {MAX_ATTRIBUTES} attributes")
    attributes = {}
    for line in lines:
        name, equals, value = line.partition(b"=")
        if not equals or not name:
            return Request({}, f"not a name=value line: {line[:60]!r}")
        attributes[name.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    if attributes.get("request") != "smtpd_access_policy":
        return Request(attributes, f"not an smtpd_access_policy request: {attributes.get('request')!r}")
    if not attributes.get("client_address"):
        return Request(attributes, "no client_address")
    return Request(attributes)


def format_reply(action: str) -> bytes:
    return b"action=" + action.encode() + b"\n\n"
