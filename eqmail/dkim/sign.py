"""DKIM signing (RFC 6376, RFC 8463 Ed25519, RFC 8301 algorithms): the signatures one
message gets, made by dkimpy.

Owns: what a signature covers (:class:`SigningPolicy`: canonicalisation, the header
fields signed, which of them are over-signed, the optional x= expiry) and the choice of
the signing domain for a From: domain (:func:`signing_domain`, the "or a parent domain"
rule).  No canonicalisation or crypto is written here: dkimpy canonicalises, hashes and
signs; ``cryptography`` checks that a key loads, converts it to the form dkimpy reads,
and makes the RSA signature itself (OpenSSL, see :func:`_rsa_sign`: dkimpy's own RSA is
Python integer arithmetic, 6-7 ms per RSA-2048 signature against OpenSSL's ~0.7 ms).

Privilege: none of its own.  The private keys are handed in as bytes (the caller, the
process that sends, read them from ``control/dkim/<domain>/<selector>.key``); no file is
opened, no socket, no process.

Inputs: the message as it is stored (LF line ends, as eqmail's queue keeps it) or as it
goes out (CRLF): dkimpy canonicalises both to the same CRLF form, so a signature made
over the LF form verifies after the message is sent with CRLF
(tests/integration/test_dkim_interop.py proves it with Mail::DKIM and OpenDKIM).
Output: the DKIM-Signature header fields to put in front of the message, one per key
(so RSA and Ed25519 signatures stand side by side), each ending with the message's own
line end and folded with it.

Failure modes: a key that does not load (not PEM, wrong type, RSA outside 1024..4096
bits) raises :class:`KeyLoadError` naming the domain and selector — the caller defers the
delivery, so mail is never sent unsigned by accident; a message whose header section
dkimpy cannot parse, or that has no From: field, raises :class:`MessageError`.  Both
are :class:`SigningError`.
"""

from __future__ import annotations

import base64
import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from eqmail.control.dkimsign import NEVER_SIGNED as NEVER_SIGNED  # control/dkimsign checks it too
from eqmail.dkim.keys import KeyType as KeyType  # one enum for the store and the signer

RSA_MIN_BITS, RSA_MAX_BITS = 1024, 4096

# What current signers sign when present (OpenDKIM's default SignHeaders, which is RFC
# 6376 §5.4.1's list, plus rspamd's additions: List-Unsubscribe-Post, which RFC 8058
# one-click unsubscribe requires to be signed, and the OpenPGP/Autocrypt fields).
# Never Received, Return-Path, Bcc, DKIM-Signature or other trace fields (§5.4).
DEFAULT_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive", "openpgp", "autocrypt",
)
# Signed once more than present, so that another instance cannot be added (RFC 6376
# §8.15).  From alone, as dkimpy and OpenDKIM's examples do: over-signing more fields
# breaks signatures when a mailing list legitimately adds e.g. a missing Reply-To.
DEFAULT_OVERSIGN: tuple[str, ...] = ("from",)


class SigningError(Exception):
    """The message cannot be signed (see the subclasses)."""


class KeyLoadError(SigningError):
    """The private key of ``domain``/``selector`` cannot be used: defer, never send unsigned."""

    def __init__(self, domain: str, selector: str, why: str) -> None:
        super().__init__(f"DKIM key {selector}._domainkey.{domain}: {why}")
        self.domain = domain
        self.selector = selector
        self.why = why


class MessageError(SigningError):
    """The message's header section cannot be signed (unparseable, or no From: field)."""


class Canon(enum.StrEnum):
    RELAXED = "relaxed"
    SIMPLE = "simple"


_ALGORITHM = {KeyType.RSA: b"rsa-sha256", KeyType.ED25519: b"ed25519-sha256"}


@dataclass(frozen=True)
class SigningKey:
    """One selector's key: d=, s=, the key type and the PEM (PKCS#8) private key."""

    domain: str
    selector: str
    key_type: KeyType
    private_key: bytes

    def __repr__(self) -> str:  # never print key material into a log
        return f"SigningKey({self.domain!r}, {self.selector!r}, {self.key_type.value})"


@dataclass(frozen=True)
class SigningPolicy:
    """What a signature covers.  The defaults are current practice (see above).

    ``headers``: the fields signed when present (every instance of each); ``oversign``:
    fields listed once more than present; ``expire``: seconds until x= (None: no x=).
    No l= tag is ever written: a body length limit lets anyone append to the body.
    """

    header_canon: Canon = Canon.RELAXED
    body_canon: Canon = Canon.RELAXED
    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = DEFAULT_OVERSIGN
    expire: int | None = None

    def __post_init__(self) -> None:
        names = {h.lower() for h in self.headers + self.oversign}
        if "from" not in {h.lower() for h in self.headers}:
            raise ValueError("a DKIM signature must cover From (RFC 6376 §5.4)")
        if names & NEVER_SIGNED:
            raise ValueError(f"never signed: {', '.join(sorted(names & NEVER_SIGNED))}")
        if self.expire is not None and self.expire <= 0:
            raise ValueError("expire must be a positive number of seconds")


def header_list(present: Iterable[str], policy: SigningPolicy) -> list[bytes]:
    """The h= list for a message with header fields ``present`` (names, in order).

    Each policy field once per instance present, then the over-signed ones once more
    (present or not: an absent From still cannot be added).
    """
    counts: dict[str, int] = {}
    for name in present:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    wanted = list(dict.fromkeys(h.lower() for h in policy.headers))
    names = [h for h in wanted for _ in range(counts.get(h, 0))]
    names += list(dict.fromkeys(h.lower() for h in policy.oversign))
    return [n.encode("ascii") for n in names]


# RSA keys loaded by _dkimpy_key, by modulus: what _rsa_sign signs with.  Bounded like
# _dkimpy_key's cache (a key evicted there is registered again when it is next used).
_OPENSSL_RSA: dict[int, rsa.RSAPrivateKey] = {}
_OPENSSL_RSA_MAX = 64
_PREHASHED = {"sha256": Prehashed(hashes.SHA256()), "sha1": Prehashed(hashes.SHA1())}
_dkimpy_rsa_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign


def _rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signing step, made by OpenSSL for a key this module
    loaded.  PKCS#1 v1.5 signatures are deterministic, so the bytes are exactly those
    dkimpy's own arithmetic gives (tests/unit/test_dkim_sign.py compares them); any other
    key (dkimpy used directly, e.g. ARC sealing in the tests) goes to dkimpy's code.
    dkimpy calls the function through its module's global name, so that name is what is
    replaced, once, at import."""
    key = _OPENSSL_RSA.get(private_key.get("modulus", -1))
    algorithm = _PREHASHED.get(str(getattr(digest, "name", "")).lower())
    if key is None or algorithm is None:
        return bytes(_dkimpy_rsa_sign(digest, private_key))
    return key.sign(digest.digest(), padding.PKCS1v15(), algorithm)


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign


@functools.lru_cache(maxsize=64)
def _parsed_pem(data: bytes) -> dict[str, int]:
    """dkimpy's parse of a PEM private key, once per key: dkimpy parses the PEM again
    (pure-Python ASN.1) for every signature, 0.1 ms of a 0.6 ms signature.  The dict is
    shared between calls; dkimpy only reads it."""
    return dict(_dkimpy_parse_pem(data))


_dkimpy_parse_pem = dkim.parse_pem_private_key
dkim.parse_pem_private_key = _parsed_pem


def _register_rsa(loaded: rsa.RSAPrivateKey) -> None:
    modulus = loaded.private_numbers().public_numbers.n
    if modulus in _OPENSSL_RSA:
        return
    _OPENSSL_RSA[modulus] = loaded
    while len(_OPENSSL_RSA) > _OPENSSL_RSA_MAX:
        del _OPENSSL_RSA[next(iter(_OPENSSL_RSA))]


def _dkimpy_key(key: SigningKey) -> bytes:
    """The key as dkimpy reads it: PKCS#1 PEM for RSA, base64 of the 32-byte seed for
    Ed25519; an RSA key is (again) handed to :func:`_rsa_sign`, whose table may have
    dropped it while the cache below kept it."""
    pem, loaded = _converted(key)
    if loaded is not None:
        _register_rsa(loaded)
    return pem


@functools.lru_cache(maxsize=64)
def _converted(key: SigningKey) -> tuple[bytes, rsa.RSAPrivateKey | None]:
    """Cached: loading checks an RSA key, which costs a few milliseconds."""
    try:
        loaded = serialization.load_pem_private_key(key.private_key, password=None)
    except (ValueError, TypeError) as e:
        raise KeyLoadError(key.domain, key.selector, f"not a PEM private key ({e})") from None
    except Exception as e:  # cryptography raises its own UnsupportedAlgorithm, too
        raise KeyLoadError(key.domain, key.selector, f"cannot load ({e})") from None
    if key.key_type is KeyType.RSA:
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise KeyLoadError(key.domain, key.selector, "not an RSA key")
        if not RSA_MIN_BITS <= loaded.key_size <= RSA_MAX_BITS:
            raise KeyLoadError(key.domain, key.selector,
                               f"RSA key of {loaded.key_size} bits (allowed "
                               f"{RSA_MIN_BITS}..{RSA_MAX_BITS})")
        return loaded.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()), loaded
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise KeyLoadError(key.domain, key.selector, "not an Ed25519 key")
    seed = loaded.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    return base64.b64encode(seed), None


def line_end(message: bytes) -> bytes:
    """The message's line end: CRLF when its first line ends so (or it has no line end)."""
    i = message.find(b"\n")
    return b"\n" if i >= 0 and message[i - 1:i] != b"\r" else b"\r\n"


class _Signer(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkimpy's signer, plus x= (its sign() has no expiry parameter)."""

    expire: int | None = None

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> Any:
        if self.expire is not None:
            at = [i for i, (tag, _) in enumerate(fields) if tag == b"t"][0]
            x = int(fields[at][1]) + self.expire
            fields.insert(at + 1, (b"x", str(x).encode("ascii")))
        return super().gen_header(fields, *args, **kwargs)


def sign(message: bytes, keys: Sequence[SigningKey],
         policy: SigningPolicy = SigningPolicy()) -> bytes:
    """The DKIM-Signature fields for ``message``, one per key in ``keys`` order.

    Prepend the result to the message as it is (same line ends).  Raises
    :class:`KeyLoadError` for a key that does not load, :class:`MessageError` for a
    message that cannot be signed; nothing is returned unless every key signed.
    """
    eol = line_end(message)
    try:
        signer = _Signer(message, linesep=eol)
    except (dkim.DKIMException, IndexError, ValueError) as e:
        raise MessageError(f"header section cannot be parsed: {e}") from None
    present = [name.decode("ascii", "replace") for name, _ in signer.headers]
    if "from" not in {name.lower() for name in present}:
        raise MessageError("no From: header field")
    include = header_list(present, policy)
    signer.expire = policy.expire
    canon = (policy.header_canon.value.encode(), policy.body_canon.value.encode())
    out = []
    for key in keys:
        privkey = _dkimpy_key(key)
        try:
            field = signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                                privkey, signature_algorithm=_ALGORITHM[key.key_type],
                                canonicalize=canon, include_headers=list(include))
        except (dkim.KeyFormatError, UnicodeEncodeError) as e:
            raise KeyLoadError(key.domain, key.selector, str(e)) from None
        except dkim.DKIMException as e:
            raise MessageError(str(e)) from None
        out.append(bytes(field))
    return b"".join(out)


def signing_domain(from_domain: str, available: Iterable[str]) -> str | None:
    """The domain that signs mail from ``from_domain``: itself, or its closest parent
    that has a key (among ``available``, lowercased A-labels); None when none has.

    The From: domain is compared as a lowercased A-label (a U-label is converted); a
    parent is tried only while it has two labels or more, so a key for a top-level name
    never signs for the domains below it.
    """
    try:
        name = from_domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    have = {d.lower().rstrip(".") for d in available}
    if not name:
        return None
    if name in have:
        return name
    labels = name.split(".")
    for i in range(1, len(labels) - 1):
        parent = ".".join(labels[i:])
        if parent in have:
            return parent
    return None
