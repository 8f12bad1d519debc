"""The reload's listener diff, pure: which listeners keep running and which are renewed.

A listener process holds, from its fork on, its socket, its ``ListenerSpec`` (the
control/listen line: service, address, port, environment, concurrency, processes,
rules file, checkpassword, clientcert) and the TLS context the supervisor loaded as
root (control/servercert.pem, dh2048.pem, clientca.pem, clientcrl.pem, whether
tlsclients exists, and control/tlsserverciphers).  Everything else it reads from ``Controls``,
which a running listener takes over a configuration push (eqmail.ipc.config).  So,
listeners by socket (``ListenerSpec.key``):

- keep:    same socket, same spec, same TLS inputs -- keeps running, gets the new
           configuration pushed, its sessions and counts undisturbed;
- replace: same socket, anything in the spec or the TLS inputs changed -- new
           processes on the same bound socket, the old ones retire (finish their
           sessions under the old configuration);
- add:     a socket not listed before -- bound, then new processes;
- remove:  a socket no longer listed -- its processes retire, the socket is closed.

The TLS inputs are ``Controls.tlsfiles`` (the stamps eqmail.control takes of the
server TLS files when it parses control/) and ``Controls.tlsserverciphers``; the
lines of tlsclients are ordinary configuration (only whether the file exists goes
into the TLS context).
"""

from __future__ import annotations

from dataclasses import dataclass

from eqmail.control import Controls, ListenerSpec

# Controls that go into a listener's TLS context, loaded at its fork.
LISTENER_FORK_CONTROLS = ("tlsserverciphers", "tlsfiles")


@dataclass(frozen=True)
class ListenerPlan:
    keep: tuple[ListenerSpec, ...] = ()
    replace: tuple[ListenerSpec, ...] = ()
    add: tuple[ListenerSpec, ...] = ()
    remove: tuple[ListenerSpec, ...] = ()

    @property
    def start(self) -> tuple[ListenerSpec, ...]:
        """Specs that need new listener processes."""
        return self.replace + self.add


def listener_diff(old: Controls, new: Controls) -> ListenerPlan:
    """Compare the listeners of ``old`` and ``new`` (see the module docstring)."""
    old_specs = {s.key: s for s in old.listen}
    new_specs = {s.key: s for s in new.listen}
    forked_same = all(getattr(old, name) == getattr(new, name) for name in LISTENER_FORK_CONTROLS)
    keep: list[ListenerSpec] = []
    replace: list[ListenerSpec] = []
    add: list[ListenerSpec] = []
    for key, spec in new_specs.items():
        if key not in old_specs:
            add.append(spec)
        elif old_specs[key] == spec and forked_same:
            keep.append(spec)
        else:
            replace.append(spec)
    remove = [spec for key, spec in old_specs.items() if key not in new_specs]
    return ListenerPlan(tuple(keep), tuple(replace), tuple(add), tuple(remove))
