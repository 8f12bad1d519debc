"""TLS cipher policy: the default list and whether OpenSSL selects anything from a string.

Used by the control/tlsserverciphers, control/tlsclientciphers and listener TLSCIPHERS
parsers.  Pure apart from building a throw-away OpenSSL context.
"""

from __future__ import annotations

# Mozilla's "intermediate" TLS 1.2 list (ssl-config.mozilla.org, guideline 5.7):
# ECDHE/DHE key exchange with AEAD ciphers only — no RSA key exchange, no CBC, no SHA-1
# MAC.  TLS 1.3 suites are not set by cipher strings and keep OpenSSL's defaults.
TLS_INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"))


def server_ciphers_ok(text: str) -> bool:
    """The listener's library: the ssl module's OpenSSL."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
    except (ssl.SSLError, ValueError):  # ValueError: a NUL or an unencodable byte
        return False
    return True


def client_ciphers_ok(text: str) -> bool:
    """Remote delivery's library: pyOpenSSL (eqmail.smtp.transport)."""
    from OpenSSL import SSL

    try:
        SSL.Context(SSL.TLS_CLIENT_METHOD).set_cipher_list(text.encode())
    except (SSL.Error, ValueError):  # ValueError: a NUL or an unencodable byte
        return False
    return True
