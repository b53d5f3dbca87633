"""TLS with an upstream: what the client trusts and presents, and why a handshake failed.

:func:`tls_context` builds the context a client for one upstream verifies the server with
(the site's ``ca_file``, else httpx's CA bundle) and presents its client certificate from.
:func:`tls_refusal` and :func:`tls_failure` read a failed handshake's exception chain for a
reason a person can act on (which side refused, or OpenSSL's reason), which
:class:`sync_agent.transport.TlsAwareTransport` raises as ``UpstreamError(AUTH)``: the two
ends do not accept each other, a configuration problem, not a fault of the items.
"""

from __future__ import annotations

import ssl

import httpx

from appliance.config import AuthKind, UpstreamConfig
from appliance.errors import KeyFileError

# OpenSSL's names for the alerts by which a server refuses our certificate or the handshake
# (RFC 8446 section 6.2; TLS 1.3 sends certificate_required when none was presented). An
# end-of-file or reset is deliberately not here: that is a lost connection, not a refusal.
_TLS_REFUSALS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_PROTOCOL_VERSION",
    }
)


def tls_refusal(exc: BaseException) -> str | None:
    """Why a TLS handshake failed for a configuration reason, or None if it did not.

    Walks the exception chain (httpx wraps httpcore, which wraps :mod:`ssl`).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return (
                f"we do not trust the server's certificate ({current.verify_message}); "
                "check ca_file and the server name"
            )
        if isinstance(current, ssl.SSLError) and current.reason in _TLS_REFUSALS:
            return (
                f"the server refused the TLS handshake ({current.reason}); check "
                "client_cert_file and that the upstream trusts its issuer"
            )
        current = current.__cause__ or current.__context__
    return None


# ssl's errors that are a connection lost in the handshake, not a handshake refused.
_TLS_LOST = (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, when OpenSSL gave a reason (``exc`` being a
    ``ConnectError``: the handshake is part of connecting), or None.

    Any reason other than :func:`tls_refusal`'s: https to a port that speaks plain HTTP
    (``WRONG_VERSION_NUMBER``), a protocol version or a key we do not accept
    (``UNSUPPORTED_PROTOCOL``, ``DH_KEY_TOO_SMALL``)... It happens again on every try, so it
    is for a person to mend, not a dead link to wait out. An end-of-file or a reset is not
    one: that is a lost connection.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # OpenSSL's reason is a name (WRONG_VERSION_NUMBER): no key material, no data.
        lost = isinstance(current, _TLS_LOST)
        if isinstance(current, ssl.SSLError) and not lost and current.reason:
            return (
                f"the TLS handshake failed ({current.reason}); check that the address "
                "is the server's https port (not an http one) and that the server's "
                "TLS version and keys are current ones"
            )
        current = current.__cause__ or current.__context__
    return None


def tls_context(upstream: UpstreamConfig) -> ssl.SSLContext | bool:
    """How the client verifies the server, and the certificate it presents (mtls, or any
    upstream with ``client_cert_file``).

    ``True`` (httpx's default CA bundle) unless the site gives ``ca_file`` or a client
    certificate. Any file that does not load is a :class:`KeyFileError` naming it.
    """
    # Presented whenever configured: with auth = "mtls", or alongside SMART or a bearer.
    mtls = upstream.auth is AuthKind.MTLS or upstream.client_cert_file is not None
    if upstream.ca_file is None and not mtls:
        return True
    if upstream.ca_file is None:
        context = httpx.create_ssl_context()
    else:
        try:
            context = ssl.create_default_context(cafile=str(upstream.ca_file))
        except ssl.SSLError as exc:  # before OSError, its base class
            raise KeyFileError(
                f"{upstream.ca_file}: not a PEM CA bundle ({exc.reason or 'unreadable'})"
            ) from exc
        except OSError as exc:
            raise KeyFileError(
                f"{upstream.ca_file}: cannot read the CA bundle ({exc.strerror or exc})"
            ) from exc
    if mtls:
        # Imported here: auth imports sync_agent.transport, which imports this module.
        from sync_agent.auth import check_private_file

        assert upstream.client_cert_file is not None  # the config parser requires both
        assert upstream.client_key_file is not None
        check_private_file(upstream.client_key_file, "TLS client key")
        try:
            context.load_cert_chain(str(upstream.client_cert_file), str(upstream.client_key_file))
        except ssl.SSLError as exc:  # before OSError, its base class
            # e.g. KEY_VALUES_MISMATCH: OpenSSL's reason names no key material.
            raise KeyFileError(
                f"{upstream.client_cert_file}, {upstream.client_key_file}: the client "
                f"certificate and key do not load together ({exc.reason or 'unreadable'})"
            ) from exc
        except OSError as exc:
            raise KeyFileError(
                f"{upstream.client_cert_file}: cannot read the client certificate "
                f"({exc.strerror or exc})"
            ) from exc
    return context
