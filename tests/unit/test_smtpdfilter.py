"""poplock-smtpd-filter's side of OpenSMTPD's filter protocol 0.6, with the lookups answered here."""

import io

import pytest

from poplock.errors import ProtocolError
from poplock.smtpdfilter import Filter, client_key, recipient_domain

SESSION = "7641df9771b4ed00"
TOKEN = "1ef1c203cc576e5d"


class Answers(Filter):
    """The filter with its lookups answered from a dict (key -> reply or exception), and recorded."""

    def __init__(self, answers: dict, local_domains=("example.org",)):
        super().__init__("/run/poplock-socketmap.sock", "poplock", 2.0, list(local_domains), output=io.StringIO(),
                         errors=io.StringIO())
        self.answers = answers
        self.asked: list[str] = []

    def ask(self, key: str):
        self.asked.append(key)
        answer = self.answers[key]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def lines(self) -> list[str]:
        return self.output.getvalue().splitlines()


def connect(state: Filter, address: str, session: str = SESSION) -> None:
    state.handle(f"filter|0.6|1576146008.006099|smtp-in|connect|{session}|{TOKEN}|mail.example.net|{address}")


def rcpt(state: Filter, recipient: str, session: str = SESSION) -> str:
    state.handle(f"filter|0.6|1576146008.006099|smtp-in|rcpt-to|{session}|{TOKEN}|{recipient}")
    return state.lines()[-1]


def test_it_registers_for_connect_and_rcpt_to_once_smtpd_is_ready():
    state = Answers({})
    for line in ("config|smtpd-version|6.8.0p2", "config|smtp-session-timeout|300", "config|subsystem|smtp-in"):
        state.handle(line)
    assert state.lines() == []
    state.handle("config|ready")
    assert state.lines() == ["register|filter|smtp-in|connect", "register|filter|smtp-in|rcpt-to",
                             "register|report|smtp-in|link-disconnect", "register|ready"]


def test_a_granted_client_proceeds_and_a_stranger_is_refused_with_550():
    state = Answers({"192.0.2.7": ("OK", "OK"), "192.0.2.8": ("NOTFOUND", "")})
    connect(state, "192.0.2.7")
    assert state.lines()[-1] == f"filter-result|{SESSION}|{TOKEN}|proceed"
    assert rcpt(state, "someone@elsewhere.example") == f"filter-result|{SESSION}|{TOKEN}|proceed"
    connect(state, "192.0.2.8", session="2")
    assert rcpt(state, "someone@elsewhere.example", session="2") == \
           f"filter-result|2|{TOKEN}|reject|550 5.7.1 Relaying denied"


@pytest.mark.parametrize("answer", [("TEMP", "store"), ("PERM", "no map"), ("TIMEOUT", "x"),
                                    OSError("Connection refused"), TimeoutError("timed out"),
                                    ProtocolError("not a netstring"), ValueError("bad"), RuntimeError("a bug")])
def test_anything_but_ok_or_notfound_is_a_451_never_a_proceed(answer):
    state = Answers({"192.0.2.7": answer})
    connect(state, "192.0.2.7")
    assert rcpt(state, "someone@elsewhere.example") == \
           f"filter-result|{SESSION}|{TOKEN}|reject|451 4.3.0 Relay check unavailable, try again later"
    assert "answering 451" in state.errors.getvalue()


def test_local_recipients_proceed_without_a_question():
    state = Answers({})
    connect(state, "192.0.2.8")
    for recipient in ("root@example.org", "<postmaster@EXAMPLE.ORG>", "a@example.org."):
        assert rcpt(state, recipient) == f"filter-result|{SESSION}|{TOKEN}|proceed"
    assert state.asked == []
    rcpt(state, "someone@sub.example.org")  # a foreign domain, however alike, is asked about
    assert state.asked == ["192.0.2.8"]


def test_ipv6_clients_are_asked_for_without_smtpds_brackets():
    assert client_key("[::1]") == "::1"
    assert client_key("[2001:db8::5]") == "2001:db8::5"
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("[::1") == "[::1"  # anything else is passed on, for poplock-socketmap to refuse
    state = Answers({"2001:db8::5": ("OK", "OK")})
    connect(state, "[2001:db8::5]")
    assert rcpt(state, "someone@elsewhere.example").endswith("|proceed")


def test_a_recipient_in_a_session_it_never_saw_connect_is_a_451():
    state = Answers({})
    assert rcpt(state, "someone@elsewhere.example").endswith("|reject|451 4.3.0 Relay check unavailable, try again "
                                                             "later")


def test_a_session_is_forgotten_when_it_disconnects():
    state = Answers({"192.0.2.7": ("OK", "OK")})
    connect(state, "192.0.2.7")
    state.handle(f"report|0.6|1576146008.006099|smtp-in|link-disconnect|{SESSION}")
    assert state.clients == {}
    assert rcpt(state, "someone@elsewhere.example").endswith("|451 4.3.0 Relay check unavailable, try again later")


def test_recipient_domains_are_read_as_smtpd_gives_them():
    assert recipient_domain("someone@Elsewhere.Example") == "elsewhere.example"
    assert recipient_domain("<a@b.example.>") == "b.example"
    assert recipient_domain("a|b@c.example") == "c.example"
