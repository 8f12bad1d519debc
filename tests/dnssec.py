"""A DNSSEC world for tests: nsd (authoritative) serving locally signed zones, unbound
(validating resolver) trusting their private root, both private to one test module.

The records are data, as in tests/dnsserver.py::

    world = DnssecWorld(
        {"sec.test": {"MX": [(10, "mx.sec.test")]},
         "mx.sec.test": {"A": ["10.99.0.2"]},
         "_25._tcp.mx.sec.test": {"TLSA": ["3 1 1 " + digest]},
         "plain.test": {"MX": [(10, "mx.plain.test")]},
         "mx.plain.test": {"A": ["10.99.0.3"]}},
        zones={"sec.test": Signing.SECURE, "plain.test": Signing.INSECURE})
    with world:                      # or world.start() ... world.stop()
        control/dnsservers = world.dnsservers   # "127.0.0.1:PORT" of the validating resolver

Record types: A, AAAA, MX (pairs), CNAME (one name), TXT (zone-file text), TLSA
(presentation text, see :func:`tlsa_text`), and any other type as presentation text.

The chain of trust is a real one: a private root zone ``.`` signed with its own key is
unbound's only trust anchor; each zone of ``zones`` is delegated from it -- SECURE and
BOGUS with a DS record (so they must validate), INSECURE without (an authenticated
insecure delegation: answers come back without AD).  BOGUS zones are signed with
signatures that expired in 2020, so every answer from them fails validation (unbound:
SERVFAIL).  ``tamper`` replaces the data of single RRsets after signing (their
signatures no longer match: bogus, the rest of the zone stays good), e.g.
``tamper={("_25._tcp.mx.sec.test", "TLSA"): ["3 1 1 " + "00" * 32]}``.  Names under
no listed zone live in the (signed) root zone.

The private root means every name resolves here and nothing leaves the machine: unbound
reaches nsd through a stub zone for ``.`` on 127.0.0.1 (nsd hosts the root and every
child, so it answers each name from the right zone and each DS from the root).  Both
servers bind dynamically chosen free ports; ``netns`` (a pid) runs them inside that
process's network namespace (unbound on ``host``, nsd on its 127.0.0.1).  Readiness is
an answered query, not a sleep.  Keys and signatures come from ldns-keygen and
ldns-signzone (Debian's ldnsutils); scripts/bootstrap.sh installs nsd, unbound and
ldnsutils.
"""

from __future__ import annotations

import enum
import hashlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from netns import in_netns

Zone = dict[str, Any]
NS_NAME = "ns.test-servers."
TOOLS = ("nsd", "unbound", "ldns-keygen", "ldns-signzone")


class Signing(enum.Enum):
    SECURE = "secure"      # signed, DS in the root: answers carry AD
    INSECURE = "insecure"  # unsigned, no DS: answers without AD, never SERVFAIL
    BOGUS = "bogus"        # signed with expired signatures, DS in the root: SERVFAIL


def available() -> bool:
    return all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in TOOLS)


def tlsa_text(cert: x509.Certificate, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    """The TLSA record data (``"3 1 1 <hex>"``) for ``cert`` as a zone file has it."""
    data = (cert.public_bytes(serialization.Encoding.DER) if selector == 0 else
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return f"{usage} {selector} {mtype} {data.hex()}"




def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` (the daemons bind it next)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return int(port)
    raise OSError("no free port")


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _rdata(rdtype: str, value: Any) -> str:
    if rdtype == "MX":
        pref, target = value
        return f"{pref} {_fqdn(target)}"
    if rdtype in ("CNAME", "NS", "PTR"):
        return _fqdn(str(value))
    return str(value)


def _values(rdtype: str, value: Any) -> list[Any]:
    return [value] if rdtype == "CNAME" or isinstance(value, str) else list(value)


class DnssecWorld:
    def __init__(self, records: Zone, zones: Mapping[str, Signing] | None = None,
                 host: str = "127.0.0.1", netns: int | None = None,
                 tamper: Mapping[tuple[str, str], list[str]] | None = None) -> None:
        self.records = {_fqdn(k): v for k, v in records.items()}
        self.zones = {_fqdn(k): v for k, v in (zones or {}).items()}
        self.host = host
        self.netns = netns
        self.tamper = {(_fqdn(n), t.upper()): v for (n, t), v in (tamper or {}).items()}
        self.dir = Path(tempfile.mkdtemp(prefix="eqmail-dnssec-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.nsd_port = 0

    @property
    def dnsservers(self) -> str:
        """control/dnsservers' line for the validating resolver."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # ------------------------------------------------------------------ zones
    def _zone_of(self, name: str) -> str:
        best = "."
        for apex in self.zones:
            if (name == apex or name.endswith("." + apex)) and len(apex) > len(best):
                best = apex
        return best

    def _zone_lines(self, apex: str) -> list[str]:
        lines = [f"{apex} 3600 IN SOA {NS_NAME} hostmaster.invalid. 1 3600 600 86400 30",
                 f"{apex} 3600 IN NS {NS_NAME}"]
        if apex == ".":
            lines.append(f"{NS_NAME} 60 IN A 127.0.0.1")
            for child in self.zones:
                lines.append(f"{child} 3600 IN NS {NS_NAME}")
        for name, entry in self.records.items():
            if self._zone_of(name) != apex or not isinstance(entry, dict):
                continue
            for rdtype, value in entry.items():
                for v in _values(rdtype, value):
                    lines.append(f"{name} 60 IN {rdtype.upper()} {_rdata(rdtype.upper(), v)}")
        return lines

    def _run(self, *argv: str) -> str:
        done = subprocess.run(list(argv), cwd=self.dir, capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def _sign(self, apex: str, lines: list[str], expired: bool) -> tuple[Path, str]:
        """Sign one zone with a fresh ECDSA P-256 key (one key, as KSK and ZSK): the
        signed file and the zone's DS record."""
        stem = "root" if apex == "." else apex.rstrip(".")
        plain = self.dir / f"{stem}.zone"
        plain.write_text("\n".join(lines) + "\n")
        key = self._run("ldns-keygen", "-a", "ECDSAP256SHA256", "-k", apex).strip()
        ds = (self.dir / f"{key}.ds").read_text().strip()
        argv = ["ldns-signzone", "-o", apex, "-f", f"{stem}.signed"]
        if expired:
            argv += ["-i", "20190101000000", "-e", "20200101000000"]
        self._run(*argv, plain.name, key)
        signed = self.dir / f"{stem}.signed"
        if self.tamper:
            signed.write_text(self._tampered(signed.read_text(), apex))
        return signed, ds

    def _tampered(self, text: str, apex: str) -> str:
        out = []
        done: set[tuple[str, str]] = set()
        for line in text.splitlines():
            f = line.split(None, 4)
            key = (f[0].lower(), f[3].upper()) if len(f) == 5 else ("", "")
            if key in self.tamper:
                if key not in done:  # the RRset's new data, under its old signatures
                    done.add(key)
                    out += [f"{f[0]} {f[1]} IN {f[3]} {v}" for v in self.tamper[key]]
                continue
            out.append(line)
        return "\n".join(out) + "\n"

    def _build(self) -> tuple[list[tuple[str, Path]], str]:
        signed: list[tuple[str, Path]] = []
        root_lines = self._zone_lines(".")
        for apex, how in self.zones.items():
            lines = self._zone_lines(apex)
            if how is Signing.INSECURE:
                path = self.dir / f"{apex.rstrip('.')}.zone"
                path.write_text("\n".join(lines) + "\n")
                signed.append((apex, path))
                continue
            path, ds = self._sign(apex, lines, expired=how is Signing.BOGUS)
            signed.append((apex, path))
            root_lines.append(ds)
        root, root_ds = self._sign(".", root_lines, expired=False)
        return [(".", root), *signed], root_ds

    # ------------------------------------------------------------------ servers
    def _nsd_conf(self, files: list[tuple[str, Path]]) -> str:
        d = self.dir
        conf = [
            "server:", f"  ip-address: 127.0.0.1@{self.nsd_port}", f"  port: {self.nsd_port}",
            '  username: ""', '  chroot: ""', f'  zonesdir: "{d}"', '  database: ""',
            f'  pidfile: "{d}/nsd.pid"', f'  xfrdfile: "{d}/xfrd.state"',
            f'  zonelistfile: "{d}/zone.list"', f'  xfrdir: "{d}"', f'  logfile: "{d}/nsd.log"',
            "  server-count: 1", "  verbosity: 2", "  hide-version: yes", "  do-ip6: no",
            "  reuseport: no", "  tcp-count: 32", "  zonefiles-check: yes", "  zonefiles-write: 0",
            "remote-control:", "  control-enable: no"]
        for apex, path in files:
            conf += ["zone:", f'  name: "{apex}"', f'  zonefile: "{path}"']
        return "\n".join(conf) + "\n"

    def _unbound_conf(self) -> str:
        d = self.dir
        conf = [
            "server:", f"  interface: {self.host}@{self.port}", f"  port: {self.port}",
            "  interface-automatic: no", "  do-daemonize: no", '  username: ""', '  chroot: ""',
            f'  directory: "{d}"', f'  pidfile: "{d}/unbound.pid"', f'  logfile: "{d}/unbound.log"',
            "  use-syslog: no", "  verbosity: 1", "  val-log-level: 2", "  log-servfail: yes",
            f"  do-ip6: {'yes' if ':' in self.host else 'no'}", "  num-threads: 1",
            "  so-reuseport: no", "  access-control: 0.0.0.0/0 allow", "  access-control: ::/0 allow",
            "  do-not-query-localhost: no", f'  trust-anchor-file: "{d}/root.ds"',
            '  module-config: "validator iterator"', "  qname-minimisation: no",
            "  trust-anchor-signaling: no", "  root-key-sentinel: no", "  ede: yes",
            "  harden-dnssec-stripped: yes", "  val-permissive-mode: no",
            "  cache-max-negative-ttl: 5", "  infra-host-ttl: 5", "  minimal-responses: yes",
            "  outgoing-range: 64", "  num-queries-per-thread: 32",
            # unbound answers RFC 6761's special names (test., invalid., ...) itself;
            # here they are ordinary names of the private root
            *(f'  local-zone: "{tld}" nodefault' for tld in self._tlds()),
            "stub-zone:", '  name: "."', f"  stub-addr: 127.0.0.1@{self.nsd_port}",
            "remote-control:", "  control-enable: no"]
        return "\n".join(conf) + "\n"

    def _tlds(self) -> list[str]:
        names = [*self.records, *self.zones, "test.", "invalid."]
        return sorted({n.rstrip(".").rsplit(".", 1)[-1] + "." for n in names if n != "."})

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        if self.netns is not None:
            argv = ["nsenter", f"--net=/proc/{self.netns}/ns/net", *argv]
        out = open(self.dir / log, "ab")  # noqa: SIM115 - the daemon's stderr, closed in stop()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd=self.dir)
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def _wait(self, proc: subprocess.Popen[bytes], host: str, port: int, log: str,
              want_ad: bool) -> None:
        """Until the server answers ``. SOA`` (with AD from the resolver: validation
        works); a dead server fails at once with its log."""
        deadline = time.monotonic() + 20
        q = dns.message.make_query(".", "SOA", want_dnssec=True)
        q.flags |= dns.flags.AD
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{log} exited: {self.logs()}")
            try:
                with in_netns(self.netns):
                    r = dns.query.udp(q, host, port=port, timeout=0.5)
                if not want_ad or r.flags & dns.flags.AD:
                    return
            except (dns.exception.DNSException, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log} did not answer: {self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        """The servers' logs (for a failing test's message)."""
        return "\n".join(f"--- {n}\n{self.log(n)}" for n in
                         ("nsd.out", "nsd.log", "unbound.out", "unbound.log"))

    def log(self, name: str) -> str:
        try:
            return (self.dir / name).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> DnssecWorld:
        files, root_ds = self._build()
        (self.dir / "root.ds").write_text(root_ds + "\n")
        with in_netns(self.netns):
            self.nsd_port = _free_port("127.0.0.1")
            self.port = _free_port(self.host)
        (self.dir / "nsd.conf").write_text(self._nsd_conf(files))
        (self.dir / "unbound.conf").write_text(self._unbound_conf())
        try:
            nsd = self._spawn(["nsd", "-d", "-c", str(self.dir / "nsd.conf")], "nsd.out")
            self._wait(nsd, "127.0.0.1", self.nsd_port, "nsd.out", want_ad=False)
            unbound = self._spawn(["unbound", "-d", "-c", str(self.dir / "unbound.conf")],
                                  "unbound.out")
            self._wait(unbound, self.host, self.port, "unbound.out", want_ad=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DnssecWorld:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
