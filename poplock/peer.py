"""The client of a per-connection program (relaylock, poplock-logauth), as its launcher tells it.

Free of `socket` and `os`: these programs run once per connection.
"""


def client_address(environment: dict) -> str | None:
    """The peer of standard input, else $REMOTE_ADDR, else $TCPREMOTEIP (raw text)."""
    import _socket

    try:
        connection = _socket.socket(fileno=0)
    except OSError:  # not a socket: a pipe, a terminal
        connection = None
    if connection is not None:
        try:
            if connection.family in (_socket.AF_INET, _socket.AF_INET6):
                return connection.getpeername()[0]
        except OSError:
            pass
        finally:
            connection.detach()  # fd 0 belongs to the SMTP server
    for name in (b"REMOTE_ADDR", b"TCPREMOTEIP"):
        value = environment.get(name)
        if value:
            return value.decode("ascii", "replace")
    return None
