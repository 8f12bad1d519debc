"""The MTA-STS policy worker's client: contract placeholder of issue 17; the MTA-STS
work replaces this module."""

from __future__ import annotations

from pathlib import Path

from eqmail.delivery.tlspolicy import StsLookup


class StsClient:
    """Asks the policy worker (``run/policy.sock``) for a domain's policy."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def lookup(self, domain: str) -> StsLookup:
        raise NotImplementedError("issue 17 contract")
