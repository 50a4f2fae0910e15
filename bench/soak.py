"""Soak: storing, querying, retrieving and viewer sessions at once, for minutes, on loopback.

One ``dicom-gateway serve`` process (its own temporary data folder; SQLite, or a fresh schema
of ``--database-url``) takes for ``--minutes``:

* ``--associations`` C-STORE SCUs (pynetdicom, one thread and one association each, released
  and opened again every few studies), each sending studies of a small 64x64 series and a
  CT 512x512 series; every acknowledged instance is recorded with the SHA-256 of the data set
  bytes sent (after the file meta);
* ``--http-clients`` HTTP clients (threads, one keep-alive connection each, with an ``admin``
  API key) doing QIDO-RS (studies by PatientID and by PatientName prefix, series, instances),
  series metadata, whole-series retrieve (bytes checked against the recorded digests), frames
  and rendered images on what was acknowledged;
* ``--viewer-sessions`` viewer loops: the patient's DSP date set (``PUT /api/patients/{id}/dsp``),
  a link minted (``POST /api/links``), ``/view/<token>`` opened, and the session cookie used for
  QIDO-RS and metadata as OHIF does.

Stores run in one client process, HTTP clients and viewer loops in another, so that neither
waits for the other's interpreter lock. The gateway's RSS, open file descriptors and threads
are sampled every second. At the end every acknowledged instance is retrieved over WADO-RS
(``transfer-syntax=*``, as stored) and its data set compared byte for byte with what was sent.

Prints a table (errors by kind, lost instances, RSS start/end/peak, p50/p95 per operation for
the first and the last minute) and writes it as JSON to ``bench/results/``. Exit status 1 if
any error, lost instance or error logged by the gateway.

    .venv/bin/python bench/soak.py                                  # 10 minutes, 20 + 50 clients
    .venv/bin/python bench/soak.py --minutes 2 --associations 6 --http-clients 10
    .venv/bin/python bench/soak.py --database-url postgresql+psycopg://user@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import multiprocessing as mp
import os
import random
import secrets
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GatewayServer, percentile, process_cpu_seconds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
            b"UV"}
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
HTTP_TIMEOUT = 120.0       # seconds for one HTTP request before it counts as a timeout
DIMSE_TIMEOUT = 120.0      # seconds for ACSE / DIMSE / network before an association is lost
STUDIES_PER_ASSOCIATION = 4
MAX_LOOP = 10_000_000      # every request loop is bounded in count as well as in time
DSP_CREATED = "2000-01-01"  # before every generated study: links may be minted for all
VIEWER_ID = "dr-soak"
EXAMPLES = 20              # error examples kept per process


# -- Part 10 ---------------------------------------------------------------------------------
def split_part10(data: bytes) -> tuple[str, int]:
    """The Media Storage SOP Instance UID of a Part 10 file and the offset of its data set.

    The file meta group (PS3.10 §7.1) is always Explicit VR Little Endian.

    >>> split_part10(b"\\0" * 128 + b"DICM" + b"\\2\\0\\3\\0UI\\4\\0" + b"1.2\\0" + b"\\x08\\0")
    ('1.2', 144)
    """
    if data[128:132] != b"DICM":
        raise ValueError("not a Part 10 file (no DICM prefix)")
    pos, sop = 132, ""
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in LONG_VRS:
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if element == 3:
            sop = data[pos + header:pos + header + length].rstrip(b"\0 ").decode()
        pos += header + length
    return sop, pos


def data_set_digest(data: bytes) -> tuple[str, str]:
    sop, offset = split_part10(data)
    return sop, hashlib.sha256(memoryview(data)[offset:]).hexdigest()


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The contents of a multipart/related body (RFC 2046 §5.1), headers dropped."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError(f"no boundary in {content_type!r}")
    parts = []
    for piece in (b"\r\n" + body).split(b"\r\n--" + boundary.encode())[1:]:
        if piece.startswith(b"--"):
            break
        parts.append(piece[piece.index(b"\r\n\r\n") + 4:])
    return parts


# -- recording -------------------------------------------------------------------------------
@dataclass
class Recorder:
    """Latency samples (seconds since the load started, operation, ms) and errors by kind."""

    t0: float
    samples: list[tuple[float, str, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self, op: str, started: float, ms: float) -> None:
        with self.lock:
            self.samples.append((started - self.t0, op, ms))
            self.counts[op] += 1

    def error(self, kind: str, op: str, detail: str) -> None:
        with self.lock:
            self.errors[f"{kind} ({op})"] += 1
            if len(self.examples) < EXAMPLES:
                self.examples.append(f"{time.time() - self.t0:7.1f}s {kind} {op}: {detail}"[:400])

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps({"samples": self.samples, "errors": dict(self.errors),
                                    "examples": self.examples, "counts": dict(self.counts)}))


# -- the store process -----------------------------------------------------------------------
def keep_responses_for_sender(assoc: Any) -> None:
    """Work around a race in pynetdicom's (3.0.4) requestor association: its reactor thread may
    take the C-STORE-RSP off the DIMSE queue, leaving ``send_c_store`` to wait for nothing.

    ``send_c_store`` clears ``_reactor_checkpoint`` and waits until ``_is_paused`` is true; but
    the reactor sets ``_is_paused`` just *before* ``_reactor_checkpoint.wait()``, which returns
    at once while the checkpoint is still set from the previous request, and clears it only
    after. Between the two it reads the flag as paused, sends, and the reactor, running on,
    calls ``dimse.get_msg(block=False)``: if the response has come by then, it takes it, logs
    "Received unexpected C-STORE service message" and drops it (docs/benchmarks.md, Soak).
    Here a response the reactor's non-blocking read takes is put back at the head of the queue
    for the blocked sender; requests still reach the reactor as before.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        item = take(block)
        msg = item[1]
        if block or msg is None or getattr(msg, "MessageIDBeingRespondedTo", None) is None:
            return item
        queue = dimse.msg_queue
        with queue.not_empty:  # the queue's own lock: a blocked get() wakes up with it
            queue.queue.appendleft(item)
            queue.not_empty.notify()
        return None, None

    dimse.get_msg = get_msg


class LibraryWarnings(logging.Handler):
    """pynetdicom's warnings and errors (it logs nowhere by default), recorded as errors."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__(logging.WARNING)
        self.rec = rec

    def emit(self, record: logging.LogRecord) -> None:
        self.rec.error("pynetdicom " + record.levelname.lower(), "c-store",
                       f"{threading.current_thread().name}: {record.getMessage()}")


def store_process(cfg: dict[str, Any], ready: Any, go: Any, t0: Any) -> None:
    """``cfg["associations"]`` threads sending studies until the deadline."""
    import pydicom.config  # noqa: F401  (imported before pynetdicom reads it)
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from sample_dicom.generator import SeriesSpec, StudySpec, deterministic_uid, generate_study

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    small, ct = (generate_study(StudySpec(series=(SeriesSpec(instances=1, rows=n, columns=n),),
                                          key_object=False), seed=cfg["seed"])[0]
                 for n in (64, 512))
    ready.set()
    go.wait(120)
    rec = Recorder(t0.value)
    library = logging.getLogger("pynetdicom")
    library.addHandler(LibraryWarnings(rec))
    library.setLevel(logging.WARNING)
    deadline = rec.t0 + cfg["seconds"]
    acks = open(cfg["acks"], "a", buffering=1)  # noqa: SIM115
    acks_lock = threading.Lock()
    shm = Path(cfg["spool"])

    def unacknowledged(sop: str, series: str, study: str) -> None:
        """A C-STORE that got no answer: the verification says whether it was stored."""
        with acks_lock, open(cfg["unacked"], "a") as f:
            f.write(json.dumps({"sop": sop, "series": series, "study": study}) + "\n")

    def worker(w: int) -> None:
        rng = random.Random(f"{cfg['seed']}:{w}")
        templates = {"small": _copy(small), "ct": _copy(ct)}
        base_pixels = {kind: bytes(ds.PixelData) for kind, ds in templates.items()}
        path = shm / f"send-{w}.dcm"
        ae = AE(ae_title=f"SOAK{w:02d}")
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DIMSE_TIMEOUT
        assoc = None
        study_n = 0
        pause = cfg["associations"] / cfg["store_rate"] if cfg["store_rate"] else 0.0
        next_send = last_ack = time.time()
        for _ in range(MAX_LOOP):
            if time.time() >= deadline:
                break
            if assoc is None or not assoc.is_established:
                started = time.time()
                try:
                    assoc = ae.associate("127.0.0.1", cfg["dimse_port"], ae_title=cfg["ae_title"])
                except Exception as exc:  # noqa: BLE001
                    rec.error("exception", "associate", repr(exc))
                    assoc = None
                if assoc is None or not assoc.is_established:
                    rec.error("association refused", "associate", "not established")
                    assoc = None
                    time.sleep(1)
                    continue
                keep_responses_for_sender(assoc)
                rec.sample("associate", started, (time.time() - started) * 1000)
            patient = f"SOAK-{w:02d}-{study_n // 2:05d}"
            name = f"SOAK{w:02d}^P{study_n // 2:05d}"
            study = str(deterministic_uid(cfg["seed"], "soak", w, study_n))
            plan = [("small", rng.randint(4, 12)), ("ct", rng.randint(1, 4))]
            for number, (kind, count) in enumerate(plan, start=1):
                series = str(deterministic_uid(study, number))
                for i in range(count):
                    if time.time() >= deadline:
                        break
                    ds = templates[kind]
                    sop = str(deterministic_uid(series, i))
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                    ds.PatientID, ds.PatientName = patient, name
                    ds.AccessionNumber = f"S{w:02d}{study_n:06d}"
                    ds.SeriesNumber, ds.InstanceNumber = number, i + 1
                    ds.SeriesDescription = f"soak {kind}"
                    pixels = bytearray(base_pixels[kind])
                    pixels[:8] = struct.pack("<HHHH", w, study_n % 4096, i, number)
                    ds.PixelData = bytes(pixels)
                    ds.save_as(path, enforce_file_format=True)
                    _, digest = data_set_digest(path.read_bytes())
                    wait = next_send - time.time()
                    if wait > 0:
                        time.sleep(min(wait, max(0.0, deadline - time.time())))
                    next_send = max(next_send + pause, time.time() - 1.0)
                    started = time.time()
                    op = f"c-store {kind}"
                    try:
                        status = assoc.send_c_store(path)
                    except Exception as exc:  # noqa: BLE001
                        rec.error("exception", op, repr(exc))
                        unacknowledged(sop, series, study)
                        assoc.abort()
                        assoc = None
                        break
                    ms = (time.time() - started) * 1000
                    code = getattr(status, "Status", None)
                    if code is None:
                        rec.error("no response (association lost)", op,
                                  f"{sop} sent at {started - rec.t0:.1f} s, previous ack at "
                                  f"{last_ack - rec.t0:.1f} s, on SOAK{w:02d}")
                        unacknowledged(sop, series, study)
                        assoc.abort()
                        assoc = None
                        break
                    if code != 0:
                        comment = getattr(status, "ErrorComment", "")
                        rec.error(f"status 0x{code:04X}", op, f"{sop} {comment}")
                        continue
                    rec.sample(op, started, ms)
                    last_ack = time.time()
                    line = json.dumps({"sop": sop, "series": series, "study": study,
                                       "patient": patient, "name": name, "kind": kind,
                                       "digest": digest, "size": path.stat().st_size})
                    with acks_lock:
                        acks.write(line + "\n")
                if assoc is None:
                    break
            study_n += 1
            if assoc is not None and study_n % STUDIES_PER_ASSOCIATION == 0:
                assoc.release()
                assoc = None
        if assoc is not None and assoc.is_established:
            assoc.release()
        path.unlink(missing_ok=True)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True)
               for w in range(cfg["associations"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg["seconds"] + 300)
    acks.close()
    rec.dump(Path(cfg["out"]))


def _copy(ds: Any) -> Any:
    import copy

    return copy.deepcopy(ds)


# -- the HTTP process ------------------------------------------------------------------------
class Catalog:
    """What the store process acknowledged, read from its acknowledgement file as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lock = threading.Lock()
        self.digests: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.series: dict[str, list[str]] = defaultdict(list)
        self.series_of_study: dict[str, list[str]] = defaultdict(list)
        self.study_patient: dict[str, tuple[str, str]] = {}
        self.studies: list[str] = []

    def refresh(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        with self.lock:
            for line in chunk[:end].splitlines():
                ack = json.loads(line)
                self.digests[ack["sop"]] = ack["digest"]
                self.kinds[ack["sop"]] = ack["kind"]
                if ack["series"] not in self.series:
                    self.series_of_study[ack["study"]].append(ack["series"])
                self.series[ack["series"]].append(ack["sop"])
                if ack["study"] not in self.study_patient:
                    self.study_patient[ack["study"]] = (ack["patient"], ack["name"])
                    self.studies.append(ack["study"])

    def pick(self, rng: random.Random) -> tuple[str, str, str, list[str]] | None:
        """A study, one of its series, its patient ID, and the series' acknowledged SOPs."""
        with self.lock:
            if not self.studies:
                return None
            # Half the picks among the last studies: recent data is what viewers open.
            recent = self.studies[-50:]
            study = rng.choice(recent if rng.random() < 0.5 else self.studies)
            series = rng.choice(self.series_of_study[study])
            return study, series, self.study_patient[study][0], list(self.series[series])


class Http:
    """One keep-alive connection; a request returns (status, headers, body) or raises."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.headers = headers
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)
        try:
            self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            response = self.conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.headers, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def timed(rec: Recorder, op: str, call: Callable[[], tuple[int, Any, bytes]],
          expect: int = 200) -> tuple[Any, bytes] | None:
    """Run one request; record its latency, or the error it ended in."""
    started = time.time()
    try:
        status, headers, body = call()
    except TimeoutError as exc:
        rec.error("timeout", op, repr(exc))
        return None
    except Exception as exc:  # noqa: BLE001
        rec.error(f"exception {type(exc).__name__}", op, repr(exc))
        return None
    ms = (time.time() - started) * 1000
    if status != expect:
        kind = "HTTP 5xx" if status >= 500 else (
            "HTTP 4xx" if status >= 400 else f"HTTP {status}")
        rec.error(kind, op, f"{status} {body[:200]!r}")
        return None
    rec.sample(op, started, ms)
    return headers, body


def check(rec: Recorder, op: str, ok: bool, detail: str) -> None:
    if not ok:
        rec.error("wrong answer", op, detail)


def dicomweb_ops(http: Http, catalog: Catalog, rec: Recorder,
                 rng: random.Random) -> list[tuple[str, Callable[[], None]]]:
    """The operations of an HTTP client, each on a freshly picked acknowledged series."""
    root = "/dicomweb"
    accept_json = {"Accept": DICOM_JSON}

    def picked() -> tuple[str, str, str, list[str]]:
        choice = catalog.pick(rng)
        assert choice is not None
        return choice

    def qido_pid() -> None:
        study, _, patient, _ = picked()
        got = timed(rec, "qido studies PatientID", lambda: http.request(
            "GET", f"{root}/studies?PatientID={quote(patient)}", accept_json))
        if got:
            uids = {r["0020000D"]["Value"][0] for r in json.loads(got[1] or b"[]")}
            check(rec, "qido studies PatientID", study in uids, f"{study} not in {len(uids)}")

    def qido_name() -> None:
        _, _, patient, _ = picked()
        prefix = "SOAK" + patient.split("-")[1]
        got = timed(rec, "qido studies PatientName*", lambda: http.request(
            "GET", f"{root}/studies?PatientName={prefix}*&limit=50", accept_json))
        if got:
            check(rec, "qido studies PatientName*", bool(json.loads(got[1] or b"[]")),
                  f"nothing for {prefix}*")

    def qido_series() -> None:
        study, series, _, _ = picked()
        got = timed(rec, "qido series", lambda: http.request(
            "GET", f"{root}/studies/{study}/series", accept_json))
        if got:
            uids = {r["0020000E"]["Value"][0] for r in json.loads(got[1] or b"[]")}
            check(rec, "qido series", series in uids, f"{series} not in {uids}")

    def qido_instances() -> None:
        study, series, _, sops = picked()
        got = timed(rec, "qido instances", lambda: http.request(
            "GET", f"{root}/studies/{study}/series/{series}/instances", accept_json))
        if got:
            uids = {r["00080018"]["Value"][0] for r in json.loads(got[1] or b"[]")}
            check(rec, "qido instances", set(sops) <= uids, f"{set(sops) - uids} missing")

    def metadata() -> None:
        study, series, _, sops = picked()
        got = timed(rec, "series metadata", lambda: http.request(
            "GET", f"{root}/studies/{study}/series/{series}/metadata", accept_json))
        if got:
            uids = {r["00080018"]["Value"][0] for r in json.loads(got[1])}
            check(rec, "series metadata", set(sops) <= uids, f"{set(sops) - uids} missing")

    def retrieve() -> None:
        study, series, _, sops = picked()
        got = timed(rec, "retrieve series", lambda: http.request(
            "GET", f"{root}/studies/{study}/series/{series}", {"Accept": ACCEPT_AS_STORED}))
        if got:
            digests = dict(data_set_digest(p) for p in
                           multipart_parts(got[0]["Content-Type"], got[1]))
            with catalog.lock:
                expected = {s: catalog.digests[s] for s in sops}
            bad = [s for s, d in expected.items() if digests.get(s) != d]
            check(rec, "retrieve series", not bad, f"{len(bad)} missing or different: {bad[:2]}")

    def frames() -> None:
        study, series, _, sops = picked()
        sop = rng.choice(sops)
        got = timed(rec, "frames", lambda: http.request(
            "GET", f"{root}/studies/{study}/series/{series}/instances/{sop}/frames/1",
            {"Accept": ACCEPT_FRAMES}))
        if got:
            parts = multipart_parts(got[0]["Content-Type"], got[1])
            size = 64 * 64 * 2 if catalog.kinds.get(sop) == "small" else 512 * 512 * 2
            check(rec, "frames", len(parts) == 1 and len(parts[0]) == size,
                  f"{[len(p) for p in parts]} bytes, expected {size}")

    def rendered() -> None:
        study, series, _, sops = picked()
        sop = rng.choice(sops)
        got = timed(rec, "rendered", lambda: http.request(
            "GET", f"{root}/studies/{study}/series/{series}/instances/{sop}/rendered",
            {"Accept": "image/jpeg"}))
        if got:
            check(rec, "rendered", got[1][:3] == b"\xff\xd8\xff", f"not a JPEG: {got[1][:8]!r}")

    return [("qido_pid", qido_pid), ("qido_name", qido_name), ("qido_series", qido_series),
            ("qido_instances", qido_instances), ("metadata", metadata),
            ("retrieve", retrieve), ("frames", frames), ("rendered", rendered)]


def viewer_session(port: int, api: Http, catalog: Catalog, rec: Recorder, rng: random.Random,
                   dsp: dict[str, threading.Event], dsp_lock: threading.Lock) -> None:
    """One viewer session: DSP date, mint, open the link, then OHIF's first requests.

    The first loop to pick a patient records its DSP date; the others wait for that answer
    before minting (a link minted before it is rightly refused).
    """
    choice = catalog.pick(rng)
    assert choice is not None
    study, series, patient, _ = choice
    with dsp_lock:
        recorded = dsp.get(patient)
        if recorded is None:
            dsp[patient] = threading.Event()
    json_body = {"Content-Type": "application/json"}
    if recorded is None:
        body = json.dumps({"created": DSP_CREATED}).encode()
        ok = timed(rec, "PUT dsp", lambda: api.request(
            "PUT", f"/api/patients/{quote(patient)}/dsp", json_body, body))
        with dsp_lock:
            dsp[patient].set()
            if not ok:
                del dsp[patient]
                return
    elif not recorded.wait(2 * HTTP_TIMEOUT) or dsp.get(patient) is not recorded:
        return  # the other loop's PUT failed: counted there
    body = json.dumps({"study": study, "viewer": {"id": VIEWER_ID, "name": "Soak"},
                       "relationship": "trust_circle", "ttl": 3600}).encode()
    got = timed(rec, "POST link", lambda: api.request("POST", "/api/links", json_body, body),
                expect=201)
    if not got:
        return
    landing = Http(port, {})
    try:
        path = urlsplit(json.loads(got[1])["url"]).path
        opened = timed(rec, "open /view", lambda: landing.request("GET", path), expect=303)
        if not opened:
            return
        cookie = ""
        for header in opened[0].get_all("Set-Cookie") or []:
            if header.startswith("gw_session="):
                cookie = header.split(";", 1)[0]
        check(rec, "open /view", bool(cookie), "no gw_session cookie")
        if not cookie:
            return
        browser = Http(port, {"Cookie": cookie, "Accept": DICOM_JSON})
        try:
            got = timed(rec, "viewer qido studies", lambda: browser.request(
                "GET", f"/dicomweb/studies?StudyInstanceUID={study}"))
            if got:
                check(rec, "viewer qido studies", len(json.loads(got[1] or b"[]")) == 1,
                      "not one study")
            got = timed(rec, "viewer qido series", lambda: browser.request(
                "GET", f"/dicomweb/studies/{study}/series"))
            if got:
                uids = {r["0020000E"]["Value"][0] for r in json.loads(got[1] or b"[]")}
                check(rec, "viewer qido series", series in uids, f"{series} not in {uids}")
            timed(rec, "viewer series metadata", lambda: browser.request(
                "GET", f"/dicomweb/studies/{study}/series/{series}/metadata"))
        finally:
            browser.close()
    finally:
        landing.close()


def http_process(cfg: dict[str, Any], ready: Any, go: Any, t0: Any) -> None:
    """HTTP clients and viewer loops until the deadline."""
    catalog = Catalog(Path(cfg["acks"]))
    ready.set()
    go.wait(120)
    rec = Recorder(t0.value)
    deadline = rec.t0 + cfg["seconds"]
    stop = threading.Event()

    def tail() -> None:
        while not stop.wait(0.5):
            catalog.refresh()

    tailer = threading.Thread(target=tail, daemon=True)
    tailer.start()
    wait_until = time.time() + 120
    while not catalog.studies and time.time() < wait_until:
        catalog.refresh()
        time.sleep(0.2)
    auth = {"Authorization": f"Bearer {cfg['api_key']}"}
    think = cfg["think"]

    def client(n: int) -> None:
        rng = random.Random(f"{cfg['seed']}:http:{n}")
        http = Http(cfg["http_port"], auth)
        ops = dicomweb_ops(http, catalog, rec, rng)
        k = rng.randrange(len(ops))
        for _ in range(MAX_LOOP):
            if time.time() >= deadline:
                break
            ops[k % len(ops)][1]()
            k += 1
            time.sleep(rng.uniform(0, 2 * think))
        http.close()

    dsp: dict[str, threading.Event] = {}
    dsp_lock = threading.Lock()

    def viewer(n: int) -> None:
        rng = random.Random(f"{cfg['seed']}:viewer:{n}")
        api = Http(cfg["http_port"], auth)
        for _ in range(MAX_LOOP):
            if time.time() >= deadline:
                break
            viewer_session(cfg["http_port"], api, catalog, rec, rng, dsp, dsp_lock)
            time.sleep(rng.uniform(0, 2 * think))
        api.close()

    threads = ([threading.Thread(target=client, args=(n,), daemon=True)
                for n in range(cfg["http_clients"])]
               + [threading.Thread(target=viewer, args=(n,), daemon=True)
                  for n in range(cfg["viewer_sessions"])])
    if catalog.studies:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=cfg["seconds"] + 300)
    else:
        rec.error("no data", "start", "nothing was acknowledged in 120 s")
    stop.set()
    rec.counts["viewer sessions"] = rec.counts["open /view"]
    rec.dump(Path(cfg["out"]))


# -- the gateway process: sampling and verification ------------------------------------------
@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    threads: int
    cpu: float = 0.0       # the gateway's CPU seconds (user + system) so far
    wal_bytes: int = 0     # the size of SQLite's log (index.sqlite-wal), when SQLite


def descriptors(pid: int, data: Path) -> dict[str, int]:
    """The gateway's open descriptors by what they are (sockets, the index, spool files...)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(data)):
            relative = Path(target).relative_to(data)
            target = "data/" + (relative.parts[0] + "/..." if len(relative.parts) > 1
                                else relative.name)
        kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return dict(kinds.most_common())


def process_sample(pid: int, t: float, data: Path | None = None) -> Sample:
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    wal = data / "index.sqlite-wal" if data else None
    return Sample(t, rss, len(os.listdir(f"/proc/{pid}/fd")), threads, process_cpu_seconds(pid),
                  wal.stat().st_size if wal and wal.exists() else 0)


class Sampler(threading.Thread):
    """The gateway's RSS, descriptors and threads, every second."""

    def __init__(self, pid: int, t0: float, data: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.data = pid, t0, data
        self.samples: list[Sample] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.samples.append(process_sample(self.pid, time.time() - self.t0, self.data))
            except (FileNotFoundError, ProcessLookupError):
                return
            self.stopped.wait(1.0)


def verify(acks: list[dict[str, Any]], port: int, api_key: str, workers: int = 4
           ) -> tuple[int, list[str], float]:
    """Retrieve every acknowledged instance, series by series, as stored; compare data sets.

    Returns the number lost (missing or different), examples, and the seconds it took.
    """
    by_series: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for ack in acks:
        by_series[(ack["study"], ack["series"])][ack["sop"]] = ack["digest"]
    queue = list(by_series.items())
    lock = threading.Lock()
    lost: list[str] = []
    started = time.time()

    def worker() -> None:
        http = Http(port, {"Authorization": f"Bearer {api_key}"})
        while True:
            with lock:
                if not queue:
                    break
                (study, series), expected = queue.pop()
            got: dict[str, str] = {}
            for attempt in range(3):
                try:
                    status, headers, body = http.request(
                        "GET", f"/dicomweb/studies/{study}/series/{series}",
                        {"Accept": ACCEPT_AS_STORED})
                except Exception as exc:  # noqa: BLE001
                    if attempt == 2:
                        with lock:
                            lost.append(f"series {series}: {exc!r}")
                    continue
                if status == 200:
                    got = dict(data_set_digest(p)
                               for p in multipart_parts(headers["Content-Type"], body))
                break
            bad = [f"{sop}: {'missing' if sop not in got else 'different bytes'}"
                   for sop, digest in expected.items() if got.get(sop) != digest]
            with lock:
                lost.extend(bad)
        http.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(lost), lost[:EXAMPLES], time.time() - started


def stored_anyway(unacked: list[dict[str, Any]], port: int, api_key: str) -> list[str]:
    """Which C-STOREs that got no answer the gateway holds all the same (its answer lost on
    the way, or never sent) rather than never received whole."""
    http = Http(port, {"Authorization": f"Bearer {api_key}", "Accept": DICOM_JSON})
    found = []
    for u in unacked:
        status, _, _ = http.request("GET", f"/dicomweb/studies/{u['study']}/series/"
                                           f"{u['series']}/instances/{u['sop']}/metadata")
        if status == 200:
            found.append(u["sop"])
    http.close()
    return found


# -- setup -------------------------------------------------------------------------------------
def links_toml(viewer_dir: Path) -> str:
    return (f'[links]\nsigning_kid = "soak"\nmax_ttl = 7200\nviewer_dir = "{viewer_dir}"\n\n'
            f'[[links.keys]]\nkid = "soak"\nalg = "HS256"\nsecret = "{secrets.token_hex(32)}"\n')


def viewer_folder(root: Path) -> Path:
    """The OHIF build of ``GATEWAY_TEST_VIEWER_DIR``, or a stand-in index page: the landing
    answers 503 without a viewer, and the soak never loads the viewer's own files."""
    configured = os.environ.get("GATEWAY_TEST_VIEWER_DIR")
    if configured and (Path(configured) / "index.html").is_file():
        return Path(configured)
    folder = root / "viewer"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><div id='root'>OHIF</div>")
    return folder


@contextmanager
def database(url: str | None, keep: bool) -> Iterator[str | None]:
    """A fresh PostgreSQL schema of ``url`` for the run (dropped after), or None (SQLite)."""
    if not url:
        yield None
        return
    from sqlalchemy import create_engine, text

    schema = f"soak_{secrets.token_hex(4)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        if not keep:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def create_admin_key(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway", "apikey", "create", "--name", "soak",
                          "--scopes", "admin"], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def spool_folder(root: Path) -> Path:
    """Where the store threads write the file each sends: memory when /dev/shm exists."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="soak-", dir=shm if shm.is_dir() else root))
    return folder


# -- the report --------------------------------------------------------------------------------
def latency_table(samples: list[tuple[float, str, float]], seconds: float
                  ) -> dict[str, dict[str, dict[str, float]]]:
    window = min(60.0, seconds / 2)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, lo, hi in (("first", 0.0, window), ("last", seconds - window, seconds + 1e9)):
        by_op: dict[str, list[float]] = defaultdict(list)
        for t, op, ms in samples:
            if lo <= t < hi:
                by_op[op].append(ms)
        for op, values in by_op.items():
            table.setdefault(op, {})[name] = {
                "n": len(values), "p50": round(statistics.median(values), 1),
                "p95": round(percentile(values, 95), 1)}
    return dict(sorted(table.items()))


def per_minute(samples: list[tuple[float, str, float]], gateway: list[Sample],
               seconds: float) -> list[dict[str, float]]:
    """Requests, C-STOREs, the gateway's CPU per operation, RSS and SQLite's log, per minute:
    a cost per operation that grows says more than latencies on a shared machine."""
    rows = []
    for minute in range(max(1, int(seconds // 60))):
        lo, hi = minute * 60.0, min(seconds, (minute + 1) * 60.0)
        inside = [g for g in gateway if lo <= g.t <= hi]
        if len(inside) < 2:
            continue
        stores = sum(1 for t, op, _ in samples if lo <= t < hi and op.startswith("c-store"))
        requests = sum(1 for t, op, _ in samples
                       if lo <= t < hi and not op.startswith(("c-store", "associate")))
        cpu = inside[-1].cpu - inside[0].cpu
        rows.append({"minute": minute + 1, "c_stores": stores, "http_requests": requests,
                     "gateway_cpu_percent": round(100 * cpu / (inside[-1].t - inside[0].t), 1),
                     "cpu_ms_per_operation": round(1000 * cpu / max(1, stores + requests), 2),
                     "rss_mb": round(inside[-1].rss_kb / 1024),
                     "wal_mb": round(inside[-1].wal_bytes / 1e6, 1)})
    return rows


def slope_mb_per_min(samples: list[Sample]) -> float:
    if len(samples) < 3:
        return 0.0
    xs = [s.t / 60 for s in samples]
    ys = [s.rss_kb / 1024 for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def log_lines(path: Path, *levels: str) -> list[str]:
    """Lines of the gateway's log at one of ``levels`` (``Traceback`` for tracebacks)."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [line for line in lines
            if any(f" {level} " in line or line.startswith(level) for level in levels)]


def print_report(r: dict[str, Any]) -> None:
    print()
    print(f"Soak {r['minutes']} min: {r['associations']} associations, {r['http_clients']} "
          f"HTTP clients, {r['viewer_sessions']} viewer loops, {r['database']}")
    s = r["stored"]
    print(f"stored     {s['instances']} instances acknowledged ({s['small']} 64x64, {s['ct']} "
          f"CT 512x512), {s['megabytes']:.0f} MB, {s['per_second']:.1f}/s")
    print(f"HTTP       {r['http']['requests']} requests ({r['http']['per_second']:.1f}/s), "
          f"{r['http']['viewer_sessions']} viewer sessions opened")
    print(f"lost       {r['lost']['count']} of {s['instances']} (each retrieved as stored and "
          f"its data set compared byte for byte, {r['lost']['seconds']:.0f} s)")
    for example in r["lost"]["examples"][:5]:
        print(f"             {example}")
    u = r["unacknowledged"]
    if u["count"]:
        print(f"unanswered {u['count']} C-STOREs without an answer, of which the gateway holds "
              f"{len(u['stored_anyway'])}")
    print(f"errors     {r['errors']['total']}")
    for kind, n in sorted(r["errors"]["by_kind"].items()):
        print(f"             {n:6d}  {kind}")
    for example in r["errors"]["examples"][:10]:
        print(f"             e.g. {example}")
    print(f"server log {len(r['server_log_errors'])} ERROR lines or tracebacks, "
          f"{len(r['server_log_warnings'])} WARNING lines")
    for line in (r["server_log_errors"] + r["server_log_warnings"])[:5]:
        print(f"             {line[:200]}")
    g = r["gateway"]
    print(f"RSS MB     before load {g['rss_before_mb']:.0f}, "
          f"start {g['rss_start_mb']:.0f} (after {r['warmup']:.0f} s), end "
          f"{g['rss_end_mb']:.0f}, peak {g['rss_peak_mb']:.0f}, after verification "
          f"{g['rss_after_verify_mb']:.0f}; slope after warm-up {g['rss_slope_mb_per_min']:+.2f}"
          " MB/min")
    print(f"fds        before load {g['fds_before']}, start {g['fds_start']}, end "
          f"{g['fds_end']}, clients gone {g['fds_idle']}, after verification "
          f"{g['fds_after_verify']}")
    print(f"             clients gone: {g['fds_idle_by_kind']}")
    print(f"threads    before load {g['threads_before']}, start {g['threads_start']}, end "
          f"{g['threads_end']}, clients gone {g['threads_idle']}, after verification "
          f"{g['threads_after_verify']}")
    print(f"stopped    {g['stopped']}")
    print(f"\n{'minute':>6} {'C-STOREs':>9} {'HTTP':>7} {'gw CPU %':>9} {'CPU ms/op':>10} "
          f"{'RSS MB':>7} {'WAL MB':>7}")
    for row in r["per_minute"]:
        print(f"{row['minute']:>6} {row['c_stores']:>9} {row['http_requests']:>7} "
              f"{row['gateway_cpu_percent']:>9.1f} {row['cpu_ms_per_operation']:>10.2f} "
              f"{row['rss_mb']:>7} {row['wal_mb']:>7.1f}")
    window = min(60.0, r["minutes"] * 30)
    print(f"\nlatency ms (first and last {window:.0f} s of load)")
    print(f"{'operation':28} {'n':>6} {'p50':>8} {'p95':>8}   {'n':>6} {'p50':>8} {'p95':>8}")
    for op, windows in r["latency_ms"].items():
        first, last = windows.get("first", {}), windows.get("last", {})
        print(f"{op:28} {first.get('n', 0):>6} {first.get('p50', float('nan')):>8.1f} "
              f"{first.get('p95', float('nan')):>8.1f}   {last.get('n', 0):>6} "
              f"{last.get('p50', float('nan')):>8.1f} {last.get('p95', float('nan')):>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--http-clients", type=int, default=50)
    parser.add_argument("--viewer-sessions", type=int, default=5,
                        help="viewer loops (mint, open, OHIF's first requests), one at a time each")
    parser.add_argument("--store-rate", type=float, default=50.0,
                        help="most instances per second over all associations (0: no limit); "
                             "bounds the data folder: about 4 GB at 50/s for 10 minutes")
    parser.add_argument("--think", type=float, default=0.25,
                        help="mean seconds each HTTP client waits between requests")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds of load before the RSS 'start' sample")
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL URL; the run uses a fresh schema, dropped after")
    parser.add_argument("--keep", action="store_true", help="keep the data folder and schema")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    seconds = args.minutes * 60
    RESULTS.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    spool = spool_folder(root)
    report: dict[str, Any] = {}
    try:
        with database(args.database_url, args.keep) as url:
            report = run(args, root, spool, url, seconds)
    finally:
        for path in spool.iterdir():
            path.unlink()
        spool.rmdir()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)
        else:
            print(f"kept {root}")
    print_report(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"soak-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {out}")
    failed = (report["errors"]["total"] or report["lost"]["count"]
              or report["server_log_errors"])
    return 1 if failed else 0


def run(args: argparse.Namespace, root: Path, spool: Path, url: str | None,
        seconds: float) -> dict[str, Any]:
    viewer = viewer_folder(root)
    config = root / "gateway.toml"
    config.write_text(links_toml(viewer))
    data = root / "data"
    env = {"GATEWAY_CONFIG": str(config),
           "GATEWAY_DIMSE_MAX_ASSOCIATIONS": str(max(32, args.associations + 8)),
           **({"GATEWAY_DATABASE_URL": url} if url else {})}
    full_env = {**os.environ, "GATEWAY_DATA_DIR": str(data), "GATEWAY_LOG_LEVEL": "WARNING",
                **env}
    data.mkdir()
    api_key = create_admin_key(full_env)
    log = root / "gateway.log"
    ctx = mp.get_context("spawn")
    with GatewayServer(data, env=env, log=log) as gateway:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        base = {"seed": args.seed, "seconds": seconds, "acks": str(root / "acks.jsonl"),
                "dimse_port": gateway.dimse_port, "ae_title": gateway.ae_title,
                "http_port": gateway.http_port, "api_key": api_key}
        store_cfg = {**base, "associations": args.associations, "store_rate": args.store_rate,
                     "spool": str(spool), "out": str(root / "store.json"),
                     "unacked": str(root / "unacked.jsonl")}
        http_cfg = {**base, "http_clients": args.http_clients, "think": args.think,
                    "viewer_sessions": args.viewer_sessions, "out": str(root / "http.json")}
        before = process_sample(pid, 0.0)
        go, t0 = ctx.Event(), ctx.Value("d", 0.0)
        readies = [ctx.Event(), ctx.Event()]
        procs = [ctx.Process(target=store_process, args=(store_cfg, readies[0], go, t0)),
                 ctx.Process(target=http_process, args=(http_cfg, readies[1], go, t0))]
        for p in procs:
            p.start()
        for ready in readies:
            if not ready.wait(300):
                raise RuntimeError("a client process did not start")
        start = time.time() + 0.5
        t0.value = start
        go.set()
        sampler = Sampler(pid, start, data)
        sampler.start()
        print(f"soak running for {args.minutes} min (gateway pid {pid}, data in {root})",
              flush=True)
        for p in procs:
            p.join(timeout=max(0.0, start + seconds - time.time()) + 600)
            if p.is_alive():
                p.kill()
                p.join()
        sampler.stopped.set()
        sampler.join()
        time.sleep(5)  # the gateway closes connections and ends association threads
        idle = process_sample(pid, time.time() - start)
        idle_fds = descriptors(pid, data)
        acks = [json.loads(line) for line in (root / "acks.jsonl").read_text().splitlines()]
        print(f"load over; verifying {len(acks)} acknowledged instances", flush=True)
        lost, lost_examples, verify_seconds = verify(acks, gateway.http_port, api_key)
        unacked_path = root / "unacked.jsonl"
        unacked = ([json.loads(line) for line in unacked_path.read_text().splitlines()]
                   if unacked_path.exists() else [])
        unacked_stored = stored_anyway(unacked, gateway.http_port, api_key)
        after_verify = process_sample(pid, time.time() - start)
        after_verify_fds = descriptors(pid, data)
        stop_started = time.time()
    stopped = f"on SIGTERM in {time.time() - stop_started:.1f} s"
    died = {"samples": [], "errors": {"client process died": 1}, "examples": [], "counts": {}}
    results: list[dict[str, Any]] = [
        json.loads(Path(cfg["out"]).read_text()) if Path(cfg["out"]).exists() else died
        for cfg in (store_cfg, http_cfg)]
    samples = [(t, op, ms) for r in results for t, op, ms in r["samples"]]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    during = [s for s in sampler.samples if 0 <= s.t <= seconds]
    settled = [s for s in during if s.t >= args.warmup] or during
    http_counts = Counter(results[1]["counts"])
    requests = sum(n for op, n in http_counts.items() if op != "viewer sessions")
    return {
        "minutes": args.minutes, "associations": args.associations,
        "http_clients": args.http_clients, "viewer_sessions": args.viewer_sessions,
        "store_rate": args.store_rate, "think": args.think, "warmup": args.warmup,
        "seed": args.seed, "database": "PostgreSQL" if url else "SQLite",
        "stored": {"instances": len(acks), "small": sum(a["kind"] == "small" for a in acks),
                   "ct": sum(a["kind"] == "ct" for a in acks),
                   "megabytes": sum(a["size"] for a in acks) / 1e6,
                   "per_second": len(acks) / seconds},
        "http": {"requests": requests, "per_second": requests / seconds,
                 "viewer_sessions": http_counts["viewer sessions"]},
        "lost": {"count": lost, "examples": lost_examples, "seconds": verify_seconds},
        "unacknowledged": {"count": len(unacked), "stored_anyway": unacked_stored},
        "errors": {"total": sum(errors.values()), "by_kind": dict(errors),
                   "examples": results[0]["examples"] + results[1]["examples"]},
        "server_log_errors": log_lines(log, "ERROR", "CRITICAL", "Traceback"),
        "server_log_warnings": log_lines(log, "WARNING")[:EXAMPLES],
        "gateway": {
            "rss_start_mb": settled[0].rss_kb / 1024, "rss_end_mb": during[-1].rss_kb / 1024,
            "rss_peak_mb": max(s.rss_kb for s in during) / 1024,
            "rss_after_verify_mb": after_verify.rss_kb / 1024,
            "rss_slope_mb_per_min": slope_mb_per_min(settled),
            "rss_before_mb": before.rss_kb / 1024, "fds_before": before.fds,
            "threads_before": before.threads,
            "fds_start": settled[0].fds, "fds_end": during[-1].fds, "fds_idle": idle.fds,
            "threads_start": settled[0].threads, "threads_end": during[-1].threads,
            "threads_idle": idle.threads, "fds_after_verify": after_verify.fds,
            "threads_after_verify": after_verify.threads, "stopped": stopped,
            "fds_idle_by_kind": idle_fds, "fds_after_verify_by_kind": after_verify_fds,
            "rss_mb_every_10s": [round(s.rss_kb / 1024) for s in during[::10]],
        },
        "latency_ms": latency_table(samples, seconds),
        "per_minute": per_minute(samples, during, seconds),
    }


if __name__ == "__main__":
    sys.exit(main())
