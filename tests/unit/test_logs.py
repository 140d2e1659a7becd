"""poplock.logs on plain stderr: lines held in a block or deferred to a scheduler come out whole, in order."""

import logging

import pytest

from poplock import events
from poplock.logs import defer_lines, held_lines, log_event, setup_logging

log = logging.getLogger("poplock.test")


@pytest.fixture
def stderr(capsys, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("poplock-test")
    yield capsys
    defer_lines(None)


def allowed(address: str) -> None:
    log_event(log, logging.INFO, events.RELAY_ALLOWED, "relay allowed for %s", address, address=address)


def test_deferred_lines_wait_for_the_scheduled_call_and_come_in_one_write(stderr):
    scheduled = []
    defer_lines(scheduled.append)
    for index in range(3):
        allowed(f"192.0.2.{index}")
    assert stderr.readouterr().err == ""
    assert len(scheduled) == 1  # one call for the lines of a turn, however many
    scheduled.pop()()
    assert stderr.readouterr().err == "".join(f"poplock-test: relay allowed for 192.0.2.{index}\n"
                                              for index in range(3))
    allowed("192.0.2.9")
    assert len(scheduled) == 1


def test_ending_the_deferral_writes_what_is_kept_and_then_each_line_at_once(stderr):
    scheduled = []
    defer_lines(scheduled.append)
    allowed("192.0.2.1")
    defer_lines(None)
    assert stderr.readouterr().err == "poplock-test: relay allowed for 192.0.2.1\n"
    allowed("192.0.2.2")
    assert stderr.readouterr().err == "poplock-test: relay allowed for 192.0.2.2\n"
    scheduled.pop()()  # the call made late finds nothing left to write
    assert stderr.readouterr().err == ""


def test_a_held_block_inside_a_deferral_leaves_its_lines_to_the_deferral(stderr):
    scheduled = []
    defer_lines(scheduled.append)
    allowed("192.0.2.1")
    with held_lines():
        allowed("192.0.2.2")
    assert stderr.readouterr().err == ""
    scheduled.pop()()
    assert stderr.readouterr().err.splitlines() == ["poplock-test: relay allowed for 192.0.2.1",
                                                    "poplock-test: relay allowed for 192.0.2.2"]
