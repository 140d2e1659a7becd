"""The socketmap codec: netstrings in, requests out; answers in, netstrings out. Pure, no sockets."""

import random

import pytest

from poplock.errors import ProtocolError
from poplock.socketmapprotocol import (
    MAX_REQUEST_BYTES,
    NOTFOUND,
    OK,
    PERM,
    TEMP,
    RequestBuffer,
    format_reply,
    format_request,
    parse_key,
    parse_reply,
)

NAMES = frozenset({b"poplock", b"relay"})

# Every key spelling an MTA was seen to send (../shared/recipes and the tests under tests/system),
# with the address poplock reads from it.
SPELLINGS = [
    (b"127.0.0.5", "127.0.0.5", "IPv4: Postfix, Sendmail, Exim, OpenSMTPD"),
    (b"192.0.2.7", "192.0.2.7", "IPv4"),
    (b"::1", "::1", "compressed: Postfix, Exim's daemon"),
    (b"2001:db8::5", "2001:db8::5", "compressed"),
    (b"0:0:0:0:0:0:0:1", "::1", "Sendmail's full form without ::"),
    (b"2001:db8:0:0:0:0:0:5", "2001:db8::5", "Sendmail's full form"),
    (b"0000:0000:0000:0000:0000:0000:0000:0001", "::1", "Exim -bh, zero-padded"),
    (b"2001:0db8:0000:0000:0000:0000:0000:0005", "2001:db8::5", "Exim -bh, zero-padded"),
    (b"::ffff:192.0.2.7", "192.0.2.7", "IPv4-mapped, as inet_ntop prints it"),
]

# Keys that name an address, but not as any MTA spells it, and text that is no address.
NOT_ADDRESSES = [
    b"unknown",  # Postfix asks for the client's host name first
    b"mail.example.org",
    b"192.0.2.7 ", b" 192.0.2.7", b"192.0.2.7\0", b"192.0.2.7\n", b"192.0.2.7/32", b"192.0.2.7.",
    b"192.0.2.07", b"0192.0.2.7", b"192.0.2", b"3221226247", b"0xc0.0.2.7", b"192.0.2.256",
    b"2001:DB8::5",  # upper case: no MTA sends it
    b"2001:db8:0::5", b"2001:0db8::5",  # compressed, but not as inet_ntop compresses
    b"2001:db8:0:0:0:0:0:0005",  # groups neither all padded nor all bare
    b"[2001:db8::5]", b"IPv6:2001:db8::5", b"ipv6:2001:db8::5",  # tags the rulesets strip
    b"connect:192.0.2.7", b"connect:[192.0.2.7]",  # Sendmail's access map keys
    b"::ffff:c000:207",  # a mapped address not as inet_ntop prints it
    b"2001:db8::5%eth0", b"fe80::1%1",
    b"~alice", b"#cursor:/var/lib/poplock/cursor", b"#count",  # the store's own keys
    b"\xff\xfe", "192.0.2.７".encode(), b"::1\0", b"",
]


@pytest.mark.parametrize(("key", "address", "who"), SPELLINGS, ids=[s[0].decode() for s in SPELLINGS])
def test_each_spelling_an_mta_sends_is_read_as_its_address(key, address, who):
    assert parse_key(key) == address


@pytest.mark.parametrize("key", NOT_ADDRESSES, ids=repr)
def test_keys_spelled_any_other_way_are_no_address(key):
    assert parse_key(key) is None


def test_a_request_is_one_netstring_with_a_map_name_and_a_key():
    [request] = RequestBuffer(NAMES).feed(b"17:poplock 127.0.0.5,")
    assert (request.name, request.key, request.address, request.problem) == ("poplock", b"127.0.0.5", "127.0.0.5",
                                                                             None)


def test_a_key_that_is_no_address_is_an_ordinary_request_without_an_address():
    [request] = RequestBuffer(NAMES).feed(b"15:poplock unknown,")
    assert request.problem is None and request.address is None


def test_requests_may_arrive_byte_by_byte_and_pipelined():
    data = b"".join(format_request("poplock", f"192.0.2.{n}") for n in range(20)) + format_request("relay", "::1")
    buffer = RequestBuffer(NAMES)
    requests = []
    for index in range(len(data)):
        requests += buffer.feed(data[index:index + 1])
        assert buffer.in_request == (index + 1 < len(data) and data[index] != ord(","))
    assert [request.address for request in requests] == [f"192.0.2.{n}" for n in range(20)] + ["::1"]
    assert requests[-1].name == "relay"


def test_leading_zeros_in_a_length_are_read_as_the_number():
    [request] = RequestBuffer(NAMES).feed(b"017:poplock 127.0.0.5,")
    assert request.address == "127.0.0.5"


@pytest.mark.parametrize(("data", "problem"), [
    (b"0:,", "empty request"),
    (b"7:poplock,", "not a map name and a key"),
    (b"17:Poplock 127.0.0.5,", "unknown map name 'Poplock'"),
    (b"13:other 1.2.3.4,", "unknown map name 'other'"),
    (b"9:\xffpop 1.2.,", "unknown map name"),
])
def test_netstrings_that_say_nothing_answerable_are_marked_so_they_get_perm(data, problem):
    [request] = RequestBuffer(NAMES).feed(data)
    assert problem in request.problem and request.address is None


@pytest.mark.parametrize("data", [
    b"x:poplock 127.0.0.5,", b":poplock,", b"17;poplock 127.0.0.5,", b"-1:x,", b" 17:poplock 127.0.0.5,",
    b"17:poplock 127.0.0.5;", b"16:poplock 127.0.0.5,", b"17:poplock 127.0.0.5,\n", b"poplock 127.0.0.5\n",
    b"+17:poplock 127.0.0.5,", b"\xef\xbc\x91:x,",
])
def test_bytes_that_are_not_netstrings_are_a_protocol_error(data):
    with pytest.raises(ProtocolError):
        RequestBuffer(NAMES).feed(data)


def test_a_length_over_the_cap_is_refused_as_soon_as_it_is_read():
    buffer = RequestBuffer(NAMES)
    with pytest.raises(ProtocolError, match=f"larger than {MAX_REQUEST_BYTES}"):
        buffer.feed(b"%d:" % (MAX_REQUEST_BYTES + 1))
    with pytest.raises(ProtocolError, match="larger than"):
        RequestBuffer(NAMES).feed(b"99999999")  # no colon yet, but already more digits than any request has
    with pytest.raises(ProtocolError, match="larger than"):
        RequestBuffer(NAMES).feed(b"2000")


def test_the_cap_is_far_below_what_postfix_would_take():
    assert MAX_REQUEST_BYTES <= 100_000 // 50
    [request] = RequestBuffer(NAMES).feed(format_request("poplock", "h" * (MAX_REQUEST_BYTES - 8)))
    assert request.address is None and request.problem is None


def test_a_partial_length_is_checked_for_digits_before_the_colon_arrives():
    with pytest.raises(ProtocolError):
        RequestBuffer(NAMES).feed(b"1x")
    buffer = RequestBuffer(NAMES)
    assert buffer.feed(b"17") == [] and buffer.in_request


def test_replies_are_netstrings_and_notfound_keeps_its_space():
    assert format_reply(OK, "OK") == b"5:OK OK,"
    assert format_reply(OK, "RELAY") == b"8:OK RELAY,"
    assert format_reply(NOTFOUND) == b"9:NOTFOUND ,"
    assert format_reply(TEMP, "store") == b"10:TEMP store,"
    assert format_reply(PERM, "x") == b"6:PERM x,"


def test_the_client_half_reads_what_the_server_half_writes():
    assert format_request("poplock", "192.0.2.7") == b"17:poplock 192.0.2.7,"
    assert parse_reply(format_reply(OK, "OK")) == ("OK", "OK")
    assert parse_reply(format_reply(NOTFOUND)) == ("NOTFOUND", "")
    for bad in (b"", b"5:OK OK", b"4:OK OK,", b"5:OK OK,,", b"2:OK,", b"7:MAYBE x,", b"x:OK,"):
        with pytest.raises(ProtocolError):
            parse_reply(bad)


def test_random_bytes_never_make_a_request_for_an_address_they_do_not_frame(seed=20261202):
    generator = random.Random(seed)
    alphabet = b"0123456789:, poplock127.\xff\0"
    for _ in range(3000):
        blob = bytes(generator.choice(alphabet) for _ in range(generator.randrange(1, 60)))
        try:
            requests = RequestBuffer(NAMES).feed(blob)
        except ProtocolError:
            continue
        for request in requests:
            assert request.address is None or format_request(request.name, request.key.decode()) in blob
