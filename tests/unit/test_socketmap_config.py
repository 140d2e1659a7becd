"""[Socketmap] Maps=: the map names poplock-socketmap answers, each with its OK value, read strictly."""

import pytest

from poplock.config import load_config
from poplock.errors import ConfigError


def maps(tmp_path, value: str):
    path = tmp_path / "poplock.conf"
    path.write_text(f"[Socketmap]\nMaps={value}\n")
    return load_config(str(path)).socketmap_maps


def test_the_default_is_one_map_named_poplock_answering_ok(tmp_path):
    (tmp_path / "empty.conf").write_text("")
    assert load_config(str(tmp_path / "empty.conf")).socketmap_maps == (("poplock", "OK"),)


def test_several_maps_keep_their_order_and_values(tmp_path):
    assert maps(tmp_path, "poplock:OK sendmail:RELAY postfix:relay_from_poplock") == (
        ("poplock", "OK"), ("sendmail", "RELAY"), ("postfix", "relay_from_poplock"))


@pytest.mark.parametrize(("value", "problem"), [
    ("poplock", "expected NAME:VALUE"),
    ("poplock:", "expected NAME:VALUE"),
    (":OK", "expected NAME:VALUE"),
    ("pop lock:OK", "expected NAME:VALUE"),
    ("pop/lock:OK", "a map name is up to 64"),
    ("x" * 65 + ":OK", "a map name is up to 64"),
    ("poplock:" + "V" * 201, "up to 200 printable ASCII"),
    ("poplock:OK\x7f", "up to 200 printable ASCII"),
    ("poplock:OK poplock:RELAY", "map name poplock given twice"),
    ("", "at least one NAME:VALUE"),
])
def test_a_bad_maps_value_is_a_configuration_error_with_its_place(tmp_path, value, problem):
    with pytest.raises(ConfigError) as raised:
        maps(tmp_path, value)
    assert f"poplock.conf:2: [Socketmap] Maps={value}" in str(raised.value)
    assert problem in str(raised.value)
