"""Signing outgoing mail: which messages, with which keys and which policy (issue 16).

Owns the decision (:func:`signing_plan`): a message is signed when its origin, as the
queue writer recorded it, is one that is signed (``Origin.signed``: an authenticated
SMTP client, a relay client, local injection, eqmail's own bounces) and its From:
domain, or the closest parent domain, has keys under ``control/dkim/``.  Mail from
outsiders (origin NETWORK, FORWARD or none) is never signed, whatever its From: says.
Then every selector of that domain signs (RSA and Ed25519 side by side), with the
policy control/dkimsign gives the domain (:func:`policy_for`; eqmail.control.dkimsign).

Also owns the key store as the signer reads it (:class:`KeyStore`): the key files are
read when they change — a cache keyed on the file's device, inode, size and times, so
a key made by ``eqmailctl dkim keygen`` (or replaced with ``--force``) is used by the
next delivery without a restart.

Privilege: runs in the remote delivery worker (eqmailr), the only process that can read
the keys (owner eqmailr, mode 0400).  Reads control/dkim/; no sockets, no processes.

Failure modes: a key that cannot be read or loaded raises :class:`KeyFileError` naming
the file — the caller defers the delivery (mail is never sent unsigned by accident); a
message that cannot be signed raises eqmail.dkim.sign.MessageError.
"""

from __future__ import annotations

import email.utils
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from eqmail.control.dkimsign import DkimSignRule, rule_for
from eqmail.dkim.keys import (
    KEY_SUFFIX,
    MAX_KEY_FILE,
    SELECTOR_RE,
    DkimError,
    key_type,
    normalize_domain,
    parse_key,
)
from eqmail.dkim.sign import (
    DEFAULT_HEADERS,
    DEFAULT_OVERSIGN,
    Canon,
    KeyLoadError,
    SigningError,
    SigningKey,
    SigningPolicy,
    sign,
    signing_domain,
)
from eqmail.ipc.queue import Origin

HEADER_MAX = 1 << 20  # bytes of the header section searched for From:


class KeyFileError(SigningError):
    """A key file (or the store's directory) that cannot be read or used."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def from_domain(message: bytes) -> str | None:
    """The domain of the first address of the message's first From: field (lower case,
    as written); None without a From: field or an address with a domain."""
    end = min((i for i in (message.find(b"\n\n"), message.find(b"\r\n\r\n")) if i >= 0),
              default=len(message))
    head = message[:min(end, HEADER_MAX)].decode("utf-8", "surrogateescape")
    value = None
    for line in head.replace("\r\n", "\n").split("\n"):
        if value is not None:
            if line[:1] in (" ", "\t"):
                value += " " + line.strip()
                continue
            break
        name, colon, rest = line.partition(":")
        if colon and name.strip().lower() == "from":
            value = rest.strip()
    if value is None:
        return None
    for _, addr in email.utils.getaddresses([value]):
        if "@" in addr:
            domain = addr.rpartition("@")[2].strip().strip("[]").lower()
            return domain or None
    return None


def signing_plan(origin: Origin | None, from_dom: str | None,
                 available: Iterable[str]) -> str | None:
    """The domain whose keys sign a message of ``origin`` with From: domain ``from_dom``
    (itself or its closest parent with keys, among ``available``); None: not signed."""
    if origin is None or not Origin(origin).signed or not from_dom:
        return None
    return signing_domain(from_dom, available)


def policy_for(rules: tuple[DkimSignRule, ...], domain: str) -> SigningPolicy:
    """What the signatures of ``domain`` cover: control/dkimsign's options for it (its
    line, then the ``*`` line), the defaults of eqmail.dkim.sign for the rest."""
    rule = rule_for(rules, domain)
    return SigningPolicy(
        header_canon=Canon(rule.header_canon or Canon.RELAXED.value),
        body_canon=Canon(rule.body_canon or Canon.RELAXED.value),
        headers=rule.headers if rule.headers is not None else DEFAULT_HEADERS,
        oversign=rule.oversign if rule.oversign is not None else DEFAULT_OVERSIGN,
        expire=rule.expire or None)


@dataclass(frozen=True)
class _Stamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyStore:
    """control/dkim/<domain>/<selector>.key as the signer reads it; thread-safe (the
    remote worker's pool threads share one)."""

    def __init__(self, control: Path) -> None:
        self.base = Path(control) / "dkim"
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[_Stamp, SigningKey]] = {}
        # Directory listings by the directory's own stamp: an entry added, removed or
        # renamed changes its mtime/ctime, so a delivery costs a stat per directory
        # instead of a listdir (and its sorting and checking) per directory.
        self._listings: dict[Path, tuple[_Stamp, list[str]]] = {}

    def _listing(self, path: Path) -> list[str]:
        """``os.listdir(path)``, sorted, re-read only when the directory changed; the
        OSErrors are listdir's."""
        stamp = _Stamp.of(os.stat(path))
        with self._lock:
            cached = self._listings.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        names = sorted(os.listdir(path))
        with self._lock:
            if len(self._listings) > LISTINGS_MAX:
                self._listings.clear()
            self._listings[path] = (stamp, names)
        return names

    def domains(self) -> list[str]:
        """The domains with at least one key file (names as the store writes them)."""
        try:
            names = self._listing(self.base)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KeyFileError(self.base, f"cannot list: {e.strerror}") from None
        out = []
        for name in names:
            try:
                if normalize_domain(name) != name:
                    continue
            except DkimError:
                continue
            if self._selectors(name):
                out.append(name)
        return out

    def _selectors(self, domain: str) -> list[str]:
        path = self.base / domain
        try:
            names = self._listing(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise KeyFileError(path, f"cannot list: {e.strerror}") from None
        return sorted(n[:-len(KEY_SUFFIX)] for n in names
                      if n.endswith(KEY_SUFFIX) and SELECTOR_RE.fullmatch(n[:-len(KEY_SUFFIX)]))

    def keys(self, domain: str) -> list[SigningKey]:
        """Every selector's key of ``domain``, by selector; KeyFileError for the first
        that cannot be read or loaded."""
        return [self._load(domain, sel) for sel in self._selectors(domain)]

    def path(self, domain: str, selector: str) -> Path:
        return self.base / domain / (selector + KEY_SUFFIX)

    def _load(self, domain: str, selector: str) -> SigningKey:
        path = self.path(domain, selector)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise KeyFileError(path, f"cannot read: {e.strerror}") from None
        try:
            stamp = _Stamp.of(os.fstat(fd))
            with self._lock:
                cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            data = b""
            while len(data) <= MAX_KEY_FILE and (chunk := os.read(fd, MAX_KEY_FILE + 1 - len(data))):
                data += chunk
        except OSError as e:
            raise KeyFileError(path, f"cannot read: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_FILE:
            raise KeyFileError(path, f"over {MAX_KEY_FILE} bytes: not a key")
        try:
            key = parse_key(data, str(path))
        except DkimError as e:
            raise KeyFileError(path, str(e).removeprefix(f"{path}: ")) from None
        signing = SigningKey(domain, selector, key_type(key), data)
        with self._lock:
            self._cache[path] = (stamp, signing)
        return signing


LISTINGS_MAX = 4096  # directories whose listing is kept (control/dkim and its domains)


class OutboundSigner:
    """The remote worker's signer: the key store and the decision, for one instance."""

    def __init__(self, control: Path) -> None:
        self.store = KeyStore(control)

    def domain_for(self, head: bytes, origin: Origin | None) -> str | None:
        """The signing domain of a message that starts with ``head`` (its header section
        is enough), or None when it is not signed.  KeyFileError when control/dkim/
        cannot be listed."""
        if origin is None or not Origin(origin).signed:
            return None  # no look at control/dkim for an outsider's mail
        return signing_plan(origin, from_domain(head), self.store.domains())

    def signatures(self, message: bytes, origin: Origin | None,
                   rules: tuple[DkimSignRule, ...], domain: str | None = None) -> bytes:
        """The DKIM-Signature fields to put in front of ``message`` (b"" when it is not
        signed); ``domain``: :meth:`domain_for`'s answer when the caller has it.
        KeyFileError / MessageError as the module says."""
        if domain is None:
            domain = self.domain_for(message, origin)
        if domain is None:
            return b""
        keys = self.store.keys(domain)
        if not keys:
            return b""  # the last key went away since the listing
        try:
            return sign(message, keys, policy_for(rules, domain))
        except KeyLoadError as e:  # loaded by cryptography, refused by dkimpy
            raise KeyFileError(self.store.path(e.domain, e.selector), e.why) from None
