import pytest

from poplock.values import format_timespan, parse_boolean, parse_timespan


@pytest.mark.parametrize("text, seconds", [
    ("30min", 1800), ("1h 30min", 5400), ("1h30min", 5400), ("90", 90), ("2.5s", 2.5),
    ("20ms", 0.02), ("1d", 86400), ("1 week", 604800), ("  45 s ", 45), ("500us", 0.0005),
])
def test_time_spans_are_read_as_systemd_writes_them(text, seconds):
    assert parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "min", "30 fortnights", "1..5s", "-5min", "30min!"])
def test_a_malformed_time_span_is_an_error_that_shows_an_example(text):
    with pytest.raises(ValueError, match="time"):
        parse_timespan(text)


def test_time_spans_are_printed_in_their_shortest_systemd_spelling():
    assert format_timespan(5400) == "1h 30min"
    assert format_timespan(1800) == "30min"
    assert format_timespan(0.02) == "20ms"
    assert parse_timespan(format_timespan(90061)) == 90061


@pytest.mark.parametrize("word", ["yes", "Y", "true", "on", "1", "t"])
def test_systemd_true_words_are_true(word):
    assert parse_boolean(word) is True


@pytest.mark.parametrize("word", ["no", "N", "false", "off", "0", "f"])
def test_systemd_false_words_are_false(word):
    assert parse_boolean(word) is False


def test_a_word_that_is_not_a_boolean_is_an_error():
    with pytest.raises(ValueError, match="boolean"):
        parse_boolean("maybe")
