"""qmail-spp, the SMTP plugin API (eqmail-features.md §2), and the other programs the plugin
sandbox runs for other workers: checkpassword (for the listeners) and the before-remote
commands (for the remote delivery worker).

- :mod:`eqmail.spp.config`        control/smtpplugins (or $SPPCONFFILE) and control/spptimeout.
- :mod:`eqmail.spp.protocol`      a plugin's stdout -> commands; a whole section -> HookOutcome.
- :mod:`eqmail.spp.runner`        runs one plugin: posix_spawn with rlimits, or in-process.
- :mod:`eqmail.spp.checkpassword` runs one checkpassword program (sandbox side).
- :mod:`eqmail.spp.beforemote`    runs one before-remote chain on a message fd (sandbox side).
- :mod:`eqmail.spp.client`        ``run_hook`` and ``call`` for the listener.
- :mod:`eqmail.spp.checkpwclient` ``run_checkpassword`` for the listener (rules: eqmail.smtp.checkpw).
- :mod:`eqmail.spp.bfrmtclient`   ``run_chain`` for the remote worker (rules: eqmail.delivery.bfrmt).
- :mod:`eqmail.workers.sandbox`   the worker (user eqmailp) that serves both sockets.

config, protocol and the rules they use (eqmail.smtp.checkpw, eqmail.delivery.bfrmt) are
pure; the runners start processes and the clients talk over the sandbox sockets
(docs/architecture.md, "Import rules").
The frames of run/sandbox.sock and run/sandbox-remote.sock are eqmail.ipc.sandbox's.
"""
