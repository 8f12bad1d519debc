"""DKIM verification (RFC 6376, RFC 8463, RFC 8301): one result per DKIM-Signature of a
message, in the terms of Authentication-Results (RFC 8601 §2.7.1), made by dkimpy.

Owns: the mapping of everything that can go wrong with a signature, its key record or
the DNS to a result, and the bounds of the work.  No canonicalisation or crypto is
written here: dkimpy parses, canonicalises and hashes; ``cryptography`` (OpenSSL)
parses a key record's public key to check its size before dkimpy uses it, and checks
RSA signatures for dkimpy (see "dkimpy's key parsing and RSA check" below: parsed keys
are kept per record bytes, at most :data:`KEY_CACHE`).

Privilege: none; no file, no socket, no process.  DNS is the :data:`TxtLookup` handed
in (it bounds each lookup with its own timeout and raises ``DnsTempError`` /
``DnsPermError``).

Input: the message (LF or CRLF line ends).  Output: :func:`verify` returns a list of
:class:`DkimResult`, one per DKIM-Signature field in the order they appear (a message
without one gets a single ``none``).  It never raises for anything in the message or
the DNS; the results:

- ``pass``: the signature verifies.  With an l= tag it still passes, but ``reason``
  says so and ``unsigned_body`` counts the canonical body bytes after the l= limit:
  that content is not covered by the signature and must be treated as unsigned (a
  caller may e.g. refuse to show it as authenticated).  An l= larger than the body is
  a ``permerror`` (RFC 6376 §3.5).
- ``fail``: the signature or the body hash does not match (the message was changed).
- ``permerror``: the signature cannot ever verify: a malformed DKIM-Signature (tag
  syntax, a tag given twice, a missing or bad tag, h= without From), rsa-sha1 (RFC 8301
  §3.1), no key record (NXDOMAIN, no TXT), several key records, a record that is not a
  DKIM key or is revoked (empty p=), a record longer than :data:`MAX_KEY_RECORD`, an RSA
  key shorter than 1024 bits (RFC 8301 §3.2) or longer than :data:`RSA_MAX_BITS`, a key
  type that does not match a=, or anything dkimpy cannot process.
- ``temperror``: the key lookup failed for now (the lookup raised DnsTempError: its own
  timeout or SERVFAIL), or the time budget was used up before this signature's turn.
- ``policy``: not evaluated because the message has more than ``max_signatures``
  signatures (RFC 8601: "some aspect of the signature was not acceptable").
- ``none``: the message has no DKIM-Signature.

Bounds: at most ``max_signatures`` signatures are verified (each costs one DNS lookup
and one pass over the body); the ``deadline`` (a ``time.monotonic()`` value, so one
budget can span all the messages of a session) is checked before each signature, so
the total time is the budget plus at most one signature's work (one bounded lookup plus
hashing the body).  A signature repeated byte for byte gets the first copy's result
without a second lookup.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from eqmail.dkim.dns import DnsPermError, DnsTempError, TxtLookup

MAX_SIGNATURES = 5              # OpenDKIM's MaximumSignaturesToVerify is 3
DEFAULT_BUDGET = 15.0           # seconds for one message when no deadline is given
MAX_KEY_RECORD = 4096           # bytes; an RSA-8192 record is about 1,400
RSA_MIN_BITS, RSA_MAX_BITS = 1024, 8192
KEY_CACHE = 1024                # parsed key records kept (keyed on the record's bytes)
_REASON_MAX = 120


class Result(enum.StrEnum):
    """The dkim= result values of RFC 8601 §2.7.1."""

    PASS = "pass"
    FAIL = "fail"
    NEUTRAL = "neutral"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    POLICY = "policy"
    NONE = "none"


@dataclass(frozen=True)
class DkimResult:
    """One signature's outcome and the properties Authentication-Results reports:
    header.d (``domain``), header.s (``selector``), header.a (``algorithm``) and
    header.b (``b``: the first 8 characters of b=, RFC 6008).  Empty where the signature
    did not say (or could not be parsed).  ``body_length`` is the l= value, if any."""

    result: Result
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""
    b: str = ""
    body_length: int | None = None
    unsigned_body: int = 0


class _Outcome(Exception):
    """Raised inside dkimpy's key lookup to end one signature's check with a result."""

    def __init__(self, result: Result, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _short(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= _REASON_MAX else text[:_REASON_MAX - 3] + "..."


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace")


def _unfolded(value: bytes | None) -> str:
    return _text(value.replace(b"\r", b"").replace(b"\n", b"") if value else value)


def _tags(value: bytes) -> dict[bytes, bytes] | str:
    """The signature's tags, or why they cannot be parsed: dkimpy's own parse of the
    field's value as it stands (DKIM.verify's), so that the same dict serves
    :func:`_one`'s checks and dkimpy's verification (values keep any folding inside
    them; :class:`_Ident` unfolds what it reports)."""
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList as e:
        detail = e.args[0] if e.args else b""
        if isinstance(detail, bytes):
            detail = _text(detail)
        return f"malformed DKIM-Signature ({type(e).__name__}: {detail})"
    return tags


def _check_key(record: bytes, algorithm: bytes) -> None:
    """Raise :class:`_Outcome` unless ``record`` holds a usable key for ``algorithm``.
    The verdict is kept per (record bytes, a=): a changed record is judged afresh."""
    if len(record) > MAX_KEY_RECORD:
        raise _Outcome(Result.PERMERROR, f"key record of {len(record)} bytes "
                                         f"(limit {MAX_KEY_RECORD})")
    problem = _key_problem(record, algorithm)
    if problem is not None:
        raise _Outcome(*problem)


@functools.lru_cache(maxsize=KEY_CACHE)
def _key_problem(record: bytes, algorithm: bytes) -> tuple[Result, str] | None:
    try:
        _judge_key(record, algorithm)
    except _Outcome as o:
        return o.result, o.reason
    return None


def _judge_key(record: bytes, algorithm: bytes) -> None:
    try:
        tags = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList:
        raise _Outcome(Result.PERMERROR, "key record syntax error") from None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise _Outcome(Result.PERMERROR, "key record v= is not DKIM1")
    ktype = tags.get(b"k", b"rsa")
    if b"p" not in tags:
        raise _Outcome(Result.PERMERROR, "key record has no p=")
    p = re.sub(rb"\s+", b"", tags[b"p"])
    if not p:
        raise _Outcome(Result.PERMERROR, "key revoked (empty p=)")
    try:
        der = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        raise _Outcome(Result.PERMERROR, "key record p= is not base64") from None
    if not algorithm.startswith(ktype + b"-"):
        raise _Outcome(Result.PERMERROR, f"key type k={_text(ktype)} does not match "
                                         f"a={_text(algorithm)}")
    if ktype == b"ed25519":
        if len(der) != 32:
            raise _Outcome(Result.PERMERROR, "Ed25519 key is not 32 bytes")
        return
    if ktype != b"rsa":
        raise _Outcome(Result.PERMERROR, f"unknown key type k={_text(ktype)}")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise _Outcome(Result.PERMERROR, "key record p= is not an RSA public key") from None
    except Exception:  # cryptography's UnsupportedAlgorithm and kin: a key we cannot use
        raise _Outcome(Result.PERMERROR, "key record p= is not an RSA public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise _Outcome(Result.PERMERROR, "key record p= is not an RSA public key")
    if key.key_size < RSA_MIN_BITS:
        raise _Outcome(Result.PERMERROR, f"RSA key of {key.key_size} bits "
                                         f"(RFC 8301: at least {RSA_MIN_BITS})")
    if key.key_size > RSA_MAX_BITS:
        raise _Outcome(Result.PERMERROR, f"RSA key of {key.key_size} bits "
                                         f"(limit {RSA_MAX_BITS})")


# -- dkimpy's key parsing and RSA check, made cheap ---------------------------------------
# dkimpy parses a key record's ASN.1 and checks an RSA signature in pure Python (0.3 ms
# of CPU per signature, more than everything else it does for a 5 KB message).  Both are
# module globals of dkim, which its verify_sig and verify_sig_process (DKIM and ARC
# alike) call; they are replaced once, at import, as eqmail.auth.spfcheck replaces
# pyspf's resolver:
# - evaluate_pk: the parsed record is kept per record bytes (a changed record is parsed
#   afresh; a record that does not parse is not kept, so its error is dkimpy's own);
# - RSASSA_PKCS1_v1_5_verify: the same RFC 8017 check by OpenSSL (``cryptography``),
#   the public key object kept per (modulus, exponent).  One difference, on the strict
#   side: a signature representative not below the modulus is invalid (RFC 8017
#   §5.2.2), where dkimpy reduced it first.  Signing (dkimpy's RSASSA_PKCS1_v1_5_sign)
#   is not touched.
_DKIMPY_EVALUATE_PK = dkim.evaluate_pk
_PREHASHED = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}
# RFC 8017 §9.2: EMSA-PKCS1-v1_5 needs the modulus to hold the DigestInfo + 11 bytes
_DIGEST_INFO = {"sha256": 19 + 32, "sha1": 15 + 20}


@functools.lru_cache(maxsize=KEY_CACHE)
def _parsed_pk(record: bytes) -> tuple[Any, Any, Any, Any]:
    return _DKIMPY_EVALUATE_PK(b"", record)  # type: ignore[no-any-return]


def _evaluate_pk(name: bytes, record: bytes | str) -> tuple[Any, Any, Any, Any]:
    if isinstance(record, bytes) and len(record) <= MAX_KEY_RECORD:
        try:
            return _parsed_pk(record)
        except Exception:  # dkimpy's own error, naming the record's name: ask it again
            pass
    return _DKIMPY_EVALUATE_PK(name, record)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=KEY_CACHE)
def _rsa_public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:  # e.g. an even exponent: no signature verifies
        return None


def _rsa_verify(hash_obj: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkim.crypto.RSASSA_PKCS1_v1_5_verify's contract (True/False, DigestTooLargeError
    for a modulus too short for the digest), checked by OpenSSL."""
    name = hash_obj.name.lower()
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    if (modulus.bit_length() + 7) // 8 < _DIGEST_INFO[name] + 11:
        raise dkim.crypto.DigestTooLargeError()
    key = _rsa_public_key(modulus, exponent)
    if key is None:
        return False
    try:
        key.verify(bytes(signature), hash_obj.digest(), padding.PKCS1v15(),
                   utils.Prehashed(_PREHASHED[name]))
    except InvalidSignature:
        return False
    return True


dkim.evaluate_pk = _evaluate_pk
dkim.RSASSA_PKCS1_v1_5_verify = _rsa_verify


class _KeyFetch:
    """dkimpy's dnsfunc: the record through the :data:`TxtLookup`, checked."""

    def __init__(self, lookup: TxtLookup, algorithm: bytes) -> None:
        self.lookup = lookup
        self.algorithm = algorithm

    def __call__(self, name: bytes, timeout: float = 0) -> bytes:
        try:
            qname = name.decode("ascii").rstrip(".")
        except UnicodeDecodeError:
            raise _Outcome(Result.PERMERROR, "d= or s= is not ASCII") from None
        try:
            records = self.lookup(qname)
        except DnsTempError as e:
            raise _Outcome(Result.TEMPERROR, _short(f"key lookup {qname}: {e}")) from None
        except DnsPermError:
            raise _Outcome(Result.PERMERROR, f"no key record at {qname}") from None
        if not records:
            raise _Outcome(Result.PERMERROR, f"no key record at {qname}")
        if len(records) > 1:  # RFC 6376 §3.6.2.2: "results are undefined"
            raise _Outcome(Result.PERMERROR, f"{len(records)} TXT records at {qname}")
        record = records[0]
        if not isinstance(record, bytes):
            raise _Outcome(Result.PERMERROR, "key record is not text")
        _check_key(record, self.algorithm)
        return record


@dataclass(frozen=True)
class _Ident:
    """What a signature says about itself, for its result (empty when unparseable)."""

    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""

    @classmethod
    def of(cls, tags: dict[bytes, bytes] | str) -> _Ident:
        if isinstance(tags, str):
            return cls()
        b = re.sub(rb"\s+", b"", tags.get(b"b", b""))
        return cls(_unfolded(tags.get(b"d")).lower(), _unfolded(tags.get(b"s")),
                   _unfolded(tags.get(b"a")), _text(b[:8]))

    def result(self, result: Result, reason: str = "", body_length: int | None = None,
               unsigned_body: int = 0) -> DkimResult:
        return DkimResult(result, self.domain, self.selector, self.algorithm, reason,
                          self.b, body_length, unsigned_body)


def _precheck(tags: dict[bytes, bytes], body: bytes) -> tuple[int | None, int]:
    """What dkimpy leaves to the caller: h= must name From, no rsa-sha1 (RFC 8301), and
    an l= no larger than the canonical body.  Returns (l=, unsigned body bytes).
    dkimpy's own field checks (missing tags, bad base64, i= outside d=, t= in the
    future, x= past) come first, so the reason names the first problem."""
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as e:
        raise _Outcome(Result.PERMERROR, _short(str(e))) from None
    if b"from" not in [h.strip().lower() for h in tags.get(b"h", b"").split(b":")]:
        raise _Outcome(Result.PERMERROR, "h= does not include From")
    if tags.get(b"a") == b"rsa-sha1":
        raise _Outcome(Result.PERMERROR, "rsa-sha1 is not accepted (RFC 8301)")
    if b"l" not in tags:
        return None, 0
    if re.fullmatch(rb"\d{1,76}", tags[b"l"]) is None:
        raise _Outcome(Result.PERMERROR, "l= is not a number")
    length = int(tags[b"l"])
    try:
        canon = dkim.canonicalization.CanonicalizationPolicy.from_c_value(
            tags.get(b"c", b"simple/simple"))
    except dkim.canonicalization.InvalidCanonicalizationPolicyError:
        raise _Outcome(Result.PERMERROR, "invalid c= value") from None
    size = len(canon.canonicalize_body(body))
    if length > size:
        raise _Outcome(Result.PERMERROR, f"l={length} is longer than the body ({size})")
    return length, size - length


def _one(checker: dkim.DKIM, field: tuple[bytes, bytes], tags: dict[bytes, bytes] | str,
         lookup: TxtLookup) -> DkimResult:
    """Verify the signature in header ``field`` (its ``tags`` parsed): dkimpy does the
    work, every outcome becomes a result."""
    ident = _Ident.of(tags)
    if isinstance(tags, str):
        return ident.result(Result.PERMERROR, _short(tags))
    length: int | None = None
    unsigned = 0
    try:
        length, unsigned = _precheck(tags, checker.body)
        ok = _dkimpy_verify(checker, field, tags, _KeyFetch(lookup, tags.get(b"a", b"")))
    except _Outcome as o:
        return ident.result(o.result, o.reason, length)
    except dkim.ValidationError as e:
        if str(e).startswith("body hash mismatch"):
            return ident.result(Result.FAIL, "body hash did not verify", length)
        return ident.result(Result.PERMERROR, _short(str(e)))
    except dkim.DKIMException as e:
        return ident.result(Result.PERMERROR, _short(f"{type(e).__name__}: {e}"))
    except Exception as e:  # dkimpy on hostile input (IndexError, ValueError, ...)
        return ident.result(Result.PERMERROR, f"unverifiable: {type(e).__name__}")
    if not ok:
        return ident.result(Result.FAIL, "signature did not verify", length)
    reason = f"l={length}: {unsigned} body bytes after it are not signed" if length is not None else ""
    return ident.result(Result.PASS, reason, length, unsigned)


def _dkimpy_verify(checker: dkim.DKIM, field: tuple[bytes, bytes], tags: dict[bytes, bytes],
                   dnsfunc: _KeyFetch) -> bool:
    """What ``checker.verify(idx)`` does after its own parse of the field, which
    :func:`verify` has done already (:func:`_tags`: the same parse_tag_value of the same
    bytes) and whose validate_signature_fields :func:`_precheck` has run: dkimpy's
    verify_sig on the header fields h= names.  dkimpy canonicalises every field it
    holds and picks the named ones (dkim.select_headers: by lower-case name, from the
    bottom); it is handed only the fields with those names, in their order, which
    gives it the same picks without canonicalising the rest (Received and the like)."""
    include = [x.lower() for x in re.split(rb"\s*:\s*", tags[b"h"])]
    checker.signature_fields = tags
    checker.domain, checker.selector = tags[b"d"], tags[b"s"]
    checker.include_headers = tuple(include)
    wanted = frozenset(include)
    every = checker.headers
    checker.headers = [h for h in every if h[0].lower() in wanted]
    try:
        return bool(checker.verify_sig(tags, include, field, dnsfunc))
    finally:
        checker.headers = every


def _parse(message: bytes) -> dkim.DKIM:
    """dkimpy's DKIM object for ``message``, as ``dkim.DKIM(message)`` makes it.

    dkimpy's rfc822_parse splits the whole message into lines by regex to find the
    header section, then joins the body's lines again with CRLF.  The header section
    (up to and with its empty line) is given to rfc822_parse itself; the body's line
    ends are made CRLF by two bytes.replace, which is the same (rfc822_parse splits at
    every ``\r?\n``: every split ends in LF and takes a CR before it): a third of
    dkimpy's work for a 5 KB message (bench/auth.sh).  A message without an empty line,
    or starting with one, is dkimpy's to parse as it is."""
    end = _HEADER_END.search(message)
    if end is None or message.startswith((b"\n", b"\r\n")):
        return dkim.DKIM(message, minkey=RSA_MIN_BITS)
    checker = dkim.DKIM(None, minkey=RSA_MIN_BITS)
    checker.headers, _ = dkim.rfc822_parse(message[:end.end()])
    checker.body = message[end.end():].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return checker


# the empty line that ends the header section: a LF (every line end) followed by a line
# end or the end of the message
_HEADER_END = re.compile(rb"\n(?:\r?\n|\Z)")


def _unparsed(message: bytes, why: str) -> list[DkimResult]:
    """Results for a message dkimpy cannot parse: permerror per signature field seen."""
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]
    count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", head))
    if not count:
        return [DkimResult(Result.NONE, reason="no signature")]
    return [DkimResult(Result.PERMERROR, reason=_short(f"message cannot be parsed: {why}"))
            for _ in range(count)]


def verify(message: bytes, lookup: TxtLookup, *, max_signatures: int = MAX_SIGNATURES,
           deadline: float | None = None,
           clock: Callable[[], float] = time.monotonic) -> list[DkimResult]:
    """One :class:`DkimResult` per DKIM-Signature of ``message`` (see the module doc).

    ``deadline`` is a ``clock()`` value (default: now + :data:`DEFAULT_BUDGET`); a
    signature whose turn comes at or after it is not evaluated (``temperror``).
    """
    if deadline is None:
        deadline = clock() + DEFAULT_BUDGET
    try:
        checker = _parse(message)
    except Exception as e:  # MessageFormatError, or dkimpy's IndexError on odd input
        return _unparsed(message, type(e).__name__)
    fields = [(name, value) for name, value in checker.headers
              if name.lower() == b"dkim-signature"]
    if not fields:
        return [DkimResult(Result.NONE, reason="no signature")]
    results: list[DkimResult] = []
    seen: dict[bytes, int] = {}
    evaluated = 0
    for idx, field in enumerate(fields):
        value = field[1]
        tags = _tags(value)
        if value in seen:
            first = results[seen[value]]
            results.append(DkimResult(first.result, first.domain, first.selector,
                                      first.algorithm, f"repeats signature {seen[value] + 1}",
                                      first.b, first.body_length, first.unsigned_body))
            continue
        seen[value] = idx
        if evaluated >= max_signatures:
            results.append(_Ident.of(tags).result(
                Result.POLICY, f"not evaluated: more than {max_signatures} signatures"))
            continue
        if clock() >= deadline:
            results.append(_Ident.of(tags).result(
                Result.TEMPERROR, "not evaluated: time budget used up"))
            continue
        evaluated += 1
        results.append(_one(checker, field, tags, lookup))
    return results
