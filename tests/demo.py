"""poplock end to end, on this machine, with the shipped defaults (paths moved to a scratch directory).

A real Dovecot on loopback logs into a real journald; poplock-reader follows the
journal; a client that logs in with the right password may relay, one that gets its
password wrong may not. Exits non-zero if any of that does not happen.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from support.dovecot import Dovecot
from support.journald import ensure_journald
from support.mailclients import pop3_login
from support.poplock import ReaderProcess, Setup

GOOD_CLIENT = "127.0.0.5"
BAD_CLIENT = "127.0.0.6"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(setup: Setup, *arguments: str) -> int:
    result = setup.run(*arguments)
    print(f"$ poplock {' '.join(arguments)}")
    print((result.stdout + result.stderr).rstrip())
    return result.returncode


def main() -> int:
    ensure_journald()
    with tempfile.TemporaryDirectory(prefix="poplock-demo-") as scratch:
        directory = Path(scratch)
        # This Dovecot logs as "dovecot-demo" (its instance_name), so that other Dovecot
        # logins already in this machine's journal do not mix into the demo.
        setup = Setup(directory, extra="\n[Source:dovecot]\nIdentifiers=dovecot-demo\n")
        say(f"configuration: the defaults, with the store and cursor under {directory}")
        print(setup.config.read_text().rstrip())
        dovecot = Dovecot(directory / "dovecot", {"demo": "secret"}, identifier="dovecot-demo")
        with dovecot, ReaderProcess(setup) as reader:
            say(f"Dovecot POP3 on 127.0.0.1:{dovecot.pop3_port}; poplock-reader is following the journal")
            accepted = pop3_login("127.0.0.1", dovecot.pop3_port, "demo", "secret", source=GOOD_CLIENT)
            print(f"POP3 login from {GOOD_CLIENT} with the right password: {'accepted' if accepted else 'REFUSED'}")
            refused = not pop3_login("127.0.0.1", dovecot.pop3_port, "demo", "wrong", source=BAD_CLIENT)
            print(f"POP3 login from {BAD_CLIENT} with a wrong password: {'refused' if refused else 'ACCEPTED'}")
            setup.wait_until_allowed(GOOD_CLIENT)
            say("what poplock made of it")
            show(setup, "show")
            good = show(setup, "check", GOOD_CLIENT)
            bad = show(setup, "check", BAD_CLIENT)
            reader.stop()
            say("poplock-reader's log")
            print(reader.output().rstrip())
    ok = accepted and refused and good == 0 and bad == 1
    say("demo " + ("passed: the client that checked its mail may relay, the other may not" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (subprocess.SubprocessError, OSError, TimeoutError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        sys.exit(1)
