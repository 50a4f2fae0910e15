"""STOW-RS: store instances (PS3.18 §10.5).

The body (``multipart/related; type="application/dicom"``) is read as a stream, one part at a
time; a part is kept in memory up to :data:`SPOOL_IN_MEMORY` bytes and spooled to a temporary file
beyond, so the request is never held whole. Each part goes through the same ingest path as
C-STORE (:meth:`gateway.ingest.Ingestor.ingest`: durable write, then index; identical re-sends
succeed, a different instance under a stored SOP Instance UID is refused).

The answer is the Store Instances Response Module (PS3.18 Table 10.5.3-2): ReferencedSOPSequence
with a RetrieveURL per stored instance, FailedSOPSequence with a FailureReason per refused one,
and the status of Table 10.5.3-1: 200 all stored, 202 some refused, 409 none stored, 415 for a
media type other than ``application/dicom`` parts.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage
from pydicom import dcmread

from dicomweb.context import audit, base_url, gateway_of, require
from dicomweb.media import (
    MEDIA_DICOM,
    MEDIA_DICOM_JSON,
    MEDIA_DICOM_XML,
    MEDIA_JSON,
    MULTIPART_RELATED,
    accept_of,
    not_acceptable,
    parse_accept,
)
from dicomweb.xml import to_native_xml
from gateway.access import Scope
from gateway.audit import Action, StoredInstances
from gateway.dicom_json import Unsupported, read_file_meta
from gateway.errors import (
    Forbidden,
    GatewayError,
    Unavailable,
)
from gateway.http_status import HTTPProblem
from gateway.ingest import IngestResult
from gateway.metadata import DEFLATED
from gateway.status import CANNOT_UNDERSTAND, PROCESSING_FAILURE, store_status
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

# FailureReason values (PS3.18 §10.5.3 reuses PS3.4 B.2.3): gateway.status, shared with C-STORE.

SPOOL_IN_MEMORY = 16 * 1024 * 1024
READ_CHUNK = 256 * 1024
FAILED_ATTRIBUTES = "00741048"  # FailedAttributesSequence
ERROR_COMMENT = "00000902"  # ErrorComment (LO: 64 characters)
# The preamble and prefix put in front of a part that starts at its file meta group.
PART10_HEADER = bytes(128) + b"DICM"
# Bytes of a part read again to name it when the ingest path could not read it at all.
IDENTIFY_BYTES = 64 * 1024


@dataclass
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    failure: int | None = None
    reason: str = ""
    # Refused because the index's database or the object store did not answer.
    unavailable: Unavailable | None = None


class Spool:
    """A part's bytes: in memory up to :data:`SPOOL_IN_MEMORY`, in a temporary file beyond.

    The Part 10 header a bare data set lacks (:func:`with_part10_header`) is put in front as
    the part is kept, so that :meth:`read` makes the instance's bytes in one piece, once.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.chunks: list[bytes] = []
        self.size = 0
        self.file: Any = None

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.file is None:
            self.chunks.append(chunk)
            if self.size > SPOOL_IN_MEMORY:
                self.file = await asyncio.to_thread(
                    tempfile.TemporaryFile, dir=self.directory, prefix="stow-")
                chunks, self.chunks = with_part10_header(self.chunks), []
                await asyncio.to_thread(self.file.writelines, chunks)
        else:
            await asyncio.to_thread(self.file.write, chunk)

    def read(self) -> bytes:
        """All the bytes, with the Part 10 header (called on a worker thread)."""
        if self.file is None:
            return b"".join(with_part10_header(self.chunks)) if self.chunks else b""
        self.file.seek(0)
        data: bytes = self.file.read()
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.chunks = []


def _identify(data: bytes) -> tuple[str, str]:
    """SOP Class and Instance UIDs of a part the ingest path could not read, when they can be
    read at all: of a deflated one, from its file meta information (reading its data set would
    inflate it); else only from its first :data:`IDENTIFY_BYTES`, where they are (group 0008)."""
    try:
        meta, _ = read_file_meta(data)
        if meta.get(0x00020010) == DEFLATED:
            return meta.get(0x00020002, ""), meta.get(0x00020003, "")
    except Unsupported:
        pass
    try:
        ds = dcmread(io.BytesIO(data[:IDENTIFY_BYTES]), stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"], force=True)
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        return "", ""


def _brief(exc: Exception) -> str:
    """An error of the multipart reader, short and printable (it may quote the body)."""
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 200 else text[:200] + "..."


def with_part10_header(chunks: list[bytes]) -> list[bytes]:
    r"""The chunks of a part, with the preamble and ``DICM`` prefix in front when the part
    starts right at the file meta group.

    pydicom's ``dcmwrite`` (used by dicomweb-client's ``store_instances``) omits the 128-byte
    preamble unless the data set carries one; the meta group, hence the transfer syntax, is
    there, so the part is accepted as the Part 10 file it otherwise is.

    >>> b"".join(with_part10_header([b"\x02\x00", b"\x00\x00UL"]))[128:134]
    b'DICM\x02\x00'
    """
    if not chunks:
        return chunks
    head = chunks[0]
    for chunk in chunks[1:]:
        if len(head) >= 132:
            break
        head += chunk[:132]
    if len(head) >= 132 and head[128:132] == b"DICM":
        return chunks
    if head[:2] == b"\x02\x00":
        return [PART10_HEADER, *chunks]
    return chunks


def _store_part(request: web.Request, spool: Spool, study: str | None, source: str) -> Outcome:
    """Ingest one part (on a worker thread); map refusals to FailureReason values.

    The part is parsed once, by the ingest path; a refusal names the instance from what that
    parse read (:attr:`GatewayError.sop_uids`).
    """
    data = spool.read()
    try:
        result: IngestResult = gateway_of(request).ingestor.ingest(
            data, source=source, expected_study_instance_uid=study)
    except GatewayError as exc:
        failure = store_status(exc)
        sop_class, sop_instance = exc.sop_uids or _identify(data)
        logger.info("STOW-RS part refused (%s, 0x%04X): %s", sop_instance or "unreadable",
                    failure, exc)
        return Outcome(sop_class, sop_instance, failure=failure, reason=str(exc),
                       unavailable=exc if isinstance(exc, Unavailable) else None)
    except Exception as exc:
        logger.exception("STOW-RS part failed")
        sop_class, sop_instance = _identify(data)
        return Outcome(sop_class, sop_instance, failure=PROCESSING_FAILURE,
                       reason=type(exc).__name__)
    finally:
        spool.close()
    return Outcome(result.sop_class_uid, result.sop_instance_uid, result.study_instance_uid,
                   result.series_instance_uid)


def _check_media_type(request: web.Request) -> None:
    ranges = parse_accept(request.headers.get("Content-Type", ""))
    media = ranges[0] if ranges else None
    if media is None or media.media_type != MULTIPART_RELATED:
        raise HTTPProblem(415, 'STOW-RS takes multipart/related; type="application/dicom" '
                               f"bodies, not {request.content_type or 'no Content-Type'}")
    part_type = media.params.get("type", MEDIA_DICOM)
    if part_type != MEDIA_DICOM:
        raise HTTPProblem(415, f"parts of type {part_type} are not supported; send Part 10 "
                               'instances as multipart/related; type="application/dicom"')
    if "boundary" not in media.params:
        raise HTTPProblem(400, "the multipart Content-Type has no boundary parameter")


def _response_form(request: web.Request) -> str:
    for media in accept_of(request):
        if media.matches(MEDIA_DICOM_JSON) or media.media_type == MEDIA_JSON:
            return "json"
        if media.media_type == MEDIA_DICOM_XML or (
                media.media_type == MULTIPART_RELATED
                and media.params.get("type") == MEDIA_DICOM_XML):
            return "xml"
    raise not_acceptable("the STOW-RS response is application/dicom+json or "
                         "application/dicom+xml")


def response_dataset(outcomes: list[Outcome], base: str, study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-2) as DICOM JSON."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for o in outcomes:
        item: dict[str, Any] = {
            "00081150": {"vr": "UI", **({"Value": [o.sop_class_uid]} if o.sop_class_uid else {})},
            "00081155": {"vr": "UI",
                         **({"Value": [o.sop_instance_uid]} if o.sop_instance_uid else {})},
        }
        if o.failure is None:
            item["00081190"] = {"vr": "UR", "Value": [
                f"{base}/studies/{o.study_instance_uid}/series/{o.series_instance_uid}"
                f"/instances/{o.sop_instance_uid}"]}
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [o.failure]}
            if o.reason:
                # Why, in words, as the Microsoft DICOM service says it: an ErrorComment in
                # a FailedAttributesSequence item (PS3.18 Table 10.5.3-2 leaves it open).
                item[FAILED_ATTRIBUTES] = {"vr": "SQ", "Value": [
                    {ERROR_COMMENT: {"vr": "LO", "Value": [o.reason[:64]]}}]}
            failed.append(item)
    dataset: dict[str, Any] = {}
    studies = {o.study_instance_uid for o in outcomes if o.failure is None}
    target = study or (studies.pop() if len(studies) == 1 else None)
    if target:
        dataset["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{target}"]}
    if failed:
        dataset["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        dataset["00081199"] = {"vr": "SQ", "Value": referenced}
    return dataset


async def store_instances(request: web.Request) -> web.Response:
    """``POST /studies`` and ``POST /studies/{study}`` (PS3.18 §10.5.1)."""
    who = require(request, Scope.DICOMWEB_WRITE)
    if who.restricted:
        raise Forbidden("a session limited to some studies cannot store instances")
    study = request.match_info.get("study")
    if study is not None:
        validate_uid(study, "StudyInstanceUID")
    _check_media_type(request)
    form = _response_form(request)
    gateway = gateway_of(request)
    limit = gateway.settings.http.max_upload_bytes
    max_parts = gateway.settings.http.max_stow_parts
    max_part_bytes = gateway.settings.http.max_part_bytes
    if request.content_length is not None and request.content_length > limit:
        raise HTTPProblem(413, f"the body has {request.content_length} bytes; this server "
                               f"takes at most {limit} (http.max_upload_bytes)")
    spool_dir = gateway.settings.data_dir / "tmp"
    await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
    source = f"stow:{who.audit_name}"[:200]
    reader = MultipartReader(request.headers, request.content)
    outcomes: list[Outcome] = []
    received = 0
    try:
        while True:
            try:
                part = await reader.next()
            except (ValueError, BadHttpMessage) as exc:
                # A part's headers are parsed as HTTP headers (RFC 2046 §5.1.1): a malformed
                # one raises aiohttp's BadHttpMessage (InvalidHeader, LineTooLong).
                raise HTTPProblem(400, f"malformed multipart body: {_brief(exc)}") from None
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise HTTPProblem(415, "nested multipart bodies are not supported")
            if len(outcomes) >= max_parts:
                raise HTTPProblem(413, f"the body has more than {max_parts} parts "
                                       "(http.max_stow_parts); the parts before the limit "
                                       "were stored")
            part_type = (part.headers.get("Content-Type", MEDIA_DICOM)
                         .split(";")[0].strip().lower())
            spool = Spool(str(spool_dir))
            try:
                while chunk := await part.read_chunk(READ_CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise HTTPProblem(413, f"the body exceeds {limit} bytes "
                                               "(http.max_upload_bytes); the parts before the "
                                               "limit were stored")
                    if spool.size + len(chunk) > max_part_bytes:
                        raise HTTPProblem(413, f"part {len(outcomes) + 1} exceeds "
                                               f"{max_part_bytes} bytes (http.max_part_bytes); "
                                               "the parts before it were stored")
                    await spool.write(chunk)
            except BaseException:
                spool.close()
                raise
            if part_type != MEDIA_DICOM or not spool.size:
                spool.close()
                outcomes.append(Outcome("", "", failure=CANNOT_UNDERSTAND,
                                        reason=f"part of type {part_type}" if spool.size
                                        else "empty part"))
                continue
            outcomes.append(await asyncio.to_thread(_store_part, request, spool, study, source))
    finally:
        # Parts stored before a refusal of the rest of the body (413, malformed, nested) are
        # kept, so the trail must name them whatever the answer is.
        # One "DICOM Instances Transferred" entry per study for the whole request (PS3.15
        # A.5.3), each listing the instances stored in its study.
        stored = [o for o in outcomes if o.failure is None]
        if outcomes:
            instances = StoredInstances()
            for o in stored:
                instances.add(o.study_instance_uid, o.sop_instance_uid)
            await audit(request, Action.STORE, tuple(instances.studies),
                        detail=f"STOW-RS: {len(stored)} stored, "
                               f"{len(outcomes) - len(stored)} refused",
                        success=bool(stored), stored=instances if stored else None)
    if not outcomes:
        raise HTTPProblem(400, "the multipart body holds no part")
    down = next((o.unavailable for o in outcomes if o.unavailable is not None), None)
    if down is not None and not stored:
        raise down  # nothing kept and a dependency down: 503, send the whole body again
    status = 200 if len(stored) == len(outcomes) else 202 if stored else 409
    dataset = response_dataset(outcomes, base_url(request), study)
    if form == "xml":
        return web.Response(status=status, body=to_native_xml(dataset),
                            headers={"Content-Type": MEDIA_DICOM_XML})
    return web.Response(status=status, body=json.dumps(dataset).encode(),
                        headers={"Content-Type": MEDIA_DICOM_JSON})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/studies", store_instances)
    app.router.add_post("/studies/{study}", store_instances)
