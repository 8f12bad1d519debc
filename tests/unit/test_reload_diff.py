"""The reload's listener diff (eqmail.supervisor.diff): a pure function of the old and
new Controls (the TLS file stamps included)."""

from __future__ import annotations

import dataclasses

from harness import parsed_controls
from hypothesis import given
from hypothesis import strategies as st

from eqmail.control import Controls, FileStamp, ListenerSpec
from eqmail.supervisor.diff import ListenerPlan, listener_diff

SMTP = ListenerSpec("smtp", "127.0.0.1", 25)
SUBMISSION = ListenerSpec("submission", "127.0.0.1", 587, checkpassword=("/bin/checkpw",))
V6 = ListenerSpec("smtp", "::1", 25, processes=2)
TLS = (FileStamp("servercert.pem", 1, 2, 3, 4, 5),)
BASE: Controls = parsed_controls()


def controls(*listen: ListenerSpec, tls: tuple[FileStamp, ...] = TLS, **kw: object) -> Controls:
    return dataclasses.replace(BASE, listen=listen, tlsfiles=tls, **kw)  # type: ignore[arg-type]


def test_nothing_changed_keeps_every_listener() -> None:
    old = controls(SMTP, SUBMISSION, V6)
    assert listener_diff(old, old) == ListenerPlan(keep=(SMTP, SUBMISSION, V6))


def test_session_controls_keep_the_listeners() -> None:
    """databytes, rcpthosts, the greeting, tcp.smtp ... reach a running listener by the
    configuration push: no new processes."""
    old = controls(SMTP, V6)
    new = controls(SMTP, V6, databytes=1000, rcpthosts=("b.example",), smtpgreeting="hi",
                   tcp_smtp="127.:allow\n", timeoutsmtpd=30, me="b.example")
    plan = listener_diff(old, new)
    assert plan == ListenerPlan(keep=(SMTP, V6)) and plan.start == ()


def test_changed_options_replace_only_that_listener() -> None:
    old = controls(SMTP, SUBMISSION, V6)
    more = dataclasses.replace(V6, processes=3)
    other_env = dataclasses.replace(SUBMISSION, env=(("RELAYCLIENT", ""),))
    plan = listener_diff(old, controls(SMTP, other_env, more))
    assert plan == ListenerPlan(keep=(SMTP,), replace=(other_env, more))
    assert plan.start == (other_env, more)
    for change in ({"concurrency": 7}, {"rules": "tcp.other"}, {"clientcert": False},
                   {"checkpassword": ("/bin/other",)}):
        changed = dataclasses.replace(SMTP, **change)  # type: ignore[arg-type]
        assert listener_diff(controls(SMTP), controls(changed)) == ListenerPlan(replace=(changed,))


def test_added_and_removed_sockets() -> None:
    moved = dataclasses.replace(SMTP, port=2525)  # another port is another socket
    plan = listener_diff(controls(SMTP, SUBMISSION), controls(moved, SUBMISSION))
    assert plan == ListenerPlan(keep=(SUBMISSION,), add=(moved,), remove=(SMTP,))
    assert plan.start == (moved,)
    as_smtps = dataclasses.replace(SUBMISSION, service="smtps")  # the protocol is the socket's too
    assert listener_diff(controls(SUBMISSION), controls(as_smtps)) == ListenerPlan(
        add=(as_smtps,), remove=(SUBMISSION,))


def test_tls_files_or_server_ciphers_renew_every_listener() -> None:
    """The TLS context is loaded by the supervisor at the fork: a new certificate (or
    key, DH parameters, client CA, CRL) or control/tlsserverciphers needs new processes."""
    old = controls(SMTP, SUBMISSION)
    swapped = controls(SMTP, SUBMISSION, tls=(FileStamp("servercert.pem", 1, 9, 3, 4, 5),))
    assert listener_diff(old, swapped) == ListenerPlan(replace=(SMTP, SUBMISSION))
    chmod = controls(SMTP, SUBMISSION, tls=(FileStamp("servercert.pem", 1, 2, 3, 4, 6),))
    assert listener_diff(old, chmod) == ListenerPlan(replace=(SMTP, SUBMISSION))
    appeared = controls(SMTP, SUBMISSION, tls=TLS + (FileStamp("dh2048.pem", 1, 3, 3, 4, 5),))
    assert listener_diff(old, appeared).replace == (SMTP, SUBMISSION)
    ciphers = controls(SMTP, SUBMISSION, tlsserverciphers="HIGH")
    assert listener_diff(old, ciphers) == ListenerPlan(replace=(SMTP, SUBMISSION))
    # but outbound TLS settings are the remote worker's business
    client = controls(SMTP, SUBMISSION, tlsclientciphers="HIGH")
    assert listener_diff(old, client) == ListenerPlan(keep=(SMTP, SUBMISSION))


specs = st.builds(ListenerSpec, service=st.sampled_from(["smtp", "submission", "smtps"]),
                  address=st.sampled_from(["127.0.0.1", "::1", "0.0.0.0"]),
                  port=st.sampled_from([25, 587, 2525]), concurrency=st.sampled_from([10, 100]),
                  processes=st.sampled_from([1, 2]))
stamps = st.sampled_from([TLS, ()])


@given(st.lists(specs, max_size=6), st.lists(specs, max_size=6), stamps, stamps,
       st.sampled_from(["A", "B"]))
def test_the_plan_partitions_the_listeners(old_l: list[ListenerSpec], new_l: list[ListenerSpec],
                                           old_tls: tuple[FileStamp, ...], new_tls: tuple[FileStamp, ...],
                                           ciphers: str) -> None:
    old = controls(*old_l, tls=old_tls)
    new = controls(*new_l, tls=new_tls, tlsserverciphers=ciphers)
    plan = listener_diff(old, new)
    old_keys = {s.key: s for s in old_l}
    new_keys = {s.key: s for s in new_l}
    # every listener of the new configuration is kept, replaced or added, exactly once
    running = [s.key for s in plan.keep + plan.replace + plan.add]
    assert sorted(running) == sorted(new_keys)
    assert {s.key for s in plan.remove} == set(old_keys) - set(new_keys)
    assert {s.key for s in plan.add} == set(new_keys) - set(old_keys)
    for s in plan.keep:  # kept: nothing a process holds from its fork has changed
        assert old_keys[s.key] == s and old_tls == new_tls and old.tlsserverciphers == ciphers
    for s in plan.replace:
        assert s.key in old_keys
        assert old_keys[s.key] != s or old_tls != new_tls or old.tlsserverciphers != ciphers
    assert listener_diff(new, new).keep == tuple(new_keys.values())
