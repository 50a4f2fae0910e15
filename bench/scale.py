"""The index at national scale: QIDO-RS, series /metadata and C-FIND on a PostgreSQL index of
at least 1,000,000 instances (issue 23).

Builds, in a database given by URL, an archive of ``--studies`` studies (default 100,000) of
``--patients`` patients (default 30,000): 1 to 3 series a study, 1 to 9 instances a series
(10 a study on average), plus one series of ``--series-size`` instances (default 500). The
rows are written by the index's own code, the way ingest writes them: for each new series
``Index.add_instance`` (patient, study and series rows, the stored DICOM JSON of an instance
parsed by ``parse_instance``), for the series' other instances ``Index.add_new_instance``
(the C-STORE hot path's one statement), ``--chunk`` studies per transaction. Only the large
series has files: it goes through the full ingest path (``Ingestor.ingest``); no query
measured opens a file.

The build is resumable: each chunk is one transaction, the data are a function of the study
number, and a run continues after the last chunk committed (it says how long each part took).

Then a real ``dicom-gateway serve`` process on that database answers, with 1 and 8
concurrent clients (one keep-alive connection or one association each), random keys each
request:

* QIDO-RS ``PatientID=`` (a patient's studies)
* QIDO-RS ``AccessionNumber=``
* QIDO-RS ``PatientName=`` prefix wildcard (the first 6 letters of a patient's family name)
* QIDO-RS ``StudyDate=`` one-year range + ``ModalitiesInStudy=MR`` + ``limit=50``
* WADO-RS series ``/metadata`` of the large series
* C-FIND study level by ``PatientID`` (pynetdicom)

Usage::

    createdb scale   # a database of its own, never the tests' one
    python bench/scale.py postgresql+psycopg://postgres@127.0.0.1:5432/scale \\
        [--data-dir bench-scale-data] [--rounds 40] [--build-only] [--explain]

Target (issue 23): every p95 under 50 ms with one client.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GatewayServer, library_versions  # noqa: E402
from dicomweb_harness import gateway_env, percentile, timed_get  # noqa: E402
from qido import MODALITIES, WEIGHTS, make_instance  # noqa: E402

ROOT = "1.2.826.0.1.3680043.8.498.5151"
SEED = 20261202
SYLLABLES = ["SCH", "MUL", "WEB", "WAG", "HOF", "BEC", "KLE", "FIS", "MEY", "THI", "REU", "KIE",
             "LEN", "HAN", "MAJ", "WEL", "DUP", "MAR", "BER", "DUB", "THO", "ROB", "RIC", "PET",
             "DUR", "LER", "MOR", "SIM", "LAU", "LEF", "GOM", "SAN"]
ENDINGS = ["ER", "MAN", "IN", "ET", "OT", "EL", "ARD", "ES", "ON", "Y", "EN", "ITZ"]
BIG_STUDY = f"{ROOT}.0.1"
BIG_SERIES = f"{BIG_STUDY}.1"


# -- the archive: a function of the study number ------------------------------------------------
# Every value that varies has one length (UIDs ROOT.1xxxxx.k.n, IDs, names, dates), so that a
# series' first instance is a template of its modality with its values put in place, byte for
# byte, and then parsed by ``parse_instance``: writing each data set with pydicom took 10 ms.
GIVEN4 = ["ANNE", "MARC", "JEAN", "PAUL", "LUCA", "EMMA", "NOAH", "LENA", "LEON", "MILA"]
_PLACE = {"study": f"{ROOT}.999999", "patient_id": "LU99999999",
          "patient_name": "ZZZZZZZZZ^ZZZZ", "birth": "18881111", "date": "18880202",
          "time": "235958", "accession": "A999999999"}
_TEMPLATES: dict[str, bytes] = {}


def patient(number: int) -> tuple[str, str, str]:
    """(PatientID, PatientName, PatientBirthDate) of patient ``number``."""
    rng = random.Random(SEED * 7 + number)
    family = "".join(rng.choice(SYLLABLES) for _ in range(3))
    return (f"LU{number:08d}", f"{family}^{rng.choice(GIVEN4)}",
            f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}")


def study_uid(number: int) -> str:
    return f"{ROOT}.{100000 + number}"


def study_plan(number: int, patients: int) -> dict[str, Any]:
    """What study ``number`` (1-based) holds: its patient, date, series and sizes."""
    rng = random.Random(SEED + number)
    date = f"{rng.randint(2010, 2026)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    first = rng.choices(MODALITIES, WEIGHTS)[0]
    modalities = [first] + rng.sample([m for m in MODALITIES if m != first],
                                      rng.choices([0, 1, 2], [30, 40, 30])[0])
    return {"uid": study_uid(number), "patient": patient(rng.randrange(patients)),
            "date": date, "time": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
            "accession": f"A{number:09d}",
            "series": [(m, rng.randint(1, 9)) for m in modalities]}


def _part10(ds: Any) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _template(modality: str) -> bytes:
    if modality not in _TEMPLATES:
        study = _PLACE["study"]
        _TEMPLATES[modality] = _part10(make_instance(
            study, f"{study}.9", f"{study}.9.9",
            (_PLACE["patient_id"], _PLACE["patient_name"], _PLACE["birth"]), _PLACE["date"],
            _PLACE["time"], modality, _PLACE["accession"], 1, 8))
    return _TEMPLATES[modality]


def series_instances(plan: dict[str, Any], k: int) -> list[tuple[Any, str]]:
    """The parsed instances of series ``k`` of a study, with their stored DICOM JSON.

    The first is parsed by ``parse_instance`` from its Part 10 bytes; the others are copies of
    it with their own SOP Instance UID and number.
    """
    from gateway.metadata import parse_instance

    modality, size = plan["series"][k]
    series = f"{plan['uid']}.{k + 1}"
    first_uid = f"{series}.1"
    data = _template(modality)
    study = _PLACE["study"]
    pid, name, birth = plan["patient"]
    for old, new in ((f"{study}.9.9", first_uid), (f"{study}.9", series), (study, plan["uid"]),
                     (_PLACE["patient_id"], pid), (_PLACE["patient_name"], name),
                     (_PLACE["birth"], birth), (_PLACE["date"], plan["date"]),
                     (_PLACE["time"], plan["time"]), (_PLACE["accession"], plan["accession"])):
        assert len(old) == len(new), (old, new)
        data = data.replace(old.encode(), new.encode())
    parsed = parse_instance(data)
    assert parsed.series_instance_uid == series
    template = parsed.metadata_json()
    number_1 = '"00200013":{"vr":"IS","Value":[1]}'
    assert number_1 in template
    out = [(parsed, template)]
    for n in range(2, size + 1):
        uid = f"{series}.{n}"
        metadata = template.replace(f'"{first_uid}"', f'"{uid}"').replace(
            number_1, number_1.replace("[1]", f"[{n}]"))
        out.append((replace(parsed, sop_instance_uid=uid,
                            fields={**parsed.fields, "instance_number": n},
                            metadata=metadata), metadata))
    return out


# -- the build ----------------------------------------------------------------------------------
def build(gateway: Any, studies: int, patients: int, chunk: int, series_size: int,
          reverse: bool = False) -> None:
    from sqlalchemy import func, select

    from gateway.models import Study

    index = gateway.index
    with index.Session() as session:
        done = session.scalar(select(func.count()).select_from(Study).where(
            Study.study_instance_uid.like(f"{ROOT}.%"),
            Study.study_instance_uid != BIG_STUDY)) or 0
    if done:
        print(f"resuming: {done} studies already built", flush=True)
    started = time.perf_counter()
    instances = built = 0
    chunks = list(range(1, studies + 1, chunk))
    if reverse:
        chunks.reverse()
    for first in chunks:
        numbers = range(first, min(first + chunk, studies + 1))
        # A chunk is one transaction: its last study there means all of it is.
        if index.find_digest(f"{study_uid(numbers[-1])}.1.1") is not None:
            continue
        batch = []
        for number in numbers:
            plan = study_plan(number, patients)
            for k in range(len(plan["series"])):
                batch.append(series_instances(plan, k))
        instances += sum(len(s) for s in batch)

        def work(session: Any, batch: list[list[tuple[Any, str]]] = batch) -> None:
            rest = []
            for series in batch:
                head, metadata = series[0]
                index.add_instance(session, head, _relpath(head), "bench", metadata)
                rest += [index.new_instance_parameters(p, _relpath(p), "bench", m)
                         for p, m in series[1:]]
            # The C-STORE hot path's statement (Index.add_new_instance), for all at once.
            cursor = session.connection().connection.driver_connection.cursor()
            try:
                cursor.executemany(index.insert_new_instance, rest)
                if cursor.rowcount != len(rest):
                    raise RuntimeError(f"{len(rest) - cursor.rowcount} instances not added")
            finally:
                cursor.close()

        index.write(work)
        built += len(numbers)
        if built % (chunk * 25) == 0:
            seconds = time.perf_counter() - started
            print(f"  {built} studies; this run: {instances} instances in {seconds:.0f} s "
                  f"({instances / seconds:.0f}/s)", flush=True)
    if index.find_digest(f"{BIG_SERIES}.{series_size}") is None:
        t0 = time.perf_counter()
        for n in range(1, series_size + 1):
            if index.find_digest(f"{BIG_SERIES}.{n}") is None:
                ds = make_instance(BIG_STUDY, BIG_SERIES, f"{BIG_SERIES}.{n}",
                                   ("LUBIG", "BIG^SERIES", "19600101"), "20260101", "120000",
                                   "CT", "ABIG", n, 64)
                gateway.ingestor.ingest(_part10(ds), source="bench")
        print(f"  large series: {series_size} instances ingested with files in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


def _relpath(p: Any) -> str:
    return (f"{p.study_instance_uid}/{p.series_instance_uid}/"
            f"{p.sop_instance_uid}.{p.digest[:12]}.dcm")


# -- the measures -------------------------------------------------------------------------------
def qido_paths(studies: int, patients: int, series_size: int
               ) -> dict[str, Callable[[random.Random], str]]:
    def by_patient(rng: random.Random) -> str:
        return f"/studies?PatientID={study_plan(rng.randint(1, studies), patients)['patient'][0]}"

    def by_accession(rng: random.Random) -> str:
        return f"/studies?AccessionNumber=A{rng.randint(1, studies):09d}"

    def by_name(rng: random.Random) -> str:
        name = study_plan(rng.randint(1, studies), patients)["patient"][1]
        return f"/studies?PatientName={name[:6]}*"

    def by_date(rng: random.Random) -> str:
        year = rng.randint(2010, 2025)
        return f"/studies?StudyDate={year}0101-{year}1231&ModalitiesInStudy=MR&limit=50"

    def metadata(rng: random.Random) -> str:
        return f"/studies/{BIG_STUDY}/series/{BIG_SERIES}/metadata"

    return {"QIDO PatientID": by_patient, "QIDO AccessionNumber": by_accession,
            "QIDO PatientName prefix": by_name,
            "QIDO StudyDate year + ModalitiesInStudy=MR, limit 50": by_date,
            f"series /metadata, {series_size} instances": metadata}


def run_clients(clients: int, rounds: int, once: Callable[[Any, random.Random], tuple[float, int]],
                connect: Callable[[], Any], close: Callable[[Any], None]
                ) -> tuple[list[float], list[int]]:
    """``clients`` threads, each on its own connection, each ``rounds`` requests (after 2 to
    warm up); return every request's milliseconds and result count."""
    times: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = connect()
        try:
            for _ in range(2):
                once(connection, rng)
            barrier.wait()
            mine = [once(connection, rng) for _ in range(rounds)]
            with lock:
                times.extend(ms for ms, _ in mine)
                counts.extend(n for _, n in mine)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()
        finally:
            close(connection)

    threads = [threading.Thread(target=client, args=(1000 * clients + i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return times, counts


def measure(url: str, data_dir: Path, key: str, studies: int, patients: int, series_size: int,
            rounds: int, client_counts: list[int]) -> None:
    import http.client

    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    headers = {"Authorization": f"Bearer {key}"}
    env = {"GATEWAY_DATABASE_URL": url}
    print("\nFigures taken on a shared 2-core machine (other jobs running): p50 / p95 in ms, "
          "random keys each request.")
    with GatewayServer(data_dir, env=env) as server:
        caught_up(url)
        def qido_once(path_of: Callable[[random.Random], str]
                      ) -> Callable[[Any, random.Random], tuple[float, int]]:
            def once(connection: Any, rng: random.Random) -> tuple[float, int]:
                ms, status, body = timed_get(connection, "/dicomweb" + path_of(rng), headers)
                if status not in (200, 204):
                    raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
                return ms, len(json.loads(body)) if body else 0
            return once

        def http_connect() -> Any:
            return http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=600)

        measures: dict[str, tuple[Callable[..., Any], Callable[[], Any], Callable[[Any], None]]]
        measures = {name: (qido_once(path), http_connect, lambda c: c.close())
                    for name, path in qido_paths(studies, patients, series_size).items()}

        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)

        def find_connect() -> Any:
            assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
            if not assoc.is_established:
                raise RuntimeError("C-FIND association refused")
            return assoc

        def find_once(assoc: Any, rng: random.Random) -> tuple[float, int]:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = study_plan(rng.randint(1, studies), patients)["patient"][0]
            for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                            "PatientName", "ModalitiesInStudy", "StudyDescription",
                            "NumberOfStudyRelatedInstances"):
                setattr(ds, keyword, "")
            start = time.perf_counter()
            matches = 0
            for status, identifier in assoc.send_c_find(
                    ds, StudyRootQueryRetrieveInformationModelFind):
                if status is None or status.Status not in (0xFF00, 0xFF01, 0x0000):
                    raise RuntimeError(f"C-FIND status {status}")
                if identifier is not None and status.Status in (0xFF00, 0xFF01):
                    matches += 1
            return (time.perf_counter() - start) * 1000, matches

        measures["C-FIND study level, PatientID"] = (find_once, find_connect,
                                                    lambda a: a.release())
        width = max(len(name) for name in measures)
        print(f"\n{'':<{width}}  " + "  ".join(f"{c} client{'s' if c > 1 else '':<1}  p50 / p95"
                                               .rjust(24) for c in client_counts)
              + "   results (median)")
        for name, (once, connect, close) in measures.items():
            cells = []
            found: list[int] = []
            for clients in client_counts:
                times, counts = run_clients(clients, max(rounds // clients, 10) if clients > 1
                                            else rounds, once, connect, close)
                cells.append(f"{statistics.median(times):8.1f} / {percentile(times, 0.95):7.1f}"
                             .rjust(24))
                found += counts
            print(f"{name:<{width}}  " + "  ".join(cells)
                  + f"   {statistics.median(found):.0f}", flush=True)


def caught_up(url: str, timeout: float = 1800) -> None:
    """Wait until the serving node's stable-study scan (gateway.events) has read every instance
    and announced every quiet study: after a bulk load it has 100,000 studies to announce,
    writes that would otherwise be measured with the queries."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    start = time.perf_counter()
    try:
        while True:
            with engine.connect() as connection:
                behind, pending = connection.execute(text(
                    "SELECT (SELECT coalesce(max(pk), 0) FROM instance) - coalesce((SELECT value "
                    "FROM event_cursor WHERE name = 'instances'), 0), "
                    "(SELECT count(*) FROM event_study WHERE pending)")).one()
            if behind == 0 and pending == 0:
                break
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"the events scan did not catch up in {timeout:.0f} s")
            time.sleep(5)
    finally:
        engine.dispose()
    print(f"events scan caught up (every study announced) after "
          f"{time.perf_counter() - start:.0f} s", flush=True)


def explain(url: str, studies: int, patients: int) -> None:
    """EXPLAIN ANALYZE of each statement the query engine runs for each QIDO-RS measured (one
    random key each), as the gateway's engine sends them."""
    from sqlalchemy import event

    from gateway.access import Principal, PrincipalKind
    from gateway.index import Index
    from gateway.query import Level, QueryEngine, parse_qido

    index = Index(url)
    captured: list[tuple[str, Any]] = []

    @event.listens_for(index.engine, "before_cursor_execute")
    def _capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> None:
        captured.append((statement, parameters))

    engine = QueryEngine(index)
    principal = Principal(PrincipalKind.API_KEY, "bench", frozenset({"dicomweb:read"}))
    rng = random.Random(1)
    try:
        for name, path_of in qido_paths(studies, patients, 0).items():
            if "metadata" in name:
                continue
            path = path_of(rng)
            params = [(k, v) for k, v in (p.split("=", 1) for p in path.split("?")[1].split("&"))]
            captured.clear()
            found = engine.search(parse_qido(Level.STUDY, params), principal,
                                  retrieve_base="http://bench")
            print(f"\n== {name}: {path} ({len(found.matches)} results)")
            statements = list(captured)
            with index.engine.connect() as connection:
                for statement, parameters in statements:
                    plan = connection.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).scalars()
                    print(statement.replace("\n", " ")[:400])
                    print("\n".join(plan))
                    print("--")
    finally:
        index.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the PostgreSQL database to build and query")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-scale-data"))
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--patients", type=int, default=30_000)
    parser.add_argument("--series-size", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=200, help="studies per transaction")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--reverse", action="store_true",
                        help="build the chunks from the last: a second builder at once")
    parser.add_argument("--explain", action="store_true",
                        help="print EXPLAIN ANALYZE of each QIDO-RS's SQL and stop")
    args = parser.parse_args()
    print(library_versions(), flush=True)
    os.environ.update({k: v for k, v in gateway_env(args.data_dir).items()
                       if k.startswith("GATEWAY_")})
    os.environ["GATEWAY_DATABASE_URL"] = args.url
    if args.explain:
        explain(args.url, args.studies, args.patients)
        return 0

    from sqlalchemy import func, select

    from gateway.apikeys import ApiKeys
    from gateway.config import load_settings
    from gateway.core import Gateway
    from gateway.models import Instance, Patient, Series, Study

    settings = load_settings(environ=dict(os.environ))
    t0 = time.perf_counter()
    with Gateway(settings) as gateway:
        print(f"schema up to date in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        build(gateway, args.studies, args.patients, args.chunk, args.series_size, args.reverse)
        print(f"build: {time.perf_counter() - t0:.0f} s this run", flush=True)
        with gateway.index.Session() as session:
            sizes = {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                     for model in (Patient, Study, Series, Instance)}
        print("index: " + ", ".join(f"{n:,} {t}" for t, n in sizes.items()), flush=True)
        key = str(ApiKeys(gateway.index).create(f"bench-{time.time_ns()}", "dicomweb:read"))
    if args.build_only:
        return 0
    t0 = time.perf_counter()
    with gateway_engine(args.url) as run:
        # What autovacuum does in time on a database in service: statistics and the
        # visibility map (index-only scans), after a load faster than it.
        run("VACUUM (ANALYZE) patient, study, series, instance")
    print(f"VACUUM (ANALYZE) in {time.perf_counter() - t0:.0f} s", flush=True)
    measure(args.url, args.data_dir, key, args.studies, args.patients, args.series_size,
            args.rounds, [int(c) for c in args.clients.split(",")])
    return 0


class gateway_engine:  # noqa: N801 - a context manager used like a function
    """An AUTOCOMMIT connection to run maintenance statements on."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(url, isolation_level="AUTOCOMMIT")

    def __enter__(self) -> Callable[[str], None]:
        from sqlalchemy import text

        self.connection = self.engine.connect()
        return lambda sql: self.connection.execute(text(sql)) and None

    def __exit__(self, *exc: object) -> None:
        self.connection.close()
        self.engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
