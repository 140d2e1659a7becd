"""A real Dovecot 2.3 on loopback ports, logging through syslog(3) into the journal.

Dovecot's login lines reach journald from its `log` process as _UID=0,
SYSLOG_IDENTIFIER=dovecot, which is what poplock's default trust rule accepts under a
plain journald.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .ports import free_port, wait_for_port
from .processes import Service, reachable_by_everyone
from .tls import self_signed_certificate


class Dovecot(Service):
    """Dovecot with POP3 and IMAP (plain and implicit TLS) on 127.0.0.1 and ::1.

    Users are `name: password` pairs from a passwd-file. Use it as a context manager.
    """

    def __init__(self, directory: Path, users: dict[str, str], *, tls: bool = True,
                 identifier: str = "dovecot"):
        """`identifier`: Dovecot's instance_name, which is also its syslog identifier; a test
        gives its own Dovecot a unique one so that other Dovecots' logins never mix in."""
        self.directory = directory
        self.identifier = identifier
        self.users = users
        self.tls = tls
        self.pop3_port = free_port()
        self.imap_port = free_port()
        self.pop3s_port = free_port()
        self.imaps_port = free_port()

    def _write_config(self) -> Path:
        d = self.directory
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        # Dovecot's auth and mail processes run as other users.
        reachable_by_everyone(d)
        os.chown(d / "mail", _uid("nobody"), -1)
        (d / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        (d / "passwd").chmod(0o644)
        if self.tls:
            certificate, key = self_signed_certificate(d)
            tls_settings = f"ssl = yes\nssl_cert = <{certificate}\nssl_key = <{key}\n"
        else:
            tls_settings = "ssl = no\n"
        config = d / "dovecot.conf"
        config.write_text(
            f"""\
instance_name = {self.identifier}
protocols = pop3 imap
listen = 127.0.0.1, ::1
base_dir = {d}/run
state_dir = {d}/state
log_path = syslog
syslog_facility = mail
auth_verbose = yes
# Tests make many failed logins; Dovecot would otherwise hold each for 2 seconds.
auth_failure_delay = 0
auth_mechanisms = plain login apop
disable_plaintext_auth = no
{tls_settings}mail_location = maildir:{d}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port if self.tls else 0}
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port if self.tls else 0}
  }}
}}
"""
        )
        return config

    def start(self) -> "Dovecot":
        config = self._write_config()
        # Dovecot forks into the background: its output goes to a file, not a pipe
        # that would stay open as long as the daemon runs.
        with open(self.directory / "dovecot.out", "wb") as output:
            subprocess.run(["dovecot", "-c", str(config)], check=True, stdout=output, stderr=output)
        for port in (self.pop3_port, self.imap_port):
            wait_for_port("127.0.0.1", port)
            wait_for_port("::1", port)
        return self

    def stop(self) -> None:
        pid_file = self.directory / "run" / "master.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)



def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def container_files(users: dict[str, str], pop3_port: int, *, imap_port: int | None = None,
                    listen: str = "127.0.0.1") -> dict[str, str]:
    """/etc/dovecot files for Debian's own dovecot.service in a container (systemd-nspawn) root:
    POP3 (and IMAP) without TLS on `listen`, logging through syslog into the journal, mail in
    /srv/mail. Paths relative to the root, as nspawn.Container's files are."""
    imap = f"""\
service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""" if imap_port is not None else ""
    return {
        "etc/dovecot/dovecot.conf": f"""\
protocols = pop3{' imap' if imap_port is not None else ''}
listen = {listen}
log_path = syslog
syslog_facility = mail
auth_verbose = yes
auth_failure_delay = 0
auth_mechanisms = plain login
disable_plaintext_auth = no
ssl = no
mail_location = maildir:/srv/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN /etc/dovecot/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/srv/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{imap}""",
        "etc/dovecot/users": "".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in users.items()),
    }
