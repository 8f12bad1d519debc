"""qmail-spp, the SMTP plugin API (eqmail-features.md §2), run in the plugin sandbox.

- :mod:`eqmail.spp.config`   control/smtpplugins (or $SPPCONFFILE) and control/spptimeout.
- :mod:`eqmail.spp.protocol` a plugin's stdout -> commands; a whole section -> HookOutcome.
- :mod:`eqmail.spp.runner`   runs one plugin: posix_spawn with rlimits, or in-process.
- :mod:`eqmail.spp.wire`     the listener <-> sandbox request/answer frames.
- :mod:`eqmail.spp.client`   ``run_hook`` for the listener.
- :mod:`eqmail.workers.sandbox` the worker (user eqmailp) that serves run/sandbox.sock.
"""
