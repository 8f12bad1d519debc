"""qmail-spp, the SMTP plugin API (eqmail-features.md §2), and the other programs the plugin
sandbox runs for other workers: checkpassword (for the listeners) and the before-remote
commands (for the remote delivery worker).

- :mod:`eqmail.spp.config`        control/smtpplugins (or $SPPCONFFILE) and control/spptimeout.
- :mod:`eqmail.spp.protocol`      a plugin's stdout -> commands; a whole section -> HookOutcome.
- :mod:`eqmail.spp.runner`        runs one plugin: posix_spawn with rlimits, or in-process.
- :mod:`eqmail.spp.checkpassword` runs one checkpassword program (sandbox side).
- :mod:`eqmail.spp.beforemote`    runs one before-remote chain on a message fd (sandbox side).
- :mod:`eqmail.spp.client`        ``run_hook`` and ``call`` for the listener.
- :mod:`eqmail.workers.sandbox`   the worker (user eqmailp) that serves both sockets.

The frames of run/sandbox.sock and run/sandbox-remote.sock are eqmail.ipc.sandbox's.

The callers' sides: eqmail.smtp.checkpw (listener), eqmail.delivery.bfrmt (remote worker).
"""
