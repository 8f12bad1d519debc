"""The DKIM package: keys (``keys``), the DNS lookup of key records (``dns``), and the
signing and verification built on dkimpy.

A library: it imports the foundation modules and ``ipc`` only, starts no processes and
opens no sockets — except :mod:`eqmail.dkim.dns`, whose one function asks the resolvers
it is given (docs/architecture.md, "Import rules").
"""
