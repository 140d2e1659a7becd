"""Parsers for setting values in systemd's own words: booleans, time spans, paths, lists.

Pure, and free of `re`: relaylock reads part of the configuration once per SMTP
connection, and importing `re` alone costs more than its whole budget.
"""

_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")

# systemd.time(7): unit names and their length in seconds.
_TIME_UNITS = {
    "usec": 1e-6, "us": 1e-6, "µs": 1e-6,
    "msec": 1e-3, "ms": 1e-3,
    "seconds": 1, "second": 1, "sec": 1, "s": 1,
    "minutes": 60, "minute": 60, "min": 60, "m": 60,
    "hours": 3600, "hour": 3600, "hr": 3600, "h": 3600,
    "days": 86400, "day": 86400, "d": 86400,
    "weeks": 604800, "week": 604800, "w": 604800,
    "months": 2629800, "month": 2629800, "M": 2629800,
    "years": 31557600, "year": 31557600, "y": 31557600,
}


def parse_boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("expected a boolean (yes/no, true/false, on/off, 1/0)")


def parse_timespan(text: str) -> float:
    """A systemd time span ("30min", "1h 30min", "90", "2.5s") in seconds."""
    rest = text.strip()
    if not rest:
        raise ValueError("expected a time span such as 30min or 1h 30min")
    total = 0.0
    while rest:
        digits = 0
        while digits < len(rest) and (rest[digits].isdigit() or rest[digits] == "."):
            digits += 1
        number_text, rest = rest[:digits], rest[digits:].lstrip()
        letters = 0
        while letters < len(rest) and (rest[letters].isalpha() or rest[letters] == "µ"):
            letters += 1
        unit, rest = rest[:letters], rest[letters:].lstrip()
        if not number_text or number_text.count(".") > 1 or number_text == ".":
            raise ValueError(f"expected a time span such as 30min or 1h 30min, not {text.strip()!r}")
        if unit and unit not in _TIME_UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text.strip()!r} (use s, min, h, d, ...)")
        total += float(number_text) * _TIME_UNITS.get(unit, 1)
    return total


def format_timespan(seconds: float) -> str:
    """The shortest systemd spelling of a whole number of seconds, e.g. 5400 -> "1h 30min"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    parts = []
    remaining = round(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, remaining = divmod(remaining, length)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts) or "0"


def parse_absolute_path(text: str) -> str:
    path = text.strip()
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    return path


def parse_list(text: str) -> tuple[str, ...]:
    """Space-separated words, as in systemd list settings."""
    return tuple(text.split())
