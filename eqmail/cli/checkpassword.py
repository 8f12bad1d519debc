"""``eqmail-checkpassword``: a checkpassword program (DJB's interface) over a password file.

Checking (what qmail-smtpd's AUTH runs)::

    eqmail-checkpassword [--file FILE] [PROGRAM [ARG ...]]

reads ``user\\0password\\0challenge\\0`` from fd 3 (at most 16 KiB).  Right password:
exit 0, or with a PROGRAM set ``USER`` and exec it (as DJB's checkpassword does; a
program that cannot be run gives 111).  Wrong password or unknown user: exit 1.  No
readable password file or unreadable fd 3: 111 (temporary trouble).  Input without the
three fields: 2.  The password file is ``--file``, else ``$EQMAIL_PASSWORDS``, else
``/etc/eqmail/passwords``.

Managing users::

    eqmail-checkpassword passwd add|set USER [--file FILE] [--cram] [--owner NAME]
    eqmail-checkpassword passwd del USER [--file FILE]
    eqmail-checkpassword passwd list [--file FILE]

The password comes from standard input (first line) or, on a terminal, is asked twice.
A new file is made 0600 and owned by ``--owner`` (default ``eqmailp``, the user the
plugin sandbox runs checkpassword as, when it exists); a rewrite keeps owner and mode.

File format, one user a line (``#`` comments)::

    user:$argon2id$v=19$m=19456,t=2,p=1$salt$hash[:{CRAM-MD5}64-hex-digits]

Passwords are hashed with Argon2id (argon2-cffi; OWASP's m=19 MiB, t=2, p=1: about
25 ms and 19 MiB per check, so a burst of concurrent AUTHs cannot exhaust memory).  An
empty, ``!`` or ``*`` hash disables the user.  CRAM-MD5 cannot be checked against a
one-way hash: with ``--cram`` the line also keeps the HMAC-MD5 inner and outer states
of the password (the same data as Dovecot's CRAM-MD5 scheme).  That value does not
reveal the password, but it is password-equivalent *for CRAM-MD5*: whoever can read
the file can log in with CRAM-MD5 as that user.  Without it CRAM-MD5 fails cleanly (1).

``--help`` and ``--version`` (first, or after ``--file FILE``) print to standard output
and exit 0; in that place they are never taken for the program to run.

Start-up cost matters (one process per AUTH): only os, sys and hmac are imported for a
check; argon2 is imported when a hash is verified.  An unknown user still costs one
Argon2 verification, so the reply time does not tell which users exist.
"""

from __future__ import annotations

import math
import os
import sys

DEFAULT_FILE = "/etc/eqmail/passwords"
MAX_INPUT = 16 * 1024
MAX_FILE = 64 * 1024 * 1024
CRAM_PREFIX = "{CRAM-MD5}"
ARGON2 = {"time_cost": 2, "memory_cost": 19456, "parallelism": 1, "hash_len": 32}
# A hash of a random password with the same parameters, verified for unknown users.
_DUMMY = (b"$argon2id$v=19$m=19456,t=2,p=1$+txRI76R4a2LdsgBpTtbZA$"
          b"0vOS0oGh9ecx6QMnJKanBSAvNhmRT7BmWZIXKZHH2bM")


# ------------------------------------------------------------------ the password file


def password_file(explicit: str | None = None) -> str:
    return explicit or os.environ.get("EQMAIL_PASSWORDS") or DEFAULT_FILE


def parse_line(line: str) -> tuple[str, str, str] | None:
    """(user, hash, cram) of one line, or None for a blank or comment line."""
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    user, _, rest = line.partition(":")
    hashed, _, cram = rest.partition(":")
    return user, hashed, cram


def lookup(text: str, user: str) -> tuple[str, str] | None:
    for line in text.splitlines():
        entry = parse_line(line)
        if entry is not None and entry[0] == user:
            return entry[1], entry[2]
    return None


# ------------------------------------------------------------------ verification


def verify_password(hashed: str, password: bytes) -> bool:
    if not hashed.startswith("$argon2"):
        return False  # empty, "!", "*" or an unknown scheme: never matches
    from argon2.exceptions import VerificationError, VerifyMismatchError
    from argon2.low_level import Type, verify_secret

    try:
        return verify_secret(hashed.encode("ascii"), password, Type.ID)
    except (VerifyMismatchError, VerificationError, ValueError):
        return False


def _burn_time(password: bytes) -> None:
    """Spend what a real verification costs (unknown user, disabled account)."""
    verify_password(_DUMMY.decode(), password)


def verify_cram(stored: str, challenge: bytes, response: bytes) -> bool:
    """``response`` is the hex HMAC-MD5 of ``challenge`` the client sent."""
    import hmac

    if not stored.startswith(CRAM_PREFIX):
        return False
    try:
        states = bytes.fromhex(stored[len(CRAM_PREFIX):])
    except ValueError:
        return False
    if len(states) != 32:
        return False
    expected = cram_digest(states, challenge).hex().encode()
    return hmac.compare_digest(expected, response.strip().lower())


def check(text: str, user: bytes, password: bytes, challenge: bytes) -> bool:
    entry = lookup(text, user.decode("utf-8", "surrogateescape"))
    if challenge:  # CRAM-MD5: "password" is the client's digest
        return entry is not None and verify_cram(entry[1], challenge, password)
    if entry is None or not entry[0].startswith("$argon2"):
        _burn_time(password)
        return False
    return verify_password(entry[0], password)


# ------------------------------------------------------------------ HMAC-MD5 states
# CRAM-MD5 needs HMAC-MD5 keyed with the password.  Storing the two MD5 states after
# the key blocks (key ^ ipad, key ^ opad) instead of the key lets the check resume
# from them; hashlib cannot resume from a state, hence this small MD5.

_MASK = 0xFFFFFFFF
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]
_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def _compress(state: tuple[int, ...], block: bytes) -> tuple[int, ...]:
    m = [int.from_bytes(block[i:i + 4], "little") for i in range(0, 64, 4)]
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _K[i] + m[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _SHIFTS[i]) | (f >> (32 - _SHIFTS[i])))) & _MASK
    return tuple((x + y) & _MASK for x, y in zip(state, (a, b, c, d), strict=True))


def _md5_resume(state: tuple[int, ...], done: int, data: bytes) -> bytes:
    """MD5 of (``done`` bytes already compressed into ``state``) + ``data``."""
    total = done + len(data)
    data += b"\x80" + b"\0" * ((55 - total) % 64) + (total * 8).to_bytes(8, "little")
    for i in range(0, len(data), 64):
        state = _compress(state, data[i:i + 64])
    return b"".join(x.to_bytes(4, "little") for x in state)


def cram_states(password: bytes) -> bytes:
    """The inner and outer HMAC-MD5 states for ``password`` (32 bytes)."""
    import hashlib

    if len(password) > 64:
        password = hashlib.md5(password).digest()
    key = password.ljust(64, b"\0")
    inner = _compress(_IV, bytes(k ^ 0x36 for k in key))
    outer = _compress(_IV, bytes(k ^ 0x5C for k in key))
    return b"".join(x.to_bytes(4, "little") for x in inner + outer)


def cram_digest(states: bytes, challenge: bytes) -> bytes:
    words = [int.from_bytes(states[i:i + 4], "little") for i in range(0, 32, 4)]
    inner = _md5_resume(tuple(words[:4]), 64, challenge)
    return _md5_resume(tuple(words[4:]), 64, inner)


# ------------------------------------------------------------------ checkpassword


def _read_fd3() -> bytes | None:
    chunks, size = [], 0
    try:
        while size <= MAX_INPUT:
            chunk = os.read(3, MAX_INPUT + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        os.close(3)
    except OSError:
        return None
    return b"".join(chunks)


def checkpassword(argv: list[str]) -> int:
    explicit = None
    if len(argv) >= 2 and argv[0] == "--file":
        explicit, argv = argv[1], argv[2:]
    elif argv and argv[0].startswith("--file="):
        explicit, argv = argv[0][len("--file="):], argv[1:]
    data = _read_fd3()
    if data is None:
        return 111
    fields = data.split(b"\0")
    if len(data) > MAX_INPUT or len(fields) < 4 or not fields[0]:
        return 2
    user, password, challenge = fields[0], fields[1], fields[2]
    try:
        with open(password_file(explicit), encoding="utf-8", errors="surrogateescape") as f:
            text = f.read(MAX_FILE)
    except OSError:
        return 111
    if not check(text, user, password, challenge):
        return 1
    if not argv:
        return 0
    os.environ["USER"] = user.decode("utf-8", "surrogateescape")
    try:
        os.execvp(argv[0], argv)
    except OSError:
        return 111
    return 111  # pragma: no cover - execvp does not return


# ------------------------------------------------------------------ passwd


def hash_password(password: bytes) -> str:
    from argon2.low_level import Type, hash_secret

    return hash_secret(password, os.urandom(16), type=Type.ID, **ARGON2).decode("ascii")


def valid_user(user: str) -> bool:
    return bool(user) and len(user) <= 255 and not any(
        c in user for c in ":\0\n\r") and not user.startswith("#") and user.strip() == user


def update_text(text: str, user: str, entry: str | None) -> tuple[str, bool]:
    """Replace (or with None delete) ``user``'s line; append when absent.  Returns the
    new text and whether the user existed."""
    out, found = [], False
    for line in text.splitlines():
        parsed = parse_line(line)
        if parsed is not None and parsed[0] == user:
            found = True
            if entry is not None:
                out.append(entry)
            continue
        out.append(line)
    if not found and entry is not None:
        out.append(entry)
    return "".join(ln + "\n" for ln in out), found


def _read_new_password() -> bytes:
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != first:
            raise SystemExit("eqmail-checkpassword: the passwords differ")
        password = first.encode()
    else:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    if not password or b"\0" in password:
        raise SystemExit("eqmail-checkpassword: empty password (or one with NUL) refused")
    return password


def _default_owner(name: str | None) -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(name or "eqmailp")
    except KeyError:
        if name:
            raise SystemExit(f"eqmail-checkpassword: no user {name!r}") from None
        return None
    return pw.pw_uid, pw.pw_gid


def _write_file(path: str, text: str, owner: tuple[int, int] | None) -> None:
    """Atomic replace keeping an existing file's owner and mode (new: 0600)."""
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode = 0o600
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.write(fd, text.encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def passwd_main(argv: list[str]) -> int:
    import argparse
    import fcntl

    p = argparse.ArgumentParser(prog="eqmail-checkpassword passwd",
                                description="add, change, delete or list users")
    p.add_argument("action", choices=["add", "set", "del", "list"])
    p.add_argument("user", nargs="?")
    p.add_argument("--file", help=f"password file (default $EQMAIL_PASSWORDS or {DEFAULT_FILE})")
    p.add_argument("--cram", action="store_true", help="also allow CRAM-MD5 (see --help text)")
    p.add_argument("--owner", help="owner of a new file (default: eqmailp when root)")
    from eqmail import __version__

    p.add_argument("--version", action="version", version=f"eqmail-checkpassword (eqmail) {__version__}")
    args = p.parse_args(argv)
    path = password_file(args.file)
    if args.action != "list" and not (args.user and valid_user(args.user)):
        print("eqmail-checkpassword: a user name without ':' and control characters is needed",
              file=sys.stderr)
        return 2
    if args.action == "list":
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                entries = [parse_line(ln) for ln in f.read(MAX_FILE).splitlines()]
        except FileNotFoundError:
            entries = []
        for e in entries:
            if e is not None:
                print(f"{e[0]}{'  (cram-md5)' if e[2] else ''}")
        return 0
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600) if os.path.isdir(
        os.path.dirname(path) or ".") else None
    if lock_fd is not None:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # two admins at once must not lose an update
    try:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read(MAX_FILE)
        except FileNotFoundError:
            text = ""
        exists = lookup(text, args.user) is not None
        if args.action == "add" and exists:
            print(f"eqmail-checkpassword: {args.user} exists (use 'set')", file=sys.stderr)
            return 1
        if args.action in ("set", "del") and not exists:
            print(f"eqmail-checkpassword: no user {args.user}", file=sys.stderr)
            return 1
        entry = None
        if args.action != "del":
            password = _read_new_password()
            entry = f"{args.user}:{hash_password(password)}"
            if args.cram:
                entry += f":{CRAM_PREFIX}{cram_states(password).hex()}"
        new_text, _ = update_text(text, args.user, entry)
        _write_file(path, new_text, _default_owner(args.owner))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    verb = {"add": "added", "set": "changed", "del": "deleted"}[args.action]
    print(f"{verb} {args.user} in {path}")
    return 0


HELP = f"""usage: eqmail-checkpassword [--file FILE] [PROGRAM [ARG ...]]
       eqmail-checkpassword passwd add|set|del|list [USER] [--file FILE] [--cram] [--owner NAME]
       eqmail-checkpassword --help | --version

A checkpassword program (DJB's interface) over an Argon2id password file: reads
user\\0password\\0challenge\\0 from fd 3; on success exits 0 or, with PROGRAM, sets USER
and runs it.  Exit 1 wrong password or unknown user, 2 malformed input, 111 temporary
trouble.  The file is --file, else $EQMAIL_PASSWORDS, else {DEFAULT_FILE}.

  --file FILE  the password file
  passwd       add, change, delete or list users ('passwd --help')
  --help       show this help and exit (before PROGRAM: never run as a program)
  --version    show the version and exit

See eqmail-checkpassword(8).
"""


def _own_option(args: list[str]) -> str | None:
    """--help / --version where PROGRAM would be (first, or after --file FILE): they are
    this program's options, never a program to run."""
    if len(args) >= 2 and args[0] == "--file":
        args = args[2:]
    elif args and args[0].startswith("--file="):
        args = args[1:]
    return args[0] if args and args[0] in ("--help", "--version") else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "passwd":
        return passwd_main(args[1:])
    own = _own_option(args)
    if own == "--help":
        sys.stdout.write(HELP)
        return 0
    if own == "--version":
        from eqmail import __version__

        sys.stdout.write(f"eqmail-checkpassword (eqmail) {__version__}\n")
        return 0
    return checkpassword(args)


if __name__ == "__main__":
    sys.exit(main())
