"""control/dkimsign: how outgoing mail is DKIM-signed, per signing domain (issue 16).

One line per domain, ``#`` comments and empty lines ignored::

    # DOMAIN  OPTION=VALUE ...
    *            canon=relaxed/relaxed expire=1209600
    example.com  headers=from:to:cc:subject:date:message-id:mime-version:content-type
    example.org  canon=relaxed/simple oversign=from:subject:to

DOMAIN is a signing domain (the ``d=`` of the signature: a domain under control/dkim/
with a key), or ``*``, whose options every domain gets unless its own line sets them.
The options (any may be left out; what is left out keeps the default):

- ``canon=HEADER/BODY`` — ``relaxed`` or ``simple`` each (RFC 6376 §3.4); one word
  alone is the header canonicalisation with ``simple`` body, as a signature's ``c=``
  tag and OpenDKIM's Canonicalization read it.  Default ``relaxed/relaxed``.
- ``headers=NAME:NAME:...`` — the fields signed when present; must include ``from``.
  Default: the list of eqmail.dkim.sign (OpenDKIM's, RFC 6376 §5.4.1, plus List-
  Unsubscribe-Post, OpenPGP and Autocrypt).
- ``oversign=NAME:...`` — fields signed once more than present, so none can be added
  (RFC 6376 §8.15); ``oversign=`` (empty) for none.  Default ``from``.
- ``expire=SECONDS`` — an ``x=`` tag that many seconds after signing; ``0`` for none
  (the default).

Trace and changing fields (Received, Return-Path, DKIM-Signature, ...) can never be
signed: naming one is an error.  Every error names the line (``control/dkimsign:3: ...``)
and refuses the configuration, as for every control file.  Without the file every
domain gets the defaults.

Pure: the Reader reads the file; no other I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from eqmail.control.reader import Reader

FILE = "dkimsign"
CANONS = ("relaxed", "simple")
EXPIRE_MAX = 10 * 365 * 86400
# Fields a signature must never cover: they change in transit by design (RFC 6376 §5.4).
NEVER_SIGNED = frozenset({"return-path", "received", "comments", "keywords", "bcc",
                          "resent-bcc", "dkim-signature"})
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_OPTIONS = ("canon", "headers", "oversign", "expire")


@dataclass(frozen=True)
class DkimSignRule:
    """One line of control/dkimsign; None: the option was not given there."""

    domain: str  # lowercase A-label domain, or "*"
    header_canon: str | None = None
    body_canon: str | None = None
    headers: tuple[str, ...] | None = None
    oversign: tuple[str, ...] | None = None
    expire: int | None = None  # 0: no x= tag

    def __str__(self) -> str:
        parts = [self.domain]
        if self.header_canon is not None:
            parts.append(f"canon={self.header_canon}/{self.body_canon}")
        if self.headers is not None:
            parts.append("headers=" + ":".join(self.headers))
        if self.oversign is not None:
            parts.append("oversign=" + ":".join(self.oversign))
        if self.expire is not None:
            parts.append(f"expire={self.expire}")
        return " ".join(parts)


def rule_for(rules: tuple[DkimSignRule, ...], domain: str) -> DkimSignRule:
    """The options for signing domain ``domain``: its line's, each option it leaves
    out taken from the ``*`` line; options neither gives stay None (the defaults)."""
    name = domain.lower().rstrip(".")
    own = next((r for r in rules if r.domain == name), DkimSignRule(name))
    star = next((r for r in rules if r.domain == "*"), DkimSignRule("*"))
    canon = ((own.header_canon, own.body_canon) if own.header_canon is not None
             else (star.header_canon, star.body_canon))
    return DkimSignRule(
        name, canon[0], canon[1],
        own.headers if own.headers is not None else star.headers,
        own.oversign if own.oversign is not None else star.oversign,
        own.expire if own.expire is not None else star.expire)


def parse_dkimsign(r: Reader) -> tuple[DkimSignRule, ...]:
    """control/dkimsign's rules (empty when absent); errors recorded on ``r``."""
    out: list[DkimSignRule] = []
    seen: set[str] = set()
    for n, line in r.lines(FILE) or []:
        if not line.split():
            continue  # blanks only (a form feed, say): as an empty line
        rule, problem = parse_line(line)
        if problem:
            r.error(FILE, n, problem)
            continue
        assert rule is not None
        if rule.domain in seen:
            r.error(FILE, n, f"{rule.domain} is given on an earlier line too")
            continue
        seen.add(rule.domain)
        out.append(rule)
    return tuple(out)


def parse_line(line: str) -> tuple[DkimSignRule | None, str]:
    """One line: (the rule, "") or (None, what is wrong)."""
    words = line.split()
    if not words:
        return None, "empty line"
    domain = words[0].lower().rstrip(".")
    if domain != "*":
        try:
            domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
        except UnicodeError:
            return None, f"bad domain {words[0]!r}"
        if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
            return None, f"bad domain {words[0]!r}: want a domain such as example.com, or *"
    values: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        key = key.lower()
        if not eq:
            return None, f"{word!r}: want OPTION=VALUE"
        if key not in _OPTIONS:
            return None, f"unknown option {key!r} (known: {', '.join(_OPTIONS)})"
        if key in values:
            return None, f"{key}= given twice"
        values[key] = value
    return _rule(domain, values)


def _rule(domain: str, values: dict[str, str]) -> tuple[DkimSignRule | None, str]:
    header_canon = body_canon = None
    if "canon" in values:
        head, slash, body = values["canon"].lower().partition("/")
        body = body if slash else "simple"
        if head not in CANONS or body not in CANONS:
            return None, f"canon={values['canon']}: want relaxed or simple, or HEADER/BODY of those"
        header_canon, body_canon = head, body
    headers = oversign = None
    for key in ("headers", "oversign"):
        if key not in values:
            continue
        names, problem = _field_list(key, values[key])
        if problem:
            return None, problem
        if key == "headers":
            headers = names
        else:
            oversign = names
    if headers is not None and "from" not in headers:
        return None, "headers= must include from (RFC 6376 §5.4)"
    expire = None
    if "expire" in values:
        text = values["expire"]
        if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= EXPIRE_MAX:
            return None, f"expire={text}: want seconds, 0..{EXPIRE_MAX} (0: no x= tag)"
        expire = int(text)
    return DkimSignRule(domain, header_canon, body_canon, headers, oversign, expire), ""


def _field_list(key: str, value: str) -> tuple[tuple[str, ...], str]:
    names = [n.strip().lower() for n in value.split(":")] if value else []
    if key == "headers" and not names:
        return (), "headers= is empty: want NAME:NAME:... including from"
    for name in names:
        if not _FIELD_NAME.fullmatch(name):
            return (), f"{key}=: {name!r} is not a header field name"
        if name in NEVER_SIGNED:
            return (), f"{key}=: {name} changes in transit and is never signed"
    return tuple(dict.fromkeys(names)), ""
