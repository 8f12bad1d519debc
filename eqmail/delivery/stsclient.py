"""The MTA-STS policy worker's client: the lead's interim version until the MTA-STS work
lands (no worker yet: no policy)."""

from __future__ import annotations

from pathlib import Path

from eqmail.delivery.tlspolicy import StsLookup


class StsClient:
    """Asks the policy worker (``run/policy.sock``) for a domain's policy."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def lookup(self, domain: str) -> StsLookup:
        return StsLookup(None)
