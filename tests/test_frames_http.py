"""Frames, rendered images and thumbnails over real HTTP on 127.0.0.1 (PS3.18 §10.4).

The sample files are stored through the one ingest path, the root application of the composition
root is served on a free port, and every assertion is on what crossed the wire: status codes,
media types, multipart parts, and pixel values.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import RLELossless

from dicomweb.app import create_app as create_dicomweb_app
from dicomweb.pixels import AuditCoalescer
from gateway.access import Principal, PrincipalKind
from gateway.apikeys import ApiKeys
from gateway.audit import Action, AuditEvent
from gateway.core import Gateway
from gateway.pixels import read_pixel_file
from gateway.render import Window, apply_window
from gateway.server import create_app
from sample_dicom import FILES_DIR
from tests.support.common import ct_dataset, make_settings, part10

MANIFEST: dict[str, dict] = json.loads((FILES_DIR / "MANIFEST.json").read_text())
HEADERS = {name: dcmread(FILES_DIR / name, stop_before_pixels=True) for name in MANIFEST}
OHIF_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
OHIF_ACCEPT_QUOTED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
OCTET = 'multipart/related; type="application/octet-stream"'
EXPLICIT_LE = "1.2.840.10008.1.2.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.77"


class Sessions:
    """A viewer-session policy for the tests: session id -> principal (AccessPolicy protocol)."""

    cookie_name = "gw_session"

    def __init__(self, table: dict[str, Principal]) -> None:
        self.table = table

    def principal_for_session(self, session_id: str, address: str) -> Principal | None:
        return self.table.get(session_id)


@dataclass
class Served:
    url: str
    session: aiohttp.ClientSession
    reader: str
    writer: str
    gateway: Gateway

    def uri(self, name: str, tail: str = "") -> str:
        ds = HEADERS[name]
        return (f"{self.url}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{tail}")

    async def get(self, url: str, accept: str | None = None, token: str | None = None,
                  cookie: str | None = None) -> tuple[aiohttp.ClientResponse, bytes]:
        headers = {"Authorization": f"Bearer {token or self.reader}"} if cookie is None else {
            "Cookie": f"gw_session={cookie}"}
        if accept is not None:
            headers["Accept"] = accept
        async with self.session.get(url, headers=headers) as response:
            return response, await response.read()


STUDY = str(HEADERS["ct_explicit_le.dcm"].StudyInstanceUID)
KEY_IMAGE = str(HEADERS["ct_jpeg2000_lossless.dcm"].SOPInstanceUID)


@pytest.fixture
async def served(gateway: Gateway) -> AsyncIterator[Served]:
    for name in MANIFEST:
        gateway.ingestor.ingest((FILES_DIR / name).read_bytes(), source="test")
    gateway.ingestor.ingest(part10(ct_dataset(0, study=OTHER_STUDY)), source="test")
    keys = ApiKeys(gateway.index)
    reader, writer = keys.create("reader", "dicomweb:read"), keys.create("writer",
                                                                         "dicomweb:write")
    policy = Sessions({
        "study": Principal(PrincipalKind.VIEWER_SESSION, "viewer-1",
                           frozenset({"dicomweb:read"}), study_uids=frozenset({STUDY})),
        "key-images": Principal(PrincipalKind.VIEWER_SESSION, "viewer-2",
                                frozenset({"dicomweb:read"}), study_uids=frozenset({STUDY}),
                                instance_uids=frozenset({KEY_IMAGE})),
    })
    runner = web.AppRunner(create_app(gateway, policy))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield Served(f"http://127.0.0.1:{port}", session, str(reader), str(writer), gateway)
    finally:
        await runner.cleanup()


def multipart(response: aiohttp.ClientResponse, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body into (headers, content) parts (RFC 2046 §5.1)."""
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related")
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1)  # type: ignore[union-attr]
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert body.endswith(f"--{boundary}--\r\n".encode())
    parts = []
    for chunk in body.split(f"--{boundary}".encode())[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert content.endswith(b"\r\n")
        parts.append((headers, content[:-2]))
    return parts


def cornerstone_transfer_syntax(content_type: str) -> str:
    """What OHIF's image loader reads from a part's Content-Type (transfer-syntax parameter)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    return params.get("transfer-syntax", "1.2.840.10008.1.2").replace('"', "")


def stored_frames(name: str) -> list[bytes]:
    ds = dcmread(FILES_DIR / name)
    return list(generate_frames(ds.PixelData, number_of_frames=MANIFEST[name]["frames"]))


def problem(response: aiohttp.ClientResponse, body: bytes, status: int) -> dict[str, object]:
    assert response.status == status, body
    assert response.headers["Content-Type"].startswith("application/problem+json")
    document = json.loads(body)
    assert document["status"] == status and document["detail"]
    return document


ENCAPSULATED = sorted(n for n, e in MANIFEST.items()
                      if e["transfer_syntax"] not in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2",
                                                      "1.2.840.10008.1.2.1.99"))
LOSSLESS = sorted(n for n, e in MANIFEST.items() if e["lossless"])


@pytest.mark.parametrize("accept", [OHIF_ACCEPT, OHIF_ACCEPT_QUOTED])
async def test_ohif_frame_request_returns_frames_as_stored(served: Served, accept: str) -> None:
    for name in MANIFEST:
        response, body = await served.get(served.uri(name, "/frames/1"), accept)
        assert response.status == 200, (name, body)
        ((headers, content),) = multipart(response, body)
        syntax = cornerstone_transfer_syntax(headers["Content-Type"])
        if name in ENCAPSULATED:
            assert syntax == MANIFEST[name]["transfer_syntax"]
            assert content == stored_frames(name)[0], name
        else:  # native (and deflated) files come back as Explicit VR Little Endian
            assert syntax == EXPLICIT_LE
            frame_bytes = len(content) * MANIFEST[name]["frames"]
            assert frame_bytes == MANIFEST[name]["rows"] * MANIFEST[name]["columns"] * 2 * \
                MANIFEST[name]["frames"]
            if MANIFEST[name]["frames"] == 1:
                assert hashlib.sha256(content).hexdigest() == MANIFEST[name]["pixel_sha256"]


@pytest.mark.parametrize("accept", [OCTET, f"{OCTET}; transfer-syntax={EXPLICIT_LE}",
                                    f"multipart/related; type=application/octet-stream; "
                                    f"transfer-syntax={EXPLICIT_LE}"])
async def test_octet_stream_frames_are_decoded_exactly(served: Served, accept: str) -> None:
    for name in LOSSLESS:
        count = MANIFEST[name]["frames"]
        frames = ",".join(str(n) for n in range(1, count + 1))
        response, body = await served.get(served.uri(name, f"/frames/{frames}"), accept)
        assert response.status == 200, (name, body)
        parts = multipart(response, body)
        assert len(parts) == count
        assert all(h["Content-Type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
                   for h, _ in parts)
        joined = b"".join(content for _, content in parts)
        assert hashlib.sha256(joined).hexdigest() == MANIFEST[name]["pixel_sha256"], name


async def test_lossy_jpeg_decoded_frame_is_rgb_within_tolerance(served: Served) -> None:
    name = "sc_jpeg_baseline_rgb.dcm"
    response, body = await served.get(served.uri(name, "/frames/1"), OCTET)
    ((headers, content),) = multipart(response, body)
    rgb = np.frombuffer(content, np.uint8).reshape(128, 128, 3)
    band = rgb[128 // 4 + 2: 128 // 3 - 2, 40:90].astype(int)
    assert np.abs(band - (220, 30, 30)).mean() < 8


@pytest.mark.parametrize(("name", "accept", "media"), [
    ("ct_jpegls_lossless.dcm",
     'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80', "image/jls"),
    ("ct_jpeg2000_lossless.dcm",
     'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.90', "image/jp2"),
    ("ct_htj2k_lossless.dcm", 'multipart/related; type="image/jphc"', "image/jphc"),
    ("ct_jpeg_lossless_sv1.dcm", 'multipart/related; type="image/jpeg"', "image/jpeg"),
    ("ct_rle_lossless_signed.dcm", 'multipart/related; type="image/dicom-rle"',
     "image/dicom-rle"),
    ("sc_jpeg_baseline_rgb.dcm",
     'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50',
     "image/jpeg"),
])
async def test_explicit_syntax_variants_as_stored(served: Served, name: str, accept: str,
                                                  media: str) -> None:
    response, body = await served.get(served.uri(name, "/frames/1"), accept)
    assert response.status == 200, body
    assert f'type="{media}"' in response.headers["Content-Type"]
    ((headers, content),) = multipart(response, body)
    assert headers["Content-Type"] == \
        f"{media}; transfer-syntax={MANIFEST[name]['transfer_syntax']}"
    assert content == stored_frames(name)[0]


async def test_transcoding_to_rle_and_406_when_impossible(served: Served) -> None:
    name = "ct_explicit_le.dcm"
    response, body = await served.get(served.uri(name, "/frames/1"),
                                      'multipart/related; type="image/dicom-rle"')
    ((headers, content),) = multipart(response, body)
    assert headers["Content-Type"] == f"image/dicom-rle; transfer-syntax={RLELossless}"
    info = read_pixel_file(FILES_DIR / name).image
    arr, _ = get_decoder(RLELossless).as_array(
        encapsulate([content]), **{**info.decode_options(), "transfer_syntax_uid": RLELossless})
    assert hashlib.sha256(arr.astype("<u2").tobytes()).hexdigest() == \
        MANIFEST[name]["pixel_sha256"]
    response, body = await served.get(
        served.uri(name, "/frames/1"),
        'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50')
    assert "cannot produce" in problem(response, body, 406)["detail"]
    response, body = await served.get(served.uri(name, "/frames/1"), "application/dicom+json")
    problem(response, body, 406)


async def test_accept_with_qualities_and_single_part(served: Served) -> None:
    name = "ct_jpeg2000_lossless.dcm"
    accept = (f'{OCTET}; transfer-syntax={EXPLICIT_LE}; q=0.5, '
              'multipart/related; type="image/jp2"; q=0.9')
    response, body = await served.get(served.uri(name, "/frames/1"), accept)
    ((headers, content),) = multipart(response, body)
    assert headers["Content-Type"].startswith("image/jp2")
    response, body = await served.get(served.uri(name, "/frames/1"), "application/octet-stream")
    assert response.status == 200
    assert response.headers["Content-Type"] == \
        f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert hashlib.sha256(body).hexdigest() == MANIFEST[name]["pixel_sha256"]


async def test_accept_query_parameter_and_single_part_image_types(served: Served) -> None:
    """PS3.18 §8.3.3.1 ``accept=`` overrides the header (OHIF's urlArguments use it)."""
    name = "ct_jpegls_lossless.dcm"
    response, body = await served.get(served.uri(name, "/frames/1?accept=image/jls"),
                                      "application/dicom+json")
    assert response.status == 200, body
    assert response.headers["Content-Type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    assert body == stored_frames(name)[0]
    response, body = await served.get(served.uri(name, "/frames/1"), "image/jls")
    assert body == stored_frames(name)[0]
    # application/octet-stream naming the stored compressed syntax: answered as stored
    response, body = await served.get(
        served.uri(name, "/frames/1"),
        "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.80")
    ((headers, content),) = multipart(response, body)
    assert cornerstone_transfer_syntax(headers["Content-Type"]) == "1.2.840.10008.1.2.4.80"
    assert content == stored_frames(name)[0]
    response, body = await served.get(
        served.uri(name, "/frames/1"),
        "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50")
    problem(response, body, 406)


async def test_multiframe_frames_in_requested_order(served: Served) -> None:
    name = "sc_multiframe_explicit_le.dcm"
    reference = dcmread(FILES_DIR / name).pixel_array
    response, body = await served.get(served.uri(name, "/frames/3,1,2"), OHIF_ACCEPT)
    parts = multipart(response, body)
    assert [content for _, content in parts] == [reference[i].astype("<u2").tobytes()
                                                 for i in (2, 0, 1)]
    response, body = await served.get(served.uri(name, "/frames/4"), OHIF_ACCEPT)
    assert "frame 4 does not exist" in problem(response, body, 404)["detail"]


async def test_frame_errors(served: Served) -> None:
    name = "ct_explicit_le.dcm"
    response, body = await served.get(served.uri(name, "/frames/0"), OHIF_ACCEPT)
    problem(response, body, 400)
    response, body = await served.get(served.uri(name, "/frames/1,a"), OHIF_ACCEPT)
    problem(response, body, 400)
    ds = HEADERS[name]
    unknown = (f"{served.url}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
               f"{ds.SeriesInstanceUID}/instances/1.2.3.4.5/frames/1")
    response, body = await served.get(unknown, OHIF_ACCEPT)
    problem(response, body, 404)
    wrong_study = served.uri(name, "/frames/1").replace(f"/studies/{ds.StudyInstanceUID}/",
                                                        f"/studies/{OTHER_STUDY}/")
    response, body = await served.get(wrong_study, OHIF_ACCEPT)
    problem(response, body, 404)
    bad_uid = served.uri(name, "/frames/1").replace(str(ds.SOPInstanceUID), "1.2.abc")
    response, body = await served.get(bad_uid, OHIF_ACCEPT)
    problem(response, body, 400)


async def test_access_is_checked(served: Served) -> None:
    url = served.uri("ct_explicit_le.dcm", "/frames/1")
    async with served.session.get(url, headers={"Accept": OHIF_ACCEPT}) as response:
        problem(response, await response.read(), 401)
    response, body = await served.get(url, OHIF_ACCEPT, token=served.writer)
    assert "dicomweb:read" in problem(response, body, 403)["detail"]
    response, body = await served.get(url, OHIF_ACCEPT, cookie="study")
    assert response.status == 200
    other = (f"{served.url}/dicomweb/studies/{OTHER_STUDY}/series/{OTHER_STUDY}.1/instances/"
             f"{OTHER_STUDY}.1.1")
    response, body = await served.get(other + "/frames/1", OHIF_ACCEPT)
    assert response.status == 200   # the API key may see every study
    for tail in ("/frames/1", "/rendered", "/thumbnail"):
        response, body = await served.get(other + tail, cookie="study")
        problem(response, body, 404)  # not 403: the session cannot learn it exists
    response, body = await served.get(f"{served.url}/dicomweb/studies/{OTHER_STUDY}/thumbnail",
                                      cookie="study")
    problem(response, body, 404)
    # key images only: the key image is there, its neighbours are not
    response, body = await served.get(served.uri("ct_jpeg2000_lossless.dcm", "/frames/1"),
                                      OHIF_ACCEPT, cookie="key-images")
    assert response.status == 200
    response, body = await served.get(url, OHIF_ACCEPT, cookie="key-images")
    problem(response, body, 404)
    response, body = await served.get(f"{served.url}/dicomweb/studies/{STUDY}/rendered",
                                      cookie="key-images")
    assert len(multipart(response, body)) == 1
    response, body = await served.get(url, OHIF_ACCEPT, cookie="expired")
    problem(response, body, 401)


def image(body: bytes) -> Image.Image:
    return Image.open(io.BytesIO(body))


async def test_rendered_ct_with_a_known_window(served: Served) -> None:
    name = "ct_explicit_le.dcm"
    hu = read_pixel_file(FILES_DIR / name).decode_frame(0).astype(float) - 1024
    response, body = await served.get(served.uri(name, "/rendered?window=-600,1500,linear"),
                                      "image/png")
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    png = np.asarray(image(body))
    expected = apply_window(hu, Window(-600, 1500)).astype(np.uint8)
    assert np.array_equal(png, expected)
    assert len(np.unique(png)) > 10
    # default: JPEG in the dataset's window (40/80), within JPEG tolerance
    response, body = await served.get(served.uri(name, "/rendered"))
    assert response.headers["Content-Type"] == "image/jpeg"
    jpeg = np.asarray(image(body)).astype(int)
    assert np.abs(jpeg - apply_window(hu, Window(40, 80))).mean() < 3


async def test_rendered_monochrome1_and_colour(served: Served) -> None:
    response, body = await served.get(served.uri("cr_monochrome1.dcm", "/rendered"), "image/png")
    png = np.asarray(image(body))
    stored = read_pixel_file(FILES_DIR / "cr_monochrome1.dcm").decode_frame(0).astype(float)
    assert np.array_equal(png, 255 - apply_window(stored, Window(3000, 2000)))
    response, body = await served.get(served.uri("sc_jpeg_baseline_rgb.dcm", "/rendered"),
                                      "image/png")
    rgb = np.asarray(image(body)).astype(int)
    assert rgb.shape == (128, 128, 3)
    assert np.abs(rgb[128 // 4 + 2: 128 // 3 - 2, 40:90] - (220, 30, 30)).mean() < 8


async def test_rendered_parameters(served: Served) -> None:
    name = "ct_explicit_le.dcm"
    response, body = await served.get(served.uri(name, "/rendered?viewport=64,32"))
    assert image(body).size == (32, 32)
    low = (await served.get(served.uri(name, "/rendered?quality=5")))[1]
    high = (await served.get(served.uri(name, "/rendered?quality=100")))[1]
    assert len(low) < len(high) / 2
    for query, parameter in [("window=40", "window"), ("viewport=0,0", "viewport"),
                             ("viewport=100000,10", "viewport"), ("quality=101", "quality")]:
        response, body = await served.get(served.uri(name, f"/rendered?{query}"))
        assert problem(response, body, 400)["parameter"] == parameter
    response, body = await served.get(served.uri(name, "/rendered"), "image/tiff")
    problem(response, body, 406)


async def test_rendered_multiframe_frames_series_and_study(served: Served) -> None:
    name = "sc_multiframe_explicit_le.dcm"
    reference = read_pixel_file(FILES_DIR / name)
    second = apply_window(reference.decode_frame(1).astype(float) - 1024, Window(40, 80))
    response, body = await served.get(served.uri(name, "/frames/2/rendered"), "image/png")
    assert np.array_equal(np.asarray(image(body)), second.astype(np.uint8))
    response, body = await served.get(served.uri(name, "/rendered"), "image/gif")
    gif = image(body)
    assert response.headers["Content-Type"] == "image/gif" and gif.n_frames == 3
    response, body = await served.get(served.uri(name, "/frames/1,3/rendered"), "image/png")
    assert len(multipart(response, body)) == 2
    ds = HEADERS[name]
    response, body = await served.get(
        f"{served.url}/dicomweb/studies/{STUDY}/series/{ds.SeriesInstanceUID}/rendered")
    ((headers, content),) = multipart(response, body)
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Location"].endswith(f"/instances/{ds.SOPInstanceUID}/rendered")
    response, body = await served.get(f"{served.url}/dicomweb/studies/{STUDY}/rendered")
    parts = multipart(response, body)
    assert len(parts) == len(MANIFEST)
    assert all(image(content).format == "JPEG" for _, content in parts)


async def test_thumbnails_are_representative_scaled_and_cached(served: Served) -> None:
    cache = served.gateway.settings.data_dir / "cache" / "rendered"
    response, body = await served.get(f"{served.url}/dicomweb/studies/{STUDY}/thumbnail")
    assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
    assert max(image(body).size) == 128
    entries: set[Path] = set()
    for _ in range(100):  # the entry is written after the response, in a worker thread
        entries = {p for p in cache.iterdir() if not p.name.startswith(".")}
        if entries:
            break
        await asyncio.sleep(0.02)
    assert len(entries) == 1 and entries.pop().read_bytes() == body
    entries = set(cache.iterdir())
    again = (await served.get(f"{served.url}/dicomweb/studies/{STUDY}/thumbnail"))[1]
    assert again == body and set(cache.iterdir()) == entries
    name = "sc_multiframe_explicit_le.dcm"
    ds = HEADERS[name]
    response, body = await served.get(
        f"{served.url}/dicomweb/studies/{STUDY}/series/{ds.SeriesInstanceUID}/thumbnail"
        "?viewport=32,32", "image/png")
    thumb = np.asarray(image(body))
    assert thumb.shape == (32, 32)
    middle = apply_window(read_pixel_file(FILES_DIR / name).decode_frame(1).astype(float)
                          - 1024, Window(40, 80))
    small = np.asarray(Image.fromarray(middle.astype(np.uint8)).resize((32, 32),
                                                                       Image.Resampling.BILINEAR))
    assert np.abs(thumb.astype(int) - small).mean() < 2    # the middle frame, scaled
    response, body = await served.get(served.uri("cr_monochrome1.dcm", "/thumbnail"))
    assert response.status == 200 and max(image(body).size) == 128
    response, body = await served.get(served.uri(name, "/frames/3/thumbnail?viewport=16,16"))
    assert image(body).size == (16, 16)


async def test_decompression_bomb_is_refused_over_http(served: Served, tmp_path: Path) -> None:
    ds = dcmread(FILES_DIR / "ct_jpeg2000_lossless.dcm")
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    at = frame.index(b"\xff\x51")
    bomb = bytearray(frame)
    bomb[at + 6:at + 14] = struct.pack(">II", 60000, 60000)
    ds.PixelData = encapsulate([bytes(bomb)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{OTHER_STUDY}.9.9"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = OTHER_STUDY, f"{OTHER_STUDY}.9"
    ds.PatientID = ct_dataset(0).PatientID  # the patient of OTHER_STUDY (no other may join)
    ds.IssuerOfPatientID = ""
    served.gateway.ingestor.ingest(part10(ds), source="test")
    base = (f"{served.url}/dicomweb/studies/{OTHER_STUDY}/series/{OTHER_STUDY}.9/instances/"
            f"{OTHER_STUDY}.9.9")
    for tail, accept in (("/rendered", None), ("/thumbnail", None), ("/frames/1", OCTET)):
        response, body = await served.get(base + tail, accept)
        assert "60000x60000" in str(problem(response, body, 413)["detail"])
    response, body = await served.get(base + "/frames/1", OHIF_ACCEPT)
    ((headers, content),) = multipart(response, body)
    assert content == bytes(bomb)  # as stored: bytes, no decoding, no danger


async def test_replaced_instance_is_not_served_from_the_cache(tmp_path: Path,
                                                              database_url: str) -> None:
    """The render cache key holds the file digest: a replaced instance renders anew."""
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE="1",
                             GATEWAY_DEMO="1")
    ds = dcmread(FILES_DIR / "ct_explicit_le.dcm")
    with Gateway(settings) as gateway:
        gateway.ingestor.ingest(part10(ds), source="test")
        runner = web.AppRunner(create_app(gateway))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = (f"http://127.0.0.1:{runner.addresses[0][1]}/dicomweb/studies/"
               f"{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
               f"{ds.SOPInstanceUID}/rendered")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(url, headers={"Accept": "image/png"}) as response:
                    before = np.asarray(image(await response.read()))
                assert before.max() == 255
                cache = settings.data_dir / "cache" / "rendered"
                for _ in range(100):  # wait for the entry, written after the response
                    if any(p.suffix == ".bin" for p in cache.iterdir()):
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the rendered image was not cached")
                ds.PixelData = np.zeros((128, 128), "<u2").tobytes()  # -1024 HU: black
                result = gateway.ingestor.ingest(part10(ds), source="test")
                assert result.outcome.value == "replaced"
                async with session.get(url, headers={"Accept": "image/png"}) as response:
                    after = np.asarray(image(await response.read()))
                assert after.shape == before.shape and after.max() == 0
        finally:
            await runner.cleanup()


async def test_instance_without_pixel_data_is_422(served: Served) -> None:
    ds = ct_dataset(5, study=OTHER_STUDY)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                    "RescaleIntercept", "RescaleSlope"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    served.gateway.ingestor.ingest(part10(ds), source="test")
    base = (f"{served.url}/dicomweb/studies/{OTHER_STUDY}/series/{ds.SeriesInstanceUID}/"
            f"instances/{ds.SOPInstanceUID}")
    for tail, accept in (("/frames/1", OHIF_ACCEPT), ("/rendered", None), ("/thumbnail", None)):
        response, body = await served.get(base + tail, accept)
        assert "pixel data" in str(problem(response, body, 422)["detail"])
    # the series still has a thumbnail: its instance with pixel data
    response, body = await served.get(
        f"{served.url}/dicomweb/studies/{OTHER_STUDY}/series/{ds.SeriesInstanceUID}/thumbnail")
    assert response.status == 200 and image(body).format == "JPEG"


class RecordingSink:
    """An audit sink that keeps the events (the AuditSink protocol)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)


async def test_accesses_are_audited(gateway: Gateway) -> None:
    """Frames are Instances Transferred, rendered and thumbnails Instances Accessed (PS3.15
    A.5.3); a refused request records nothing."""
    name = "ct_explicit_le.dcm"
    gateway.ingestor.ingest((FILES_DIR / name).read_bytes(), source="test")
    sink = RecordingSink()
    root = web.Application()
    root.add_subapp("/dicomweb", create_dicomweb_app(gateway, Sessions({
        "study": Principal(PrincipalKind.VIEWER_SESSION, "viewer-1", frozenset({"dicomweb:read"}),
                           study_uids=frozenset({STUDY}), jti="link-1")}), sink))
    runner = web.AppRunner(root)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ds = HEADERS[name]
    base = (f"http://127.0.0.1:{runner.addresses[0][1]}/dicomweb/studies/{STUDY}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    try:
        async with aiohttp.ClientSession(headers={"Cookie": "gw_session=study"}) as session:
            for tail in ("/frames/1", "/frames/1", "/rendered", "/thumbnail", "/rendered",
                         "/frames/7"):
                async with session.get(base + tail, headers={"Accept": "*/*"}) as response:
                    await response.read()
                    assert response.status == (404 if tail == "/frames/7" else 200)
    finally:
        await runner.cleanup()
    assert [(e.action, e.study_uids, e.jti, e.success) for e in sink.events] == [
        (Action.TRANSFER, (STUDY,), "link-1", True),
        (Action.RETRIEVE, (STUDY,), "link-1", True),
        (Action.RETRIEVE, (STUDY,), "link-1", True),
    ]
    assert all(e.principal == "viewer_session:viewer-1" for e in sink.events)
    assert sink.events[0].detail == "WADO-RS frames (one entry per study and 60 s)"


def test_audit_coalescer_windows() -> None:
    viewer = Principal(PrincipalKind.VIEWER_SESSION, "v", jti="a")
    other_link = Principal(PrincipalKind.VIEWER_SESSION, "v", jti="b")
    coalescer = AuditCoalescer(window=60)
    assert coalescer.due(viewer, STUDY, "frames")
    assert not coalescer.due(viewer, STUDY, "frames")       # within the window
    assert coalescer.due(viewer, OTHER_STUDY, "frames")     # another study
    assert coalescer.due(viewer, STUDY, "rendered")         # another kind
    assert coalescer.due(other_link, STUDY, "frames")       # another link
    every_time = AuditCoalescer(window=0)
    assert every_time.due(viewer, STUDY, "frames") and every_time.due(viewer, STUDY, "frames")
