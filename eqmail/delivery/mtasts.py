"""MTA-STS (RFC 8461) as pure functions: the ``_mta-sts`` TXT record, the policy body,
the HTTP response that carries it, and the names it is fetched under.

Owns: the grammar of RFC 8461 §3.1 (``v=STSv1; id=...``) and §3.2 (the policy:
``version``, ``mode``, ``max_age``, ``mx`` lines, CRLF or LF, unknown keys ignored),
the checks of §3.3 on the HTTP answer (status 200, ``text/plain``, no redirect — a 3xx
is a fetch error —, at most MAX_BODY bytes of body), and which domain names may name
a policy file in the cache.  No I/O: the policy worker (eqmail.workers.policy) does the
DNS, the HTTPS and the disk, and hands the bytes it got to these functions.

Inputs are untrusted bytes from DNS and from a web server; every function is bounded
by its input's size (MAX_BODY, MAX_HEADER) and returns a value or a :class:`StsError`
naming RFC 8460's result type (sts-policy-fetch-error, sts-policy-invalid), never
raises anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from eqmail.delivery.tlspolicy import ResultType, StsMode, StsPolicy

MAX_BODY = 64 * 1024      # the policy body (issue 17: a 64 KiB cap)
MAX_HEADER = 16 * 1024    # the HTTP status line and header fields
MAX_RESPONSE = MAX_HEADER + MAX_BODY + 4096  # raw bytes read: room for chunk framing
MAX_AGE = 31557600        # RFC 8461 §3.2: max_age's upper bound (about a year)
MAX_MX = 64               # mx patterns kept from one policy
MAX_TXT = 4096            # bytes of one TXT record considered
POLICY_PATH = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_AGE_TEXT = re.compile(r"[0-9]{1,10}")
_WSP = " \t"


@dataclass(frozen=True)
class StsError:
    """Why no policy came of what was fetched: RFC 8460's ``result`` and a ``detail``
    for the log and the report's failure-reason-code."""

    result: ResultType
    detail: str


def fetch_error(detail: str) -> StsError:
    return StsError(ResultType.STS_POLICY_FETCH_ERROR, detail)


def invalid(detail: str) -> StsError:
    return StsError(ResultType.STS_POLICY_INVALID, detail)


# ---- names ---------------------------------------------------------------------------


def valid_domain(domain: str) -> bool:
    """A DNS host name of LDH labels (A-labels for IDNs), at least two labels, at most
    253 characters: the only names a policy is looked up for and a cache file named
    after (so never ``..``, ``/``, a leading dot or an IP literal)."""
    if not domain or len(domain) > 253 or not domain.isascii():
        return False
    labels = domain.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def normal_domain(domain: str) -> str | None:
    """The lower-case form of ``domain`` without a trailing dot when it is valid."""
    d = domain.lower().removesuffix(".")
    return d if valid_domain(d) else None


def txt_name(domain: str) -> str:
    return f"_mta-sts.{domain}"


def policy_host(domain: str) -> str:
    return f"mta-sts.{domain}"


def http_request(domain: str) -> bytes:
    """The GET of RFC 8461 §3.3 (HTTP/1.1, one request per connection)."""
    return (f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {policy_host(domain)}\r\n"
            "User-Agent: eqmail-mta-sts\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
            ).encode("ascii")


# ---- the TXT record (RFC 8461 §3.1) ---------------------------------------------------


def parse_txt_record(record: bytes) -> str | None:
    """The ``id`` of one ``v=STSv1; id=...`` record; None when it is not a valid one."""
    if len(record) > MAX_TXT:
        return None
    try:
        text = record.decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = [f.strip(_WSP) for f in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing delimiter is allowed
    if not fields or fields[0] != "v=STSv1":
        return None
    found: str | None = None
    for f in fields[1:]:
        name, eq, value = f.partition("=")
        if not eq:
            return None
        if name == "id":
            if not _ID.fullmatch(value) or found is not None:
                return None
            found = value
        elif not (_EXT_NAME.fullmatch(name) and _TXT_EXT_VALUE.fullmatch(value)):
            return None
    return found


def txt_id(records: list[bytes]) -> str | None:
    """RFC 8461 §3.1: records not beginning ``v=STSv1;`` are discarded; unless exactly
    one remains and it is valid, the domain has no available policy (None)."""
    sts = [r for r in records if r.startswith(b"v=STSv1;") or r.strip() == b"v=STSv1"]
    return parse_txt_record(sts[0]) if len(sts) == 1 else None


# ---- the policy (RFC 8461 §3.2) -------------------------------------------------------


def _mx_pattern(value: str) -> str | None:
    v = value.lower().removesuffix(".")
    host = v[2:] if v.startswith("*.") else v
    return v if valid_domain(host) or (v.startswith("*.") and _LABEL.fullmatch(host)) else None


def policy_lines(text: str) -> list[str]:
    """The policy's lines, CRLF or LF, without their ends (TLS-RPT's policy-string)."""
    return [ln.removesuffix("\r") for ln in text.split("\n") if ln.removesuffix("\r")]


def parse_policy(body: bytes, policy_id: str, fetched: float) -> StsPolicy | StsError:
    """The policy in ``body`` (fetched under the TXT ``policy_id`` at ``fetched``), or
    sts-policy-invalid saying what is wrong.  The first of a repeated key counts (``mx``
    may repeat); unknown keys are ignored; every line must be ``key: value``."""
    if len(body) > MAX_BODY:
        return invalid(f"policy larger than {MAX_BODY} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return invalid("policy is not UTF-8")
    values: dict[str, str] = {}
    mx: list[str] = []
    for n, line in enumerate(policy_lines(text), 1):
        key, colon, value = line.partition(":")
        value = value.strip(_WSP)
        if not colon or not _EXT_NAME.fullmatch(key) or not value:
            return invalid(f"line {n} is not a policy field")
        if key == "mx":
            pattern = _mx_pattern(value)
            if pattern is None:
                return invalid(f"line {n}: bad mx pattern")
            if len(mx) < MAX_MX:
                mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        return invalid("version is not STSv1")
    try:
        mode = StsMode(values.get("mode", ""))
    except ValueError:
        return invalid("mode is not enforce, testing or none")
    age = values.get("max_age", "")
    if not _MAX_AGE_TEXT.fullmatch(age) or int(age) > MAX_AGE:
        return invalid(f"max_age is not a number of seconds up to {MAX_AGE}")
    if mode is not StsMode.NONE and not mx:
        return invalid("no mx pattern")
    return StsPolicy(mode, tuple(mx), int(age), policy_id, text, fetched)


# ---- the HTTP answer (RFC 8461 §3.3) ---------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    content_type: str  # the media type, lower case, without parameters
    body: bytes


def _header_block(buf: bytes) -> tuple[bytes, bytes] | None:
    end = buf.find(b"\r\n\r\n")
    sep = 4
    lf = buf.find(b"\n\n")
    if lf >= 0 and (end < 0 or lf < end):
        end, sep = lf, 2
    if end < 0:
        return None
    return buf[:end], buf[end + sep:]


def _dechunk(data: bytes, eof: bool) -> bytes | StsError | None:
    """A chunked body (RFC 9112 §7.1); None while incomplete."""
    out = bytearray()
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return fetch_error("truncated chunked body") if eof else None
        size_text = data[pos:nl].split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
            return fetch_error("bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            return bytes(out)  # trailers, if any, are not needed
        if len(out) + size > MAX_BODY:
            return invalid(f"policy larger than {MAX_BODY} bytes")
        start = nl + 1
        if len(data) < start + size + 1:
            return fetch_error("truncated chunked body") if eof else None
        out += data[start:start + size]
        pos = start + size
        pos += 2 if data[pos:pos + 2] == b"\r\n" else 1


def parse_http(buf: bytes, eof: bool) -> HttpAnswer | StsError | None:
    """The answer in the bytes read so far (``eof``: the server closed); None while
    more is needed.  A body over MAX_BODY is an error as soon as that is known."""
    if len(buf) > MAX_RESPONSE:
        return invalid(f"policy larger than {MAX_BODY} bytes")
    split = _header_block(buf)
    if split is None:
        if len(buf) > MAX_HEADER or eof:
            return fetch_error("no complete HTTP header")
        return None
    head, rest = split
    if len(head) > MAX_HEADER:
        return fetch_error("HTTP header too long")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    m = re.fullmatch(r"HTTP/1\.[01] ([0-9]{3})(?: .*)?", lines[0])
    if m is None:
        return fetch_error("not an HTTP/1.x answer")
    status = int(m.group(1))
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return fetch_error("bad HTTP header field")
        fields.setdefault(name.lower(), value.strip(_WSP))
    ctype = fields.get("content-type", "").split(";", 1)[0].strip(_WSP).lower()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = _dechunk(rest, eof)
        if body is None or isinstance(body, StsError):
            return body
    elif "content-length" in fields:
        length = fields["content-length"]
        if not re.fullmatch(r"[0-9]{1,10}", length):
            return fetch_error("bad Content-Length")
        if int(length) > MAX_BODY:
            return invalid(f"policy larger than {MAX_BODY} bytes")
        if len(rest) < int(length):
            return fetch_error("truncated body") if eof else None
        body = rest[:int(length)]
    else:
        if len(rest) > MAX_BODY:
            return invalid(f"policy larger than {MAX_BODY} bytes")
        if not eof:
            return None
        body = rest
    return HttpAnswer(status, ctype, body)


def check_answer(answer: HttpAnswer) -> bytes | StsError:
    """RFC 8461 §3.3: only a 200 with ``text/plain`` carries a policy; a redirect is
    not followed (it is a fetch error like any other status)."""
    if 300 <= answer.status < 400:
        return fetch_error(f"HTTP {answer.status}: redirects are not followed")
    if answer.status != 200:
        return fetch_error(f"HTTP {answer.status}")
    if answer.content_type != "text/plain":
        return invalid(f"Content-Type {answer.content_type or 'missing'}, not text/plain")
    return answer.body
