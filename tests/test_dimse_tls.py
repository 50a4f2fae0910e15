"""DICOM TLS (PS3.15 B.1) on the SCP and on C-MOVE associations, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.core import Gateway
from tests.support.common import LiveServer
from tests.support.qr_helpers import ALL_SYNTAXES, identifier, load_study, qr_settings


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its private key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def client_context(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def refused_association(port: int, tls_args: tuple[ssl.SSLContext, str] | None) -> bool:
    """Try to associate; return whether it was established, closing the client's socket.

    pynetdicom (3.0) drops a requestor's socket without closing it when the peer ends the
    connection during negotiation (its shutdown fails first); the test closes it itself, so the
    ResourceWarning of a leak in the test's SCU cannot surface in a later test.
    """
    sockets: list[Any] = []

    def keep(event: Any) -> None:
        sockets.append(event.assoc.dul.socket.socket)

    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW", tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, keep)])
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    for thread in (assoc, assoc.dul):
        if thread.ident is not None:
            thread.join(timeout=10)
    for sock in sockets:
        if sock is not None:
            sock.close()
    return not established


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path / "pki"
    folder.mkdir()
    return {name: self_signed(folder, name) for name in ("gateway", "client", "receiver")}


@pytest.fixture
def tls_receiver(certificates: dict[str, tuple[Path, Path]]) -> Iterator[tuple[int, dict]]:
    """A Storage SCP that speaks TLS only and requires the gateway's client certificate."""
    received: dict[str, bytes] = {}

    def handle_store(event: object) -> int:
        ds = event.dataset  # type: ignore[attr-defined]
        received[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
        request = event.request  # type: ignore[attr-defined]
        received[f"originator:{ds.SOPInstanceUID}"] = str(
            request.MoveOriginatorApplicationEntityTitle).encode()
        return 0x0000

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificates["receiver"])
    context.load_verify_locations(certificates["gateway"][0])
    context.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="TLSSTORE")
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=context,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield int(server.server_address[1]), received
    finally:
        server.shutdown()


@pytest.fixture
def tls_live(tmp_path: Path, database_url: str, certificates: dict[str, tuple[Path, Path]],
             tls_receiver: tuple[int, dict]) -> Iterator[LiveServer]:
    """The gateway with TLS on its SCP (client certificates required) and a TLS destination."""
    ca_bundle = tmp_path / "pki" / "trusted.pem"
    ca_bundle.write_bytes(certificates["client"][0].read_bytes()
                          + certificates["receiver"][0].read_bytes())
    settings = qr_settings(
        tmp_path, database_url,
        dimse={"tls_certificate": str(certificates["gateway"][0]),
               "tls_private_key": str(certificates["gateway"][1]),
               "tls_ca_certificates": str(ca_bundle)},
        destinations={"TLSSTORE": {"host": "127.0.0.1", "port": tls_receiver[0],
                                   "tls": True}},
    )
    gateway = Gateway(settings).open()
    try:
        with LiveServer(gateway) as live:
            yield live
    finally:
        gateway.close()


def test_tls_scu_with_client_certificate_is_served(
        tls_live: LiveServer, certificates: dict[str, tuple[Path, Path]]) -> None:
    load_study(tls_live.gateway)
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    context = client_context(certificates["gateway"][0], certificates["client"])
    assoc = ae.associate("127.0.0.1", tls_live.dimse_port, ae_title="DICOMGW",
                         tls_args=(context, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    responses = list(assoc.send_c_find(identifier("STUDY", StudyInstanceUID=""),
                                       StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert [int(s.Status) for s, _ in responses] == [0xFF00, 0x0000]


def test_tls_scu_without_client_certificate_is_refused(
        tls_live: LiveServer, certificates: dict[str, tuple[Path, Path]]) -> None:
    context = client_context(certificates["gateway"][0])
    assert refused_association(tls_live.dimse_port, (context, "localhost"))


def test_plain_tcp_scu_is_not_served_by_a_tls_scp(tls_live: LiveServer) -> None:
    assert refused_association(tls_live.dimse_port, None)


def test_move_to_a_tls_destination(tls_live: LiveServer, tls_receiver: tuple[int, dict],
                                   certificates: dict[str, tuple[Path, Path]]) -> None:
    study = load_study(tls_live.gateway)
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    context = client_context(certificates["gateway"][0], certificates["client"])
    assoc = ae.associate("127.0.0.1", tls_live.dimse_port, ae_title="DICOMGW",
                         tls_args=(context, "localhost"))
    responses = list(assoc.send_c_move(
        identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID), "TLSSTORE",
        StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    final = responses[-1][0]
    assert int(final.Status) == 0x0000
    assert final.NumberOfCompletedSuboperations == len(study)
    _port, received = tls_receiver
    assert {k: v for k, v in received.items() if not k.startswith("originator:")} == {
        str(d.SOPInstanceUID): bytes(d.PixelData) for d in study}
    # The C-STORE sub-operations name the C-MOVE's requestor (PS3.7 9.1.1.1).
    assert {received[f"originator:{d.SOPInstanceUID}"] for d in study} == {b"TLSSCU"}
