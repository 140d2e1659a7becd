"""Grant lists for `poplock import` (pure: the text and the time come in as arguments).

Two line forms, mixed as they come:

  * the JSON objects `poplock show --json` prints, one a line: a "grant" keeps its
    expiry, login time, source and user; a "static" entry (the allow list) is not a grant
    and is left out;
  * `ADDRESS [EXPIRES]`, where EXPIRES is an ISO 8601 time (local unless it has an
    offset) or a systemd time span from now ("2h"); without it, the window. Such a
    grant's source is "manual".

Blank lines and lines starting with "#" are skipped. A line that is none of these, or a
grant longer than any grant can be, is a problem reported with its line number.
"""

from __future__ import annotations

import datetime
import json

from poplock.addresses import normalize_address, parse_network
from poplock.errors import AddressError
from poplock.grants import MAX_GRANT_LENGTH, Grant
from poplock.values import parse_timespan


class GrantLines:
    """What a grant list holds: the grants, the expired ones left out, and the problems."""

    def __init__(self):
        self.grants: list[Grant] = []
        self.expired = 0
        self.problems: list[str] = []


def parse_grant_lines(lines, name: str, now: float, window: float) -> GrantLines:
    """Read `lines` (an iterable of text lines) of the file called `name`."""
    result = GrantLines()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            grant = _parse_json(text, now) if text.startswith("{") else _parse_plain(text, now, window)
        except ValueError as error:
            result.problems.append(f"{name}:{number}: {error}")
            continue
        if grant is None:
            continue
        if grant.expires_at <= now:
            result.expired += 1
        elif grant.expires_at - grant.login_at > MAX_GRANT_LENGTH:
            result.problems.append(f"{name}:{number}: {grant.address}: a grant lasts at most 7d, not until "
                                   f"{_iso(grant.expires_at)}")
        else:
            result.grants.append(grant)
    return result


def _parse_json(text: str, now: float) -> Grant | None:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a JSON object: {error.msg}") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("kind") == "static":
        return None
    if record.get("kind") != "grant":
        raise ValueError(f"expected \"kind\": \"grant\" (as `poplock show --json` prints), not {record.get('kind')!r}")
    address = _address(record.get("address"))
    # A grant held open by sessions lists its sessions' bound as "expires": what it keeps once
    # they end is "released_expires" (sessions are this host's, and do not move with it).
    expires_at = _time(record.get("released_expires", record.get("expires")), "expires")
    login_at = _time(record.get("login_time"), "login_time") if "login_time" in record else int(now)
    source = record.get("source", "manual")
    if not isinstance(source, str) or not source or any(character.isspace() for character in source):
        raise ValueError(f"\"source\" must be a word, not {source!r}")
    user = record.get("user")
    if user is not None and (not isinstance(user, str) or not user):
        raise ValueError(f"\"user\" must be a name or null, not {user!r}")
    return Grant(address, expires_at, min(login_at, int(now)), source, user)


def _parse_plain(text: str, now: float, window: float) -> Grant:
    words = text.split()
    if len(words) > 2:
        raise ValueError(f"expected ADDRESS [EXPIRES], not {text!r}")
    address = _address(words[0])
    if len(words) == 1:
        return Grant(address, int(now + window), int(now), "manual")
    try:
        expires_at = int(datetime.datetime.fromisoformat(words[1]).timestamp())
    except ValueError:
        try:
            expires_at = int(now + parse_timespan(words[1]))
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time or a time span such as 2h, not {words[1]!r}") from None
    return Grant(address, expires_at, int(now), "manual")


def _address(value) -> str:
    """An address, or the IPv6 network key of a grant made with [Grants] IPv6Prefix= ("2001:db8:1::/64")."""
    if not isinstance(value, str):
        raise ValueError(f"expected an address, not {value!r}")
    try:
        if "/" in value:
            network = parse_network(value)
            if network.bits != 128 or not 32 <= network.prefix < 128:
                raise AddressError(f"{value}: a grant's network is an IPv6 network of /32 to /127")
            return str(network)
        return normalize_address(value)
    except AddressError as error:
        raise ValueError(str(error)) from None


def _time(value, key: str) -> int:
    if not isinstance(value, str):
        raise ValueError(f"\"{key}\" must be an ISO 8601 time, not {value!r}")
    try:
        return int(datetime.datetime.fromisoformat(value).timestamp())
    except ValueError:
        raise ValueError(f"\"{key}\" must be an ISO 8601 time, not {value!r}") from None


def _iso(seconds: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"@{seconds}"
