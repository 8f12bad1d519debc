"""``eqmailctl dkim keygen|show|check``: DKIM keys of an instance, and their DNS records.

Owns: the three commands' output and exit codes (eqmailctl(8), "DKIM").  ``keygen``
makes a key in control/dkim/DOMAIN/SEL.key (eqmail.dkim.keys: owner eqmailr, mode 0400,
written atomically) and prints the zone-file line to publish; ``show`` prints the line
of every selector of a domain again; ``check`` looks each selector's record up through
control/dnsservers (the resolvers remote delivery uses) with a bounded time per lookup
and prints ``ok``, ``mismatch: WHY``, ``missing`` or ``temporary DNS failure`` per
selector.

Exit codes: 0 done (check: every selector matches), 1 failed (check: any selector does
not match, or the domain has no key), 2 usage error (a bad domain, selector or size).
Privilege: root on a privileged instance (the key gets the remote delivery user as
owner), the instance's user otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from eqmail.control import load_controls
from eqmail.control.dkimsign import DkimSignRule
from eqmail.dkim.dns import DnsPermError, DnsTempError, TxtLookup, dnspython_txt_lookup
from eqmail.dkim.keys import (
    RSA_DEFAULT_BITS,
    RSA_MAX_BITS,
    RSA_MIN_BITS,
    DkimError,
    KeyType,
    Match,
    Owners,
    PrivateKey,
    check_selector,
    file_problems,
    generate,
    key_files,
    key_path,
    load_key,
    match,
    normalize_domain,
    record_name,
    record_text,
    selectors,
    unreadable_by,
    write_key,
    zone_line,
)
from eqmail.errors import ControlErrors
from eqmail.instance import Instance
from eqmail.privsep.ids import Role, SystemIds

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
CHECK_TIMEOUT = 5.0   # seconds per lookup (dkim check --timeout)


def default_selector(now: float | None = None) -> str:
    """``eqYYYYMM`` (UTC): a new selector each month, so a rotated key gets a new name."""
    return "eq" + time.strftime("%Y%m", time.gmtime(now))


def _err(cmd: str, text: str) -> None:
    print(f"eqmailctl dkim {cmd}: {text}", file=sys.stderr)


def store_owners() -> Owners | None:
    """Root: key eqmailr:root, directories root:eqmailr's group; otherwise None (the
    invoking user keeps what it writes).  KeyError when the system users are missing."""
    if os.geteuid() != 0:
        return None
    remote = SystemIds.lookup()[Role.REMOTE]
    return Owners(key_uid=remote.uid, key_gid=0, dir_uid=0, dir_gid=remote.gid)


def expected_key_owner() -> tuple[int, int | None]:
    """The (uid, gid) a stored key should have, as :func:`store_owners` writes it (gid
    None: not checked)."""
    if os.geteuid() != 0:
        return os.getuid(), None
    try:
        return SystemIds.lookup()[Role.REMOTE].uid, 0
    except KeyError:
        return 0, None


def key_warnings(control: Path) -> list[str]:
    """``eqmailctl check``'s lines for stored keys that are unreadable, owned or
    moded wrongly, or do not parse — each naming the file — and (run as root) for keys
    the remote delivery user, the one that signs, cannot read: mail of their domain
    would be deferred."""
    uid, gid = expected_key_owner()
    signer = signer_ids()
    out = []
    for path in key_files(control):
        problems = file_problems(path, uid, gid)
        rel = path.relative_to(control.parent)
        if problems:
            out.append(f"warning: {rel}: {'; '.join(problems)}")
        if signer is not None:
            why = unreadable_by(path, signer[0], signer[1])
            if why:
                out.append(f"warning: {rel}: the remote delivery user cannot read it ({why}): "
                           "signed mail of its domain will be deferred")
    return out


def dkimsign_warnings(control: Path, rules: tuple[DkimSignRule, ...]) -> list[str]:
    """control/dkimsign lines that do nothing: a line applies to the domain that signs
    (the d= of the signature), so a domain without key files never uses its line."""
    out = []
    for rule in rules:
        if rule.domain == "*":
            continue
        try:
            keyed = bool(selectors(control, rule.domain))
        except DkimError:
            keyed = True  # unreadable: key_warnings and file_problems speak for it
        if not keyed:
            out.append(f"warning: control/dkimsign: {rule.domain} has no key under "
                       f"control/dkim/{rule.domain}/: its line is never used "
                       f"(eqmailctl dkim keygen {rule.domain})")
    return out


def signer_ids() -> tuple[int, frozenset[int]] | None:
    """The uid and groups of the user that signs (the remote delivery user), when
    ``check`` runs as root on a system that has it; None otherwise (then the invoking
    user is the signer, and file_problems' read of the key already speaks for it)."""
    if os.geteuid() != 0:
        return None
    try:
        remote = SystemIds.lookup()[Role.REMOTE]
    except KeyError:
        return None
    return remote.uid, frozenset(os.getgrouplist(remote.name, remote.gid))


def cmd_keygen(inst: Instance, args: argparse.Namespace) -> int:
    try:
        domain = normalize_domain(args.domain)
        selector = check_selector(args.selector or default_selector())
    except DkimError as e:
        _err("keygen", str(e))
        return EXIT_USAGE
    ktype = KeyType(args.type)
    if args.bits is not None and ktype is KeyType.ED25519:
        _err("keygen", "--bits is for RSA keys only")
        return EXIT_USAGE
    bits = RSA_DEFAULT_BITS if args.bits is None else args.bits
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        _err("keygen", f"--bits {bits}: want {RSA_MIN_BITS}..{RSA_MAX_BITS}")
        return EXIT_USAGE
    path = key_path(inst.control, domain, selector)
    if path.exists() and not args.force:
        _err("keygen", f"{path} exists: keep it, or replace it with --force")
        return EXIT_FAIL
    try:
        owners = store_owners()
        key = generate(ktype, bits)
        write_key(inst.control, domain, selector, key, owners, force=args.force)
    except (DkimError, KeyError) as e:
        _err("keygen", str(e).strip("'\""))
        return EXIT_FAIL
    size = f"{bits} bits" if ktype is KeyType.RSA else "RFC 8463"
    _err("keygen", f"wrote {path} ({ktype} {size}); publish this record:")
    print(zone_line(domain, selector, record_text(key)))
    return EXIT_OK


def _domain_keys(cmd: str, inst: Instance, text: str) -> tuple[str, list[tuple[str, PrivateKey | None]]] | int:
    """The domain and its (selector, key or None when it cannot be loaded), or an exit
    code after saying why."""
    try:
        domain = normalize_domain(text)
    except DkimError as e:
        _err(cmd, str(e))
        return EXIT_USAGE
    try:
        names = selectors(inst.control, domain)
    except DkimError as e:
        _err(cmd, str(e))
        return EXIT_FAIL
    if not names:
        _err(cmd, f"no DKIM keys for {domain} in {inst.control / 'dkim' / domain}")
        return EXIT_FAIL
    out: list[tuple[str, PrivateKey | None]] = []
    for sel in names:
        try:
            out.append((sel, load_key(key_path(inst.control, domain, sel))))
        except DkimError as e:
            _err(cmd, f"{sel}: cannot use the key: {e}")
            out.append((sel, None))
    return domain, out


def cmd_show(inst: Instance, args: argparse.Namespace) -> int:
    found = _domain_keys("show", inst, args.domain)
    if isinstance(found, int):
        return found
    domain, keys = found
    for sel, key in keys:
        if key is not None:
            print(zone_line(domain, sel, record_text(key)))
    return EXIT_OK if all(key is not None for _, key in keys) else EXIT_FAIL


def check_selector_record(lookup: TxtLookup, domain: str, selector: str, key: PrivateKey) -> str:
    """One selector's verdict: ``ok``, ``mismatch: WHY``, ``missing`` or ``temporary DNS
    failure (WHY)``."""
    try:
        records = lookup(record_name(domain, selector))
    except DnsPermError:
        return "missing"
    except DnsTempError as e:
        return f"temporary DNS failure ({e})"
    if not records:
        return "missing"
    results: list[Match] = [match(r, key) for r in records]
    if any(m.ok for m in results):
        return "ok"
    reasons = "; ".join(dict.fromkeys(m.reason for m in results))
    many = f" ({len(records)} TXT records)" if len(records) > 1 else ""
    return f"mismatch{many}: {reasons}"


def cmd_check(inst: Instance, args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 60:
        _err("check", f"--timeout {args.timeout:g}: want more than 0, at most 60 seconds")
        return EXIT_USAGE
    found = _domain_keys("check", inst, args.domain)
    if isinstance(found, int):
        return found
    domain, keys = found
    try:
        controls = load_controls(inst.root)
    except ControlErrors as e:
        for err in e.errors:
            _err("check", str(err))
        return EXIT_FAIL
    lookup = dnspython_txt_lookup(controls.dnsservers, args.timeout)
    all_ok = True
    for sel, key in keys:
        verdict = "cannot load the key" if key is None else check_selector_record(lookup, domain, sel, key)
        all_ok = all_ok and verdict == "ok"
        print(f"{record_name(domain, sel)}: {verdict}")
    return EXIT_OK if all_ok else EXIT_FAIL


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``eqmailctl dkim ...`` in eqmailctl's argument parser."""
    s = sub.add_parser("dkim", help="DKIM keys: keygen, show, check (their DNS records)",
                       description="DKIM signing keys under control/dkim/DOMAIN/SELECTOR.key "
                                   "and the DNS TXT records that publish them.")
    dsub = s.add_subparsers(dest="dkim_action", required=True, metavar="ACTION")
    k = dsub.add_parser("keygen", help="make a key and print the DNS record to publish")
    k.add_argument("domain", help="the signing domain (d=), e.g. example.com")
    k.add_argument("--selector", help="the selector (s=), [a-z0-9][a-z0-9-]{0,62} "
                                      "(default: eqYYYYMM of this month, UTC)")
    k.add_argument("--type", choices=[t.value for t in KeyType], default=KeyType.RSA.value,
                   help="key type (default rsa)")
    k.add_argument("--bits", type=int, help=f"RSA key size, {RSA_MIN_BITS}..{RSA_MAX_BITS} "
                                            f"(default {RSA_DEFAULT_BITS})")
    k.add_argument("--force", action="store_true", help="replace an existing key of that selector")
    sh = dsub.add_parser("show", help="print the DNS record of every selector of a domain")
    sh.add_argument("domain", help="the signing domain")
    c = dsub.add_parser("check", help="look each selector's record up (control/dnsservers) "
                                      "and compare it with the key; exit 0 only if all match")
    c.add_argument("domain", help="the signing domain")
    c.add_argument("--timeout", type=float, default=CHECK_TIMEOUT,
                   help=f"seconds per DNS lookup (default {CHECK_TIMEOUT:g})")


def cmd_dkim(inst: Instance, args: argparse.Namespace) -> int:
    return {"keygen": cmd_keygen, "show": cmd_show, "check": cmd_check}[args.dkim_action](inst, args)
