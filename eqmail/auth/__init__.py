"""Inbound mail authentication: SPF, DKIM, DMARC and ARC results for a received message,
the Authentication-Results field that reports them (RFC 8601), and the filter that
removes forged ones.

Modules: core.py (:func:`authenticate` and its values), spfcheck.py (pyspf), dmarc.py
(RFC 7489, publicsuffixlist), arc.py (dkimpy's arc_verify), authres.py (the field and
:class:`ForgedResultsFilter`), message.py (header fields), dns.py (the one DNS path,
the only module here that reaches the network).  DKIM itself is eqmail.dkim.verify.
Used by the listener (eqmail.workers) and by the qmail-spp plugin plugins/spf.
"""

from eqmail.auth.arc import Arc, ArcResult
from eqmail.auth.authres import ForgedResultsFilter
from eqmail.auth.core import AuthPolicy, AuthReport, Inbound, authenticate, authenticate_cached
from eqmail.auth.dmarc import Dmarc, DmarcDisposition, DmarcResult
from eqmail.auth.dns import Budget, DnsTempError, Lookups, make_lookups
from eqmail.auth.spfcheck import Spf, SpfResult
from eqmail.dkim.verify import DkimResult

__all__ = [
    "Arc", "ArcResult", "AuthPolicy", "AuthReport", "Budget", "DkimResult", "Dmarc",
    "DmarcDisposition", "DmarcResult", "DnsTempError", "ForgedResultsFilter", "Inbound",
    "Lookups", "Spf", "SpfResult", "authenticate", "authenticate_cached", "make_lookups",
]
