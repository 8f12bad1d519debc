"""eqmail-checkpassword: the DJB interface (fd 3, exit codes, exec), the password file,
the CRAM-MD5 states and the ``passwd`` command — run as the real console script."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.cli.checkpassword import (
    CRAM_PREFIX,
    cram_digest,
    cram_states,
    lookup,
    parse_line,
    update_text,
    valid_user,
)

BIN = str(Path(sys.executable).parent / "eqmail-checkpassword")
CHALLENGE = b"<4711.1700000000@mx.test.example>"


def run_check(data: bytes, *argv: str, env: dict[str, str] | None = None,
              fd3: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run the checker as qmail-smtpd does: ``data`` on fd 3, nothing on stdin."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    # A tiny exec wrapper puts the pipe on fd 3 (dash only takes one-digit fd numbers).
    wrapper = ("import os, sys\n"
               "fd = int(sys.argv[1])\n"
               "os.dup2(fd, 3) if fd >= 0 else os.closerange(3, 4)\n"
               "os.execv(sys.argv[2], sys.argv[2:])\n")
    try:
        return subprocess.run([sys.executable, "-c", wrapper, str(r if fd3 else -1), BIN, *argv],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              env=env or dict(os.environ), pass_fds=(r,), timeout=30)
    finally:
        os.close(r)


def passwd(path: Path, *args: str, password: str = "Secret1") -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, "passwd", *args, "--file", str(path)], input=password + "\n",
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "passwords"
    assert passwd(path, "add", "alice", "--cram").returncode == 0
    assert passwd(path, "add", "bob@example.org", password="pässword ok").returncode == 0
    with open(path, "a") as f:
        f.write("# a comment\n\ncarol:!$argon2id$disabled\n")
    return path


# ------------------------------------------------------------------ checking


def test_right_password_exits_0(pwfile: Path) -> None:
    assert run_check(b"alice\0Secret1\0\0", "--file", str(pwfile)).returncode == 0
    assert run_check("bob@example.org\0pässword ok\0\0".encode(),
                     f"--file={pwfile}").returncode == 0


def test_right_password_execs_the_program_with_user_set(pwfile: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_check(b"alice\0Secret1\0\0", "--file", str(pwfile),
                     "/bin/sh", "-c", f'echo "$USER" > {out}; exit 7')
    assert proc.returncode == 7 and out.read_text() == "alice\n"


@pytest.mark.parametrize("data", [
    b"alice\0secret1\0\0",          # wrong password
    b"alice\0\0\0",                 # empty password
    b"mallory\0Secret1\0\0",        # unknown user
    b"carol\0anything\0\0",         # disabled ("!")
    b"Alice\0Secret1\0\0",          # user names are exact
])
def test_wrong_exits_1(pwfile: Path, data: bytes) -> None:
    proc = run_check(data, "--file", str(pwfile), "/bin/false-should-not-run")
    assert proc.returncode == 1


def test_environment_names_the_file(pwfile: Path) -> None:
    env = dict(os.environ, EQMAIL_PASSWORDS=str(pwfile))
    assert run_check(b"alice\0Secret1\0\0", env=env).returncode == 0


def test_cram_md5(pwfile: Path) -> None:
    good = hmac.new(b"Secret1", CHALLENGE, hashlib.md5).hexdigest().encode()
    assert run_check(b"alice\0" + good + b"\0" + CHALLENGE + b"\0", "--file", str(pwfile)).returncode == 0
    assert run_check(b"alice\0" + good.upper() + b"\0" + CHALLENGE + b"\0",
                     "--file", str(pwfile)).returncode == 0
    bad = hmac.new(b"Secret2", CHALLENGE, hashlib.md5).hexdigest().encode()
    assert run_check(b"alice\0" + bad + b"\0" + CHALLENGE + b"\0", "--file", str(pwfile)).returncode == 1
    # bob was stored without --cram: CRAM-MD5 fails cleanly, whatever the digest.
    digest = hmac.new("pässword ok".encode(), CHALLENGE, hashlib.md5).hexdigest().encode()
    data = b"bob@example.org\0" + digest + b"\0" + CHALLENGE + b"\0"
    assert run_check(data, "--file", str(pwfile)).returncode == 1


@pytest.mark.parametrize("data, code", [
    (b"alice\0Secret1\0", 2),        # no challenge field
    (b"\0Secret1\0\0", 2),           # no user
    (b"x" * 20000, 2),               # over 16 KiB
])
def test_malformed_input_exits_2(pwfile: Path, data: bytes, code: int) -> None:
    assert run_check(data, "--file", str(pwfile)).returncode == code


def test_temporary_trouble_exits_111(pwfile: Path, tmp_path: Path) -> None:
    assert run_check(b"alice\0Secret1\0\0", "--file", str(tmp_path / "missing")).returncode == 111
    assert run_check(b"alice\0Secret1\0\0", "--file", str(pwfile), fd3=False).returncode == 111
    assert run_check(b"alice\0Secret1\0\0", "--file", str(pwfile),
                     "/nonexistent/program").returncode == 111


def test_check_path_imports_little() -> None:
    """One process per AUTH: the check must not pull in argparse, argon2 or cryptography
    before it needs them (argon2 comes only with a hash to verify)."""
    code = ("import sys; import eqmail.cli.checkpassword; "
            "print(sorted(m for m in ('argparse', 'argon2', 'cryptography', 'asyncio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ passwd


def test_passwd_add_set_del_list(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    assert passwd(path, "add", "dave").returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert passwd(path, "add", "dave").returncode == 1           # exists: use set
    assert passwd(path, "set", "nobody").returncode == 1         # absent
    os.chmod(path, 0o640)
    assert passwd(path, "set", "dave", password="N3w").returncode == 0
    assert path.stat().st_mode & 0o777 == 0o640                  # a rewrite keeps the mode
    assert run_check(b"dave\0N3w\0\0", "--file", str(path)).returncode == 0
    assert run_check(b"dave\0Secret1\0\0", "--file", str(path)).returncode == 1
    assert passwd(path, "add", "erin", "--cram").returncode == 0
    listing = subprocess.run([BIN, "passwd", "list", "--file", str(path)], capture_output=True,
                             text=True, check=True).stdout
    assert listing == "dave\nerin  (cram-md5)\n"
    assert passwd(path, "del", "dave").returncode == 0
    assert run_check(b"dave\0N3w\0\0", "--file", str(path)).returncode == 1
    text = path.read_text()
    assert "dave" not in text and text.startswith("erin:$argon2id$")
    assert "Secret1" not in text  # neither the password nor anything reversible


@pytest.mark.parametrize("user", ["", "a:b", "a\nb", "#x", " lead"])
def test_passwd_refuses_bad_names(tmp_path: Path, user: str) -> None:
    assert passwd(tmp_path / "p", "add", user).returncode == 2
    assert not valid_user(user)


def test_passwd_refuses_empty_password(tmp_path: Path) -> None:
    proc = passwd(tmp_path / "p", "add", "frank", password="")
    assert proc.returncode != 0 and not (tmp_path / "p").exists()


# ------------------------------------------------------------------ pure parts


def test_parse_and_update() -> None:
    text = "# users\nalice:$argon2id$x:{CRAM-MD5}00\nbob:$argon2id$y\n"
    assert parse_line("# users") is None and parse_line("  ") is None
    assert lookup(text, "alice") == ("$argon2id$x", "{CRAM-MD5}00")
    assert lookup(text, "bob") == ("$argon2id$y", "")
    assert lookup(text, "carol") is None
    new, found = update_text(text, "bob", "bob:$argon2id$z")
    assert found and new == "# users\nalice:$argon2id$x:{CRAM-MD5}00\nbob:$argon2id$z\n"
    new, found = update_text(text, "carol", "carol:h")
    assert not found and new.endswith("bob:$argon2id$y\ncarol:h\n")
    new, found = update_text(text, "alice", None)
    assert found and new == "# users\nbob:$argon2id$y\n"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=150), st.binary(max_size=300))
def test_cram_states_give_hmac_md5(password: bytes, challenge: bytes) -> None:
    assert cram_digest(cram_states(password), challenge) == hmac.new(
        password, challenge, hashlib.md5).digest()


def test_stored_cram_value_is_not_the_password() -> None:
    states = cram_states(b"Secret1")
    assert len(states) == 32 and b"Secret1" not in states
    assert CRAM_PREFIX == "{CRAM-MD5}"


# ------------------------------------------------------------------ --help / --version


@pytest.mark.parametrize("before", [[], ["--file", "/nonexistent"], ["--file=/nonexistent"]])
def test_help_and_version_come_before_the_program(before: list[str]) -> None:
    """Where PROGRAM would be, --help and --version are this program's: exit 0 with the
    text on stdout, whatever is on fd 3 (qmail-smtpd is not involved)."""
    from eqmail import __version__

    proc = run_check(b"", *before, "--help", fd3=False)
    assert proc.returncode == 0 and proc.stderr == b""
    assert proc.stdout.startswith(b"usage: eqmail-checkpassword") and b"passwd" in proc.stdout
    proc = run_check(b"", *before, "--version", fd3=False)
    assert (proc.returncode, proc.stdout) == (0, f"eqmail-checkpassword (eqmail) {__version__}\n".encode())
    proc = subprocess.run([BIN, "passwd", "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: eqmail-checkpassword passwd")
    proc = subprocess.run([BIN, "passwd", "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_help_after_the_program_belongs_to_the_program(pwfile: Path) -> None:
    show = [sys.executable, "-c", "import sys; print(sys.argv[1:])"]
    proc = run_check(b"alice\0Secret1\0\0", "--file", str(pwfile), *show, "--help")
    assert (proc.returncode, proc.stdout) == (0, b"['--help']\n")
    proc = run_check(b"alice\0wrong\0\0", "--file", str(pwfile), *show, "--version")
    assert (proc.returncode, proc.stdout) == (1, b"")
