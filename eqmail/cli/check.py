"""``eqmailctl check``: qmail-showctl for an eqmail instance, as text or as JSON.

Owns: what ``check`` reports — every control value and where it came from (the table in
:mod:`eqmail.control`), the shipped plugins' own control files that are present, the
files in control/ that nothing reads, and warnings about configurations that load but
will not do what they seem to (no rcpthosts; a listener that requires AUTH it cannot
offer; SUBMISSIONPORT / SUBMISSION that make an ``smtp`` listener a submission port;
the problems the load itself reports as warnings, such as a control/authlimit that does
not parse; DKIM keys under control/dkim/ that are unreadable, wrongly owned or moded, or
do not parse; an SRS domain outside rcpthosts, a readable SRS secret; the secrets
themselves are never shown) and a note suggesting control/authcheck while inbound
verification is off.  Everything comes from the one parse, :func:`eqmail.control.load_controls`.

Privilege: read access to control/.  Read-only.
Inputs: the instance.  Outputs: :func:`check_report` (the JSON object documented in
eqmailctl(8)) and :func:`format_check` (its text form).  A control directory that does
not load gives ``ok: false`` and its file:line errors; nothing is raised.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from eqmail.cli.dkim import dkimsign_warnings, key_warnings
from eqmail.cli.stscheck import mtasts_notes, policy_worker_warnings, tlsca_warnings
from eqmail.control import (
    KNOWN_FILES,
    PLUGIN_FILES,
    Controls,
    ListenerSpec,
    Route,
    describe,
    known_file,
    load_controls,
    referenced_files,
    value_of,
)
from eqmail.delivery.hookcheck import line_problem
from eqmail.dns import LookupSoft, Resolver
from eqmail.errors import ControlErrors
from eqmail.instance import Instance
from eqmail.smtp.state import submission_port
from eqmail.smtp.tcpenv import rcpt_matcher

# qmail-showctl's compiled-in values (conf-*), shown as eqmail has them.
BUILT_IN = (("user-ext delimiter", "+"), ("subdirectory split", "23"),
            ("silent concurrency limit", "120"))
PLUGIN_VALUE_MAX = 4096  # a plugin file is shown, not parsed: bounded


def _json_value(value: object) -> Any:
    """A control value with its type kept: int, str, list, object or null."""
    if isinstance(value, frozenset):
        return sorted(_json_value(v) for v in value)
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, ListenerSpec):
        return {"service": value.service, "address": value.address, "port": value.port,
                "options": {k: v for k, v in value.env}}
    if isinstance(value, Route):
        return {"relay": value.relay, "port": value.port, "user": value.user}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _plugin_value(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(PLUGIN_VALUE_MAX)
    except OSError as e:
        return f"(unreadable: {e.strerror})"
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").split("\n")]
    return ", ".join(ln for ln in lines if ln and not ln.startswith("#")) or "(empty)"


def auth_warnings(c: Controls) -> list[str]:
    """Listeners whose AUTH requirement surprises: required but not offered, or required
    because SUBMISSIONPORT/SUBMISSION match an ``smtp`` listener's port."""
    out: list[str] = []
    for spec in c.listen:
        env = dict(spec.env)
        by_port = submission_port({**env, "TCPLOCALPORT": str(spec.port)})
        where = f"control/listen: {spec.service} {spec.display_address}"
        if (spec.service == "submission" or by_port) and not spec.checkpassword:
            out.append(f"warning: {where} requires AUTH before MAIL but has no checkpassword= "
                       "to offer it: every MAIL gets 530")
        if by_port and spec.service != "submission":
            var = "SUBMISSION" if env.get("SUBMISSION") == str(spec.port) else "SUBMISSIONPORT"
            why = f"{var}={spec.port}" if var in env else "SUBMISSIONPORT's default 587"
            out.append(f"warning: {where} requires AUTH before MAIL ({why} matches its port); "
                       "if that is meant, write it as a 'submission' listener")
        for var in ("SUBMISSIONPORT", "SUBMISSION"):
            if var in env and not env[var].isdigit():
                out.append(f"warning: {where}: {var}={env[var]!r} is not a port number and "
                           "matches no port")
    return out


def check_report(inst: Instance) -> dict[str, Any]:
    """Everything ``check`` shows, as the JSON object of eqmailctl(8)."""
    from eqmail.spp.runner import SHIPPED_DIR

    built_in = {**dict(BUILT_IN), "shipped plugins": str(SHIPPED_DIR)}
    report: dict[str, Any] = {"root": str(inst.root), "ok": True, "errors": [],
                              "built_in": built_in, "controls": [], "plugin_controls": [],
                              "unknown": [], "warnings": [], "notes": []}
    try:
        c = load_controls(inst.root)
    except ControlErrors as e:
        report["ok"] = False
        report["errors"] = [str(err) for err in e.errors]
        return report
    for (name, text, source), row in zip(describe(c), KNOWN_FILES, strict=True):
        value = value_of(c, row)
        report["controls"].append({"file": name, "value": _json_value(value), "text": text,
                                   "source": source})
    try:
        present = sorted(fn for fn in os.listdir(inst.control) if not fn.startswith("."))
    except OSError:
        present = []
    for fn, plugin, default in PLUGIN_FILES:
        if fn in present:
            path = str(inst.control / fn)
            report["plugin_controls"].append({"file": fn, "plugin": plugin, "default": default,
                                              "text": _plugin_value(path), "source": path})
    named = referenced_files(c)
    report["unknown"] = [fn for fn in present
                         if not known_file(fn) and fn not in named and fn != "dkim"]
    if c.rcpthosts is None:
        report["warnings"].append("warning: control/rcpthosts is missing: eqmail accepts only its "
                                  "locals and virtualdomains")
    report["warnings"] += [f"warning: {w}" for w in c.warnings]  # e.g. a bad control/authlimit
    report["warnings"] += auth_warnings(c)
    report["warnings"] += beforemote_warnings(c)
    report["warnings"] += key_warnings(inst.control)
    report["warnings"] += dkimsign_warnings(inst.control, c.dkimsign)
    report["warnings"] += srs_warnings(c)
    dnssec = dnssec_lines(c)
    report["warnings"] += [ln for ln in dnssec if ln.startswith("warning:")]
    report["notes"] = authcheck_notes(c) + [ln for ln in dnssec if ln.startswith("note:")]
    report["warnings"] += tlsca_warnings(inst, c) + policy_worker_warnings(inst, c)
    report["notes"] += mtasts_notes(c)
    return report


def srs_warnings(c: Controls) -> list[str]:
    """SRS settings that load but will not work: an SRS domain this instance does not
    accept mail for (every bounce to forwarded mail would get 553), or control/srs
    asking for SRS without a secret to sign with."""
    keys = c.srs_keys
    if keys is None:
        if c.srs and "srs" in c.sources and not c.srssecrets:
            return ["warning: control/srs is 1 but there is no control/srssecrets: forwarded "
                    "mail keeps its sender (run 'eqmailctl setup' to make a secret)"]
        return []
    if not rcpt_matcher(c).allows(f"postmaster@{keys.domain}"):
        return [f"warning: control/srsdomain: {keys.domain} is not in control/rcpthosts: "
                "bounces to forwarded mail (SRS addresses) will be refused with 553"]
    return []


def dnssec_placement(c: Controls) -> list[str]:
    """control/dnssec 1 with resolvers whose AD bit cannot be trusted by where they are."""
    if not c.dnssec:
        return []
    if not c.dnsservers:
        return ["warning: control/dnssec is 1 without control/dnsservers: the AD bit of "
                "/etc/resolv.conf's resolvers is trusted; name a validating resolver on "
                "this host (e.g. unbound on 127.0.0.1) in control/dnsservers"]
    far = [ip for ip, _ in c.dnsservers if not ipaddress.ip_address(ip).is_loopback]
    if far:
        return [f"warning: control/dnssec is 1 and control/dnsservers names {', '.join(far)}, "
                "not on this host: their AD bit crosses the network unprotected"]
    return []


def dnssec_lines(c: Controls) -> list[str]:
    """control/dnssec 1 (DANE) trusts the AD bit of control/dnsservers: say whether they
    set it (one DNSKEY query to them, bounded) and warn when they are not on this host
    (the AD bit is believed as it arrives, unauthenticated, RFC 4035 §4.9.3)."""
    if not c.dnssec:
        return []
    where = ", ".join(f"{ip}:{port}" for ip, port in c.dnsservers) or "/etc/resolv.conf"
    out = dnssec_placement(c)
    try:
        validating = Resolver(c.dnsservers, lifetime=2.0).validates()
    except LookupSoft as e:
        return out + [f"warning: control/dnssec is 1 but control/dnsservers ({where}) did not "
                      f"answer a DNSSEC query ({str(e)[:200]}): DANE lookups will defer"]
    if not validating:
        return out + [f"warning: control/dnssec is 1 but control/dnsservers ({where}) do not "
                      "validate (no AD bit on the root zone's DNSKEY): DANE never applies"]
    return out + [f"note: control/dnssec is 1: DANE on; control/dnsservers ({where}) validate "
                  "DNSSEC (AD on the root zone's DNSKEY)"]


def authcheck_notes(c: Controls) -> list[str]:
    """Inbound verification is off until the admin asks (as in Postfix): say how to
    turn it on, and what the DMARC setting then does."""
    if c.authcheck:
        return []
    out = ["note: control/authcheck is off: inbound mail gets no SPF/DKIM/DMARC checks and no "
           "Authentication-Results header; 'echo 1 > control/authcheck' turns them on"]
    if "dmarcreject" in c.sources:
        out.append("note: control/dmarcreject has no effect while control/authcheck is off")
    return out


def beforemote_warnings(c: Controls) -> list[str]:
    """control/beforemote lines eqmail cannot run as hook commands (e.g. eQmail's shell
    fragment): every remote delivery would defer."""
    out = []
    for line in c.beforemote:
        problem = line_problem(line)
        if problem:
            out.append(f"warning: control/beforemote: {line!r} {problem}; every remote delivery will defer")
    return out


def format_check(report: dict[str, Any]) -> str:
    """qmail-showctl's layout: built-in values, ``file: value    [source]`` rows, then
    qmail's line for every unknown file, then the warnings."""
    if not report["ok"]:
        return "".join(e + "\n" for e in report["errors"])
    lines = [f"instance root: {report['root']}"]
    lines += [f"{k}: {v}" for k, v in report["built_in"].items()]
    lines.append("")
    lines += [f"{r['file']}: {r['text']}    [{r['source']}]" for r in report["controls"]]
    for r in report["plugin_controls"]:
        lines.append(f"{r['file']}: {r['text']}    [{r['source']}; read by plugin {r['plugin']}]")
    lines += [f"{fn}: I have no idea what this file does." for fn in report["unknown"]]
    lines += report["warnings"]
    lines += report.get("notes", [])
    return "".join(ln + "\n" for ln in lines)

