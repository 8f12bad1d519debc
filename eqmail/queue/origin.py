"""What the queue writer believes about where a message came from (issue 16).

Owns the decision table of :class:`eqmail.ipc.queue.Origin`: a client *claims* an origin
in its envelope's ``Xorigin=`` record, and the writer believes the claim only as far as
the client's *role* allows.  The role is not the client's word either: a ``H`` hello is
honoured only from root or the writer's own uid (a private instance, where every worker
is the same user), and on a privileged instance the peer uid alone gives the role of the
listener (eqmaild: NETWORK) and of the scanner (eqmails: BOUNCE), as it gives their
``invoked ...`` text.

The table (``role`` down, ``claim`` across; ``-`` = no claim):

    role \\ claim   -        AUTH   RELAY  LOCAL  BOUNCE  NETWORK  FORWARD
    NETWORK        NETWORK  AUTH   RELAY  NETWORK NETWORK NETWORK FORWARD
    BOUNCE         BOUNCE   BOUNCE BOUNCE BOUNCE BOUNCE  NETWORK  FORWARD
    none / ALIAS   LOCAL    LOCAL  LOCAL  LOCAL  LOCAL   NETWORK  FORWARD

So AUTH and RELAY come only from the listener, BOUNCE only from the scanner; anyone may
claim less (NETWORK, FORWARD: never signed); a claim a role does not allow is worth what
claiming nothing is, never more.  A local user's client (no role) gets LOCAL with or
without a claim: local injection is signed, as with qmail's DKIM patch.

Pure functions; no I/O.
"""

from __future__ import annotations

from eqmail.ipc.queue import Origin, QueueRole

# What claiming nothing gives, per role (None: a client without a role).
_DEFAULT: dict[QueueRole | None, Origin] = {
    QueueRole.NETWORK: Origin.NETWORK,
    QueueRole.BOUNCE: Origin.BOUNCE,
    QueueRole.ALIAS: Origin.LOCAL,
    None: Origin.LOCAL,
}
# Claims a role may make beyond its default (NETWORK and FORWARD: anyone).
_ALLOWED: dict[QueueRole | None, frozenset[Origin]] = {
    QueueRole.NETWORK: frozenset({Origin.AUTH, Origin.RELAY}),
    QueueRole.BOUNCE: frozenset(),
    QueueRole.ALIAS: frozenset(),
    None: frozenset(),
}
_ANYONE = frozenset({Origin.NETWORK, Origin.FORWARD})


def peer_role(hello: QueueRole | None, uid: int, own_uid: int,
              role_uids: dict[QueueRole, int] | None) -> QueueRole | None:
    """The role of a queue client: its hello when it comes from root or ``own_uid``
    (the writer's), else the role its uid has on a privileged instance (``role_uids``:
    the listener's and the scanner's uids; None on a private instance), else none."""
    if uid in (0, own_uid):
        return hello
    if role_uids:
        for role, role_uid in role_uids.items():
            if uid == role_uid:
                return role
    return None


def believed_origin(role: QueueRole | None, claim: Origin | None) -> Origin:
    """The origin the writer records for a client of ``role`` claiming ``claim``."""
    default = _DEFAULT[role]
    if claim is None or claim is default:
        return default
    if claim in _ANYONE or claim in _ALLOWED[role]:
        return claim
    return default


def session_claim(authenticated: bool, relay_client: bool) -> Origin:
    """What the SMTP listener claims for a message of a session: AUTH when the client
    authenticated, RELAY when it is a relay client (RELAYCLIENT set by tcprules, a
    plugin or a client certificate), else NETWORK.  AUTH wins over RELAY: it names
    who sent the mail, which a relay client's address does not."""
    if authenticated:
        return Origin.AUTH
    return Origin.RELAY if relay_client else Origin.NETWORK
