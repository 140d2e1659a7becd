"""Reading systemd-style INI files: a main file plus drop-ins, every line kept with its place.

The syntax is systemd.syntax(7): `[Section]` headers, `Key=Value` assignments, `#` and
`;` comments, and a trailing backslash continuing a line. Nothing here knows which
sections and keys exist; config.py does. Free of `re` and `os` for relaylock's sake.
"""

import posix


class Assignment:
    """One `Key=Value` line, with the file and line it came from."""

    __slots__ = ("section", "key", "value", "path", "line")

    def __init__(self, section: str, key: str, value: str, path: str, line: int):
        self.section = section
        self.key = key
        self.value = value
        self.path = path
        self.line = line

    @property
    def place(self) -> str:
        return f"{self.path}:{self.line}"


class SectionHeader:
    """One `[Section]` line (kept so unknown sections are reported where they stand)."""

    __slots__ = ("section", "path", "line")

    def __init__(self, section: str, path: str, line: int):
        self.section = section
        self.path = path
        self.line = line


def parse_ini(text: str, path: str) -> tuple[list, list[str]]:
    """Returns (headers and assignments in file order, problems)."""
    items: list = []
    problems: list[str] = []
    section = None
    lines = text.split("\n")
    number = 0
    while number < len(lines):
        first = number + 1
        line = lines[number].strip()
        number += 1
        while line.endswith("\\") and number < len(lines):
            line = line[:-1] + " " + lines[number].strip()
            number += 1
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                problems.append(f"{path}:{first}: expected a section header such as [Grants]")
                continue
            section = line[1:-1].strip()
            items.append(SectionHeader(section, path, first))
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or not key or " " in key:
            problems.append(f"{path}:{first}: expected Key=Value or a [Section] header, not {line!r}")
            continue
        if section is None:
            problems.append(f"{path}:{first}: {key}= stands before any [Section] header")
            continue
        items.append(Assignment(section, key, value.strip(), path, first))
    return items, problems


def read_config_files(path: str, required: bool) -> tuple[list, list[str]]:
    """The main file, then PATH.d/*.conf in lexical order (later assignments win).

    A missing main file is a problem only when `required` (the user named it);
    otherwise poplock runs on its defaults.
    """
    items: list = []
    problems: list[str] = []
    paths = [path]
    try:
        names = sorted(name for name in posix.listdir(path + ".d") if name.endswith(".conf"))
        paths += [f"{path}.d/{name}" for name in names]
    except FileNotFoundError:
        pass
    except OSError as error:
        problems.append(f"{path}.d: cannot read the drop-in directory: {error.strerror}")
    for index, file_path in enumerate(paths):
        try:
            with open(file_path, encoding="utf-8") as file:
                text = file.read()
        except FileNotFoundError:
            if index == 0 and not required:
                continue
            problems.append(f"{file_path}: no such file")
            continue
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{file_path}: cannot read: {getattr(error, 'strerror', None) or error}")
            continue
        file_items, file_problems = parse_ini(text, file_path)
        items += file_items
        problems += file_problems
    return items, problems
