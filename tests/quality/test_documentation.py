"""The documentation is complete, well-formed and true to the code.

Every man page passes `mandoc -T lint -W warning` and renders with man(1) without a warning;
poplock.conf(5) and etc/poplock.conf name every setting, and poplock.conf(5) every boolean word the
code accepts; the journal catalog has exactly one entry per event and systemd's own parser reads
it; poplock(8)'s QUICK START gives README.md's commands; every option, command and MESSAGE_ID
appears where an admin will look for it; every program's usage error exits with the status its
page gives; poplock(8) leads to every page, and the pages link to each other's programs with Xr.

Needs the Debian packages mandoc, man-db (which brings groff-base) and systemd (journalctl).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import poplock.values
from poplock import logauth, relaylock
from poplock.cli import build_parser
from poplock.config import SETTINGS, SOURCE_KEYS
from poplock.events import EVENTS
from poplock.servers import SERVERS

REPOSITORY = Path(__file__).resolve().parents[2]
MAN = REPOSITORY / "man"
CATALOG = REPOSITORY / "catalog" / "poplock.catalog"
REQUIRED_PAGES = ("poplock.8", "poplock-reader.8", "relaylock.8", "poplock-policy.8", "poplock-logauth.8",
                  "poplock.conf.5")
PAGES = sorted(path.name for path in MAN.glob("*.[1-9]"))
FIELDS = {"POPLOCK_CLIENT_ADDRESS", "POPLOCK_SOURCE", "POPLOCK_SOURCE_UNIT", "POPLOCK_EXPIRES", "POPLOCK_EVENT"}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install {package}"
    return path


def page_text(name: str) -> str:
    return (MAN / name).read_text(encoding="utf-8")


def section_lines(text: str, title: str) -> list[str]:
    """The source lines of one `.Sh TITLE` section, up to the next `.Sh`."""
    lines = text.splitlines()
    start = lines.index(f".Sh {title}")
    end = next((index for index in range(start + 1, len(lines)) if lines[index].startswith(".Sh ")), len(lines))
    return lines[start + 1:end]


def literal_commands(lines: list[str]) -> list[str]:
    """The commands shown in `.Bd -literal` displays and `.Dl` lines, without comments."""
    commands = []
    literal = False
    for line in lines:
        if line.startswith(".Bd -literal"):
            literal = True
        elif line.startswith(".Ed"):
            literal = False
        elif literal or line.startswith(".Dl "):
            text = line.removeprefix(".Dl ").replace("\\e", "\\").replace("\\&", "")
            command = text.split("#")[0].strip()
            if command:
                commands.append(command)
    return commands


def setting_items(text: str) -> dict[tuple[str, str], str]:
    """(`.Ss` title, key) -> the source of that `.It Cm Key= Ns Ar value` item, in poplock.conf(5)."""
    items = {}
    subsection = None
    current = None
    for line in text.splitlines():
        if line.startswith((".Sh ", ".Ss ")):
            subsection = line[4:].strip() if line.startswith(".Ss ") else None
            current = None
            continue
        match = re.fullmatch(r"\.It Cm (\w+)= Ns Ar \S+", line)
        if match and subsection is not None:
            current = (subsection, match.group(1))
            assert current not in items, f"{current} is documented twice"
            items[current] = ""
            continue
        if line.startswith((".It", ".El")):
            current = None
        elif current is not None:
            items[current] += line + "\n"
    return items


def shipped_settings() -> dict[tuple[str, str], str]:
    """(section, key) -> the commented-out value in etc/poplock.conf."""
    shipped = {}
    section = None
    for line in (REPOSITORY / "etc" / "poplock.conf").read_text().splitlines():
        header = re.fullmatch(r"#?\[([^]]+)\]", line)
        if header:
            section = header.group(1)
            continue
        assignment = re.fullmatch(r"#(\w+)=(.*)", line)
        if assignment and section is not None:
            shipped[(section, assignment.group(1))] = assignment.group(2)
    return shipped


def catalog_entries() -> list[tuple[str, dict[str, str], str]]:
    """(message id, headers, body) for every entry, parsed strictly: anything else fails."""
    text = CATALOG.read_text(encoding="utf-8")
    preamble, *chunks = re.split(r"^-- ", text, flags=re.M)
    assert all(not line or line.startswith("#") for line in preamble.splitlines()), \
        "only comments may stand before the first entry"
    entries = []
    for chunk in chunks:
        first, _, rest = chunk.partition("\n")
        assert re.fullmatch(r"[0-9a-f]{32}", first), f"not a 128-bit id in lowercase hex: {first!r}"
        head, separator, body = rest.partition("\n\n")
        assert separator, f"{first}: the headers must be followed by an empty line and the text"
        headers = {}
        for line in head.splitlines():
            key, colon, value = line.partition(": ")
            assert colon and re.fullmatch(r"[A-Z][A-Za-z-]*", key) and value.strip(), \
                f"{first}: not a header line: {line!r}"
            assert key not in headers, f"{first}: {key} twice"
            headers[key] = value
        assert body.strip(), f"{first}: the entry has no text"
        entries.append((first, headers, body))
    return entries


# --- man pages ---------------------------------------------------------------------------------

def test_every_required_man_page_exists():
    assert set(REQUIRED_PAGES) <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_every_man_page_passes_mandoc_lint_without_a_warning(page):
    result = subprocess.run([tool("mandoc", "mandoc"), "-T", "lint", "-W", "warning", str(MAN / page)],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_every_man_page_renders_with_man_without_a_warning(page):
    environment = {"PATH": os.environ["PATH"], "MANPAGER": "cat", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    result = subprocess.run([tool("man", "man-db"), "--warnings=all", "-l", str(MAN / page)],
                            capture_output=True, text=True, env=environment)
    assert result.returncode == 0
    assert result.stderr == ""
    assert "NAME" in result.stdout and "SEE ALSO" in result.stdout


@pytest.mark.parametrize("page", PAGES)
def test_every_man_page_is_named_and_dated_like_its_file(page):
    name, _, section = page.rpartition(".")
    text = page_text(page)
    assert f"\n.Dt {name.upper()} {section}\n" in text
    assert f"\n.Nm {name}\n" in text


def test_poplock_8_leads_to_every_other_page_in_its_see_also():
    see_also = "\n".join(section_lines(page_text("poplock.8"), "SEE ALSO"))
    for page in PAGES:
        name, _, section = page.rpartition(".")
        if page != "poplock.8":
            assert f".Xr {name} {section}" in see_also, f"poplock(8) SEE ALSO lacks {name}({section})"


@pytest.mark.parametrize("program", sorted(path.stem for path in MAN.glob("*.8") if path.stem != "poplock"))
def test_other_pages_link_to_a_programs_page_and_never_name_it_bare(program):
    # `.Ic poplock-logauth` in another page renders as a word with no page to follow.
    bare = re.compile(rf"^\.(?:It )?(?:Ic|Nm) {re.escape(program)}(?![\w.-])", re.M)
    for page in PAGES:
        if page != f"{program}.8":
            assert not bare.search(page_text(page)), f"{page} names {program} without .Xr {program} 8"


def test_every_page_the_units_and_the_catalog_point_to_is_shipped():
    references = set()
    for path in [*(REPOSITORY / "units").glob("*"), CATALOG]:
        references |= set(re.findall(r"man:([\w.-]+)\((\d)\)", path.read_text()))
    assert references, "no Documentation=man: references found"
    assert {f"{name}.{section}" for name, section in references} <= set(PAGES)


# --- settings ----------------------------------------------------------------------------------

def test_every_setting_is_documented_in_poplock_conf_5_under_its_section_with_its_default():
    items = setting_items(page_text("poplock.conf.5"))
    for setting in SETTINGS:
        key = (f"[{setting.section}]", setting.key)
        assert key in items, f"poplock.conf(5) does not document [{setting.section}] {setting.key}="
        if setting.default:
            expected = rf"The default is\n\.(?:Ql|Pa) {re.escape(setting.default)} \.\n"
        else:
            expected = r"The default is empty\.\n"
        assert re.search(expected, items[key]), f"[{setting.section}] {setting.key}= does not give its default"


def test_poplock_conf_5_documents_no_setting_the_code_lacks():
    documented = {key for key in setting_items(page_text("poplock.conf.5")) if key[0] != "[Source:NAME]"}
    assert documented == {(f"[{setting.section}]", setting.key) for setting in SETTINGS}


def test_every_source_key_and_no_other_is_documented_in_poplock_conf_5():
    items = setting_items(page_text("poplock.conf.5"))
    assert {key for section, key in items if section == "[Source:NAME]"} == set(SOURCE_KEYS)


def test_every_built_in_source_and_no_other_is_listed_in_poplock_conf_5_with_its_settings():
    text = page_text("poplock.conf.5")
    listing = text[text.index("\n.Ss Built-in sources\n"):text.index("\n.Sh STATIC ALLOW LIST\n")]
    items = {item.partition("\n")[0]: item for item in re.split(r"^\.It Cm ", listing, flags=re.M)[1:]}
    assert set(items) == set(SERVERS)
    for name, server in SERVERS.items():
        for key, values in (("Identifiers", server.identifiers), ("Units", server.units), ("Users", server.users)):
            assert f"\n{key}={' '.join(values)}\n" in items[name], f"built-in source {name}: {key}="


def test_poplock_conf_5_gives_every_boolean_word_the_code_accepts():
    values_section = "\n".join(section_lines(page_text("poplock.conf.5"), "DESCRIPTION"))
    boolean = values_section[values_section.index(".It boolean\n"):values_section.index(".It time span\n")]
    documented = set(re.findall(r"^\.Ql (\S+)", boolean, re.M))
    true, false = poplock.values._TRUE, poplock.values._FALSE
    assert documented == set(true) | set(false)
    for word in true + false:
        assert poplock.values.parse_boolean(word.upper()) == (word in true)  # "in upper or lower case"


def test_every_setting_and_source_key_is_shipped_in_etc_at_its_default():
    shipped = shipped_settings()
    for setting in SETTINGS:
        assert shipped.get((setting.section, setting.key)) == setting.default, \
            f"etc/poplock.conf lacks #{setting.key}={setting.default} under [{setting.section}]"
    assert {key for section, key in shipped if section == "Source:NAME"} == set(SOURCE_KEYS)


# --- commands and options ----------------------------------------------------------------------

def options_in_help(module: str) -> set[str]:
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                            check=True, cwd=REPOSITORY)
    return set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", result.stdout.partition("options:")[2]))


def documented_options(page: str) -> set[str]:
    """The options that head an item of a list (`.It Fl -json`), not those merely mentioned."""
    items = "\n".join(line for line in page_text(page).splitlines() if line.startswith(".It "))
    return {"-" + flag for flag in re.findall(r"\bFl (-?[A-Za-z][\w-]*)", items)}


def test_every_poplock_command_and_option_is_documented_in_poplock_8():
    text = page_text("poplock.8")
    documented = documented_options("poplock.8")
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name, command in commands.items():
        assert f"\n.It Cm {name}" in text, f"poplock(8) does not describe the command {name}"
        for action in command._actions:
            assert set(action.option_strings) <= documented, f"poplock {name}: {action.option_strings}"


@pytest.mark.parametrize(("module", "page"), [("poplock.reader", "poplock-reader.8"),
                                              ("poplock.policy", "poplock-policy.8")])
def test_every_option_of_a_daemon_is_documented_in_its_page(module, page):
    options = options_in_help(module)
    assert options and options <= documented_options(page), options - documented_options(page)


def test_every_option_of_relaylock_is_documented_in_relaylock_8():
    # main() answers -h and --help itself, before the parser that USAGE describes.
    options = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", relaylock.USAGE)) | {"--config", "-h", "--help"}
    assert options <= documented_options("relaylock.8")


def test_relaylock_help_exits_0_as_relaylock_8_says():
    result = subprocess.run([sys.executable, "-m", "poplock.relaylock", "--help"], capture_output=True, text=True,
                            cwd=REPOSITORY, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout) == (0, "")
    assert relaylock.USAGE in result.stderr
    exit_status = "\n".join(section_lines(page_text("relaylock.8"), "EXIT STATUS"))
    assert re.search(r"^\.It 0\n\.Fl h\nor\n\.Fl -help \.$", exit_status, re.M)


def test_every_option_of_poplock_logauth_is_documented_in_poplock_logauth_8():
    # main() answers -h, --help and --version itself, before parse_arguments(), which USAGE describes.
    options = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", logauth.USAGE)) | {"-h", "--help", "--version"}
    assert options <= documented_options("poplock-logauth.8")


def test_poplock_logauth_help_and_protocol_equals_work_as_poplock_logauth_8_says():
    for word in ("-h", "--help", "--version"):
        result = subprocess.run([sys.executable, "-m", "poplock.logauth", word, "true"], capture_output=True,
                                text=True, cwd=REPOSITORY, stdin=subprocess.DEVNULL)
        assert (result.returncode, result.stdout) == (0, ""), word
    assert logauth.parse_arguments(["--protocol=imap", "true"]) == ("IMAP", ["true"])
    with pytest.raises(ValueError, match="--protocol needs a value"):
        logauth.parse_arguments(["--protocol"])
    text = page_text("poplock-logauth.8")
    options = "\n".join(section_lines(text, "OPTIONS"))
    assert ".It Fl h , Fl -help" in options.splitlines() and "Fl -protocol Ns = Ns Cm POP3 | IMAP" in options
    assert "is a usage error, including" not in options  # what the page said before -h and = were accepted
    exit_status = "\n".join(section_lines(text, "EXIT STATUS"))
    assert re.search(r"^\.It 0\n\.Fl h ,\n\.Fl -help\nor\n\.Fl -version \.$", exit_status, re.M)


@pytest.mark.parametrize(("module", "page"), [("poplock.cli", "poplock.8"), ("poplock.reader", "poplock-reader.8"),
                                              ("poplock.policy", "poplock-policy.8"),
                                              ("poplock.relaylock", "relaylock.8"),
                                              ("poplock.logauth", "poplock-logauth.8")])
def test_every_programs_usage_error_exits_with_the_status_its_page_gives(module, page):
    result = subprocess.run([sys.executable, "-m", module, "--no-such-option", "true"], capture_output=True,
                            text=True, cwd=REPOSITORY, stdin=subprocess.DEVNULL)
    assert result.returncode == os.EX_USAGE, result.stderr
    assert "usage" in result.stderr
    exit_status = "\n".join(section_lines(page_text(page), "EXIT STATUS"))
    assert re.search(r"^\.It 64\nUsage error", exit_status, re.M), f"{page} does not give 64 for a usage error"


def test_the_quick_start_in_poplock_8_gives_the_readmes_commands():
    readme = (REPOSITORY / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    readme_commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
                       if line.split("#")[0].strip()]
    assert readme_commands, "README.md has no sh block"
    assert literal_commands(section_lines(page_text("poplock.8"), "QUICK START")) == readme_commands


# --- events and the journal catalog ------------------------------------------------------------

def test_every_event_has_its_own_message_id():
    identifiers = [event.message_id for event in EVENTS]
    assert all(re.fullmatch(r"[0-9a-f]{32}", identifier) for identifier in identifiers)
    assert len(set(identifiers)) == len(identifiers)
    assert len({event.name for event in EVENTS}) == len(EVENTS)


def test_every_event_has_exactly_one_catalog_entry_and_every_entry_an_event():
    counts = collections.Counter(identifier for identifier, _, _ in catalog_entries())
    assert {identifier for identifier, count in counts.items() if count > 1} == set()
    assert set(counts) == {event.message_id for event in EVENTS}


def test_every_catalog_entry_has_a_subject_its_origin_and_its_documentation():
    for identifier, headers, body in catalog_entries():
        assert set(headers) == {"Subject", "Defined-By", "Support", "Documentation"}, identifier
        assert headers["Defined-By"] == "poplock"
        for uri in headers["Documentation"].split() + headers["Support"].split():
            assert re.fullmatch(r"man:[\w.-]+\(\d\)", uri), f"{identifier}: {uri}"
        fields = set(re.findall(r"@([A-Za-z0-9_]+)@", headers["Subject"] + body))
        assert fields <= FIELDS, f"{identifier}: unknown fields {fields - FIELDS}"


def test_systemd_reads_the_catalog_and_lists_every_event(tmp_path):
    journalctl = tool("journalctl", "systemd")
    catalog_directory = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog_directory.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_directory / "poplock.catalog")
    update = subprocess.run([journalctl, f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True)
    assert (update.returncode, update.stderr) == (0, "")
    listing = subprocess.run([journalctl, f"--root={tmp_path}", "--list-catalog"], capture_output=True, text=True,
                             check=True)
    listed = dict(line.split(" ", 1) for line in listing.stdout.splitlines())
    subjects = {identifier: headers["Subject"] for identifier, headers, _ in catalog_entries()}
    assert listed == {event.message_id: f"poplock: {subjects[event.message_id]}" for event in EVENTS}


def test_every_message_id_is_listed_with_its_name_in_poplock_8():
    text = page_text("poplock.8")
    for event in EVENTS:
        assert f"\n.It Li {event.message_id} Pq {event.name}\n" in text, event.name


# --- poplock-cluster(7): its files are ones poplock and systemd take ------------------------------

def cluster_guide_files(section: str) -> dict[str, str]:
    """The files poplock-cluster(7) gives in `.Sh SECTION`: each literal display whose first line is `# /path`."""
    text = page_text("poplock-cluster.7")
    start = text.index(f"\n.Sh {section}\n")
    end = text.find("\n.Sh ", start + 1)
    files = {}
    for block in re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", text[start:end], re.M | re.S):
        first, _, rest = block.replace("\\&", "").replace("\\e", "\\").partition("\n")
        if re.fullmatch(r"# /\S+", first):
            files[first[2:]] = rest
    return files


def test_the_cluster_guides_poplock_settings_are_ones_poplock_takes(tmp_path):
    from poplock.config import load_config
    from poplock.sources import build_sources

    for section, check in (("THE DECIDING HOST", "reader"), ("MTA HOSTS", "relaylock")):
        directory = tmp_path / check
        (directory / "poplock.conf.d").mkdir(parents=True)
        (directory / "poplock.conf").write_text("")
        settings = {path: text for path, text in cluster_guide_files(section).items()
                    if path.startswith("/etc/poplock/")}
        assert len(settings) == 1, (section, sorted(settings))
        for path, text in settings.items():
            (directory / "poplock.conf.d" / Path(path).name).write_text(text)
        config = load_config(str(directory / "poplock.conf"))
        if check == "reader":
            assert config.received_directory == "/var/log/journal/remote"
            assert build_sources(config)["dovecot"].hosts == {"192.0.2.11", "192.0.2.12"}
        else:
            assert (config.relaylock_server, config.relay_client) == ("192.0.2.1:7025", "1")


def test_the_cluster_guides_units_and_drop_ins_are_ones_systemd_takes(tmp_path):
    """systemd-analyze verify on a root with poplock installed, systemd's units, and the guide's files."""
    subprocess.run(["make", "-s", "install", f"DESTDIR={tmp_path}", "PREFIX=/usr"], cwd=REPOSITORY, check=True,
                   capture_output=True, timeout=300)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", dirs_exist_ok=True,
                    symlinks=True, ignore=shutil.ignore_patterns("poplock*"))
    # The programs the units run, where they name them (Debian 12 is merged-/usr).
    (tmp_path / "lib").symlink_to("usr/lib")
    for program in ("/usr/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-upload",
                    "/usr/bin/journalctl"):
        (tmp_path / program.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(program, tmp_path / program.lstrip("/"))
    units = set()
    for section in ("POP HOSTS", "THE DECIDING HOST", "OLD FILES"):
        for path, text in cluster_guide_files(section).items():
            if path.startswith("/etc/systemd/system/"):
                target = tmp_path / path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                units.add(Path(path).parent.name.removesuffix(".d") if path.endswith(".conf") else Path(path).name)
    assert units == {"systemd-journal-upload.service", "systemd-journal-remote.service",
                     "systemd-journal-remote.socket", "poplock-reader.service", "poplock-policy.socket",
                     "poplock-socketmap.socket", "journal-remote-vacuum.service", "journal-remote-vacuum.timer"}
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", *sorted(units)],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
