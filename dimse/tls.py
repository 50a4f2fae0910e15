"""DICOM TLS (PS3.15 B.1, the BCP 195 profile of Python's ``ssl`` defaults): the server's
context, for associations pynetdicom runs, and the client's, for move destinations with
``tls = true``."""

from __future__ import annotations

import ssl

from gateway.config import DimseSettings


def server_tls_context(settings: DimseSettings) -> ssl.SSLContext | None:
    """The SCP's context when certificate files are configured; it requires and checks client
    certificates when ``tls_ca_certificates`` is set."""
    if not settings.tls_certificate:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates:
        context.load_verify_locations(settings.tls_ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(settings: DimseSettings) -> ssl.SSLContext:
    """The context of a move association: the destination's certificate is checked against
    ``tls_ca_certificates`` (or the system's store); the gateway presents its own certificate
    when one is configured."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.tls_ca_certificates) if settings.tls_ca_certificates else None,
    )
    if settings.tls_certificate:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return context
