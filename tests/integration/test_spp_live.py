"""qmail-spp against a live eqmail (supervisor + listener + sandbox worker).  Skipped
until the listener routes RunHook to eqmail.spp.client.run_hook (see issue 6)."""

from __future__ import annotations

import inspect
import smtplib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Instance  # noqa: E402

from eqmail.workers import smtpconn  # noqa: E402

pytestmark = pytest.mark.skipif("run_hook" not in inspect.getsource(smtpconn),
                                reason="listener does not call eqmail.spp.client.run_hook yet")


def test_header_delivered_and_relayclient_from_plugin(instance: Instance) -> None:
    instance.write_control("listen", "smtp 127.0.0.1:0\n")
    instance.write_control("smtpplugins", "[connection]\n:echo SRELAYCLIENT=\n"
                           "[mail]\n:echo 'HX-Spp-Test: yes'\n")
    instance.start()
    port = next(li["port"] for li in __import__("json").loads(
        instance.ctl("status", "--json").stdout)["listeners"])
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("a@example.net", ["testuser@mx.test.example"], b"Subject: t\r\n\r\nhi\r\n")
    (msg,) = instance.wait_for_mail(1)
    assert b"\nX-Spp-Test: yes\n" in msg.read_bytes()
