"""Pixel resources of WADO-RS: frames, rendered images and thumbnails (PS3.18 §10.4).

Routes, relative to the DICOMweb root:

- ``/studies/{s}/series/{se}/instances/{i}/frames/{list}`` — frames, multipart/related, one
  part per frame (§10.4.1.1.4), in the transfer syntax negotiated from ``Accept`` (§8.7.3.5):
  ``transfer-syntax=*`` returns frames as stored, ``application/octet-stream`` without a syntax
  returns Explicit VR Little Endian (decoded), an explicit syntax is produced when possible
  (as stored, decoded, or re-encoded as RLE / JPEG 2000 lossless), else 406.
- ``.../instances/{i}/rendered``, ``.../frames/{list}/rendered``, ``/studies/{s}/series/{se}/
  rendered``, ``/studies/{s}/rendered`` — rendered images (§10.4.1.1.3) as image/jpeg (default),
  image/png or image/gif (animated for multi-frame), with ``window``, ``viewport`` and ``quality``
  (§8.3.5.1); series and study answers are multipart/related, one image per instance.
- ``/studies/{s}/thumbnail``, ``.../series/{se}/thumbnail``, ``.../instances/{i}/thumbnail``,
  ``.../frames/{n}/thumbnail`` (§10.4.1.1.5): a representative image (the middle instance of
  the first image series of a study, the middle instance of a series, the middle frame of an
  instance), 128 pixels a side unless ``viewport`` says otherwise.

Every handler requires ``dicomweb:read``; a restricted principal (a viewer session) sees only
its study, or its key images, and gets 404 for anything else, as if it did not exist. Files are
read, decoded and encoded in worker threads (``asyncio.to_thread``); rendered images and
thumbnails are kept in a bounded on-disk cache (:mod:`gateway.rendercache`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from dicomweb.context import GATEWAY, PRINCIPAL, audit, require
from dicomweb.media import MediaRange, accept_of
from gateway.access import Principal, Scope
from gateway.audit import Action
from gateway.core import Gateway
from gateway.errors import NotFound
from gateway.http_status import HTTPProblem
from gateway.instances import InstanceRef, visible_instances
from gateway.pixels import (
    MEDIA_OCTET_STREAM,
    SYNTAXES_OF_MEDIA,
    ImageTooLarge,
    NotAcceptable,
    PixelDataError,
    PixelFile,
    PixelLimits,
    frames_of,
    open_pixel_file,
    parse_frame_list,
)
from gateway.render import (
    MEDIA_GIF,
    MEDIA_JPEG,
    RENDERED_MEDIA_TYPES,
    RenderParams,
    parse_quality,
    parse_viewport,
    parse_window,
    render_frame,
    render_frames,
    thumbnail_params,
)
from gateway.rendercache import DEFAULT_MAX_BYTES, RenderCache, cache_key

logger = logging.getLogger(__name__)

MEDIA_MULTIPART = "multipart/related"
# Bytes of frames read per worker-thread call while streaming a multipart answer.
STREAM_BATCH_BYTES = 8 * 1024**2
# Pixel requests of one viewer for one study within this many seconds share one audit entry.
AUDIT_WINDOW_SECONDS = 60.0
# Instances rendered by one series or study request.
MAX_RENDERED_INSTANCES = 5000
T = TypeVar("T")


class PixelServices:
    """What the pixel handlers share: the core, limits and the render cache."""

    def __init__(self, gateway: Gateway) -> None:
        table = gateway.settings.extra.get("pixels", {})
        self.gateway = gateway
        self.limits = PixelLimits.from_settings(table, also=("cache_bytes",
                                                             "audit_window_seconds"))
        cache_bytes = int(table.get("cache_bytes", DEFAULT_MAX_BYTES))
        self.cache = RenderCache(gateway.settings.data_dir / "cache" / "rendered", cache_bytes)
        self.audit_window = AuditCoalescer(float(table.get("audit_window_seconds",
                                                           AUDIT_WINDOW_SECONDS)))


PIXELS = web.AppKey("pixel_services", PixelServices)


class AuditCoalescer:
    """Keeps the access trail to one entry per viewer, study and kind of pixel request a window.

    A viewer opening a 500-slice series asks for 500 frames; the trail (PS3.15 A.5.3.6, DICOM
    Instances Transferred) needs to say who got which study when, not 500 times over, and a
    synchronous database row per frame would cost more than serving the frame. The first
    request of a (principal, link, study, kind) in each ``window`` seconds is recorded; the
    others are covered by it.
    """

    def __init__(self, window: float = AUDIT_WINDOW_SECONDS, size: int = 10000) -> None:
        self.window = window
        self.size = size
        self._last: dict[tuple[str, str | None, str, str], float] = {}
        self._lock = threading.Lock()

    def due(self, principal: Principal, study: str, kind: str) -> bool:
        """Whether this access opens a new window (and so must be recorded)."""
        key = (principal.audit_name, principal.jti, study, kind)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.window:
                return False
            if len(self._last) >= self.size:
                self._last = {k: t for k, t in self._last.items() if now - t < self.window}
            self._last[key] = now
            return True


async def _audit(request: web.Request, services: PixelServices, action: Action,
                 study: str, kind: str) -> None:
    """Record a successful pixel access, once per viewer, study and kind a window."""
    if services.audit_window.due(request[PRINCIPAL], study, kind):
        window = round(services.audit_window.window)
        await audit(request, action, (study,),
                    detail=f"WADO-RS {kind} (one entry per study and {window} s)")


def _pixel_file(gateway: Gateway, image: InstanceRef) -> PixelFile:
    if not image.has_pixels:
        raise PixelDataError(f"instance {image.sop_instance_uid} has no pixel data")
    return open_pixel_file(gateway.storage.blob(image.file_path, image.file_size))


# -- Accept negotiation (PS3.18 §8.7.3.5) ----------------------------------------------------

@dataclass(frozen=True)
class FrameChoice:
    """The negotiated answer of a frames request."""

    multipart: bool
    media_type: str
    transfer_syntax: str  # what to ask frame_in for ("*" = as stored)


def negotiate_frames(ranges: Sequence[MediaRange], pixel_file: PixelFile,
                     frame_count: int) -> FrameChoice:
    """Choose media type and transfer syntax of frames (PS3.18 §8.7.3.5, Table 8.7.3-2).

    Raises
    ------
    NotAcceptable
        No acceptable media type can be produced for this instance.
    """
    stored = pixel_file.transfer_syntax_uid
    for media_range in ranges:
        multipart = True
        if media_range.media_type in ("multipart/related", "multipart/*"):
            media = media_range.params.get("type", MEDIA_OCTET_STREAM)
        elif media_range.media_type in ("*/*", "application/*"):
            media = MEDIA_OCTET_STREAM
        elif media_range.media_type in SYNTAXES_OF_MEDIA and frame_count == 1:
            media, multipart = media_range.media_type, False  # one frame, single part
        else:
            continue
        syntaxes = SYNTAXES_OF_MEDIA.get(media)
        if syntaxes is None:
            continue
        wanted = media_range.params.get("transfer-syntax")
        if wanted is None:
            wanted = stored if stored in syntaxes else syntaxes[0]
        if wanted == "*":
            if media == MEDIA_OCTET_STREAM or stored in syntaxes:
                return FrameChoice(multipart, media, "*")
            continue
        # Lenient: application/octet-stream with a compressed syntax (which Table 8.7.3-2
        # gives its own media type) is answered too, as some viewers ask for it.
        if (wanted in syntaxes or media == MEDIA_OCTET_STREAM) and \
                pixel_file.can_produce(wanted):
            return FrameChoice(multipart, media, wanted)
    offered = ["multipart/related; type=\"application/octet-stream\"; transfer-syntax=*",
               "multipart/related; type=\"application/octet-stream\"; "
               "transfer-syntax=1.2.840.10008.1.2.1"]
    raise NotAcceptable("cannot produce any of the accepted media types for this instance "
                        f"(stored as {stored}); acceptable: " + ", ".join(offered))


def negotiate_rendered(ranges: Sequence[MediaRange], *, allow_gif: bool = True) -> str:
    """Choose the rendered media type: image/jpeg by default (PS3.18 §8.7.4, Table 8.7.4-1)."""
    for media_range in ranges:
        media = media_range.media_type
        if media == MEDIA_MULTIPART:
            media = media_range.params.get("type", MEDIA_JPEG)
        if media in ("*/*", "image/*", "multipart/*"):
            return MEDIA_JPEG
        if media in RENDERED_MEDIA_TYPES and (allow_gif or media != MEDIA_GIF):
            return media
    raise NotAcceptable("rendered images are available as image/jpeg, image/png and "
                        "image/gif; none of them is acceptable to this request")


def render_params(request: web.Request, media_type: str, *, thumbnail: bool,
                  limits: PixelLimits) -> RenderParams:
    """Read ``window``, ``viewport`` and ``quality`` (PS3.18 §8.3.5.1); others are ignored."""
    query = request.query
    window = parse_window(query["window"]) if "window" in query and not thumbnail else None
    viewport = parse_viewport(query["viewport"], limits) if "viewport" in query else None
    quality = parse_quality(query["quality"]) if "quality" in query else None
    if thumbnail:
        return thumbnail_params(viewport, quality, media_type)
    return RenderParams(media_type=media_type, window=window, viewport=viewport,
                        **({"quality": quality} if quality is not None else {}))


# -- responses ---------------------------------------------------------------------------------

async def _off_loop(services: PixelServices, work: Callable[[], T]) -> T:
    """Run CPU and file work in a worker thread, never on the event loop."""
    return await asyncio.to_thread(work)


def _boundary() -> str:
    return f"gw-{secrets.token_hex(16)}"


def _multipart_type(media: str, boundary: str, transfer_syntax: str | None = None) -> str:
    syntax = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    return f'{MEDIA_MULTIPART}; type="{media}"; boundary={boundary}{syntax}'


def _part_head(boundary: str, content_type: str, length: int,
               location: str | None = None) -> bytes:
    head = f"--{boundary}\r\nContent-Type: {content_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return f"{head}Content-Length: {length}\r\n\r\n".encode()


def _part(boundary: str, content_type: str, data: bytes, location: str | None = None) -> bytes:
    return b"".join((_part_head(boundary, content_type, len(data), location), data, b"\r\n"))


def _multipart_body(boundary: str, content_type: str, items: Sequence[bytes]) -> bytes:
    """A whole multipart/related body (RFC 2046 §5.1), copying each item once."""
    pieces: list[bytes] = []
    for data in items:
        pieces += (_part_head(boundary, content_type, len(data)), data, b"\r\n")
    pieces.append(f"--{boundary}--\r\n".encode())
    return b"".join(pieces)


def _base(request: web.Request) -> str:
    """The path of the DICOMweb root as the client sees it (for Content-Location)."""
    path = request.path
    study = request.match_info.get("study", "")
    at = path.find(f"/studies/{study}")
    return path[:at] if at >= 0 else ""


# -- handlers ---------------------------------------------------------------------------------

@dataclass
class _Frames:
    """What the worker thread found for a frames request."""

    pixel_file: PixelFile
    choice: FrameChoice
    syntax_out: str
    first: list[bytes]
    batch: int


async def retrieve_instance_frames(request: web.Request) -> web.StreamResponse:
    """WADO-RS Retrieve Frames (PS3.18 §10.4.1.1.4)."""
    principal = require(request, Scope.DICOMWEB_READ)
    services = request.config_dict[PIXELS]
    study, series, sop = (request.match_info[k] for k in ("study", "series", "instance"))
    numbers = parse_frame_list(request.match_info["frames"])
    ranges = accept_of(request)
    limits = services.limits

    def work() -> _Frames:
        # One worker-thread hop for the common case: lookup, negotiation, the first frames.
        (image,) = visible_instances(services.gateway.index, principal, study, series, sop)
        pixel_file = _pixel_file(services.gateway, image)
        parse_frame_list(request.match_info["frames"], pixel_file.number_of_frames)
        choice = negotiate_frames(ranges, pixel_file, len(numbers))
        batch = max(1, STREAM_BATCH_BYTES // max(pixel_file.image.frame_length, 1))
        first = frames_of(pixel_file, numbers[:batch], choice.transfer_syntax, limits=limits)
        return _Frames(pixel_file, choice, pixel_file.output_syntax(choice.transfer_syntax),
                       first, batch)

    found = await _off_loop(services, work)
    await _audit(request, services, Action.TRANSFER, study, "frames")
    choice = found.choice
    part_type = f"{choice.media_type}; transfer-syntax={found.syntax_out}"
    if not choice.multipart:
        return web.Response(body=found.first[0], headers={"Content-Type": part_type})
    boundary = _boundary()
    content_type = _multipart_type(choice.media_type, boundary, found.syntax_out)
    if len(numbers) <= found.batch:
        return web.Response(body=_multipart_body(boundary, part_type, found.first),
                            headers={"Content-Type": content_type})
    # Many frames: stream them in batches so that memory stays flat.
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    for frame in found.first:
        await response.write(_part(boundary, part_type, frame))
    for start in range(found.batch, len(numbers), found.batch):
        chunk = numbers[start:start + found.batch]
        frames = await _off_loop(services, functools.partial(
            frames_of, found.pixel_file, chunk, choice.transfer_syntax, limits=limits))
        for frame in frames:
            await response.write(_part(boundary, part_type, frame))
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response


def _render_one(services: PixelServices, image: InstanceRef, frame: int | None,
                params: RenderParams) -> tuple[bytes, str | None]:
    """Render one instance (``frame`` None: every frame for a GIF, else frame 1).

    Returns the image and, when it was rendered now, the cache key to store it under.
    """
    key = cache_key(image.sop_instance_uid, image.digest, frame, params.key())
    cached = services.cache.get(key)
    if cached is not None:
        return cached, None
    pixel_file = _pixel_file(services.gateway, image)
    if frame is None:
        return render_frames(pixel_file, params, limits=services.limits), key
    if frame >= pixel_file.number_of_frames:
        raise NotFound(f"frame {frame + 1} does not exist; the instance has "
                       f"{pixel_file.number_of_frames} frame(s)")
    return render_frame(pixel_file, frame, params, limits=services.limits), key


_PENDING: set[asyncio.Future[None]] = set()


def _store_later(services: PixelServices, rendered: list[tuple[bytes, str | None]]) -> None:
    """Write new cache entries in a worker thread without holding up the response."""
    entries = [(key, data) for data, key in rendered if key is not None]
    if not entries:
        return

    def store() -> None:
        for key, data in entries:
            services.cache.put(key, data)

    future = asyncio.get_running_loop().run_in_executor(None, store)
    _PENDING.add(future)
    future.add_done_callback(_PENDING.discard)


def _images_request(request: web.Request) -> tuple[str, str | None, str | None]:
    info = request.match_info
    return info["study"], info.get("series"), info.get("instance")


async def _multipart_images(request: web.Request, services: PixelServices,
                            images: list[InstanceRef], params: RenderParams) -> web.StreamResponse:
    boundary = _boundary()
    response = web.StreamResponse(headers={
        "Content-Type": _multipart_type(params.media_type, boundary)})
    await response.prepare(request)
    base = _base(request)
    for image in images:
        if client_gone(request):
            raise ConnectionResetError("the client closed the connection")
        rendered = await _off_loop(services, functools.partial(
            _render_one, services, image, 0, params))
        _store_later(services, [rendered])
        location = (f"{base}/studies/{image.study_instance_uid}/series/{image.series_instance_uid}"
                    f"/instances/{image.sop_instance_uid}/rendered")
        await response.write(_part(boundary, params.media_type, rendered[0], location))
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response


def check_rendered_pixels(images: Sequence[InstanceRef], frames: int, params: RenderParams,
                          limits: PixelLimits) -> None:
    """Refuse a rendered request whose output would exceed ``[pixels] max_rendered_pixels``.

    Each rendered frame counts its output size: the viewport's, else the frame's own
    (``max_frame_pixels`` when the index does not know it).

    Raises
    ------
    ImageTooLarge
        Frames x output pixels over the limit.
    """
    viewport = params.viewport
    total = 0
    for image in images:
        each = (viewport.width * viewport.height if viewport is not None
                else image.pixels or limits.max_frame_pixels)
        total += each * frames
    if total > limits.max_rendered_pixels:
        raise ImageTooLarge(
            f"{total} rendered pixels asked for ({len(images)} instance(s), {frames} frame(s) "
            f"each); at most {limits.max_rendered_pixels} per request "
            "([pixels] max_rendered_pixels): ask for fewer frames or a smaller viewport")


def client_gone(request: web.Request) -> bool:
    """Whether the client of ``request`` has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def retrieve_rendered(request: web.Request) -> web.StreamResponse:
    """Rendered study, series, instance or frames (PS3.18 §10.4.1.1.3)."""
    principal = require(request, Scope.DICOMWEB_READ)
    services = request.config_dict[PIXELS]
    study, series, sop = _images_request(request)
    frames_text = request.match_info.get("frames")
    numbers = parse_frame_list(frames_text) if frames_text is not None else None
    if numbers is not None:
        numbers = list(dict.fromkeys(numbers))  # each frame rendered once, in the order asked
    media = negotiate_rendered(accept_of(request))
    params = render_params(request, media, thumbnail=False, limits=services.limits)
    if sop is None and params.media_type == MEDIA_GIF:
        params = RenderParams(MEDIA_JPEG, params.window, params.viewport, params.quality)

    def work() -> tuple[list[InstanceRef], list[tuple[bytes, str | None]]]:
        # Instance and one frame: lookup and rendering in one worker-thread hop.
        found = visible_instances(services.gateway.index, principal, study, series, sop)
        images = [i for i in found if i.has_pixels]
        if not images:
            raise PixelDataError("no instance there has pixel data to render")
        check_rendered_pixels(images, len(numbers) if numbers is not None else 1, params,
                              services.limits)
        if sop is None or (numbers is not None and len(numbers) > 1):
            return images, []
        frame = None if numbers is None else numbers[0] - 1
        return images, [_render_one(services, images[0], frame, params)]

    images, rendered = await _off_loop(services, work)
    await _audit(request, services, Action.RETRIEVE, study, "rendered")
    if sop is None:
        if len(images) > MAX_RENDERED_INSTANCES:
            raise HTTPProblem(413, f"{len(images)} instances: at most {MAX_RENDERED_INSTANCES} "
                                   "are rendered in one request; ask for each series")
        return await _multipart_images(request, services, images, params)
    if numbers is not None and len(numbers) > 1:
        # One frame per worker-thread hop, stopping as soon as the client goes away.
        for number in numbers:
            if client_gone(request):
                raise ConnectionResetError("the client closed the connection")
            rendered.append(await _off_loop(services, functools.partial(
                _render_one, services, images[0], number - 1, params)))
    _store_later(services, rendered)
    if len(rendered) == 1:
        return web.Response(body=rendered[0][0], headers={"Content-Type": params.media_type})
    boundary = _boundary()
    body = _multipart_body(boundary, params.media_type, [data for data, _ in rendered])
    return web.Response(body=body,
                        headers={"Content-Type": _multipart_type(params.media_type, boundary)})


def representative(images: list[InstanceRef]) -> InstanceRef:
    """The thumbnail's instance: the middle one of the first series with pixel data."""
    with_pixels = [i for i in images if i.has_pixels]
    if not with_pixels:
        raise PixelDataError("no instance there has pixel data for a thumbnail")
    first_series = with_pixels[0].series_instance_uid
    series = [i for i in with_pixels if i.series_instance_uid == first_series]
    return series[(len(series) - 1) // 2]


async def retrieve_thumbnail(request: web.Request) -> web.StreamResponse:
    """Thumbnail of a study, series, instance or frame (PS3.18 §10.4.1.1.5)."""
    principal = require(request, Scope.DICOMWEB_READ)
    services = request.config_dict[PIXELS]
    study, series, sop = _images_request(request)
    frames_text = request.match_info.get("frames")
    numbers = parse_frame_list(frames_text) if frames_text is not None else None
    if numbers is not None and len(numbers) != 1:
        raise HTTPProblem(400, "a thumbnail is of one frame", parameter="frames")
    media = negotiate_rendered(accept_of(request), allow_gif=False)
    params = render_params(request, media, thumbnail=True, limits=services.limits)

    def work() -> tuple[bytes, str | None]:
        image = representative(visible_instances(services.gateway.index, principal, study,
                                                 series, sop))
        frame = numbers[0] - 1 if numbers is not None else (image.number_of_frames - 1) // 2
        return _render_one(services, image, frame, params)

    rendered = await _off_loop(services, work)
    await _audit(request, services, Action.RETRIEVE, study, "thumbnail")
    _store_later(services, [rendered])
    return web.Response(body=rendered[0], headers={"Content-Type": params.media_type,
                                                   "Cache-Control": "private, max-age=300"})


def add_routes(app: web.Application) -> None:
    """Register the pixel routes (frames, rendered, thumbnail) on the DICOMweb application.

    Needs ``app[GATEWAY]`` set first (``create_app`` does it before adding routes).
    """
    app[PIXELS] = PixelServices(app[GATEWAY])
    instance = "/studies/{study}/series/{series}/instances/{instance}"
    router = app.router
    router.add_get(instance + "/frames/{frames}", retrieve_instance_frames)
    router.add_get(instance + "/frames/{frames}/rendered", retrieve_rendered)
    router.add_get(instance + "/frames/{frames}/thumbnail", retrieve_thumbnail)
    router.add_get(instance + "/rendered", retrieve_rendered)
    router.add_get(instance + "/thumbnail", retrieve_thumbnail)
    router.add_get("/studies/{study}/series/{series}/rendered", retrieve_rendered)
    router.add_get("/studies/{study}/series/{series}/thumbnail", retrieve_thumbnail)
    router.add_get("/studies/{study}/rendered", retrieve_rendered)
    router.add_get("/studies/{study}/thumbnail", retrieve_thumbnail)


__all__ = ["PIXELS", "PixelServices", "add_routes",
           "negotiate_frames", "negotiate_rendered"]
