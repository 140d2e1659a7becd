import pytest

from poplock.errors import ProtocolError
from poplock.policyprotocol import MAX_REQUEST_BYTES, RequestBuffer, format_reply


def test_a_request_ends_at_an_empty_line_and_may_arrive_in_pieces():
    buffer = RequestBuffer()
    assert buffer.feed(b"request=smtpd_access_policy\nclient_add") == []
    assert buffer.in_request
    [request] = buffer.feed(b"ress=192.0.2.7\n\n")
    assert request.problem is None
    assert request.attributes == {"request": "smtpd_access_policy", "client_address": "192.0.2.7"}
    assert not buffer.in_request


def test_pipelined_requests_come_out_in_order():
    buffer = RequestBuffer()
    data = b"".join(b"request=smtpd_access_policy\nclient_address=192.0.2.%d\n\n" % n for n in range(5))
    assert [r.attributes["client_address"] for r in buffer.feed(data)] == [f"192.0.2.{n}" for n in range(5)]


def test_values_may_contain_equals_signs_and_be_empty():
    [request] = RequestBuffer().feed(b"request=smtpd_access_policy\nclient_address=192.0.2.7\n"
                                     b"ccert_subject=CN=a=b\nsasl_method=\n\n")
    assert request.attributes["ccert_subject"] == "CN=a=b" and request.attributes["sasl_method"] == ""


@pytest.mark.parametrize("data, problem", [
    (b"garbage\n\n", "not a name=value line"),
    (b"\n", "empty request"),
    (b"=x\n\n", "not a name=value line"),
    (b"request=junk\nclient_address=192.0.2.7\n\n", "not an smtpd_access_policy request"),
    (b"request=smtpd_access_policy\nclient_name=x\n\n", "no client_address"),
    (b"request=smtpd_access_policy\nclient_address=192.0.2.7\n" + b"a=b\n" * 200 + b"\n", "more than 100"),
])
def test_malformed_requests_are_marked_so_they_get_dunno(data, problem):
    [request] = RequestBuffer().feed(data)
    assert problem in request.problem


def test_an_unfinished_request_cannot_grow_without_bound():
    buffer = RequestBuffer()
    buffer.feed(b"request=smtpd_access_policy\n")
    with pytest.raises(ProtocolError, match="larger than"):
        buffer.feed(b"x=" + b"y" * MAX_REQUEST_BYTES + b"\n")


def test_an_oversized_request_that_arrives_whole_is_refused_too():
    with pytest.raises(ProtocolError):
        RequestBuffer().feed(b"request=smtpd_access_policy\nx=" + b"y" * MAX_REQUEST_BYTES + b"\n\n")


def test_a_reply_is_one_action_line_and_an_empty_line():
    assert format_reply("OK") == b"action=OK\n\n"
