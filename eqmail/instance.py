"""Where an eqmail instance lives.

An instance is one root directory holding control/, queue/, users/, alias/, run/ and
log/ (DESIGN §2).  The root comes from ``--root``, else ``$EQMAIL_ROOT``, else
``/var/eqmail`` when that exists (a system-wide install), else the checkout this
package was installed from when it has a control/ or queue/ (the embedded default
instance), else the current directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSTEM_ROOT = Path("/var/eqmail")


def _checkout_root() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return None


def resolve_root(cli_root: str | None = None) -> Path:
    if cli_root:
        return Path(cli_root).resolve()
    env = os.environ.get("EQMAIL_ROOT")
    if env:
        return Path(env).resolve()
    if (SYSTEM_ROOT / "control").is_dir():
        return SYSTEM_ROOT
    checkout = _checkout_root()
    if checkout is not None:
        return checkout
    return Path.cwd()


@dataclass(frozen=True)
class Instance:
    root: Path

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def users(self) -> Path:
        return self.root / "users"

    @property
    def alias(self) -> Path:
        return self.root / "alias"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def queue_socket(self) -> Path:
        return self.run / "queue.sock"

    @property
    def clean_socket(self) -> Path:
        return self.run / "clean.sock"

    @property
    def local_socket(self) -> Path:
        return self.run / "local.sock"

    @property
    def status_socket(self) -> Path:
        return self.run / "status.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "eqmail.pid"
