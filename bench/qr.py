"""Query/Retrieve benchmark: C-FIND latency at 10,000 studies and C-MOVE throughput, gateway vs
Orthanc in the same run.

C-FIND is timed with two clients: pynetdicom (whose own per-response cost weighs in both
servers' figures) and dcmtk's findscu (C++, one association repeating the query), where the
server's share dominates.

Both archives hold the same corpus (``sample_dicom.generate_corpus``: 10,000 studies of one small
instance, two studies per patient) plus one study of CT 512 x 512 instances to move. The SCU is the
same pynetdicom client for both; the move destination is dcmtk's ``storescp --ignore``; C-GET is
timed with dcmtk's ``getscu --ignore``.

Two TCP settings (BENCHMARKING.md, "The TCP trap"): "packaged" (TCP_NODELAY unset for Orthanc and
storescp, pynetdicom's client sockets as they come) and "tuned" (TCP_NODELAY=1 for Orthanc and
storescp, TCP_NODELAY on the client's socket). The gateway tunes its own sockets in both.

    .venv/bin/python bench/qr.py                      # 10,000 studies, 100 CT instances moved
    .venv/bin/python bench/qr.py --studies 2000 --move-instances 50 --settings tuned
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    ORTHANC,
    GatewayServer,
    OrthancServer,
    dcmtk_env,
    free_port,
    library_versions,
    percentile,
    process_cpu_seconds,
)
from pydicom import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # type: ignore[attr-defined] # noqa: E402
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.config import load_settings  # noqa: E402
from gateway.core import Gateway  # noqa: E402
from sample_dicom.generator import SeriesSpec, StudySpec, generate_corpus, generate_study  # noqa: E402

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
RETURN_KEYS = ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID", "AccessionNumber",
               "ModalitiesInStudy", "StudyDescription")


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def corpus(studies: int, move_instances: int) -> tuple[list[bytes], list[bytes], str]:
    """The Part 10 files of the query corpus, those of the study to move, and its UID."""
    # Each corpus study is one image and its Key Object Selection document.
    files = [part10(ds) for study in generate_corpus(studies // 2, studies_per_patient=2,
                                                     instances=1, seed=3)
             for ds in study]
    spec = StudySpec(patient_id="MOVE0001", accession_number="MOVE0001",
                     series=(SeriesSpec(instances=move_instances, rows=512, columns=512),),
                     key_object=False)
    big = generate_study(spec, seed=11)
    return files, [part10(ds) for ds in big], str(big[0].StudyInstanceUID)


def load_gateway(data_dir: Path, files: Iterable[bytes]) -> None:
    """Ingest through the gateway's one ingest path (fsync off: this is setup, not measured)."""
    config = data_dir.parent / "setup.toml"
    config.write_text("[storage]\nfsync = false\nmin_free_bytes = 0\n")
    settings = load_settings(config, environ={"GATEWAY_DATA_DIR": str(data_dir)})
    gateway = Gateway(settings).open()
    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(lambda data: gateway.ingestor.ingest(data, source="bench"),
                              files):
                pass
    finally:
        gateway.close()


def load_orthanc(url: str, files: Iterable[bytes]) -> None:
    def post(data: bytes) -> None:
        request = urllib.request.Request(f"{url}/instances", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    with ThreadPoolExecutor(4) as pool:
        for _ in pool.map(post, files):
            pass


def client(port: int, ae_title: str, contexts: list[str], tuned: bool) -> Any:
    def nodelay(event: Any) -> None:
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title="BENCHSCU")
    for context in contexts:
        ae.add_requested_context(context)
    handlers = [(evt.EVT_CONN_OPEN, nodelay)] if tuned else []
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, evt_handlers=handlers)
    if not assoc.is_established:
        raise RuntimeError(f"cannot associate with {ae_title} on port {port}")
    return assoc


def queries(sample_patient: str, sample_accession: str) -> list[tuple[str, dict[str, str], int]]:
    """(name, matching keys, repetitions) of the C-FIND cases."""
    return [
        ("PatientID=", {"PatientID": sample_patient}, 100),
        ("AccessionNumber=", {"AccessionNumber": sample_accession}, 100),
        ("StudyDate one month", {"StudyDate": "20200101-20200131"}, 20),
        ("PatientName=WEBER*", {"PatientName": "WEBER*"}, 5),
    ]


def find_latency(port: int, ae_title: str, keys: dict[str, str], repeat: int, tuned: bool
                 ) -> tuple[list[float], int]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(identifier, keyword, "")
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    assoc = client(port, ae_title, [FIND], tuned)
    times, matches = [], 0
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            responses = list(assoc.send_c_find(identifier, FIND))
            times.append(time.perf_counter() - start)
            status = int(responses[-1][0].Status)
            if status != 0:
                raise RuntimeError(f"C-FIND to {ae_title} ended with 0x{status:04X}")
            matches = len(responses) - 1
    finally:
        assoc.release()
    return times, matches


def findscu_per_query(port: int, ae_title: str, keys: dict[str, str], repeat: int,
                      tuned: bool) -> float:
    """Seconds per query with dcmtk's findscu (C++, so the server's share dominates): one
    association carrying ``repeat`` queries (``--repeat``) minus one carrying a single query,
    divided by ``repeat - 1``; the median of three such pairs."""
    args = ["findscu", "-S", "-aet", "BENCHSCU", "-aec", ae_title,
            "-k", "QueryRetrieveLevel=STUDY"]
    for keyword in RETURN_KEYS:
        if keyword not in keys:
            args += ["-k", keyword]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}"]
    env = dcmtk_env(tuned)

    def wall(times: int) -> float:
        start = time.perf_counter()
        subprocess.run([*args, "--repeat", str(times), "127.0.0.1", str(port)], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    repeat = max(repeat, 2)
    return statistics.median((wall(repeat) - wall(1)) / (repeat - 1) for _ in range(3))


def get_seconds(server: Any, study_uid: str, tuned: bool) -> float:
    """Wall seconds of one C-GET of the study with dcmtk's getscu (``--ignore``: received and
    acknowledged, not written), the instances coming back on the same association."""
    env = dcmtk_env(tuned)
    start = time.perf_counter()
    subprocess.run(["getscu", "-S", "-aet", "BENCHSCU", "-aec", server.ae_title, "--ignore",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                    "127.0.0.1", str(server.dimse_port)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def move_seconds(server: Any, study_uid: str, tuned: bool, expected: int) -> tuple[float, float]:
    """Wall seconds of one C-MOVE of the study to STORESCP, and the server's CPU seconds."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    cpu = process_cpu_seconds(server.proc.pid)
    assoc = client(server.dimse_port, server.ae_title, [MOVE], tuned)
    try:
        start = time.perf_counter()
        responses = list(assoc.send_c_move(identifier, "STORESCP", MOVE))
        seconds = time.perf_counter() - start
    finally:
        assoc.release()
    final = responses[-1][0]
    if int(final.Status) != 0 or int(final.NumberOfCompletedSuboperations) != expected:
        raise RuntimeError(f"C-MOVE from {server.ae_title} ended with 0x{int(final.Status):04X}"
                           f", {final.get('NumberOfCompletedSuboperations')} completed")
    return seconds, process_cpu_seconds(server.proc.pid) - cpu


class StoreSCP:
    """dcmtk ``storescp --ignore``: receives, acknowledges and drops every instance."""

    def __init__(self, tuned: bool) -> None:
        self.port = free_port()
        self.env = dcmtk_env(tuned)

    def __enter__(self) -> StoreSCP:
        self.proc = subprocess.Popen(["storescp", "--ignore", "-aet", "STORESCP",
                                      "+xa", str(self.port)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def report_find(name: str, gateway: tuple[list[float], int],
                orthanc: tuple[list[float], int] | None) -> None:
    g_times, g_matches = gateway
    line = (f"  C-FIND {name:<22} {g_matches:>5} matches  gateway p50 "
            f"{percentile(g_times, 50) * 1e3:7.1f} ms p95 {percentile(g_times, 95) * 1e3:7.1f} ms")
    if orthanc is not None:
        o_times, o_matches = orthanc
        line += (f" | Orthanc ({o_matches} matches) p50 {percentile(o_times, 50) * 1e3:7.1f} ms"
                 f" p95 {percentile(o_times, 95) * 1e3:7.1f} ms | Orthanc/gateway p50 "
                 f"{percentile(o_times, 50) / percentile(g_times, 50):5.2f}x")
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--move-instances", type=int, default=100)
    parser.add_argument("--moves", type=int, default=3, help="C-MOVE repetitions (median kept)")
    parser.add_argument("--settings", nargs="+", default=["tuned", "packaged"],
                        choices=["tuned", "packaged"])
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()
    print(library_versions(), flush=True)
    use_orthanc = ORTHANC is not None and not args.no_orthanc
    if shutil.which("storescp") is None:
        sys.exit("dcmtk's storescp is needed as the move destination (apt-get install dcmtk)")

    root = Path(tempfile.mkdtemp(prefix="bench-qr-"))
    try:
        started = time.perf_counter()
        files, big, move_uid = corpus(args.studies, args.move_instances)
        print(f"corpus: {args.studies} studies ({len(files)} instances) + {len(big)} CT "
              f"512x512 instances to move ({sum(map(len, big)) / 1e6:.0f} MB), generated in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        data_dir = root / "gateway"
        load_gateway(data_dir, files + big)
        print(f"gateway loaded in {time.perf_counter() - started:.0f} s", flush=True)
        sample_patient = f"LU03{(args.studies // 4) * 2:07d}"
        sample_accession = f"A03{args.studies // 3:08d}"
        orthanc_dir = root / "orthanc"
        if use_orthanc:
            started = time.perf_counter()
            with OrthancServer(orthanc_dir, tuned=True, dicomweb=False) as orthanc:
                load_orthanc(orthanc.url, files + big)
            print(f"Orthanc loaded in {time.perf_counter() - started:.0f} s", flush=True)

        print("figures taken on a shared 2-core machine; compare ratios, not absolutes",
              flush=True)
        for setting in args.settings:
            tuned = setting == "tuned"
            print(f"\n[{setting}]", flush=True)
            with StoreSCP(tuned) as store:
                config = root / f"gateway-{setting}.toml"
                config.write_text(
                    "[dimse.destinations]\n"
                    f'STORESCP = {{ host = "127.0.0.1", port = {store.port} }}\n')
                with GatewayServer(data_dir, env={"GATEWAY_CONFIG": str(config)}) as gateway:
                    orthanc_cm = (OrthancServer(orthanc_dir, tuned=tuned, dicomweb=False,
                                                modalities={
                                                    "STORESCP": ["STORESCP", "127.0.0.1",
                                                                 store.port],
                                                    # Orthanc answers C-FIND / C-MOVE only
                                                    # to known modalities.
                                                    "BENCHSCU": ["BENCHSCU", "127.0.0.1",
                                                                 free_port()]})
                                  if use_orthanc else None)
                    orthanc = orthanc_cm.__enter__() if orthanc_cm else None
                    try:
                        for name, keys, repeat in queries(sample_patient, sample_accession):
                            g = find_latency(gateway.dimse_port, gateway.ae_title, keys,
                                             repeat, tuned)
                            o = (find_latency(orthanc.dimse_port, orthanc.ae_title, keys,
                                              repeat, tuned) if orthanc else None)
                            report_find(name, g, o)
                        print("  findscu (dcmtk), per query on one association:", flush=True)
                        for name, keys, repeat in queries(sample_patient, sample_accession):
                            g_s = findscu_per_query(gateway.dimse_port, gateway.ae_title, keys,
                                                    repeat // 2, tuned)
                            line = f"  C-FIND {name:<22} gateway {g_s * 1e3:7.1f} ms"
                            if orthanc:
                                o_s = findscu_per_query(orthanc.dimse_port, orthanc.ae_title,
                                                        keys, repeat // 2, tuned)
                                line += (f" | Orthanc {o_s * 1e3:7.1f} ms | Orthanc/gateway "
                                         f"{o_s / g_s:5.2f}x")
                            print(line, flush=True)
                        n = len(big)
                        g_moves = [move_seconds(gateway, move_uid, tuned, n)
                                   for _ in range(args.moves)]
                        g_wall = statistics.median(s for s, _ in g_moves)
                        g_cpu = statistics.median(c for _, c in g_moves)
                        line = (f"  C-MOVE {n} CT instances       gateway {n / g_wall:7.1f} inst/s"
                                f" ({g_cpu / n * 1e3:5.1f} ms CPU/instance)")
                        if orthanc:
                            o_moves = [move_seconds(orthanc, move_uid, tuned, n)
                                       for _ in range(args.moves)]
                            o_wall = statistics.median(s for s, _ in o_moves)
                            o_cpu = statistics.median(c for _, c in o_moves)
                            line += (f" | Orthanc {n / o_wall:7.1f} inst/s ({o_cpu / n * 1e3:5.1f}"
                                     f" ms CPU/instance) | gateway/Orthanc "
                                     f"{o_wall / g_wall:5.2f}x")
                        print(line, flush=True)
                        g_get = statistics.median(get_seconds(gateway, move_uid, tuned)
                                                  for _ in range(args.moves))
                        line = f"  C-GET  {n} CT instances       gateway {n / g_get:7.1f} inst/s"
                        if orthanc:
                            o_get = statistics.median(get_seconds(orthanc, move_uid, tuned)
                                                      for _ in range(args.moves))
                            line += (f" | Orthanc {n / o_get:7.1f} inst/s | gateway/Orthanc "
                                     f"{o_get / g_get:5.2f}x")
                        print(line, flush=True)
                    finally:
                        if orthanc_cm:
                            orthanc_cm.__exit__(None, None, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
