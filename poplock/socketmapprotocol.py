"""The socketmap lookup protocol, without I/O (Postfix's socketmap_table(5), Sendmail's `socket` map).

A request is one netstring, `LENGTH:NAME KEY,` (`17:poplock 127.0.0.5,`); the reply is one
netstring too: `OK VALUE`, `NOTFOUND ` (with its space), `TEMP reason` or `PERM reason`.
Netstrings follow each other on a connection with nothing between them.

RequestBuffer takes bytes as they arrive and hands back complete requests. It holds at
most MAX_REQUEST_BYTES of one (a map name and a host name fit in a fifth of it; Postfix
would take replies of up to 100,000 bytes, which is no reason to take such requests).
What it cannot frame, it cannot skip: a length that is not digits, one over the cap, a
netstring not ended by a comma is a ProtocolError, and the connection is closed. A
netstring that frames well but says nothing poplock can answer (no space, an unknown map
name, nothing at all) is a Request with a `problem`, answered PERM. A key that is not
an address is an ordinary request with no address, answered NOTFOUND: Postfix asks for
the client's host name too (`poplock unknown`) before its address.

Keys are read strictly (parse_key): an address in one of the spellings the MTAs send,
and nothing looser, so that no other text (`127.0.0.5 `, `127.0.0.5/24`, `~user`, a
store's bookkeeping key) ever reaches the store as a lookup:

  * IPv4 as inet_ntop(3) prints it: 192.0.2.7 (Postfix, Sendmail, Exim, OpenSMTPD);
  * IPv6 compressed as inet_ntop(3) prints it: 2001:db8::5 (Postfix, Exim's daemon);
  * IPv6 in full without `::`, no leading zeros: 2001:db8:0:0:0:0:0:5 (Sendmail, built
    with IPV6_FULL as Debian's is, after the ruleset strips its `IPv6:` tag);
  * IPv6 in full, each group four digits: 2001:0db8:0000:0000:0000:0000:0000:0005
    (Exim's -bh test mode).

All in lower case, as they send them. An IPv4-mapped IPv6 address is the IPv4 address
it stands for, as everywhere in poplock.

This is poplock-socketmap's codec: bytes to requests, answers to bytes. It never
touches a socket or a clock; poplock.service owns the connections and their bounds.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from poplock.errors import ProtocolError

MAX_REQUEST_BYTES = 1024  # a netstring's content: a map name, a space and a key (a host name is at most 255)
MAX_LENGTH_DIGITS = 6  # digits before the colon, leading zeros included; more cannot be a request we take
MAX_NAME_BYTES = 64  # a map name, as the configuration allows it

OK = "OK"
NOTFOUND = "NOTFOUND"
TEMP = "TEMP"
PERM = "PERM"

_COLON = 0x3A
_COMMA = 0x2C
_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


class Request:
    """One lookup: the map it names, the address its key spells (None when the key is no
    address), or why it cannot be answered with anything but PERM. `key` is the raw key."""

    __slots__ = ("name", "key", "address", "problem")

    def __init__(self, name: str, key: bytes, address: str | None, problem: str | None = None):
        self.name = name
        self.key = key
        self.address = address
        self.problem = problem


class RequestBuffer:
    """The decoder of one connection (the interface poplock.service expects of a codec).

    `names` are the map names the service answers for, as bytes; others are a problem.
    """

    __slots__ = ("names", "max_request_bytes", "_pending")

    def __init__(self, names, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.names = names
        self.max_request_bytes = max_request_bytes
        self._pending = b""

    @property
    def in_request(self) -> bool:
        """Part of a request has arrived and its end has not."""
        return bool(self._pending)

    def feed(self, data: bytes) -> list[Request]:
        """The requests that `data` completes, in order. ProtocolError when the bytes are not
        netstrings or one is longer than max_request_bytes (told as soon as its length is)."""
        text = self._pending + data if self._pending else data
        end = len(text)
        limit = self.max_request_bytes
        names = self.names
        requests = []
        start = 0
        while start < end:
            colon = text.find(b":", start, start + MAX_LENGTH_DIGITS + 1)
            if colon < 0:
                digits = text[start:start + MAX_LENGTH_DIGITS + 1]
                if not digits.isdigit():
                    raise ProtocolError(f"not a netstring: {_show(text[start:start + 20])}")
                if len(digits) > MAX_LENGTH_DIGITS or int(digits) > limit:
                    raise ProtocolError(f"request larger than {limit} bytes")
                break  # the length is still arriving
            digits = text[start:colon]
            if not digits.isdigit():  # b"".isdigit() is False: ":" alone is no length
                raise ProtocolError(f"not a netstring: {_show(text[start:start + 20])}")
            length = int(digits)
            if length > limit:
                raise ProtocolError(f"request larger than {limit} bytes")
            stop = colon + 1 + length
            if stop >= end:
                break  # the content or its comma is still arriving
            if text[stop] != _COMMA:
                raise ProtocolError(f"a netstring of {length} bytes not ended by a comma")
            requests.append(parse_request(text[colon + 1:stop], names))
            start = stop + 1
        self._pending = text[start:] if start < end else b""
        return requests


def parse_request(content: bytes, names) -> Request:
    """One netstring's content: `NAME KEY`."""
    name, space, key = content.partition(b" ")
    if not space:
        return Request("", content, None, "not a map name and a key" if content else "empty request")
    if name not in names:
        shown = _show(name[:MAX_NAME_BYTES])
        return Request(shown, key, None, f"unknown map name {shown}")
    return Request(name.decode("ascii"), key, parse_key(key))


def parse_key(key: bytes) -> str | None:
    """The canonical address `key` spells in one of the MTAs' spellings (see the module's
    docstring), or None when it is no address spelled so."""
    if not 2 <= len(key) <= 39:  # from "::" to eight groups of four digits
        return None
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return None
    if ":" not in text:
        try:
            packed = inet_pton(AF_INET, text)
        except (OSError, ValueError):  # ValueError: a NUL byte
            return None
        return text if inet_ntop(AF_INET, packed) == text else None
    try:
        packed = inet_pton(AF_INET6, text)
    except (OSError, ValueError):
        return None
    compressed = inet_ntop(AF_INET6, packed)
    if text != compressed and text != full_form(packed) and text != padded_form(packed):
        return None
    if packed[:12] == _MAPPED_PREFIX:
        return inet_ntop(AF_INET, packed[12:])
    return compressed


def full_form(packed: bytes) -> str:
    """An IPv6 address as eight groups without leading zeros, as Sendmail spells it: 2001:db8:0:0:0:0:0:5."""
    return ":".join(f"{packed[index] << 8 | packed[index + 1]:x}" for index in range(0, 16, 2))


def padded_form(packed: bytes) -> str:
    """An IPv6 address as eight groups of four digits, as Exim's -bh spells it."""
    return ":".join(packed[index:index + 2].hex() for index in range(0, 16, 2))


def format_reply(status: str, data: str = "") -> bytes:
    """One reply netstring: format_reply(OK, "OK") is b"5:OK OK,"; NOTFOUND keeps its space."""
    content = f"{status} {data}".encode()
    return b"%d:%s," % (len(content), content)


def _show(data: bytes) -> str:
    """Peer bytes for a log line: quoted, escaped, never raw."""
    return repr(data)[1:]


# The client's half, for poplock-smtpd-filter and the tests.

def format_request(name: str, key: str) -> bytes:
    """One request netstring: format_request("poplock", "192.0.2.7") is b"17:poplock 192.0.2.7,"."""
    content = f"{name} {key}".encode()
    return b"%d:%s," % (len(content), content)


def parse_reply(data: bytes) -> tuple[str, str]:
    """(status, data) of one whole reply netstring; ProtocolError when `data` is anything else,
    or a status the protocol does not have."""
    length, colon, rest = data.partition(b":")
    if not colon or not length.isdigit() or len(length) > MAX_LENGTH_DIGITS or len(rest) != int(length) + 1 \
            or not rest.endswith(b","):
        raise ProtocolError(f"not one netstring: {_show(data[:40])}")
    status, space, text = rest[:-1].decode("utf-8", "replace").partition(" ")
    if not space or status not in (OK, NOTFOUND, TEMP, PERM, "TIMEOUT"):
        raise ProtocolError(f"not a socketmap reply: {_show(rest[:40])}")
    return status, text
