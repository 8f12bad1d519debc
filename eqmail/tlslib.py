"""The libssl calls the standard ``ssl`` module does not offer, made on its own libssl.

Owns: three things netqmail's TLS patch does with OpenSSL that a stdlib
``ssl.SSLContext`` cannot express —

* a verify callback that never fails the handshake (``SSL_CTX_set_verify`` with a
  callback returning 1, netqmail's ``verify_cb``): a client certificate that does not
  verify against clientca.pem must only mean "not a certificate relay client";
* the CA names in the CertificateRequest (``SSL_CTX_set_client_CA_list`` from
  ``SSL_load_client_CA_file``, as netqmail does with clientca.pem);
* the connection's verification result afterwards (``SSL_get_verify_result``, with
  ``X509_verify_cert_error_string`` for eQmail's refusal text).

The functions are looked up through the ``_ssl`` extension module, so they are the very
libssl that ``ssl`` links (pyOpenSSL/cryptography bundle a different copy, whose
objects must never meet these).  The ``SSL_CTX *`` and ``SSL *`` are read from
CPython's ``PySSLContext`` / ``PySSLSocket`` objects, whose first fields they have been
since Python 3.7; :func:`probe` checks the layout on a throw-away context (the options
and the ``SSL *``'s ``SSL_CTX`` must match) before anything relies on it, and
:class:`Unsupported` says when it does not hold.  Runs wherever the TLS context is
built (the supervisor, as root) and in the listener worker; no privileges needed.

Failure modes: :class:`Unsupported` from :func:`probe` (another Python implementation,
no ``_ssl`` module, a changed object layout); ``ValueError`` from
:func:`set_client_ca_names` when the file holds no certificate.
"""

from __future__ import annotations

import ctypes
import ssl
from functools import lru_cache
from typing import Any

SSL_VERIFY_PEER = 0x01
X509_V_OK = 0

_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept(preverify_ok: int, store_ctx: int | None) -> int:
    # netqmail's verify_cb: "we don't care about the result" during the handshake; the
    # result stays readable with SSL_get_verify_result.
    return 1


# Kept alive for the life of the process: libssl holds the bare function pointer.
_ACCEPT_ALL = _VERIFY_CB(_accept)


class Unsupported(Exception):
    """This Python's ssl module cannot be reached at the libssl level."""


@lru_cache(maxsize=1)
def _lib() -> Any:
    import _ssl

    # dlsym on the extension's handle searches its dependencies, i.e. its libssl;
    # a statically linked _ssl has no __file__ and its symbols are in the executable.
    lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
    vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    for name, res, args in (
        ("SSL_CTX_set_verify", None, (vp, c_int, _VERIFY_CB)),
        ("SSL_CTX_get_verify_mode", c_int, (vp,)),
        ("SSL_CTX_get_options", ctypes.c_uint64, (vp,)),
        ("SSL_CTX_set_client_CA_list", None, (vp, vp)),
        ("SSL_load_client_CA_file", vp, (ctypes.c_char_p,)),
        ("SSL_get_SSL_CTX", vp, (vp,)),
        ("SSL_get_verify_result", c_long, (vp,)),
        ("X509_verify_cert_error_string", ctypes.c_char_p, (c_long,)),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, list(args)
    return lib


def _ctx_ptr(ctx: ssl.SSLContext) -> int:
    # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx.
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0


def _ssl_ptr(obj: ssl.SSLObject) -> int:
    # PySSLSocket: PyObject_HEAD, PyObject *Socket, then SSL *ssl.
    inner = obj._sslobj  # type: ignore[attr-defined]
    address = id(inner) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
    return ctypes.c_void_p.from_address(address).value or 0


@lru_cache(maxsize=1)
def probe() -> None:
    """Check, once per process, that the pointers are where they are expected."""
    import platform

    if platform.python_implementation() != "CPython":
        raise Unsupported(f"needs CPython's ssl module, not {platform.python_implementation()}")
    try:
        lib = _lib()
    except (ImportError, OSError, AttributeError) as e:
        raise Unsupported(f"libssl not reachable: {e}") from e
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ptr = _ctx_ptr(ctx)
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise Unsupported("unexpected ssl.SSLContext layout")
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    ssl_ptr = _ssl_ptr(obj)
    if not ssl_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != ptr:
        raise Unsupported("unexpected ssl.SSLObject layout")


def verify_without_failing(ctx: ssl.SSLContext) -> None:
    """Ask for a client certificate (SSL_VERIFY_PEER, which ``CERT_OPTIONAL`` sets)
    but let every handshake complete whatever the certificate; set ``verify_mode``
    before this call, never after (the ssl module would drop the callback)."""
    probe()
    lib = _lib()
    ptr = _ctx_ptr(ctx)
    lib.SSL_CTX_set_verify(ptr, lib.SSL_CTX_get_verify_mode(ptr) | SSL_VERIFY_PEER, _ACCEPT_ALL)


def set_client_ca_names(ctx: ssl.SSLContext, cafile: str) -> None:
    """The CertificateRequest names the subjects of the certificates in ``cafile``."""
    probe()
    lib = _lib()
    names = lib.SSL_load_client_CA_file(cafile.encode())
    if not names:
        raise ValueError(f"{cafile}: no CA certificate names could be read")
    lib.SSL_CTX_set_client_CA_list(_ctx_ptr(ctx), names)  # takes ownership of the stack


def verify_result(obj: ssl.SSLObject) -> tuple[bool, str]:
    """(True, "ok") when the peer's certificate chain verified in the handshake, else
    (False, OpenSSL's text for the error, e.g. "unable to get local issuer certificate")."""
    lib = _lib()
    code = int(lib.SSL_get_verify_result(_ssl_ptr(obj)))
    if code == X509_V_OK:
        return True, "ok"
    text = lib.X509_verify_cert_error_string(code)
    return False, text.decode("ascii", "replace") if text else f"verify error {code}"
