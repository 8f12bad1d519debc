"""The layer rules of docs/architecture.md ("Import rules"), checked on the source.

Every module of eqmail/ is parsed (ast, never imported); every import is collected — at
module level, inside functions, under ``if TYPE_CHECKING``, relative (``from . import``)
or absolute — and resolved to the module it names.  Three rules, each failure naming
the file and line:

1. arrows: a unit (a subpackage of eqmail, or a top-level module) imports only the
   units :data:`ALLOWED` lists for it;
2. cycles: the graph of units has no cycle;
3. I/O: a module opens sockets (creates, connects, binds or listens on one) or starts
   processes (fork, exec, spawn, subprocess, kill) only where :func:`io_rights` says it
   may, and never imports a module that may do what it may not (the right cannot be
   borrowed through an import).

:data:`KNOWN_ARROWS` lists the arrows that break rule 1 today and are being removed by
other work; an entry that no longer matches an import fails the test, so the list only
shrinks.  The checker itself is tested on a synthetic tree (the ``test_checker_*`` tests).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import eqmail

SOURCE = Path(eqmail.__file__).parent

# ---- the rules (docs/architecture.md, "Import rules": keep the two the same) ----------

# Shared helpers at the top of the package: each may import the others (rule 2 keeps
# them acyclic) and no package.  "eqmail" is the package's own __init__ (__version__).
FOUNDATION = frozenset({
    "eqmail", "textio", "errors", "dates", "cdb", "log", "logformat", "instance", "netif",
    "tcprules", "authlimit", "connlimit", "dns", "tlslib", "tls", "certs", "control",
    "srs",  # SRS addresses (issue 16): pure, needed by control, smtp, queue and delivery
})
_LIBRARIES = frozenset({"ipc", "smtp", "queue", "delivery", "spp", "privsep"})

ALLOWED: dict[str, frozenset[str]] = {
    **{name: FOUNDATION for name in FOUNDATION},
    "ipc": FOUNDATION,                                   # typed messages between processes
    "privsep": FOUNDATION,                               # privileges, ids (supervisor and workers)
    "inject": FOUNDATION,                                # qmail-inject's header rules
    "smtp": FOUNDATION | {"ipc"},                        # the SMTP protocol, both sides
    "queue": FOUNDATION | {"ipc"},                       # the on-disk queue, qmail-send
    "delivery": FOUNDATION | {"ipc", "queue", "smtp", "dkim"},  # qmail-local, the remote conversation (signs)
    "spp": FOUNDATION | {"ipc", "smtp", "delivery"},     # the plugin sandbox and its clients
    "workers": FOUNDATION | _LIBRARIES | {"dkim", "auth"},       # one process each; never supervisor
    "supervisor": FOUNDATION | {"ipc", "queue", "privsep", "workers"},
    "migrate": FOUNDATION | {"ipc", "queue", "delivery", "privsep", "setup"},
    "setup": FOUNDATION | {"queue", "privsep"},
    "dkim": FOUNDATION | {"ipc"},                        # DKIM keys, signing, verification
    "auth": FOUNDATION | {"dkim"},                       # SPF, DMARC, ARC, Authentication-Results
    "cli": FOUNDATION | _LIBRARIES | {"dkim", "auth", "inject", "supervisor", "migrate", "setup"},
}

# (file, imported module): arrows that break ALLOWED, each with its reason (none today).
# A stale entry fails the test, so the list cannot outlive the import it excuses.
KNOWN_ARROWS: frozenset[tuple[str, str]] = frozenset()

SOCKETS, PROCESSES = "sockets", "processes"

# Modules of the restricted packages that hold an I/O right, and why.
_RIGHTS: dict[str, frozenset[str]] = {
    "eqmail.queue.client": frozenset({SOCKETS}),        # the queue writer's client
    "eqmail.delivery.nexthop": frozenset({SOCKETS}),    # remote delivery's TCP connection
    "eqmail.delivery.remote": frozenset({SOCKETS}),     # qmail-remote: connects through nexthop
    "eqmail.delivery.local": frozenset({PROCESSES}),    # qmail-local in the per-user child
    "eqmail.spp.runner": frozenset({PROCESSES}),        # sandbox side: plugins
    "eqmail.spp.checkpassword": frozenset({PROCESSES}),  # sandbox side: checkpassword
    "eqmail.spp.beforemote": frozenset({PROCESSES}),    # sandbox side: before-remote hooks
    "eqmail.spp.client": frozenset({SOCKETS}),          # listener -> run/sandbox.sock
    "eqmail.spp.checkpwclient": frozenset({SOCKETS}),   # listener -> run/sandbox.sock
    "eqmail.spp.bfrmtclient": frozenset({SOCKETS}),     # remote -> run/sandbox-remote.sock
    "eqmail.delivery.stsclient": frozenset({SOCKETS}),  # remote -> run/policy.sock
    "eqmail.dkim.dns": frozenset({SOCKETS}),            # the TXT lookup (dnspython)
    "eqmail.auth.dns": frozenset({SOCKETS}),            # inbound checks' lookups (dnspython)
}
RESTRICTED = frozenset({"ipc", "smtp", "queue", "delivery", "spp", "dkim", "auth"})
ALL_RIGHTS = frozenset({SOCKETS, PROCESSES})


def io_rights(module: str) -> frozenset[str]:
    """What a module may do: nothing in the protocol packages unless listed above."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in RESTRICTED:
        return ALL_RIGHTS  # workers, supervisor, cli, ... and the foundation modules
    return _RIGHTS.get(module, frozenset())


SOCKET_FUNCTIONS = frozenset({
    "socket.socket", "socket.socketpair", "socket.create_connection", "socket.create_server",
    "socket.fromfd", "asyncio.open_connection", "asyncio.open_unix_connection",
    "asyncio.start_server", "asyncio.start_unix_server",
})
SOCKET_METHODS = frozenset({
    "connect", "connect_ex", "bind", "listen", "create_connection", "create_unix_connection",
    "create_server", "create_unix_server",
})
PROCESS_METHODS = frozenset({"subprocess_exec", "subprocess_shell"})  # an event loop's
PROCESS_MODULES = frozenset({"subprocess", "multiprocessing", "pty"})
PROCESS_FUNCTIONS = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp", "os.system", "os.popen",
    "os.kill", "os.killpg", "os.execv", "os.execve", "os.execvp", "os.execvpe", "os.execl",
    "os.execle", "os.execlp", "os.execlpe", "os.spawnv", "os.spawnve", "os.spawnvp",
    "os.spawnvpe", "os.spawnl", "os.spawnle", "os.spawnlp", "os.spawnlpe",
    "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell",
})

# ---- the checker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    file: str      # relative to the tree's parent, e.g. eqmail/smtp/checkpw.py
    line: int
    source: str    # the importing module, e.g. eqmail.smtp.checkpw
    target: str    # the imported module (or the package, for a name that is no module)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class IoUse:
    file: str
    line: int
    module: str
    right: str     # SOCKETS or PROCESSES
    what: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def modules(top: Path) -> dict[str, Path]:
    """Every module of the package directory ``top``, by dotted name."""
    found: dict[str, Path] = {}
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def unit(module: str) -> str:
    """The unit of a module: ``eqmail.smtp.session`` -> ``smtp``, ``eqmail.log`` -> ``log``,
    ``eqmail`` -> ``eqmail``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(top: Path) -> Iterator[Import]:
    """Every import of a module of ``top``'s package, anywhere in the file."""
    name = top.name
    known = modules(top)
    for module, path in known.items():
        file = str(path.relative_to(top.parent))
        tree = ast.parse(path.read_text(), file)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                # "from pkg import mod" names a module; "from mod import name" does not.
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for target in targets:
                if target == name or target.startswith(name + "."):
                    yield Import(file, node.lineno, module, target)


def arrow_violations(found: Iterable[Import], allowed: dict[str, frozenset[str]],
                     known: frozenset[tuple[str, str]]) -> list[str]:
    out = []
    for imp in found:
        src, dst = unit(imp.source), unit(imp.target)
        if src == dst or (imp.file, imp.target) in known:
            continue
        if src not in allowed:
            out.append(f"{imp.where()}: {src} is not in the table of units")
        elif dst not in allowed[src]:
            out.append(f"{imp.where()}: {src} may not import {dst} ({imp.target})")
    return out


def stale_known(found: Iterable[Import], known: frozenset[tuple[str, str]]) -> list[str]:
    seen = {(imp.file, imp.target) for imp in found}
    return [f"{file} no longer imports {target}: drop it from KNOWN_ARROWS"
            for file, target in sorted(known - seen)]


def cycles(found: Iterable[Import], known: frozenset[tuple[str, str]]) -> list[str]:
    """One line per cycle of units: each arrow with the first file:line making it."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in found:
        src, dst = unit(imp.source), unit(imp.target)
        if src != dst and (imp.file, imp.target) not in known:
            edges.setdefault(src, {}).setdefault(dst, imp)
    out = []
    for component in _strongly_connected(edges):
        if len(component) < 2:
            continue
        members = set(component)
        arrows = sorted(f"{src} -> {dst} ({imp.where()})" for src in component
                        for dst, imp in edges.get(src, {}).items() if dst in members)
        out.append("cycle: " + "; ".join(arrows))
    return out


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph is small; recursion would do as well)."""
    nodes = sorted(set(edges) | {d for targets in edges.values() for d in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    result.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return result


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``socket.socket`` for ``socket.socket``, ``s.socket`` (import socket as s) or
    ``socket`` (from socket import socket); None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def io_uses(top: Path) -> Iterator[IoUse]:
    """Every place a module of ``top``'s package opens a socket or starts a process."""
    for module, path in modules(top).items():
        file = str(path.relative_to(top.parent))
        tree = ast.parse(path.read_text(), file)
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    if a.name.split(".")[0] in PROCESS_MODULES:
                        yield IoUse(file, node.lineno, module, PROCESSES, f"import {a.name}")
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if node.module.split(".")[0] in PROCESS_MODULES:
                    yield IoUse(file, node.lineno, module, PROCESSES, f"from {node.module} import")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = _dotted(node.func, aliases)
            if called in SOCKET_FUNCTIONS:
                yield IoUse(file, node.lineno, module, SOCKETS, f"{called}()")
            elif called in PROCESS_FUNCTIONS:
                yield IoUse(file, node.lineno, module, PROCESSES, f"{called}()")
            elif isinstance(node.func, ast.Attribute) and node.func.attr in SOCKET_METHODS:
                yield IoUse(file, node.lineno, module, SOCKETS, f".{node.func.attr}()")
            elif isinstance(node.func, ast.Attribute) and node.func.attr in PROCESS_METHODS:
                yield IoUse(file, node.lineno, module, PROCESSES, f".{node.func.attr}()")


def io_violations(top: Path, found: Iterable[Import]) -> list[str]:
    uses = list(io_uses(top))
    out = [f"{use.where()}: {use.module} may not open sockets or start processes "
           f"({use.right}: {use.what})"
           for use in uses if use.right not in io_rights(use.module)]
    does: dict[str, set[str]] = {}
    for use in uses:
        does.setdefault(use.module, set()).add(use.right)
    for imp in found:
        borrowed = does.get(imp.target, set()) - io_rights(imp.source)
        if borrowed:
            out.append(f"{imp.where()}: {imp.source} may not import {imp.target} "
                       f"(it does {' and '.join(sorted(borrowed))} I/O)")
    return out


# ---- the rules hold for eqmail/ ------------------------------------------------------

FOUND = list(imports(SOURCE))


def test_every_unit_is_in_the_table() -> None:
    units = {unit(m) for m in modules(SOURCE)}
    assert not units - set(ALLOWED), "add the new package to ALLOWED and docs/architecture.md"


def test_no_forbidden_arrow() -> None:
    assert arrow_violations(FOUND, ALLOWED, KNOWN_ARROWS) == []


def test_known_arrows_are_not_stale() -> None:
    assert stale_known(FOUND, KNOWN_ARROWS) == []


def test_no_cycle_between_units() -> None:
    assert cycles(FOUND, KNOWN_ARROWS) == []


def test_protocol_packages_do_no_socket_or_process_io() -> None:
    assert io_violations(SOURCE, FOUND) == []


def test_every_io_right_names_an_existing_module() -> None:
    assert not set(_RIGHTS) - set(modules(SOURCE))


# ---- the checker catches what it should (a synthetic tree) ---------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    top = tmp_path / "eqmail"
    for rel, text in {"__init__.py": "", **files}.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(top).parents:
            (top / parent / "__init__.py").touch()
        path.write_text(text)
    return top


def test_checker_finds_a_forbidden_arrow_in_a_function_and_a_relative_import(
        tmp_path: Path) -> None:
    top = _tree(tmp_path, {
        "smtp/session.py": "def f():\n    from eqmail.workers import listener\n",
        "smtp/other.py": "from ..supervisor.main import Supervisor\n",
        "smtp/fine.py": "from . import session\nfrom eqmail import textio\n",
        "workers/listener.py": "",
        "supervisor/main.py": "Supervisor = 1\n",
        "textio.py": "",
    })
    found = list(imports(top))
    assert sorted(arrow_violations(found, ALLOWED, frozenset())) == [
        "eqmail/smtp/other.py:1: smtp may not import supervisor (eqmail.supervisor.main)",
        "eqmail/smtp/session.py:2: smtp may not import workers (eqmail.workers.listener)",
    ]
    known = frozenset({("eqmail/smtp/session.py", "eqmail.workers.listener"),
                       ("eqmail/smtp/gone.py", "eqmail.workers.listener")})
    assert len(arrow_violations(found, ALLOWED, known)) == 1
    assert stale_known(found, known) == [
        "eqmail/smtp/gone.py no longer imports eqmail.workers.listener: drop it from KNOWN_ARROWS"]


def test_checker_finds_a_cycle(tmp_path: Path) -> None:
    top = _tree(tmp_path, {
        "queue/manager.py": "from eqmail.delivery.bounce import note\n",
        "delivery/bounce.py": "note = 1\n",
        "delivery/local.py": "import eqmail.queue.layout\n",
        "queue/layout.py": "",
        "log.py": "",
    })
    found = list(imports(top))
    assert cycles(found, frozenset()) == [
        "cycle: delivery -> queue (eqmail/delivery/local.py:1); "
        "queue -> delivery (eqmail/queue/manager.py:1)"]
    assert cycles(found, frozenset({("eqmail/queue/manager.py", "eqmail.delivery.bounce")})) == []


def test_checker_finds_socket_and_process_io_and_borrowed_rights(tmp_path: Path) -> None:
    top = _tree(tmp_path, {
        "smtp/stdio.py": ("import socket as s\n"
                          "def f(sock):\n"
                          "    sock.recv(1)\n"            # reading a given socket: fine
                          "    s.gethostname()\n"         # a name, no socket: fine
                          "    return s.socket()\n"),
        "smtp/run.py": "def g():\n    from os import fork\n    fork()\n",
        "smtp/popen.py": "import subprocess\n",
        "smtp/client.py": "from eqmail.queue import client\n",
        "queue/client.py": "import socket\nsocket.socket().connect('x')\n",
        "workers/listener.py": "import socket\nsocket.socket().bind(('', 0))\n",
    })
    found = list(imports(top))
    assert sorted(io_violations(top, found)) == [
        "eqmail/smtp/client.py:1: eqmail.smtp.client may not import eqmail.queue.client "
        "(it does sockets I/O)",
        "eqmail/smtp/popen.py:1: eqmail.smtp.popen may not open sockets or start processes "
        "(processes: import subprocess)",
        "eqmail/smtp/run.py:3: eqmail.smtp.run may not open sockets or start processes "
        "(processes: os.fork())",
        "eqmail/smtp/stdio.py:5: eqmail.smtp.stdio may not open sockets or start processes "
        "(sockets: socket.socket())",
    ]
