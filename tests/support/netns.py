"""A private network namespace for tests that need client addresses loopback does not have
(IPv6 networks such as 2001:db8:1::/64): its own lo, with the addresses the test asks for.

The test's main thread enters it for a while; programs started meanwhile run in it, and
sockets made meanwhile belong to it. Nothing there can reach another host: the namespace
has no interface but its own loopback. Unix sockets (journald's, sd_notify's) work across.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextlib.contextmanager
def network_namespace(*addresses: str):
    """Enter a new network namespace whose lo carries `addresses` (e.g. "2001:db8:1::5");
    leave it, and remove it, at the end. Programs started inside keep running in it."""
    name = f"poplock-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for address in addresses:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/128" if ":" in address else
                            f"{address}/32", "dev", "lo"], check=True)
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield name
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
