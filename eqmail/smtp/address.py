"""qmail-smtpd's envelope address parsing for MAIL and RCPT, and MAIL's ESMTP parameters.

Owns: the exact (lenient) rules by which qmail-smtpd turns ``FROM:<...>`` / ``TO:<...>``
into an address (reference/qmail-core.md §5.1), the eQmail ``SIZE=`` / ``AUTH=``
parameters (eqmail-features.md §3) and the localiphost substitution.

Inputs: the argument bytes after the verb (``FROM:<a@b> SIZE=10``); the set of local IP
addresses and the localiphost value are passed in.  Outputs: the address as ``str``
(decoded with surrogateescape, so any byte round-trips, see eqmail.textio) or ``None``
for a syntax error; :class:`MailParams`.  Pure; never raises on any input.

qmail behaviour matched here, on purpose:
- without ``<`` the address is the text after the first ``:`` (leading spaces skipped) up
  to the next space — ``MAIL FROM: a@b`` works, ``MAIL`` alone is the null sender;
- a source route ``@a,@b:`` before the address is dropped;
- double quotes are removed (a ``>`` or space inside quotes does not end the address) and
  a backslash makes the next byte literal;
- nothing after the terminator is looked at here (parameters are parsed separately);
- an address longer than 899 bytes is a syntax error (qmail's 900 includes its NUL).
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.textio import decode

MAX_ADDRESS = 899


def parse_address(
    arg: bytes,
    local_ips: frozenset[str] = frozenset(),
    localiphost: str | None = None,
) -> str | None:
    """Return the envelope address in ``arg`` or None (-> ``555 syntax error``)."""
    lt = arg.find(b"<")
    if lt >= 0:
        rest = arg[lt + 1:]
        terminator = 0x3E  # '>'
    else:
        colon = arg.find(b":")
        rest = arg[colon + 1:] if colon >= 0 else b""
        rest = rest.lstrip(b" ")
        terminator = 0x20  # ' '
    if rest[:1] == b"@":
        # Source route: everything up to and including the first ':' goes; with no ':'
        # qmail consumes the whole argument, which leaves the null address.
        colon = rest.find(b":")
        rest = rest[colon + 1:] if colon >= 0 else b""
    addr = _unquote(rest, terminator)
    if localiphost is not None:
        addr = _localiphost(addr, local_ips, localiphost)
    if len(addr) > MAX_ADDRESS:
        return None
    return decode(addr)


def _unquote(rest: bytes, terminator: int) -> bytes:
    """Copy up to an unquoted terminator, dropping quotes and escape backslashes."""
    if b'"' not in rest and b"\\" not in rest:
        # The common case, kept cheap: no quoting at all.
        end = rest.find(bytes((terminator,)))
        return rest if end < 0 else rest[:end]
    out = bytearray()
    escaped = quoted = False
    for ch in rest:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == terminator and not quoted:
            break
        elif ch == 0x5C:  # backslash
            escaped = True
        elif ch == 0x22:  # double quote
            quoted = not quoted
        else:
            out.append(ch)
    return bytes(out)


def _localiphost(addr: bytes, local_ips: frozenset[str], localiphost: str) -> bytes:
    """``user@[d.d.d.d]`` of one of our own IPv4 addresses -> ``user@<localiphost>``."""
    at = addr.rfind(b"@")
    if at < 0 or addr[at + 1:at + 2] != b"[" or not addr.endswith(b"]"):
        return addr
    ip = _dotted_quad(addr[at + 2:-1])
    if ip is None or ip not in local_ips:
        return addr
    return addr[:at + 1] + localiphost.encode("utf-8", "surrogateescape")


def _dotted_quad(text: bytes) -> str | None:
    parts = text.split(b".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return None
    nums = [int(p) for p in parts]
    if any(n > 255 for n in nums):
        return None
    return ".".join(str(n) for n in nums)


def domain_of(address: str) -> str | None:
    """The part after the last ``@`` (qmail uses the last one), or None without ``@``."""
    at = address.rfind("@")
    return None if at < 0 else address[at + 1:]


@dataclass(frozen=True)
class MailParams:
    """ESMTP parameters of MAIL FROM that eQmail looks at."""

    size: int | None = None  # SIZE=n, None if absent
    auth: str | None = None  # AUTH= value after xtext decoding; "unknown" for <>
    # RFC 8689 (issue 17): REQUIRETLS present; requiretls_value: a REQUIRETLS=... form
    # was given (the parameter takes no value: a syntax error)
    requiretls: bool = False
    requiretls_value: bool = False


def parse_mail_params(arg: bytes) -> MailParams:
    """Parse the ESMTP parameters of a MAIL argument.

    eQmail looks at them only when a ``>`` appears after position 4 of the argument
    (``FROM:<`` is 6 bytes, so any real ``<...>`` qualifies), and then at every
    space-separated token of the whole argument (so ``AUTH=<>`` works).  Keywords are
    case-insensitive; unknown keywords are ignored, as eQmail does.  ``SIZE=`` takes
    the leading digits (qmail's scan_ulong: ``SIZE=12x`` is 12, ``SIZE=x`` is 0).
    eqmail adds ``REQUIRETLS`` (RFC 8689, no value; ``REQUIRETLS=...`` is noted so
    that the session can refuse it), looked for even without a ``>`` (in every token
    after the first, ``FROM:...``): a demand for protection is never dropped silently
    because the address lacked its brackets.
    """
    tokens = arg.split(b" ")
    gt = arg.rfind(b">")
    if gt <= 4:
        requiretls, requiretls_value = _requiretls(tokens[1:])
        return MailParams(requiretls=requiretls, requiretls_value=requiretls_value)
    size: int | None = None
    auth: str | None = None
    for token in tokens:
        key = token[:5].upper()
        if key == b"SIZE=":
            digits = _leading_digits(token[5:])
            size = int(digits) if digits else 0
        elif key == b"AUTH=":
            auth = _xtext_auth(token[5:])
    requiretls, requiretls_value = _requiretls(tokens)
    return MailParams(size=size, auth=auth, requiretls=requiretls,
                      requiretls_value=requiretls_value)


def _requiretls(tokens: list[bytes]) -> tuple[bool, bool]:
    """(a ``REQUIRETLS`` token, a ``REQUIRETLS=...`` token) among ``tokens``."""
    upper = [t.upper() for t in tokens]
    return (b"REQUIRETLS" in upper, any(t.startswith(b"REQUIRETLS=") for t in upper))


def _leading_digits(data: bytes) -> bytes:
    end = 0
    while end < len(data) and 0x30 <= data[end] <= 0x39:
        end += 1
    # Bound the number: a 10,000-digit SIZE must not cost an int() of that size.
    return data[:end][:20]


def _xtext_auth(value: bytes) -> str:
    """eQmail decodes only ``+2B`` and ``+3D`` (case-insensitive); ``<>`` -> unknown."""
    if value.startswith(b"<>"):
        return "unknown"
    out = bytearray()
    i = 0
    while i < len(value):
        code = value[i:i + 3].upper()
        if code == b"+2B":
            out += b"+"
            i += 3
        elif code == b"+3D":
            out += b"="
            i += 3
        else:
            out.append(value[i])
            i += 1
    return decode(bytes(out))
