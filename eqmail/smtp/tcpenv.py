"""The per-connection environment tcpserver gives qmail-smtpd, and the session config.

Pure functions.  ``tcp_environment`` builds PROTO, TCPLOCALIP/PORT/HOST,
TCPREMOTEIP/PORT/HOST and ucspi-tcp6's TCP6* variables (IPv4 peers as
``::ffff:a.b.c.d`` there) from the listener's options, the socket addresses and the
tcprules match.  IPv6 text is RFC 5952 (``ipaddress`` prints it so).
``session_config`` turns Controls plus that environment into a SessionConfig.
"""

from __future__ import annotations

import ipaddress

from eqmail.control import Controls
from eqmail.smtp.policy import BadMailFrom, RcptHosts
from eqmail.smtp.session import SessionConfig


def _text(ip: str) -> str:
    """Canonical text; an IPv4-mapped IPv6 address is shown as IPv4 (tcp-env does)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _v6text(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return f"::ffff:{addr}"
    return str(addr)


def tcp_environment(listener_env: dict[str, str], local: tuple[str, int], remote: tuple[str, int],
                    me: str, remote_host: str | None = None) -> dict[str, str]:
    local_ip, remote_ip = _text(local[0]), _text(remote[0])
    v6 = ":" in local_ip
    env = dict(listener_env)
    env.update({
        "PROTO": "TCP6" if v6 else "TCP",
        "TCPLOCALIP": local_ip,
        "TCPLOCALPORT": str(local[1]),
        "TCPLOCALHOST": me,
        "TCPREMOTEIP": remote_ip,
        "TCPREMOTEPORT": str(remote[1]),
        "TCP6LOCALIP": _v6text(local_ip),
        "TCP6LOCALPORT": str(local[1]),
        "TCP6LOCALHOST": me,
        "TCP6REMOTEIP": _v6text(remote_ip),
        "TCP6REMOTEPORT": str(remote[1]),
    })
    if remote_host:
        env["TCPREMOTEHOST"] = env["TCP6REMOTEHOST"] = remote_host
    return env


def rcpt_matcher(c: Controls) -> RcptHosts:
    """rcpthosts + morercpthosts; without rcpthosts, only locals and virtualdomains
    (eqmail never becomes an open relay because a file is missing)."""
    if c.rcpthosts is not None:
        return RcptHosts.from_lines(c.rcpthosts, c.morercpthosts)
    return RcptHosts.from_lines(sorted(c.locals), [key for key, _ in c.virtualdomains])


def session_config(c: Controls, env: dict[str, str], *, rcpthosts: RcptHosts,
                   badmailfrom: BadMailFrom, local_ips: frozenset[str], tls_available: bool,
                   auth_available: bool, plugins_enabled: bool = False,
                   tls_client_relay: bool = False, submission: bool = False,
                   check_mailbox: bool = False) -> SessionConfig:
    local_host = env.get("TCPLOCALHOST") or env.get("TCPLOCALIP") or "unknown"
    return SessionConfig(
        greeting=c.smtpgreeting or c.me,
        local_host=local_host,
        databytes=c.databytes,
        rcpthosts=rcpthosts,
        badmailfrom=badmailfrom,
        local_ips=local_ips,
        localiphost=c.localiphost or None,
        tls_available=tls_available,
        auth_available=auth_available,
        tls_client_relay=tls_client_relay,
        plugins_enabled=plugins_enabled,
        submission=submission,
        check_mailbox=check_mailbox,
        max_rcpt=c.maxrcpt,
        error_soft_limit=c.smtperrorsoftlimit,
        error_hard_limit=c.smtperrorhardlimit,
        error_sleep=float(c.smtperrorsleep),
        junk_limit=c.smtpjunklimit,
        srs=c.srs_keys,
    )
