"""Fuzz the Upper Layer PDU reader and the command-set decoder: what a DIMSE peer sends.

A byte stream goes through a real socket pair into :class:`dimse.loop.upper_layer.PduReader`, as
the gateway's own association loop reads it (dimse/loop/acceptor.py): an A-ASSOCIATE-RQ is
negotiated (:func:`dimse.loop.negotiation.negotiate`, :func:`~dimse.loop.negotiation.ae_titles`), a
P-DATA-TF split into presentation data values (:func:`dimse.loop.upper_layer.pdvs`) whose command
fragments are joined and decoded (:func:`dimse.loop.command_set.decode`, ``us``, ``text``).
Documented refusals: :class:`~dimse.loop.upper_layer.ProtocolError` (the association is aborted),
:class:`~dimse.loop.command_set.CommandSetError`, and the end of the stream
(:class:`~dimse.loop.upper_layer.PeerClosed`). Anything else is a finding.

Seeds: the client side of real associations, pynetdicom against pynetdicom (C-ECHO, C-STORE,
C-FIND, release), whole and one PDU per seed.

Run: ``.venv/bin/python fuzz/fuzz_pdu.py -max_total_time=60``
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main  # noqa: E402

with atheris.instrument_imports(include=["dimse", "pynetdicom.pdu", "pynetdicom.pdu_items",
                                         "pynetdicom.presentation"]):
    from dimse.loop import command_set, upper_layer
    from dimse.loop.acceptor import PDU_LENGTH_CEILING
    from dimse.loop.negotiation import ae_titles, negotiate
    from dimse.scp import build_ae

from gateway.config import Settings

NAME = "pdu"
REFUSALS = (upper_layer.ProtocolError, command_set.CommandSetError)
MAX_PDU = 256 * 1024  # [dimse] max_pdu_size's default
FIELDS = (command_set.COMMAND_FIELD, command_set.COMMAND_DATA_SET_TYPE)
TEXT_FIELDS = (0x0002, 0x1000, 0x0600)  # Affected SOP Class / Instance UID, Move Destination

_SUPPORTED: list[Any] = list(
    build_ae(SimpleNamespace(settings=Settings())).supported_contexts)  # type: ignore[arg-type]


def _record(run: Any) -> bytes:
    """What a pynetdicom requestor sends during ``run(ae, port)``, through a relay in front of
    a pynetdicom acceptor."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
        Verification,
    )

    scp = AE(ae_title="DICOMGW")
    for sop_class in (Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind):
        scp.add_supported_context(sop_class)

    def find(event: Any) -> Any:
        yield 0x0000, None

    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_C_FIND, find)])
    relay = socket.create_server(("127.0.0.1", 0))
    sent = bytearray()

    def pump(source: socket.socket, target: socket.socket, keep: bool) -> None:
        while chunk := source.recv(65536):
            if keep:
                sent.extend(chunk)
            target.sendall(chunk)
        target.shutdown(socket.SHUT_WR)

    def serve() -> None:
        client, _ = relay.accept()
        upstream = socket.create_connection(server.server_address)
        back = threading.Thread(target=pump, args=(upstream, client, False))
        back.start()
        pump(client, upstream, True)
        back.join()
        client.close()
        upstream.close()

    relaying = threading.Thread(target=serve)
    relaying.start()
    try:
        ae = AE(ae_title="FUZZSCU")
        for sop_class in (Verification, CTImageStorage,
                          StudyRootQueryRetrieveInformationModelFind):
            ae.add_requested_context(sop_class)
        ae.maximum_pdu_size = 4096  # several P-DATA-TF for a data set
        assoc = ae.associate("127.0.0.1", relay.getsockname()[1], ae_title="DICOMGW")
        assert assoc.is_established
        run(assoc)
        assoc.release()
        relaying.join(timeout=10)
    finally:
        relay.close()
        server.shutdown()
    return bytes(sent)


def _split(stream: bytes) -> list[bytes]:
    pdus, offset = [], 0
    while offset + 6 <= len(stream):
        length = struct.unpack_from(">I", stream, offset + 2)[0]
        pdus.append(stream[offset:offset + 6 + length])
        offset += 6 + length
    return pdus


def seeds() -> list[bytes]:
    from pydicom.dataset import Dataset

    def exchange(assoc: Any) -> None:
        import numpy as np
        from pydicom.uid import CTImageStorage

        assoc.send_c_echo()
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ImplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.8.498.5.1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
        ds.PatientName, ds.PatientID, ds.Modality = "Fuzz^Seed", "P1", "CT"
        ds.Rows = ds.Columns = 48
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.arange(48 * 48, dtype="<u2").tobytes()
        assoc.send_c_store(ds)
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "P1", ""
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
        )
        list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))

    stream = _record(exchange)
    return [stream, *_split(stream)]


def check(data: bytes) -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        reader = upper_layer.PduReader(ours)
        pending: list[bytes] = []
        while True:
            try:
                pdu_type, body = reader.read_pdu(PDU_LENGTH_CEILING)
            except upper_layer.PeerClosed:
                return
            if pdu_type == upper_layer.A_ASSOCIATE_RQ:
                request = bytes([pdu_type, 0]) + struct.pack(">I", len(body)) + bytes(body)
                ae_titles(request)
                negotiate(request, _SUPPORTED, MAX_PDU)
            elif pdu_type == upper_layer.P_DATA_TF:
                for _context_id, control, fragment in upper_layer.pdvs(body):
                    if not control & upper_layer.COMMAND:
                        continue
                    pending.append(bytes(fragment))
                    if control & upper_layer.LAST_FRAGMENT:
                        command = command_set.decode(b"".join(pending))
                        pending.clear()
                        for element in FIELDS:
                            command_set.us(command, element)
                        for element in TEXT_FIELDS:
                            command_set.text(command, element)
    except REFUSALS:
        return
    finally:
        ours.close()
        theirs.close()


if __name__ == "__main__":
    main(NAME, seeds, check)
