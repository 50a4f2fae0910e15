"""WADO-RS: retrieve studies, series, instances, metadata and bulk data (PS3.18 §10.4).

* Instances are streamed as ``multipart/related; type="application/dicom"`` straight from the
  stored files in 1 MiB chunks, so memory stays flat whatever the study size. A file is parsed
  only when the ``Accept`` header's transfer syntax differs from the stored one and the gateway
  can transcode (decompress) to it; otherwise the answer is 406. The default transfer syntax is
  Explicit VR Little Endian (PS3.18 §8.7.3.5.2); ``transfer-syntax=*`` returns files as stored.
* ``/metadata`` is the stored DICOM JSON of each instance, joined as strings (nothing parsed,
  no file opened), with the relative BulkDataURIs made absolute, and an ``ETag``.
* ``/bulk/{tag path}`` serves the values behind the BulkDataURIs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from dicomweb.context import audit, base_url, gateway_of, require
from dicomweb.media import (
    ANY_TRANSFER_SYNTAX,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MEDIA_DICOM,
    MEDIA_DICOM_JSON,
    MEDIA_JSON,
    MEDIA_OCTET_STREAM,
    MULTIPART_RELATED,
    MediaRange,
    accept_of,
    closing_delimiter,
    multipart_content_type,
    new_boundary,
    not_acceptable,
    part_header,
)
from gateway.access import Scope
from gateway.audit import Action
from gateway.errors import GatewayError, NotFound
from gateway.http_status import HTTPProblem
from gateway.instances import (
    InstanceRef,
    validate_path,
    visible_digests,
    visible_instances,
    visible_metadata,
)
from gateway.storage import BlobStore

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Digits of a sequence item index in a bulk data path (int() refuses more than 4300).
MAX_ITEM_DIGITS = 9
# Transfer syntaxes the gateway can produce from any stored one it can decode.
TRANSCODE_TARGETS = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN})
RELATIVE_BULK = '"BulkDataURI":"studies/'


# -- transfer syntax negotiation ----------------------------------------------------------------
def can_decode(transfer_syntax: str) -> bool:
    """Whether pixel data stored in ``transfer_syntax`` can be decompressed here."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def choose_syntax(stored: str, wanted: list[str]) -> str | None:
    """The first of ``wanted`` transfer syntaxes an instance stored as ``stored`` can be sent in.

    >>> choose_syntax("1.2.840.10008.1.2.4.50", ["*"])
    '1.2.840.10008.1.2.4.50'
    >>> choose_syntax("1.2.840.10008.1.2.1", ["1.2.840.10008.1.2.4.50"]) is None
    True
    """
    for syntax in wanted:
        if syntax in (ANY_TRANSFER_SYNTAX, stored):
            return stored
        if syntax in TRANSCODE_TARGETS and can_decode(stored):
            return syntax
    return None


@dataclass(frozen=True)
class RetrievePlan:
    multipart: bool
    syntaxes: list[str]   # one per instance


def plan_retrieve(ranges: list[MediaRange], refs: list[InstanceRef], *,
                  single_allowed: bool) -> RetrievePlan:
    """Pick the response form and each instance's transfer syntax from the Accept ranges.

    Raises
    ------
    HTTPProblem
        406 when no acceptable form can carry every instance.
    """
    for multipart, group in _accept_groups(ranges, single_allowed):
        chosen = [choose_syntax(ref.transfer_syntax_uid, group) for ref in refs]
        if all(c is not None for c in chosen):
            return RetrievePlan(multipart, [c for c in chosen if c is not None])
    stored = sorted({ref.transfer_syntax_uid for ref in refs})
    raise not_acceptable(
        f"the instances are stored as {', '.join(stored)} and can be sent as stored "
        f"(transfer-syntax=*) or transcoded to {' or '.join(sorted(TRANSCODE_TARGETS))} "
        f'with multipart/related; type="{MEDIA_DICOM}"')


def _accept_groups(ranges: list[MediaRange], single_allowed: bool
                   ) -> list[tuple[bool, list[str]]]:
    """``(multipart, [transfer syntaxes])`` per acceptable range, best first."""
    groups: list[tuple[bool, list[str]]] = []
    for media in ranges:
        syntax = media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
        if media.media_type == MULTIPART_RELATED:
            part_type = media.params.get("type", MEDIA_DICOM)
            if part_type in (MEDIA_DICOM, "application/*", "*/*"):
                groups.append((True, [syntax]))
        elif media.media_type == MEDIA_DICOM and single_allowed:
            groups.append((False, [syntax]))
        elif media.media_type in ("*/*", "multipart/*"):
            groups.append((True, [EXPLICIT_VR_LITTLE_ENDIAN]))
    return groups


def transcode(path: Path, target: str) -> bytes:
    """Re-encode a stored instance in ``target`` (decompressing pixel data if needed)."""
    ds = dcmread(path)
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = UID(target)
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=target == IMPLICIT_VR_LITTLE_ENDIAN, little_endian=True,
               enforce_file_format=True)
    return out.getvalue()


# -- retrieve -------------------------------------------------------------------------------
def _location(base: str, ref: InstanceRef) -> str:
    return (f"{base}/studies/{ref.study_instance_uid}/series/{ref.series_instance_uid}"
            f"/instances/{ref.sop_instance_uid}")


def _part_type(syntax: str) -> str:
    return f"{MEDIA_DICOM}; transfer-syntax={syntax}"


def _open_sized(path: Path) -> tuple[BinaryIO, int]:
    f = open(path, "rb")  # noqa: SIM115 - closed by send_file
    return f, os.fstat(f.fileno()).st_size


async def send_file(request: web.Request, response: web.StreamResponse, path: Path,
                    size: int, *, zero_copy: bool) -> None:
    """Send a stored file as (part of) the body, with flat memory.

    ``zero_copy`` (only when the response has a ``Content-Length``, so no chunk framing is
    needed): the kernel copies the file to the socket (``loop.sendfile``), as aiohttp's own
    ``FileResponse`` does. Otherwise, or where sendfile is unavailable (TLS), 1 MiB reads on a
    worker thread.

    Raises
    ------
    ConnectionResetError
        If the file's size is not the indexed one (replaced or deleted meanwhile): the multipart
        framing would be wrong, so the connection is dropped instead.
    """
    f, actual = await asyncio.to_thread(_open_sized, path)
    try:
        if actual != size:
            logger.error("stored file %s has %d bytes, the index says %d; aborting", path.name,
                         actual, size)
            raise ConnectionResetError("stored file changed during retrieval")
        if zero_copy and request.transport is not None:
            try:
                await asyncio.get_running_loop().sendfile(request.transport, f, 0, size,
                                                          fallback=False)
                return
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                f.seek(0)
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            await response.write(chunk)
    finally:
        f.close()  # a read-only descriptor: closing does not wait on the disk


# Objects (S3) up to PREFETCH_MAX_BYTES are fetched whole, PREFETCH_WINDOW at once, ahead of
# the part being sent; larger ones are streamed in chunks in their turn. Memory per request
# stays under PREFETCH_WINDOW * PREFETCH_MAX_BYTES.
PREFETCH_WINDOW = 8
PREFETCH_MAX_BYTES = 4 * 1024**2


class ObjectPrefetch:
    """The stored parts of a WADO-RS response from an object store, fetched concurrently
    (bounded) ahead of the one being sent. Files (``storage.local``) are not prefetched."""

    def __init__(self, storage: BlobStore, refs: list[InstanceRef], stored: list[bool]) -> None:
        self.storage = storage
        self.refs = refs
        self.wanted = [i for i, (r, s) in enumerate(zip(refs, stored, strict=True))
                       if s and not storage.local and r.file_size <= PREFETCH_MAX_BYTES]
        self.tasks: dict[int, asyncio.Task[bytes]] = {}
        self.next = 0  # the next of self.wanted to start

    async def __aenter__(self) -> ObjectPrefetch:
        self._fill()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _fill(self) -> None:
        fetch = getattr(self.storage, "fetch_async", None)
        while fetch is not None and self.next < len(self.wanted) \
                and len(self.tasks) < PREFETCH_WINDOW:
            i = self.wanted[self.next]
            self.tasks[i] = asyncio.ensure_future(fetch(self.refs[i].file_path))
            self.next += 1

    async def ready(self, i: int) -> None:
        """Wait for part ``i`` if it is prefetched (its error, e.g. a store down, raised)."""
        task = self.tasks.get(i)
        if task is not None:
            await asyncio.shield(task)

    async def send(self, i: int, response: web.StreamResponse) -> None:
        """Write part ``i``'s bytes; a size other than the index's drops the connection
        (the multipart framing would be wrong)."""
        ref = self.refs[i]
        task = self.tasks.pop(i, None)
        sent = 0
        try:
            if task is not None:
                try:
                    data = await task
                finally:
                    self._fill()
                sent = len(data)
                if sent == ref.file_size:
                    await response.write(data)
            else:
                async for chunk in self.storage.stream_async(ref.file_path):
                    sent += len(chunk)
                    if sent > ref.file_size:
                        break
                    await response.write(chunk)
        except (GatewayError, FileNotFoundError) as exc:
            # The head is out: the only way to tell the client is to cut the body short.
            logger.error("stored object %s could not be read during retrieval: %s",
                         ref.file_path, exc)
            raise ConnectionResetError("stored object unreadable during retrieval") from None
        if sent != ref.file_size:
            logger.error("stored object %s has %d bytes, the index says %d; aborting",
                         ref.file_path, sent, ref.file_size)
            raise ConnectionResetError("stored object changed during retrieval")


async def _retrieve(request: web.Request, study: str, series: str | None = None,
                    instance: str | None = None) -> web.StreamResponse:
    who = require(request, Scope.DICOMWEB_READ)
    validate_path(study, series, instance)
    gateway = gateway_of(request)
    refs = await asyncio.to_thread(visible_instances, gateway.index, who, study, series, instance)
    plan = plan_retrieve(accept_of(request), refs, single_allowed=instance is not None)
    base = base_url(request)
    storage = gateway.storage
    if not plan.multipart:
        return await _single_instance(request, refs[0], plan.syntaxes[0], base)

    boundary = new_boundary()
    headers = [part_header(boundary, _part_type(s), _location(base, r))
               for r, s in zip(refs, plan.syntaxes, strict=True)]
    as_stored = [s == r.transfer_syntax_uid for r, s in zip(refs, plan.syntaxes, strict=True)]
    response = web.StreamResponse(headers={
        "Content-Type": multipart_content_type(boundary, MEDIA_DICOM),
    })
    if all(as_stored):
        # Every part is a file as stored: the length is known, no chunked encoding needed.
        response.content_length = (sum(len(h) + r.file_size + 2 for h, r in zip(headers, refs,
                                                                                 strict=True))
                                   + len(closing_delimiter(boundary)))
    await audit(request, Action.TRANSFER, (study,),
                detail=f"WADO-RS retrieve of {len(refs)} instances")
    if request.method == "HEAD":
        await response.prepare(request)
        await response.write_eof()
        return response
    async with ObjectPrefetch(storage, refs, as_stored) as prefetch:
        # The first object is awaited before the head goes out: a store that does not
        # answer is a 503, not a body cut short.
        await prefetch.ready(0)
        await response.prepare(request)
        for i, (ref, syntax, header, stored) in enumerate(
                zip(refs, plan.syntaxes, headers, as_stored, strict=True)):
            await response.write(header)
            if stored and storage.local:
                await send_file(request, response, storage.path(ref.file_path), ref.file_size,
                                zero_copy=response.content_length is not None)
            elif stored:
                await prefetch.send(i, response)
            else:
                path = await asyncio.to_thread(storage.path, ref.file_path)
                data = await asyncio.to_thread(transcode, path, syntax)
                await response.write(data)
            await response.write(b"\r\n")
    await response.write(closing_delimiter(boundary))
    await response.write_eof()
    return response


async def _single_instance(request: web.Request, ref: InstanceRef, syntax: str,
                           base: str) -> web.StreamResponse:
    storage = gateway_of(request).storage
    await audit(request, Action.TRANSFER, (ref.study_instance_uid,),
                detail="WADO-RS retrieve of 1 instance")
    headers = {"Content-Type": _part_type(syntax), "Content-Location": _location(base, ref)}
    if syntax == ref.transfer_syntax_uid:
        response = web.StreamResponse(headers=headers)
        response.content_length = ref.file_size
        if storage.local:
            await response.prepare(request)
            await send_file(request, response, storage.path(ref.file_path), ref.file_size,
                            zero_copy=False)
        else:
            async with ObjectPrefetch(storage, [ref], [True]) as prefetch:
                await prefetch.ready(0)
                await response.prepare(request)
                await prefetch.send(0, response)
        await response.write_eof()
        return response
    path = await asyncio.to_thread(storage.path, ref.file_path)
    data = await asyncio.to_thread(transcode, path, syntax)
    return web.Response(body=data, headers=headers)


async def retrieve_study(request: web.Request) -> web.StreamResponse:
    """``GET /studies/{study}`` (PS3.18 §10.4.1, Table 10.4.1-1)."""
    return await _retrieve(request, request.match_info["study"])


async def retrieve_series(request: web.Request) -> web.StreamResponse:
    """``GET /studies/{study}/series/{series}``."""
    return await _retrieve(request, request.match_info["study"], request.match_info["series"])


async def retrieve_instance(request: web.Request) -> web.StreamResponse:
    """``GET /studies/{study}/series/{series}/instances/{instance}``."""
    info = request.match_info
    return await _retrieve(request, info["study"], info["series"], info["instance"])


# -- metadata -------------------------------------------------------------------------------
def etag_of(base: str, digests: list[tuple[int, str]]) -> str:
    """A strong validator: changes when any instance (or the URL base) changes.

    >>> etag_of("http://h/dicomweb", [(1, "ab")]) == etag_of("http://h/dicomweb", [(1, "ac")])
    False
    """
    h = hashlib.sha256(base.encode())
    for pk, digest in digests:
        h.update(f"|{pk}:{digest}".encode())
    return f'"{h.hexdigest()[:32]}"'


def _if_none_match(request: web.Request, etag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def join_metadata(documents: list[str], base: str) -> bytes:
    """Join stored DICOM JSON documents into one array, BulkDataURIs made absolute.

    >>> join_metadata(['{"7FE00010":{"vr":"OW","BulkDataURI":"studies/1/bulk/7FE00010"}}'],
    ...               "http://h/dicomweb")
    b'[{"7FE00010":{"vr":"OW","BulkDataURI":"http://h/dicomweb/studies/1/bulk/7FE00010"}}]'
    """
    body = "[" + ",".join(documents) + "]"
    return body.replace(RELATIVE_BULK, f'"BulkDataURI":"{base}/studies/').encode()


async def _metadata(request: web.Request, study: str, series: str | None = None,
                    instance: str | None = None) -> web.Response:
    who = require(request, Scope.DICOMWEB_READ)
    validate_path(study, series, instance)
    for media in accept_of(request):
        if media.matches(MEDIA_DICOM_JSON) or media.media_type == MEDIA_JSON:
            break
    else:
        raise not_acceptable("metadata is served as application/dicom+json")
    index = gateway_of(request).index
    base = base_url(request)
    digests = await asyncio.to_thread(visible_digests, index, who, study, series, instance)
    etag = etag_of(base, digests)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if _if_none_match(request, etag):
        return web.Response(status=304, headers=headers)
    documents = await asyncio.to_thread(visible_metadata, index, who, study, series, instance)
    body = await asyncio.to_thread(join_metadata, documents, base)
    await audit(request, Action.RETRIEVE, (study,),
                detail=f"metadata of {len(documents)} instances")
    headers["Content-Type"] = MEDIA_DICOM_JSON
    return web.Response(body=body, headers=headers)


async def retrieve_study_metadata(request: web.Request) -> web.Response:
    """``GET /studies/{study}/metadata`` (PS3.18 §10.4.1.1.2)."""
    return await _metadata(request, request.match_info["study"])


async def retrieve_series_metadata(request: web.Request) -> web.Response:
    """``GET /studies/{study}/series/{series}/metadata``."""
    return await _metadata(request, request.match_info["study"], request.match_info["series"])


async def retrieve_instance_metadata(request: web.Request) -> web.Response:
    """``GET /studies/{study}/series/{series}/instances/{instance}/metadata``."""
    info = request.match_info
    return await _metadata(request, info["study"], info["series"], info["instance"])


# -- bulk data ------------------------------------------------------------------------------
def _parse_tag_path(path: str) -> list[int | str]:
    """``"00540016/0/00181072"`` -> ``["00540016", 0, "00181072"]``; 400 when malformed."""
    items: list[int | str] = []
    for i, part in enumerate(path.strip("/").split("/")):
        if i % 2 == 0:
            if len(part) != 8 or any(c not in "0123456789abcdefABCDEF" for c in part):
                raise HTTPProblem(400, f"bulk data path {path!r}: {part!r} is not a tag")
            items.append(part.upper())
        else:
            if not (part.isascii() and part.isdigit()) or len(part) > MAX_ITEM_DIGITS:
                raise HTTPProblem(400, f"bulk data path {path!r}: {part!r} is not an item index")
            items.append(int(part))
    if not items or isinstance(items[-1], int):
        raise HTTPProblem(400, f"bulk data path {path!r} must end with a tag")
    return items


def read_bulk(path: Path, tag_path: list[int | str]) -> tuple[list[bytes], str]:
    """The value(s) behind a BulkDataURI, and the stored transfer syntax.

    Native values come back as one part; encapsulated pixel data as one part per frame.

    Raises
    ------
    NotFound
        If the data set has no such element.
    """
    ds: Dataset = dcmread(path, defer_size=4096)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    node: Any = ds
    element: Any = None
    try:
        for step in tag_path:
            if isinstance(step, int):
                if element is None or element.VR != "SQ":
                    raise KeyError(step)
                node = element.value[step]
            else:
                element = node[int(step, 16)]
    except (KeyError, IndexError):
        raise NotFound("the instance has no value at this bulk data path") from None
    if element is None or element.VR == "SQ":
        raise NotFound("the bulk data path names a sequence, not a value")
    value = element.value
    if value is None:
        return [b""], syntax
    if tag_path == ["7FE00010"] and UID(syntax).is_encapsulated:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return list(generate_frames(value, number_of_frames=frames)), syntax
    if isinstance(value, str):
        return [value.encode()], syntax
    return [bytes(value)], syntax


async def retrieve_bulkdata(request: web.Request) -> web.StreamResponse:
    """``GET .../instances/{instance}/bulk/{tag path}`` (PS3.18 §10.4.1.1.5, BulkDataURI)."""
    who = require(request, Scope.DICOMWEB_READ)
    info = request.match_info
    study, series, instance = info["study"], info["series"], info["instance"]
    validate_path(study, series, instance)
    tag_path = _parse_tag_path(info["path"])
    gateway = gateway_of(request)
    refs = await asyncio.to_thread(visible_instances, gateway.index, who, study, series, instance)
    multipart = True
    for media in accept_of(request):
        if media.media_type == MEDIA_OCTET_STREAM:
            multipart = False
            break
        if media.media_type in ("*/*", "multipart/*") or (
            media.media_type == MULTIPART_RELATED
            and media.params.get("type", MEDIA_OCTET_STREAM) in (MEDIA_OCTET_STREAM, "*/*")
        ):
            break
    else:
        raise not_acceptable('bulk data is served as multipart/related; '
                             'type="application/octet-stream" or application/octet-stream')
    path = await asyncio.to_thread(gateway.storage.path, refs[0].file_path)
    parts, syntax = await asyncio.to_thread(read_bulk, path, tag_path)
    await audit(request, Action.RETRIEVE, (study,), detail="bulk data")
    encapsulated = UID(syntax).is_encapsulated and tag_path == ["7FE00010"]
    part_type = (f"{MEDIA_OCTET_STREAM}; transfer-syntax={syntax}" if encapsulated
                 else MEDIA_OCTET_STREAM)
    if not multipart:
        if len(parts) != 1:
            raise not_acceptable("encapsulated pixel data has one part per frame: ask for "
                                 'multipart/related; type="application/octet-stream"')
        return web.Response(body=parts[0], headers={"Content-Type": part_type})
    boundary = new_boundary()
    location = str(request.url)
    body = b"".join(part_header(boundary, part_type, location) + p + b"\r\n" for p in parts)
    body += closing_delimiter(boundary)
    return web.Response(body=body, headers={
        "Content-Type": multipart_content_type(boundary, MEDIA_OCTET_STREAM)})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/studies/{study}", retrieve_study)
    r.add_get("/studies/{study}/metadata", retrieve_study_metadata)
    r.add_get("/studies/{study}/series/{series}", retrieve_series)
    r.add_get("/studies/{study}/series/{series}/metadata", retrieve_series_metadata)
    r.add_get("/studies/{study}/series/{series}/instances/{instance}", retrieve_instance)
    r.add_get("/studies/{study}/series/{series}/instances/{instance}/metadata",
              retrieve_instance_metadata)
    r.add_get("/studies/{study}/series/{series}/instances/{instance}/bulk/{path:.+}",
              retrieve_bulkdata)
