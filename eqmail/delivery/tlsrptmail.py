"""The daily TLS-RPT mail (RFC 8460 §3 and §5): where a domain wants its reports, and
the message that carries one.

Owns: the parser of a domain's ``_smtp._tls`` TXT records (:func:`parse_txt`,
:func:`choose_record`: ``v=TLSRPTv1; rua=mailto:...,https://...``, §3) and the RFC 8460
§5.3 message (:func:`report_message`: multipart/report; report-type="tlsrpt", a text
part and the gzip'd JSON report, ``TLS-Report-Domain``/``TLS-Report-Submitter``).
Pure: no I/O; eqmail.workers.tlsrptsend looks the record up and queues the message.

Inputs are untrusted DNS text: every length is bounded, a mailto address is accepted
only as a plain ``local@domain`` of letters, digits and the usual atext, and a record
that breaks the grammar is no record at all (§3: the domain then gets no report).
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import gzip
import json
import re
import urllib.parse
from dataclasses import dataclass
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from eqmail.delivery.tlsrpt import unique_id

VERSION = "v=TLSRPTv1"
MAX_RECORD = 4096       # characters of one TXT record we parse
MAX_URIS = 8            # rua URIs used per domain
MAX_ADDRESS = 254

_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class RecordError(ValueError):
    """The TXT record is not a valid TLSRPT record."""


@dataclass(frozen=True)
class TlsRptRecord:
    """A domain's reporting addresses: ``mailto`` (validated addresses) and ``https``
    (URIs; eqmail does not post to them)."""

    mailto: tuple[str, ...]
    https: tuple[str, ...]


def is_hostname(name: str) -> bool:
    """A DNS host name of letters, digits and hyphens (no trailing dot)."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def valid_address(addr: str) -> bool:
    if len(addr) > MAX_ADDRESS or addr.count("@") != 1:
        return False
    local, domain = addr.split("@")
    return 0 < len(local) <= 64 and bool(_LOCAL.match(local)) and is_hostname(domain) and "." in domain


def _mailto(uri: str) -> str:
    """The address of a ``mailto:`` URI (RFC 6068; header fields after ``?`` ignored)."""
    try:
        addr = urllib.parse.unquote(uri[len("mailto:"):].split("?", 1)[0], errors="strict")
    except UnicodeDecodeError:
        addr = ""
    if not valid_address(addr):
        raise RecordError(f"not a usable address: {uri[:80]!r}")
    return addr


def parse_txt(text: str) -> TlsRptRecord:
    """One ``v=TLSRPTv1`` record (RFC 8460 §3's grammar); RecordError if it is not one,
    or if it has no usable rua URI."""
    if len(text) > MAX_RECORD or not text.isascii():
        raise RecordError("record too long or not ASCII")
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # an optional trailing delimiter
    if not fields or fields[0] != VERSION:
        raise RecordError("does not start with v=TLSRPTv1")
    rua: list[str] | None = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.match(name):
            raise RecordError(f"bad field {field[:40]!r}")
        if name == "rua":
            if rua is not None:
                raise RecordError("rua given twice")
            rua = [u.strip(" \t") for u in value.split(",")]
        elif not _EXT_VALUE.match(value):
            raise RecordError(f"bad value of {name}")
    if not rua:
        raise RecordError("no rua field")
    mailto: list[str] = []
    https: list[str] = []
    for uri in rua:
        scheme = uri.split(":", 1)[0].lower()
        if scheme == "mailto":
            address = _mailto("mailto:" + uri.split(":", 1)[1])
            if address not in mailto:
                mailto.append(address)
        elif scheme == "https" and " " not in uri:
            https.append(uri)
        else:
            raise RecordError(f"not a mailto: or https: URI: {uri[:80]!r}")
    return TlsRptRecord(tuple(mailto[:MAX_URIS]), tuple(https[:MAX_URIS]))


def choose_record(texts: list[bytes]) -> TlsRptRecord:
    """RFC 8460 §3: of the TXT records, those starting with ``v=TLSRPTv1``; exactly one
    must remain and be valid (RecordError otherwise: no reports for that domain)."""
    found = [t for t in texts if t[:len(VERSION)] == VERSION.encode()]
    if len(found) != 1:
        raise RecordError(f"{len(found)} TLSRPT records")
    try:
        text = found[0].decode("ascii")
    except UnicodeDecodeError:
        raise RecordError("record not ASCII") from None
    return parse_txt(text)


def report_filename(me: str, report: dict[str, Any], unique: str) -> str:
    """RFC 8460 §5.3: ``sender!policy-domain!begin-timestamp!end-timestamp!unique-id``
    ``.json.gz``, the timestamps in seconds since the epoch."""
    rng = report["date-range"]
    begin = _epoch(rng["start-datetime"])
    end = _epoch(rng["end-datetime"])
    domain = report["policies"][0]["policy"]["policy-domain"]
    return f"{me}!{domain}!{begin}!{end}!{unique}.json.gz"


def _epoch(stamp: str) -> int:
    return int(dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp())


def report_json(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=1, ensure_ascii=True).encode("ascii")


def human_text(report: dict[str, Any]) -> str:
    """The text part: what the attachment says, for a person."""
    rng = report["date-range"]
    lines = [f"This is an aggregate TLS report (RFC 8460) from {report['organization-name']}",
             f"for {rng['start-datetime']} to {rng['end-datetime']}.", ""]
    for p in report["policies"]:
        pol, summ = p["policy"], p["summary"]
        mx = ", ".join(pol.get("mx-host", [])) or "-"
        lines.append(f"{pol['policy-domain']}: policy {pol['policy-type']} (mx {mx}): "
                     f"{summ['total-successful-session-count']} successful, "
                     f"{summ['total-failure-session-count']} failed sessions")
        for d in p["failure-details"][:20]:
            lines.append(f"  {d['failed-session-count']} x {d['result-type']} "
                         f"{d.get('receiving-mx-hostname', '-')} [{d.get('receiving-ip', '-')}]")
    lines += ["", f"Report-ID: {report['report-id']}",
              f"Contact: {report['contact-info']}", ""]
    return "\n".join(lines)


def report_message(report: dict[str, Any], me: str, sender: str, recipients: tuple[str, ...],
                   now: float, msgid_host: str) -> bytes:
    """The RFC 8460 §5.3 message of one report (LF line ends, as the queue stores
    mail).  ``TLS-Required: No`` (RFC 8689 §5, RFC 8460 §5.4): a report is delivered
    even when the TLS it reports on fails."""
    domain = report["policies"][0]["policy"]["policy-domain"]
    rid = report["report-id"]
    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = email.utils.formatdate(now, usegmt=True)
    msg["Message-ID"] = f"<tlsrpt.{unique_id(rid)}.{int(now)}@{msgid_host}>"
    msg["Subject"] = f"Report Domain: {domain} Submitter: {me} Report-ID: <{rid}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = me
    msg["TLS-Required"] = "No"
    msg["Auto-Submitted"] = "auto-generated"
    msg.preamble = "This is a multipart message in MIME format.\n"
    msg.attach(MIMEText(human_text(report), "plain", "us-ascii"))
    part = MIMEApplication(gzip.compress(report_json(report), mtime=int(now)), "tlsrpt+gzip")
    part.add_header("Content-Disposition", "attachment",
                    filename=report_filename(me, report, unique_id(rid)))
    msg.attach(part)
    policy = email.policy.SMTP.clone(linesep="\n", max_line_length=78)
    return msg.as_bytes(policy=policy)
