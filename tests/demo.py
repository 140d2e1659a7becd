"""poplock end to end, on this machine, with the shipped defaults (paths moved to a scratch directory).

A real Dovecot on loopback logs into a real journald; poplock-reader follows the
journal; a real Postfix asks poplock-policy whether a client may relay. A client that
checked its mail with the right password may relay; one that got its password wrong,
and one that never logged in, may not. Exits non-zero if any of that does not happen.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from support.dovecot import Dovecot
from support.journald import ensure_journald
from support.mailclients import pop3_login
from support.poplock import PolicyProcess, ReaderProcess, Setup
from support.ports import free_port
from support.postfix import PostfixInstance
from support.smtpservers import try_relay

GOOD_CLIENT = "127.0.0.5"
BAD_CLIENT = "127.0.0.6"
STRANGER = "127.0.0.7"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(setup: Setup, *arguments: str) -> int:
    result = setup.run(*arguments)
    print(f"$ poplock {' '.join(arguments)}")
    print((result.stdout + result.stderr).rstrip())
    return result.returncode


def relay(postfix: PostfixInstance, client: str) -> int:
    code, text = try_relay("127.0.0.1", postfix.port, source=client)
    print(f"SMTP from {client}: RCPT TO:<someone@elsewhere.example> -> {code} {text}")
    return code


def main() -> int:
    ensure_journald()
    with tempfile.TemporaryDirectory(prefix="poplock-demo-") as scratch:
        directory = Path(scratch)
        # This Dovecot logs under a name of its own (its instance_name), so that other
        # Dovecot logins in this machine's journal, earlier demos' included, do not mix in.
        identifier = f"dovecot-demo-{uuid.uuid4().hex[:8]}"
        setup = Setup(directory, extra=f"\n[Source:dovecot]\nIdentifiers={identifier}\n")
        say(f"configuration: the defaults, with the store and cursor under {directory}")
        print(setup.config.read_text().rstrip())
        policy_port = free_port()
        restriction = (f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=2s, try_limit=1, "
                       f"default_action=DUNNO }}")
        dovecot = Dovecot(directory / "dovecot", {"demo": "secret"}, identifier=identifier)
        postfix = PostfixInstance(directory / "postfix", restriction)
        with dovecot, ReaderProcess(setup) as reader, PolicyProcess(setup, f"127.0.0.1:{policy_port}"), postfix:
            say(f"Dovecot POP3 on 127.0.0.1:{dovecot.pop3_port}, Postfix SMTP on 127.0.0.1:{postfix.port} asking "
                f"poplock-policy; poplock-reader follows the journal")
            print(f"smtpd_relay_restrictions = permit_mynetworks, {restriction}, reject_unauth_destination")
            accepted = pop3_login("127.0.0.1", dovecot.pop3_port, "demo", "secret", source=GOOD_CLIENT)
            print(f"POP3 login from {GOOD_CLIENT} with the right password: {'accepted' if accepted else 'REFUSED'}")
            refused = not pop3_login("127.0.0.1", dovecot.pop3_port, "demo", "wrong", source=BAD_CLIENT)
            print(f"POP3 login from {BAD_CLIENT} with a wrong password: {'refused' if refused else 'ACCEPTED'}")
            setup.wait_until_allowed(GOOD_CLIENT)
            say("what poplock made of it")
            show(setup, "show")
            good = show(setup, "check", GOOD_CLIENT)
            bad = show(setup, "check", BAD_CLIENT)
            say("relaying through Postfix")
            relays = [relay(postfix, client) for client in (GOOD_CLIENT, BAD_CLIENT, STRANGER)]
            reader.stop()
            say("poplock-reader's log")
            print(reader.output().rstrip())
    ok = accepted and refused and good == 0 and bad == 1 and relays == [250, 554, 554]
    say("demo " + ("passed: the client that checked its mail may relay, the others may not" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (subprocess.SubprocessError, OSError, TimeoutError, RuntimeError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        sys.exit(1)
