"""Mailing yesterday's TLS-RPT reports: contract placeholder of issue 17; the TLS-RPT
work replaces this module.  The MTA-STS policy worker calls :func:`send_due` about once
an hour."""

from __future__ import annotations

from eqmail.control import Controls
from eqmail.instance import Instance


def send_due(instance: Instance, controls: Controls, now: float) -> int:
    """Mail every report of a finished UTC day not mailed yet; the number mailed."""
    raise NotImplementedError("issue 17 contract")
