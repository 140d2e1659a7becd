import random

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


def test_a_request_ends_even_when_its_two_newlines_arrive_in_separate_pieces():
    buffer = RequestBuffer()
    assert buffer.feed(b"request=smtpd_access_policy\nclient_address=192.0.2.7\n") == []
    [request] = buffer.feed(b"\n")
    assert request.problem is None and not buffer.in_request


def test_every_lone_newline_is_an_empty_request_of_its_own():
    requests = RequestBuffer().feed(b"\n" * 1000)
    assert len(requests) == 1000 and {request.problem for request in requests} == {"empty request"}


def test_nul_bytes_and_invalid_utf8_in_a_value_leave_the_request_readable():
    [request] = RequestBuffer().feed(b"request=smtpd_access_policy\nclient_address=192.0.2.7\n"
                                     b"helo_name=\xff\xfe\0x\nsasl_username=\xc3\x28\n\n")
    assert request.problem is None
    assert request.attributes["client_address"] == "192.0.2.7"
    assert request.attributes["helo_name"] == "\ufffd\ufffd\0x"


def stream_of_requests(generator) -> bytes:
    pieces = [b"request=smtpd_access_policy\nclient_address=192.0.2.%d\nrecipient=a@b\n\n" % n for n in range(20)]
    pieces += [b"\n", b"garbage\n\n", b"=x\n\n", b"request=junk\n\n", b"a=\xff\0\n\n"]
    generator.shuffle(pieces)
    return b"".join(pieces)


def summary(requests) -> list:
    return [(request.problem, sorted(request.attributes.items())) for request in requests]


@pytest.mark.parametrize("seed", range(20))
def test_bytes_split_anywhere_give_the_same_requests_as_bytes_fed_whole(seed):
    generator = random.Random(seed)
    data = stream_of_requests(generator)
    whole = RequestBuffer().feed(data)
    buffer = RequestBuffer()
    pieces = []
    position = 0
    while position < len(data):
        size = generator.choice([1, 1, 2, 3, 7, 50, 400])
        pieces += buffer.feed(data[position:position + size])
        position += size
    assert summary(pieces) == summary(whole)
    assert len(whole) == 25 and not buffer.in_request


def test_an_oversized_request_dripped_a_byte_at_a_time_is_refused_at_the_bound():
    buffer = RequestBuffer(max_request_bytes=100)
    for _ in range(100):
        buffer.feed(b"x")
    with pytest.raises(ProtocolError):
        buffer.feed(b"x")
