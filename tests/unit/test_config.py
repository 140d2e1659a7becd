from pathlib import Path

import pytest

from poplock.config import SETTINGS, load_config, render_default_config
from poplock.errors import ConfigError
from poplock.servers import SERVERS

REPOSITORY = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_without_a_configuration_file_every_setting_has_its_default(tmp_path):
    config = load_config(None) if not Path("/etc/poplock/poplock.conf").exists() else None
    if config is None:  # a host with poplock installed: read an empty file instead
        config = load_config(str(write(tmp_path / "empty.conf", "")))
    assert config.window == 1800
    assert config.store_path == "/var/lib/poplock/grants.db"
    assert config.cursor_path == "/var/lib/poplock/cursor"
    assert config.static_allow_file == "/etc/poplock/static-allowed"
    assert config.sources == ("dovecot",)
    assert config.busy_timeout == pytest.approx(0.02)


def test_drop_ins_are_read_in_lexical_order_and_the_last_assignment_wins(tmp_path):
    main = write(tmp_path / "poplock.conf", "[Grants]\nWindow=10min\n")
    write(tmp_path / "poplock.conf.d" / "20-late.conf", "[Grants]\nWindow=1h\n")
    write(tmp_path / "poplock.conf.d" / "10-early.conf", "[Grants]\nWindow=5min\n[Store]\nPath=/srv/g.db\n")
    write(tmp_path / "poplock.conf.d" / "ignored.txt", "[Grants]\nWindow=9h\n")
    config = load_config(str(main))
    assert config.window == 3600
    assert config.store_path == "/srv/g.db"


def test_every_problem_is_reported_at_once_with_its_file_and_line(tmp_path):
    main = write(tmp_path / "poplock.conf", "# comment\n[Grants]\nWindw=10min\nWindow=soon\n")
    drop_in = write(tmp_path / "poplock.conf.d" / "10-site.conf", "[Store]\nPath=relative/grants.db\n[Stor]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(main))
    problems = caught.value.problems
    assert problems == [
        f"{main}:3: [Grants] Windw: unknown setting (did you mean Window?)",
        f"{main}:4: [Grants] Window=soon: expected a time span such as 30min or 1h 30min, not 'soon'",
        f"{drop_in}:2: [Store] Path=relative/grants.db: must be an absolute path",
        f"{drop_in}:3: [Stor]: unknown section (did you mean Store?)",
    ]
    assert str(caught.value).startswith("invalid configuration:\n  ")


def test_lines_that_are_not_ini_are_errors_naming_the_line(tmp_path):
    main = write(tmp_path / "poplock.conf", "Window=1h\n[Grants\n[Grants]\njust words\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(main))
    assert caught.value.problems == [
        f"{main}:1: Window= stands before any [Section] header",
        f"{main}:2: expected a section header such as [Grants]",
        f"{main}:4: expected Key=Value or a [Section] header, not 'just words'",
    ]


def test_a_trailing_backslash_continues_a_line(tmp_path):
    main = write(tmp_path / "poplock.conf", "[Reader]\nSources=dovecot \\\n  dovecot\n")
    assert load_config(str(main)).sources == ("dovecot", "dovecot")


def test_a_configuration_file_named_on_the_command_line_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.conf"))


@pytest.mark.parametrize("window", ["500ms", "25h", "60y", "2100y", "10000y"])
def test_a_window_outside_one_second_to_a_day_is_refused_with_its_place(tmp_path, window):
    # 60y once seeked before 1970 and granted nothing, 2100y crashed the reader, 10000y the CLI.
    main = write(tmp_path / "poplock.conf", f"[Grants]\nWindow={window}\n")
    with pytest.raises(ConfigError, match=rf":2: \[Grants\] Window={window}: must be from 1s to 24h"):
        load_config(str(main))


@pytest.mark.parametrize("cursor", ["{store}", "{store}.lock", "{store}.new", "{directory}//grants.db"])
def test_a_cursor_file_that_is_one_of_the_store_files_is_refused(tmp_path, cursor):
    # It once was accepted, and every commit then wrote the cursor over the store.
    store = f"{tmp_path}/grants.db"
    cursor = cursor.format(store=store, directory=tmp_path)
    main = write(tmp_path / "poplock.conf", f"[Store]\nPath={store}\n[Reader]\nCursorPath={cursor}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(main))
    assert raised.value.problems == [
        f"{main}:4: [Reader] CursorPath={cursor}: {cursor} is also {store}{cursor.rpartition('grants.db')[2]} "
        "([Store] Path); poplock's files must all be different"]


def test_a_static_allow_file_that_is_the_store_is_refused(tmp_path):
    main = write(tmp_path / "poplock.conf", "[Grants]\nStaticAllowFile=/var/lib/poplock/grants.db\n")
    with pytest.raises(ConfigError, match=r":2: \[Grants\] StaticAllowFile=/var/lib/poplock/grants.db: "
                                          r"/var/lib/poplock/grants.db is also"):
        load_config(str(main))


def test_a_program_can_check_only_the_sections_it_uses(tmp_path):
    main = write(tmp_path / "poplock.conf", "[Store]\nPath=/srv/g.db\n[Reader]\nBogus=1\n[Nonsense]\n")
    config = load_config(str(main), sections=("Grants", "Store", "Relaylock"))
    assert config.store_path == "/srv/g.db"
    with pytest.raises(ConfigError):
        load_config(str(main))


def test_source_sections_only_accept_known_keys(tmp_path):
    main = write(tmp_path / "poplock.conf", "[Source:dovecot]\nUnit=dovecot.service\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(main))
    assert caught.value.problems == [f"{main}:2: [Source:dovecot] Unit: unknown setting (did you mean Units?)"]


def test_the_shipped_configuration_shows_every_setting_commented_at_its_default():
    shipped = (REPOSITORY / "etc" / "poplock.conf").read_text()
    assert shipped == render_default_config()
    for setting in SETTINGS:
        assert f"\n#{setting.key}={setting.default}\n" in shipped


def test_the_shipped_configuration_uncommented_gives_the_defaults(tmp_path):
    shipped = (REPOSITORY / "etc" / "poplock.conf").read_text()
    lines = [line[1:] if line.startswith("#") and "=" in line and not line.startswith("# ") else line
             for line in shipped.splitlines()]
    # The [Source:NAME] template is an example, not a setting.
    active = "\n".join(lines).split("#[Source:NAME]")[0]
    config = load_config(str(write(tmp_path / "poplock.conf", active)))
    for setting in SETTINGS:
        assert getattr(config, setting.attribute) == setting.parse(setting.default)


def relaylock_config(tmp_path: Path, text: str):
    return load_config(str(write(tmp_path / "poplock.conf", f"[Relaylock]\n{text}\n")),
                       sections=("Grants", "Store", "Relaylock"))


def test_relaylock_reads_the_local_store_unless_a_server_is_set(tmp_path):
    config = relaylock_config(tmp_path, "")
    assert (config.relaylock_server, config.relaylock_server_map) == ("", "poplock")
    assert config.relaylock_server_timeout == pytest.approx(0.1)


@pytest.mark.parametrize("written, kept", [
    ("192.0.2.25:7025", "192.0.2.25:7025"),
    ("192.0.2.25:07025", "192.0.2.25:7025"),
    ("[2001:DB8:0:0::25]:7025", "[2001:db8::25]:7025"),
    ("[::ffff:192.0.2.25]:7025", "192.0.2.25:7025"),
    ("[192.0.2.25]:7025", "192.0.2.25:7025"),
    (" /run/poplock-socketmap.sock ", "/run/poplock-socketmap.sock"),
])
def test_a_relaylock_server_is_kept_in_one_spelling(tmp_path, written, kept):
    assert relaylock_config(tmp_path, f"Server={written}").relaylock_server == kept


@pytest.mark.parametrize("written, complaint", [
    ("mail.example.org:7025", "mail.example.org is not an IP address (a host name is not taken"),
    ("2001:db8::25:7025", "an IPv6 address goes in brackets"),
    ("192.0.2.25", "expected ADDRESS:PORT, [IPV6-ADDRESS]:PORT or an absolute unix socket path"),
    ("192.0.2.25:", "expected ADDRESS:PORT"),
    (":7025", "nothing is not an IP address"),
    ("192.0.2.25:65536", "expected ADDRESS:PORT"),
    ("192.0.2.25:\u0663", "expected ADDRESS:PORT"),
    ("run/poplock-socketmap.sock", "expected ADDRESS:PORT"),
    ("/" + "x" * 107, "a unix socket path is at most 107 bytes"),
])
def test_an_invalid_relaylock_server_is_refused_with_its_place(tmp_path, written, complaint):
    with pytest.raises(ConfigError) as raised:
        relaylock_config(tmp_path, f"Server={written}")
    [problem] = raised.value.problems
    assert problem.startswith(f"{tmp_path / 'poplock.conf'}:2: [Relaylock] Server={written.strip()}: {complaint}")


@pytest.mark.parametrize("timeout, seconds", [("1ms", 0.001), ("250ms", 0.25), ("5s", 5)])
def test_the_server_timeout_may_be_from_above_zero_to_five_seconds(tmp_path, timeout, seconds):
    assert relaylock_config(tmp_path, f"ServerTimeout={timeout}").relaylock_server_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("timeout", ["0", "0ms", "5.5s", "1min", "soon"])
def test_a_server_timeout_of_zero_or_over_five_seconds_is_refused(tmp_path, timeout):
    with pytest.raises(ConfigError, match=rf":2: \[Relaylock\] ServerTimeout={timeout}: "):
        relaylock_config(tmp_path, f"ServerTimeout={timeout}")


@pytest.mark.parametrize("name", ["", "pop lock", "x" * 65, "pop:lock"])
def test_a_server_map_that_cannot_be_a_map_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=r"\[Relaylock\] ServerMap=.*: expected a map name"):
        relaylock_config(tmp_path, f"ServerMap={name}")


def test_an_unknown_source_is_reported_together_with_an_unknown_key(tmp_path):
    # Not only once the typo is fixed: poplock.conf(5) says every problem is reported at once.
    path = tmp_path / "poplock.conf"
    path.write_text("[Reader]\nSources=dovecot qpoper\nWindw=1h\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [
        f"{path}:3: [Reader] Windw: unknown setting",
        f"{path}:2: [Reader] Sources: unknown source 'qpoper' (built in: {', '.join(SERVERS)}; or define it in a "
        "[Source:qpoper] section)"]
