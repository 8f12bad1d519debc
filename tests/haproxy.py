"""A private HAProxy for a test: its own configuration, ports and stats socket.

:class:`HAProxy` writes a configuration (``global`` with an admin stats socket,
``defaults`` in TCP mode, then the sections the test gives), starts Debian's
``haproxy`` in the foreground (``-db``) as a child of the test, waits until every
``bind`` accepts, and stops it at the end.  :meth:`HAProxy.servers` reads ``show stat``
from the stats socket: each server's state and last health-check status.
"""

from __future__ import annotations

import csv
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class HAProxy:
    def __init__(self, sections: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eqm-haproxy-", dir="/var/tmp"))
        self.stats = self.dir / "admin.sock"
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text(
            "global\n"
            f"    stats socket {self.stats} mode 600 level admin\n"
            "    log stderr format raw local0 info\n"
            "defaults\n"
            "    mode tcp\n"
            "    log global\n"
            "    option tcplog\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout check 1s\n"
            + sections)
        self.proc: subprocess.Popen[bytes] | None = None
        self.binds = [(host.strip("[]"), int(port)) for host, port in
                      re.findall(r"^\s*bind\s+(\S+):(\d+)", sections, re.MULTILINE)]

    def start(self) -> HAProxy:
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)],
                                     stdout=open(self.dir / "out.log", "wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        for host, port in self.binds:
            while True:
                try:
                    with socket.create_connection((host, port), timeout=1):
                        break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"haproxy did not start:\n{self.log()}") from None
                    time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return (self.dir / "out.log").read_text(errors="replace")
        except OSError:
            return ""

    def servers(self) -> dict[str, dict[str, str]]:
        """``backend/server`` -> the server's row of ``show stat`` (status, check_status...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        rows = csv.DictReader(out.decode().lstrip("# ").splitlines())
        return {f"{r['pxname']}/{r['svname']}": r for r in rows
                if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_check(self, server: str, check_status: str, status: str, timeout: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.servers()[server]
            if row["check_status"] == check_status and row["status"] == status:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"{server}: {row['status']} {row['check_status']}\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

