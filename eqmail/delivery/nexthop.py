"""The outbound TCP connection of remote delivery: the one socket delivery/ opens.

Owns: :func:`connect`, qmail-remote's connect with ``timeoutconnect``.  Runs in the
remote delivery worker (eqmailr); what is spoken on the connection is eqmail.smtp.client's
and eqmail.smtp.transport's (which only read and write the socket they are given), and
whether a failure counts for tcpto is eqmail.smtp.transport.counts_for_tcpto.

Inputs: an IP address (v4 or v6), a port, the timeout in seconds.  Output: the
connected socket.  Failures: OSError/TimeoutError, the socket closed.
"""

from __future__ import annotations

import socket


def connect(ip: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection with ``timeoutconnect``; OSError/TimeoutError on failure."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock
