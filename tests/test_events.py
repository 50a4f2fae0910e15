"""Events: the outbox, the stable-study scan, Standard Webhooks delivery and the change feed.

A real aiohttp receiver on 127.0.0.1 takes the webhooks; the gateway runs as a LiveServer, or
as a real process for the SIGKILL test; instances arrive over real C-STOREs. Signatures are
checked with ``standardwebhooks``, the specification's reference verifier.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydicom.uid import ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from standardwebhooks import Webhook as Verifier

from gateway import events
from gateway.config import SettingsError, load_settings
from gateway.core import Gateway
from sample_dicom.generator import SeriesSpec, StudySpec, generate_study, key_object
from tests.support.common import LiveServer, ct_dataset, make_settings, part10
from tests.support.dicomweb_helpers import api_key, raw
from tests.support.dimse_helpers import wait_until
from tests.support.gateway_process import GatewayProcess

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
STABLE = 1.5  # seconds of quiet before a study is announced, in these tests
WAIT = 60.0  # the bound of every wait for a delivery (a loaded machine is slow, never wrong)


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers 500 to the first ``failures`` attempts of
    each message, ``delay`` seconds late if asked, then 204."""

    failures: int = 0
    delay: float = 0.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        msg_id = request.headers.get("webhook-id", "")
        tries = sum(1 for r in self.requests if r.headers.get("webhook-id") == msg_id)
        status = 500 if tries < self.failures else 204
        if self.delay:
            await asyncio.sleep(self.delay)
        self.requests.append(Received(time.monotonic(), dict(request.headers), body, status))
        return web.Response(status=status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/imaging"

    def acknowledged(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.requests if r.status == 204]


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Start receivers on demand (``make(...)``); all stopped at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []
    made: list[Receiver] = []

    async def start(receiver: Receiver) -> None:
        app = web.Application()
        app.router.add_post("/hooks/imaging", receiver.handle)
        runner = web.AppRunner(app, shutdown_timeout=1.0)  # the slow one is cut off
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)

    class Made(list[Receiver]):
        def make(self, **kwargs: Any) -> Receiver:
            receiver = Receiver(**kwargs)
            asyncio.run_coroutine_threadsafe(start(receiver), loop).result(10)
            self.append(receiver)
            return receiver

    made = Made()
    try:
        yield made
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _cancel_the_rest() -> None:
    """End the handlers still running (the slow receiver's) before the loop closes."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def events_toml(tmp_path: Path, *urls: str, timeout: float = 10.0) -> Path:
    hooks = "".join(f'[[events.webhooks]]\nurl = "{url}"\nsecret = "{SECRET}"\n\n'
                    for url in urls)
    path = tmp_path / "gateway.toml"
    path.write_text(f"[events]\nstable_seconds = {STABLE}\ndelivery_timeout = {timeout}\n\n"
                    f"{hooks}")
    return path


def store(port: int, datasets: list[Any]) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def study(uid: str, series: int, per_series: int, start: int = 0) -> list[Any]:
    return [ct_dataset(start + k, study=uid, series=f"{uid}.{s + 1}")
            for s in range(series) for k in range(per_series)]


def verify(received: Received) -> dict[str, Any]:
    """Check the signature with the reference verifier; return the body."""
    headers = {k.lower(): v for k, v in received.headers.items()}
    payload = Verifier(SECRET).verify(received.body, headers)
    assert headers["content-type"] == "application/json"
    return dict(payload)


def sql(gateway: Gateway, statement: str) -> Any:
    """One value read in a transaction of its own (a fresh snapshot)."""
    with gateway.index.engine.connect() as connection:
        return connection.exec_driver_sql(statement).scalar()


def changes(base: str, token: str, after: Any = None, limit: Any = None) -> tuple[int, Any]:
    query = "&".join(f"{k}={v}" for k, v in (("after", after), ("limit", limit)) if v is not None)
    reply = raw(f"{base}/api/changes?{query}", headers={"Authorization": f"Bearer {token}"})
    return reply.status, json.loads(reply.body)


STUDY_A = "1.2.826.0.1.3680043.8.498.101"
STUDY_B = "1.2.826.0.1.3680043.8.498.102"


def test_a_quiet_study_is_announced_once_after_the_receiver_failed_twice(
        tmp_path: Path, database_url: str, receivers: Any) -> None:
    receiver = receivers.make(failures=2)
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_CONFIG=str(events_toml(tmp_path, receiver.url)))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        started = time.monotonic()
        store(live.dimse_port, study(STUDY_A, 2, 2) + study(STUDY_B, 1, 1))
        # The last instance was sent after `started`: nothing can be announced before
        # `started + STABLE`.
        assert wait_until(lambda: len(receiver.acknowledged()) >= 2, WAIT)
        assert all(r.at >= started + STABLE for r in receiver.requests)
        by_study: dict[str, list[Received]] = {}
        for r in receiver.requests:
            by_study.setdefault(json.loads(r.body)["data"]["study"], []).append(r)
        assert sorted(by_study) == [STUDY_A, STUDY_B]
        for uid, tries in by_study.items():
            # Answered 500 twice, then 204: three tries of one message, one id, all signed.
            assert [r.status for r in tries] == [500, 500, 204]
            assert len({r.headers["webhook-id"] for r in tries}) == 1
            bodies = [verify(r) for r in tries]
            assert bodies[0] == bodies[2]
            assert bodies[0]["type"] == "study.stable"
            data = bodies[0]["data"]
            assert data["study"] == uid and isinstance(data["seq"], int)
            assert data["patient"] == {"id": "PAT-001", "issuer": ""}
            assert data["accession"] == "ACC-001" and data["study_date"] == "20260105"
            assert data["modalities"] == ["CT"]
            assert (data["series"], data["instances"]) == ((2, 4) if uid == STUDY_A else (1, 1))
        # Announced once: the feed holds one event per study, and neither is pending again.
        token = api_key(gateway, "portal", "events:read")
        status, page = changes(live.http_url, token, after=0)
        assert status == 200
        assert sorted(c["data"]["study"] for c in page["changes"]) == [STUDY_A, STUDY_B]
        assert all(c["type"] == "study.stable" for c in page["changes"])
        assert sql(gateway, "SELECT COUNT(*) FROM event_study WHERE pending") == 0
        # Acknowledged in the index too (a moment after the receiver answered).
        assert wait_until(lambda: sql(gateway, "SELECT COUNT(*) FROM event_delivery "
                                               "WHERE delivered_at IS NULL") == 0, WAIT)


def test_later_instances_update_a_delete_is_announced_and_the_feed_resumes(
        tmp_path: Path, database_url: str, receivers: Any) -> None:
    receiver = receivers.make()
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_CONFIG=str(events_toml(tmp_path, receiver.url)))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        store(live.dimse_port, study(STUDY_A, 1, 2))
        assert wait_until(lambda: len(receiver.acknowledged()) == 1, WAIT)
        # More instances of the announced study: study.updated with the new counts.
        store(live.dimse_port, study(STUDY_A, 2, 1, start=5))
        assert wait_until(lambda: len(receiver.acknowledged()) == 2, WAIT)
        updated = receiver.acknowledged()[1]
        assert updated["type"] == "study.updated"
        assert (updated["data"]["series"], updated["data"]["instances"]) == (2, 4)
        # DELETE of the study: study.deleted, with what it held.
        token = api_key(gateway, "admin", "admin")
        reply = raw(f"{live.http_url}/dicomweb/studies/{STUDY_A}", method="DELETE",
                    headers={"Authorization": f"Bearer {token}"})
        assert reply.status in (200, 204)
        assert wait_until(lambda: len(receiver.acknowledged()) == 3, WAIT)
        deleted = receiver.acknowledged()[2]
        assert deleted["type"] == "study.deleted"
        assert deleted["data"]["study"] == STUDY_A and deleted["data"]["instances"] == 4
        for r in receiver.requests:
            verify(r)

        # The change feed: the same events, in seq order, resumable after a seq.
        reader = api_key(gateway, "portal", "events:read")
        status, page = changes(live.http_url, reader, after=0)
        assert status == 200
        assert [c["type"] for c in page["changes"]] == [
            "study.stable", "study.updated", "study.deleted"]
        assert page["changes"] == receiver.acknowledged()
        seqs = [c["data"]["seq"] for c in page["changes"]]
        assert seqs == sorted(seqs) and page["last"] == seqs[-1]
        status, first = changes(live.http_url, reader, after=0, limit=1)
        assert [c["data"]["seq"] for c in first["changes"]] == seqs[:1]
        status, rest = changes(live.http_url, reader, after=first["last"])
        assert [c["data"]["seq"] for c in rest["changes"]] == seqs[1:]
        status, empty = changes(live.http_url, reader, after=seqs[-1])
        assert (status, empty) == (200, {"changes": [], "last": seqs[-1]})

        # Bad input: a clear 400 naming what was wrong.
        for after, limit, words in (("-1", None, "negative"), ("abc", None, "not a sequence"),
                                    (str(seqs[-1] + 1), None, "beyond the last"),
                                    ("0", "100000", "out of range"), ("0", "x", "whole")):
            status, problem = changes(live.http_url, reader, after=after, limit=limit)
            assert status == 400 and words in problem["detail"], problem

        # The scope: events:read (or admin), nothing else; no credential at all is 401.
        other = api_key(gateway, "reader", "dicomweb:read")
        assert changes(live.http_url, other, after=0)[0] == 403
        assert changes(live.http_url, token, after=0)[0] == 200
        assert raw(f"{live.http_url}/api/changes?after=0").status == 401


def test_a_slow_and_an_unreachable_receiver_hold_up_no_other(
        tmp_path: Path, database_url: str, receivers: Any) -> None:
    slow = receivers.make(delay=30)
    quick = receivers.make()
    unreachable = f"http://127.0.0.1:{quick.port + 1 if quick.port < 65535 else 1}/x"
    config = events_toml(tmp_path, slow.url, unreachable, quick.url, timeout=1.0)
    settings = make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        store(live.dimse_port, study(STUDY_A, 1, 1))
        assert wait_until(lambda: len(quick.acknowledged()) == 1, WAIT)
        # The other two are tried again, as long as it takes, each error recorded.
        assert wait_until(lambda: sql(gateway, "SELECT MIN(attempts) FROM event_delivery "
                                               "WHERE delivered_at IS NULL") >= 2, WAIT)
        with gateway.index.engine.connect() as connection:
            errors = sorted(row[0] for row in connection.exec_driver_sql(
                "SELECT last_error FROM event_delivery WHERE delivered_at IS NULL"))
        assert len(errors) == 2
        assert any("no answer within 1 s" in e for e in errors), errors
        assert any("Cannot connect" in e for e in errors), errors


def test_a_study_received_just_before_a_crash_is_announced_once_after_restart(
        tmp_path: Path, database_url: str, receivers: Any) -> None:
    receiver = receivers.make()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[events]\nstable_seconds = 5\n\n[[events.webhooks]]\n'
                      f'url = "{receiver.url}"\nsecret = "{SECRET}"\n')
    env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DATABASE_URL": database_url,
           "GATEWAY_DIMSE_PORT": "0", "GATEWAY_HTTP_PORT": "0",
           "GATEWAY_STORAGE_MIN_FREE_BYTES": "0", "GATEWAY_CONFIG": str(config)}
    process = GatewayProcess(env, tmp_path / "gateway.log").start()
    try:
        store(process.dimse_port, study(STUDY_A, 1, 2))
    finally:
        process.kill()  # SIGKILL, long before the 5 s of quiet
    with Gateway(load_settings(environ=env)) as gateway:
        with gateway.index.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM event").scalar() == 0
    restarted = GatewayProcess(env, tmp_path / "gateway.log").start()
    try:
        assert wait_until(lambda: len(receiver.acknowledged()) == 1, WAIT)
        (body,) = receiver.acknowledged()
        assert body["type"] == "study.stable" and body["data"]["instances"] == 2
    finally:
        restarted.stop()
    with Gateway(load_settings(environ=env)) as gateway:
        with gateway.index.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM event").scalar() == 1


def test_a_rejection_note_announces_the_rejected_instances(
        tmp_path: Path, database_url: str, receivers: Any) -> None:
    receiver = receivers.make()
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_CONFIG=str(events_toml(tmp_path, receiver.url)))
    spec = StudySpec(patient_id="LU0000042", accession_number="IOCM1", key_object=False,
                     series=(SeriesSpec(instances=3, rows=32, columns=32),))
    images = generate_study(spec, seed=5)
    uid = str(images[0].StudyInstanceUID)
    note = key_object(spec, images[1:], 5, uid,
                      title=("113001", "DCM", "Rejected for Quality Reasons"))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        ae = AE(ae_title="MODALITY")
        for sop_class in (CTImageStorage, KeyObjectSelectionDocumentStorage):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title="DICOMGW")
        try:
            assert [int(assoc.send_c_store(ds).Status) for ds in [*images, note]] == [0] * 4
        finally:
            assoc.release()
        # The rejection's event, then (after the quiet time) the study with what is left.
        assert wait_until(lambda: len(receiver.acknowledged()) == 2, WAIT)
        rejected, stable = receiver.acknowledged()
        assert rejected["type"] == "instances.rejected"
        assert rejected["data"]["study"] == uid
        assert rejected["data"]["instances"] == sorted(str(ds.SOPInstanceUID)
                                                       for ds in images[1:])
        assert rejected["data"]["rejection"] == {"code": "113001",
                                                 "meaning": "Rejected for Quality Reasons"}
        assert rejected["data"]["note"] == str(note.SOPInstanceUID)
        assert stable["type"] == "study.stable" and stable["data"]["instances"] == 1
        assert rejected["data"]["seq"] < stable["data"]["seq"]


def test_a_delivery_not_acknowledged_before_a_crash_is_made_after_restart(
        tmp_path: Path, database_url: str, receivers: Any) -> None:
    receiver = receivers.make(failures=10**9)  # 500 to everything, until told otherwise
    config = events_toml(tmp_path, receiver.url, timeout=2.0)
    env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DATABASE_URL": database_url,
           "GATEWAY_DIMSE_PORT": "0", "GATEWAY_HTTP_PORT": "0",
           "GATEWAY_STORAGE_MIN_FREE_BYTES": "0", "GATEWAY_CONFIG": str(config)}
    process = GatewayProcess(env, tmp_path / "gateway.log").start()
    try:
        store(process.dimse_port, study(STUDY_A, 1, 1))
        assert wait_until(lambda: len(receiver.requests) >= 2, WAIT)
    finally:
        process.kill()
    failed_ids = {r.headers["webhook-id"] for r in receiver.requests}
    receiver.failures = 0
    restarted = GatewayProcess(env, tmp_path / "gateway.log").start()
    try:
        # Within the lease of an attempt the kill may have cut short (delivery_timeout + 30 s).
        assert wait_until(lambda: len(receiver.acknowledged()) == 1, WAIT + 40)
    finally:
        restarted.stop()
    (done,) = [r for r in receiver.requests if r.status == 204]
    assert failed_ids == {done.headers["webhook-id"]}
    assert verify(done)["type"] == "study.stable"


@pytest.mark.parametrize(("hook", "words"), [
    ('url = "ftp://portal.example/x"\nsecret = "SECRET"', "not an http:// or https:// URL"),
    ('url = "https://portal.example/x"\nsecret = "portal-secret"', "Standard Webhooks' format"),
    ('url = "https://portal.example/x"\nsecret = "whsec_!!notbase64"',
     "Standard Webhooks' format"),
    ('url = "https://portal.example/x"', "secret or as secret_file"),
    ('url = "https://portal.example/x"\nsecret_file = "/nonexistent/hook.secret"',
     "cannot read it"),
])
def test_a_bad_webhook_setting_is_refused_at_start_with_one_clear_error(
        tmp_path: Path, hook: str, words: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[[events.webhooks]]\n" + hook.replace("SECRET", SECRET) + "\n")
    with pytest.raises(SettingsError, match=words) as raised:
        load_settings(config, environ={})
    assert SECRET not in str(raised.value)


def test_a_secret_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET + "\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[events.webhooks]]\nurl = "https://portal.example/x"\n'
                      f'secret_file = "{secret}"\n')
    (hook,) = load_settings(config, environ={}).events.webhooks
    assert hook.secret == SECRET and SECRET not in repr(hook)


def test_two_nodes_announce_a_study_once_and_claim_each_delivery_once(
        tmp_path: Path, database_url: str) -> None:
    """Two gateways on one database (two nodes of a cluster) run the scan and claim
    deliveries at the same time: one event per study, each delivery claimed by one."""
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as first, Gateway(settings) as second:
        uids = [f"1.2.826.0.1.3680043.8.498.2{k:02d}" for k in range(12)]
        for uid in uids:
            first.ingestor.ingest(part10(ct_dataset(0, study=uid, rows=8)), source="test")
        events.start_webhook(first.index, "hook")
        time.sleep(0.3)  # the instances' quiet time (0.2 s below) is over: no race to lose

        def node(gateway: Gateway) -> list[int]:
            claimed: list[int] = []
            for _ in range(20):
                events.discover(gateway.index)
                events.announce(gateway.index, 0.2)
                events.fan_out(gateway.index, "hook")
                claimed += [c.seq for c in events.claim(gateway.index, "hook", 60, limit=3)]
            return claimed

        with ThreadPoolExecutor(2) as pool:
            mine, theirs = pool.map(node, [first, second])
        page = events.changes(first.index, 0, 100)
        assert sorted(c["data"]["study"] for c in page["changes"]) == sorted(uids)
        assert {c["type"] for c in page["changes"]} == {"study.stable"}
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == [c["data"]["seq"] for c in page["changes"]]
