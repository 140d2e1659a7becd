"""decisions.Pending: an answer still to come, whose waiting callbacks run the moment it is given."""

import asyncio
import logging

import pytest

from poplock.decisions import Pending


def test_the_callbacks_run_once_in_order_when_the_answer_is_given():
    pending, ran = Pending(), []
    pending.add_done_callback(lambda done: ran.append(("first", done.result())))
    pending.add_done_callback(lambda done: ran.append(("second", done.result())))
    assert not pending.done() and ran == []
    pending.set_result(b"action=DUNNO\n\n")
    assert pending.done() and ran == [("first", b"action=DUNNO\n\n"), ("second", b"action=DUNNO\n\n")]
    pending.set_result(b"again")  # given twice: nothing waits any more
    assert len(ran) == 2


def test_a_callback_added_once_it_is_given_runs_at_once():
    pending = Pending()
    pending.set_result(b"OK")
    ran = []
    pending.add_done_callback(lambda done: ran.append(done.result()))
    assert ran == [b"OK"]


def test_its_result_before_it_is_given_is_an_error():
    with pytest.raises(asyncio.InvalidStateError):
        Pending().result()


def test_a_callback_that_fails_is_logged_and_the_others_still_run(caplog):
    pending, ran = Pending(), []
    pending.add_done_callback(lambda done: 1 / 0)
    pending.add_done_callback(lambda done: ran.append(done.result()))
    with caplog.at_level(logging.ERROR, logger="poplock.service"):
        pending.set_result(b"NOTFOUND")
    assert ran == [b"NOTFOUND"] and "writing an answer that came late failed" in caplog.text
