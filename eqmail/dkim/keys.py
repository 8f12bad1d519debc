"""DKIM keys: names, generation, the key store, the DNS record and its check.

Owns: the key store ``control/dkim/<domain>/<selector>.key`` (PEM PKCS#8 private keys),
the validation of the two names a path is built from, key generation (RSA 1024..4096
bits, Ed25519 per RFC 8463, with ``cryptography``), the public key record
(``v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`` / ``k=ed25519; p=<base64 of the 32
raw bytes>``), its zone-file line, the parsing of a published record (RFC 6376 §3.6.1)
and whether it matches a key.

Privilege: none of its own; the caller (``eqmailctl dkim``, as root on a privileged
instance) passes the :class:`Owners` the files get.  Files: a key is written atomically
(temporary file in the same directory, fsync, chmod/chown, link or rename, fsync of the
directory), mode 0400 owner = the remote delivery user, group root; the directories are
0750, owner root, group = the remote delivery user's group.  No sockets, no processes:
the DNS lookup lives in :mod:`eqmail.dkim.dns`.

Errors: :class:`DkimError` (a bad name, a key file that cannot be read, parsed or
written, an existing key without ``force``).  Record checking never raises: it returns a
:class:`Match`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import idna
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

RSA_MIN_BITS, RSA_MAX_BITS, RSA_DEFAULT_BITS = 1024, 4096, 2048
KEY_MODE, DIR_MODE = 0o400, 0o750
KEY_SUFFIX = ".key"
MAX_KEY_FILE = 64 * 1024          # a PEM key of 4096 bits is ~3.3 kB
MAX_TXT_STRING = 255              # one <character-string> of a TXT record
SELECTOR_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class DkimError(Exception):
    """A bad domain or selector, or a key file that cannot be read, parsed or written."""


class KeyType(enum.StrEnum):
    RSA = "rsa"
    ED25519 = "ed25519"


@dataclass(frozen=True)
class Owners:
    """Who owns the store: the key file (uid, gid) and the directories (uid, gid)."""

    key_uid: int
    key_gid: int
    dir_uid: int
    dir_gid: int


@dataclass(frozen=True)
class Match:
    """Whether a published record matches a key; ``reason`` says why not."""

    ok: bool
    reason: str = ""


# ---- names ----------------------------------------------------------------------------


def normalize_domain(text: str) -> str:
    """A domain as the store names it: lowercase A-labels, no final dot.  DkimError for
    anything that is not a host name (empty labels, ``..``, ``/``, over 253 bytes)."""
    name = text.strip().rstrip(".")
    if not name:
        raise DkimError("empty domain name")
    try:
        ascii_name = name if name.isascii() else idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise DkimError(f"bad domain name {text!r}: {e}") from None
    ascii_name = ascii_name.lower()
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_LABEL_RE.fullmatch(lb) for lb in labels):
        raise DkimError(f"bad domain name {text!r}: want a host name such as example.com")
    return ascii_name


def check_selector(text: str) -> str:
    """A selector as the store names it: ``[a-z0-9][a-z0-9-]{0,62}`` (DkimError if not)."""
    if not SELECTOR_RE.fullmatch(text):
        raise DkimError(f"bad selector {text!r}: want 1-63 of a-z, 0-9 and '-', "
                        "starting with a letter or digit")
    return text


def domain_dir(control: Path, domain: str) -> Path:
    return control / "dkim" / normalize_domain(domain)


def key_path(control: Path, domain: str, selector: str) -> Path:
    return domain_dir(control, domain) / (check_selector(selector) + KEY_SUFFIX)


def record_name(domain: str, selector: str) -> str:
    """Where the record is published: ``SEL._domainkey.DOMAIN`` (no final dot)."""
    return f"{check_selector(selector)}._domainkey.{normalize_domain(domain)}"


# ---- keys -----------------------------------------------------------------------------


def generate(ktype: KeyType, bits: int = RSA_DEFAULT_BITS) -> PrivateKey:
    """A new private key (``bits`` only for RSA, 1024..4096)."""
    if ktype is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise DkimError(f"RSA key size {bits}: want {RSA_MIN_BITS}..{RSA_MAX_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_type(key: PrivateKey) -> KeyType:
    return KeyType.ED25519 if isinstance(key, ed25519.Ed25519PrivateKey) else KeyType.RSA


def pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def parse_key(data: bytes, where: str) -> PrivateKey:
    """A PEM private key of a supported type (DkimError naming ``where`` if not)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise DkimError(f"{where}: not a PEM private key: {e}") from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm and the like
        raise DkimError(f"{where}: not a usable private key: {e}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise DkimError(f"{where}: RSA key of {key.key_size} bits: want "
                            f"{RSA_MIN_BITS}..{RSA_MAX_BITS}")
        return key
    raise DkimError(f"{where}: a {type(key).__name__}: DKIM keys are RSA or Ed25519")


def load_key(path: Path) -> PrivateKey:
    """Read and parse one key file (DkimError naming the file)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise DkimError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise DkimError(f"{path}: over {MAX_KEY_FILE} bytes: not a key")
    return parse_key(data, str(path))


def public_value(key: PrivateKey) -> bytes:
    """The bytes p= carries: SubjectPublicKeyInfo DER (RSA), the raw 32 bytes (Ed25519)."""
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def record_text(key: PrivateKey) -> str:
    """The TXT record to publish: ``v=DKIM1; k=rsa|ed25519; p=...``."""
    p = base64.b64encode(public_value(key)).decode("ascii")
    return f"v=DKIM1; k={key_type(key)}; p={p}"


def split_txt(value: str) -> list[str]:
    """The value cut into TXT strings of at most 255 bytes (the record is ASCII)."""
    data = value.encode("ascii")
    return [data[i:i + MAX_TXT_STRING].decode("ascii")
            for i in range(0, len(data), MAX_TXT_STRING)] or [""]


def zone_line(domain: str, selector: str, value: str) -> str:
    """``SEL._domainkey.DOMAIN. IN TXT "..." "..."`` — one line, as zone files write it."""
    strings = " ".join(f'"{s}"' for s in split_txt(value))
    return f"{record_name(domain, selector)}. IN TXT {strings}"


# ---- the store ------------------------------------------------------------------------


def _ensure_dir(path: Path, owners: Owners | None) -> None:
    try:
        path.mkdir(mode=DIR_MODE, exist_ok=True)
    except OSError as e:
        raise DkimError(f"{path}: cannot create: {e.strerror}") from None
    if not path.is_dir() or path.is_symlink():
        raise DkimError(f"{path}: not a directory")
    try:
        os.chmod(path, DIR_MODE)
        if owners is not None:
            os.chown(path, owners.dir_uid, owners.dir_gid)
    except OSError as e:
        raise DkimError(f"{path}: cannot set owner and mode: {e.strerror}") from None


def write_key(control: Path, domain: str, selector: str, key: PrivateKey,
              owners: Owners | None, force: bool = False) -> Path:
    """Store ``key`` as control/dkim/DOMAIN/SEL.key, atomically.  An existing key is kept
    (DkimError) unless ``force``.  ``owners`` None: the invoking user keeps the files."""
    path = key_path(control, domain, selector)
    _ensure_dir(path.parent.parent, owners)
    _ensure_dir(path.parent, owners)
    if path.exists() and not force:
        raise DkimError(f"{path} exists: keep it, or replace it with --force")
    try:
        _store(path, pem(key), owners, force)
    except OSError as e:
        raise DkimError(f"{path}: cannot write: {e.strerror}") from None
    return path


def _store(path: Path, data: bytes, owners: Owners | None, force: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=KEY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), KEY_MODE)
            if owners is not None:
                os.fchown(f.fileno(), owners.key_uid, owners.key_gid)
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # never replaces: a key made meanwhile is kept
            except FileExistsError:
                raise DkimError(f"{path} exists: keep it, or replace it with --force") from None
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def selectors(control: Path, domain: str) -> list[str]:
    """The selectors with a key file for ``domain``, sorted (none: empty list)."""
    try:
        names = os.listdir(domain_dir(control, domain))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise DkimError(f"{domain_dir(control, domain)}: cannot list: {e.strerror}") from None
    return sorted(n[:-len(KEY_SUFFIX)] for n in names
                  if n.endswith(KEY_SUFFIX) and SELECTOR_RE.fullmatch(n[:-len(KEY_SUFFIX)]))


def key_files(control: Path) -> list[Path]:
    """Every control/dkim/DOMAIN/SEL.key whose names are valid, sorted."""
    base = control / "dkim"
    try:
        domains = sorted(os.listdir(base))
    except OSError:
        return []
    out = []
    for d in domains:
        try:
            if normalize_domain(d) != d:
                continue
        except DkimError:
            continue
        out += [base / d / (sel + KEY_SUFFIX) for sel in selectors(control, d)]
    return out


def file_problems(path: Path, uid: int, gid: int | None) -> list[str]:
    """What is wrong with a stored key: owner, mode, readability, parsing (empty: fine).
    ``gid`` None: the group is not checked."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return [f"cannot stat: {e.strerror}"]
    if not stat.S_ISREG(st.st_mode):
        return ["not a regular file"]
    out = []
    if st.st_uid != uid or (gid is not None and st.st_gid != gid):
        want = f"{uid}:{gid}" if gid is not None else f"uid {uid}"
        out.append(f"owner {st.st_uid}:{st.st_gid}, want {want}")
    if stat.S_IMODE(st.st_mode) != KEY_MODE:
        out.append(f"mode {stat.S_IMODE(st.st_mode):04o}, want {KEY_MODE:04o}")
    try:
        load_key(path)
    except DkimError as e:
        out.append(str(e).removeprefix(f"{path}: "))
    return out


def _may(st: os.stat_result, uid: int, gids: frozenset[int], bits: tuple[int, int, int]) -> bool:
    """Unix permission check (no ACLs): the owner's bits for the owner, the group's for
    a member of the group, the others' for everyone else."""
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in gids:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def unreadable_by(path: Path, uid: int, gids: frozenset[int]) -> str | None:
    """Why the user ``uid`` (in groups ``gids``) cannot read ``path`` — a directory
    above it it may not search, or the file it may not read — or None when it can
    (root always can).  This is what the remote delivery worker meets when it signs."""
    if uid == 0:
        return None
    full = Path(os.path.abspath(path))
    search = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    for d in reversed(full.parents):
        try:
            st = os.stat(d)
        except OSError as e:
            return f"{d}: {e.strerror}"
        if not _may(st, uid, gids, search):
            return f"no search permission on {d}"
    try:
        st = os.stat(full)
    except OSError as e:
        return e.strerror
    if not _may(st, uid, gids, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
        return f"no read permission (owner {st.st_uid}:{st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o})"
    return None


# ---- published records ----------------------------------------------------------------


def parse_record(data: bytes) -> dict[str, str]:
    """A key record's tags (RFC 6376 §3.2, §3.6.1): ``tag=value`` separated by ``;``,
    whitespace around both ignored, whitespace inside a value kept (p= drops it later).
    DkimError for a record that is no tag list: not ASCII, a tag without ``=``, a bad
    tag name, a tag given twice."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise DkimError("the record is not ASCII") from None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue  # a trailing ';' (and empty specs) are allowed
        name, eq, value = part.partition("=")
        name = name.strip(" \t\r\n")
        if not eq or not _TAG_RE.fullmatch(name):
            raise DkimError(f"not a tag=value list near {part.strip()[:40]!r}")
        if name in tags:
            raise DkimError(f"tag {name}= given twice")
        tags[name] = value.strip(" \t\r\n")
    return tags


def _decode_p(value: str) -> bytes:
    compact = re.sub(r"[ \t\r\n]", "", value)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise DkimError("p= is not valid base64") from None


def match(data: bytes, key: PrivateKey) -> Match:
    """Whether the published record ``data`` (one TXT record, strings joined) is ``key``'s
    record: v=DKIM1 if given (and first), k= the key's type (default rsa), h= allowing
    sha256, s= allowing email, p= the key's public key.  An empty p= is a revoked key."""
    try:
        tags = parse_record(data)
    except DkimError as e:
        return Match(False, f"not a DKIM key record: {e}")
    if "v" in tags and (tags["v"] != "DKIM1" or next(iter(tags)) != "v"):
        return Match(False, f"v={tags['v'][:40]} is not DKIM1 as the first tag")
    want = key_type(key).value
    k = tags.get("k", "rsa")
    if k != want:
        return Match(False, f"k={k[:40]}, the key is {want}")
    if "h" in tags and "sha256" not in [h.strip() for h in tags["h"].split(":")]:
        return Match(False, f"h={tags['h'][:40]} does not allow sha256")
    if "s" in tags and not {"email", "*"} & {s.strip() for s in tags["s"].split(":")}:
        return Match(False, f"s={tags['s'][:40]} does not allow email")
    if "p" not in tags:
        return Match(False, "no p= tag")
    if not tags["p"].strip():
        return Match(False, "p= is empty: the key is revoked")
    try:
        published = _decode_p(tags["p"])
    except DkimError as e:
        return Match(False, str(e))
    if published != public_value(key):
        return Match(False, "p= is a different public key")
    return Match(True)
