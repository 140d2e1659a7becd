import pytest

from poplock.addresses import find_network, normalize_address, parse_allow_list, parse_deny_list, parse_network
from poplock.errors import AddressError, ConfigError


@pytest.mark.parametrize("text, canonical", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("::FFFF:c000:0207", "192.0.2.7"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    (" ::1 ", "::1"),
])
def test_addresses_have_one_spelling_and_mapped_ipv6_is_the_ipv4_client(text, canonical):
    assert normalize_address(text) == canonical


@pytest.mark.parametrize("text", ["", "192.0.2", "192.0.2.256", "host.example", "203.0.113.9>", "1:2:3",
                                  "fe80::1%eth0"])
def test_text_that_is_not_an_address_is_refused(text):
    with pytest.raises(AddressError):
        normalize_address(text)


def test_networks_are_written_with_a_prefix_length_or_a_netmask():
    assert parse_network("192.168.0.0/24") == parse_network("192.168.0.0/255.255.255.0")
    assert "192.168.0.77" in parse_network("192.168.0.0/255.255.255.0")
    assert "192.168.1.1" not in parse_network("192.168.0.0/24")
    assert "2001:db8:ffff::9" in parse_network("2001:db8::/32")
    assert "192.0.2.7" in parse_network("192.0.2.7")
    assert "192.0.2.8" not in parse_network("192.0.2.7")
    assert "10.9.9.9" in parse_network("0.0.0.0/0")


def test_an_ipv4_mapped_network_is_the_ipv4_network():
    network = parse_network("::ffff:192.0.2.0/120")
    assert network == parse_network("192.0.2.0/24")
    assert "192.0.2.200" in network


def test_ipv4_and_ipv6_networks_never_hold_each_others_addresses():
    assert "::1" not in parse_network("0.0.0.0/0")
    assert "127.0.0.1" not in parse_network("::/0")


@pytest.mark.parametrize("text, message", [
    ("192.168.0.1/24", "host bits set (did you mean 192.168.0.0/24?)"),
    ("192.168.0.0/33", "out of range"),
    ("192.168.0.0/255.0.255.0", "not contiguous"),
    ("192.168.0.0/255.255.255.256", "not an IPv4 netmask"),
    ("2001:db8::/ffff::", "expected a prefix length"),
])
def test_malformed_networks_are_refused_with_the_reason(text, message):
    with pytest.raises(AddressError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_network(text)


def test_the_allow_list_takes_comments_and_blank_lines():
    networks = parse_allow_list("# office\n192.168.0.0/24   # LAN\n\n2001:db8::/48\n10.0.0.1\n", "/etc/x")
    assert [str(network) for network in networks] == ["192.168.0.0/24", "2001:db8::/48", "10.0.0.1"]
    assert find_network(networks, "192.168.0.9").text == "192.168.0.0/24"
    assert find_network(networks, "10.0.0.2") is None


def test_every_bad_allow_list_line_is_named_with_file_and_line():
    with pytest.raises(ConfigError) as caught:
        parse_allow_list("192.168.0.0/24\nlocalhost\n\n10.0.0.0/8/8\n", "/etc/poplock/static-allowed")
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("/etc/poplock/static-allowed:2: not an IP address: 'localhost'")
    assert caught.value.problems[1].startswith("/etc/poplock/static-allowed:4: ")


def test_a_deny_list_network_is_named_in_prefix_form_however_it_was_written():
    denials = parse_deny_list("10.0.0.0/255.0.0.0\n2001:db8:0:0::/64\n", "/etc/poplock/deny")
    assert denials.denies("10.1.2.3", None) == "network 10.0.0.0/8"
    assert denials.denies("2001:db8::9", None) == "network 2001:db8::/64"
