"""``eqmailctl check``'s lines about MTA-STS (issue 17): control/mtasts and
control/tlsca.pem.

Owns: the warnings about a control/tlsca.pem that loads but will not do what it seems
to — no certificate in it, a certificate that is expired or not yet valid, a file the
policy worker (eqmailt, outside group eqmail) cannot read — and about the policy
worker's user and cache directory when eqmail runs as root; and the note that
control/mtasts 0 turns MTA-STS off.  Read-only; bounded reads.  Used by
eqmail.cli.check.
"""

from __future__ import annotations

import datetime
import os
import pwd
import stat

from eqmail.control import Controls
from eqmail.instance import Instance
from eqmail.privsep.ids import ROLE_USERS, Role

MAX_TLSCA = 1 << 20  # bytes of control/tlsca.pem read


def mtasts_notes(c: Controls) -> list[str]:
    if c.mtasts:
        return []
    return ["note: control/mtasts is 0: receiving domains' MTA-STS policies (RFC 8461) are "
            "not fetched or honoured; remove the file or write 1 to honour them"]


def tlsca_warnings(inst: Instance, c: Controls) -> list[str]:
    """Problems of control/tlsca.pem (the CAs added to the system's for MTA-STS policy
    fetches and MX certificate checks)."""
    path = inst.control / "tlsca.pem"
    if not c.tlsca:
        return []
    name = "control/tlsca.pem"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TLSCA + 1)
        mode = os.stat(path).st_mode
    except OSError as e:
        return [f"warning: {name}: cannot read it: {e.strerror}"]
    if len(data) > MAX_TLSCA:
        return [f"warning: {name}: larger than {MAX_TLSCA} bytes"]
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return [f"warning: {name}: no PEM certificate in it: MTA-STS trusts the system's CAs only"]
    out = []
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        subject = cert.subject.rfc4514_string() or "(no subject)"
        if cert.not_valid_after_utc < now:
            out.append(f"warning: {name}: {subject} expired on "
                       f"{cert.not_valid_after_utc:%Y-%m-%d}")
        elif cert.not_valid_before_utc > now:
            out.append(f"warning: {name}: {subject} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d}")
    if os.geteuid() == 0 and not mode & stat.S_IROTH:
        out.append(f"warning: {name}: mode {stat.S_IMODE(mode):04o}: the MTA-STS policy worker "
                   f"({ROLE_USERS[Role.POLICY][0]}) cannot read it; make it 0644")
    return out


def policy_worker_warnings(inst: Instance, c: Controls) -> list[str]:
    """As root: the policy worker's user and its cache directory (eqmailctl setup makes
    both; an instance set up before issue 17 lacks them)."""
    if os.geteuid() != 0 or not c.mtasts:
        return []
    user = ROLE_USERS[Role.POLICY][0]
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return [f"warning: system user {user} is missing: run 'eqmailctl setup' as root"]
    try:
        st = os.stat(inst.root / "sts")
    except FileNotFoundError:
        return []  # made at start
    except OSError as e:
        return [f"warning: {inst.root / 'sts'}: {e.strerror}"]
    if st.st_uid != uid:
        return [f"warning: {inst.root / 'sts'} is not owned by {user}: eqmailctl start fixes it"]
    return []
