"""Pixel services benchmark: frames/s (as stored and decoded), ms per rendered JPEG and thumbnail.

Usage::

    python bench/pixels.py [--instances 30] [--rounds 3] [--no-orthanc]

A synthetic 512x512 CT study (three series: Explicit VR Little Endian, RLE Lossless, JPEG 2000
Lossless) is written to a temporary folder, loaded into a gateway started with ``dicom-gateway
serve --demo`` and, when installed, into Orthanc with its DICOMweb plugin, both on 127.0.0.1 in the
same run. One client (``http.client``, keep-alive) then asks each server the same requests, one
at a time,
and, for frames, from four concurrent clients:

- native frames: ``Accept: multipart/related; type=application/octet-stream; transfer-syntax=*``
  (what OHIF sends) on the uncompressed series;
- decoded frames: ``Accept: multipart/related; type="application/octet-stream"`` (Explicit VR
  Little Endian) on the RLE and JPEG 2000 series;
- rendered: ``/rendered`` as image/jpeg of each instance, each round with another ``quality`` so
  that the gateway's render cache is cold; then the same URLs again (warm cache: what a second
  viewer of the same study gets);
- thumbnails: the gateway's ``/thumbnail`` (128 px, cold and warm); Orthanc has no
  ``/thumbnail`` in its DICOMweb plugin 1.7, so it is asked ``/rendered?viewport=128,128``.

Figures are medians over ``--rounds`` rounds, the servers taking turns within each round; the
machine's other load makes them vary (say so when you quote them).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import library_versions  # noqa: E402

from sample_dicom import SeriesSpec, StudySpec, generate_study, write_datasets

ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
OHIF_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
DECODED_ACCEPT = 'multipart/related; type="application/octet-stream"'


@dataclass(frozen=True)
class Server:
    name: str
    root: str  # DICOMweb root URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_study(folder: Path, instances: int) -> dict[str, list[tuple[str, str, str]]]:
    """Write the study; return, per series kind, the (study, series, sop) UIDs."""
    spec = StudySpec(series=(
        SeriesSpec(rows=512, columns=512, instances=instances, description="native",
                   transfer_syntax=ExplicitVRLittleEndian),
        SeriesSpec(rows=512, columns=512, instances=instances, description="rle",
                   transfer_syntax=RLELossless),
        SeriesSpec(rows=512, columns=512, instances=instances, description="j2k",
                   transfer_syntax=JPEG2000Lossless),
    ), key_object=False)
    datasets = generate_study(spec, seed=7)
    write_datasets(folder, datasets)
    kinds: dict[str, list[tuple[str, str, str]]] = {"native": [], "rle": [], "j2k": []}
    for ds in datasets:
        kinds[str(ds.SeriesDescription)].append(
            (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    return kinds


async def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def start_gateway(work: Path, data: Path) -> tuple[subprocess.Popen[bytes], Server]:
    port, dimse = free_port(), free_port()
    env = {**os.environ, "GATEWAY_DATA_DIR": str(work / "gateway"),
           "GATEWAY_HTTP_PORT": str(port), "GATEWAY_DIMSE_PORT": str(dimse),
           "GATEWAY_LOG_LEVEL": "WARNING", "GATEWAY_STORAGE_MIN_FREE_BYTES": "0"}
    subprocess.run([sys.executable, "-m", "gateway", "ingest", "-q", str(data)], env=env,
                   check=True)
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--demo"], env=env)
    return process, Server("gateway", f"http://127.0.0.1:{port}/dicomweb")


def start_orthanc(work: Path) -> tuple[subprocess.Popen[bytes], Server, str]:
    port, dimse = free_port(), free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(work / "orthanc" / "storage"),
        "IndexDirectory": str(work / "orthanc" / "index"), "HttpPort": port,
        "DicomPort": dimse, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc").mkdir()
    (work / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen([str(ORTHANC), str(work / "orthanc.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    return process, Server("orthanc", f"{base}/dicom-web"), base


async def upload_orthanc(base: str, data: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for path in sorted(data.rglob("*.dcm")):
            async with session.post(f"{base}/instances", data=path.read_bytes()) as response:
                if response.status != 200:
                    raise RuntimeError(f"Orthanc refused {path.name}: {response.status}")


def instance_url(server: Server, uids: tuple[str, str, str]) -> str:
    study, series, sop = uids
    return f"{server.root}/studies/{study}/series/{series}/instances/{sop}"


def _get(connection: http.client.HTTPConnection, url: str, accept: str) -> int:
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection.request("GET", target, headers={"Accept": accept})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{url}: {response.status} {body[:200]!r}")
    return len(body)


async def timed(urls: list[str], accept: str, concurrency: int = 1) -> tuple[float, int]:
    """Seconds to GET every URL from ``concurrency`` keep-alive clients; bytes received.

    The clients are blocking ``http.client`` connections on threads: aiohttp's client stalls
    for 60-130 ms per response on Orthanc's CivetWeb server (not on curl or http.client), which
    would misrepresent Orthanc.
    """
    def run() -> tuple[float, int]:
        queue = list(urls)
        lock = threading.Lock()
        received = [0]
        errors: list[BaseException] = []
        host = urllib.parse.urlsplit(urls[0])
        connections = [http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port)
                       for _ in range(concurrency)]
        for connection in connections:  # warm-up: connection set-up is not counted
            _get(connection, urls[0], accept)

        def client(connection: http.client.HTTPConnection) -> None:
            try:
                while True:
                    with lock:
                        if not queue:
                            return
                        url = queue.pop()
                    size = _get(connection, url, accept)
                    with lock:
                        received[0] += size
            except BaseException as exc:  # reported below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(c,)) for c in connections]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        for connection in connections:
            connection.close()
        if errors:
            raise RuntimeError(str(errors[0]))
        return elapsed, received[0]

    return await asyncio.to_thread(run)


@dataclass
class Row:
    label: str
    unit: str  # "frames/s" (higher is better) or "ms" (lower is better)
    values: dict[str, float]


async def measure(servers: list[Server], kinds: dict[str, list[tuple[str, str, str]]],
                  rounds: int) -> list[Row]:
    rows: list[Row] = []

    async def rate(label: str, make: Callable[[Server], list[str]], accept: str,
                   concurrency: int = 1) -> None:
        """frames/s; the servers take turns in each round, so that the machine's other load
        falls on both alike."""
        figures: dict[str, list[float]] = {s.name: [] for s in servers}
        failed: set[str] = set()
        for _ in range(rounds):
            for server in servers:
                if server.name in failed:
                    continue
                urls = make(server)
                try:
                    seconds, _ = await timed(urls, accept, concurrency)
                except RuntimeError as exc:
                    print(f"{server.name} cannot do '{label}': {str(exc)[-120:]}")
                    failed.add(server.name)
                    continue
                figures[server.name].append(len(urls) / seconds)
        rows.append(Row(label, "frames/s", {name: statistics.median(values)
                                            for name, values in figures.items() if values}))

    async def latency(label: str, make: Callable[[Server, int], list[str]],
                      accept: str) -> None:
        """ms per request. Cold: each round asks new URLs (another ``quality``), so nothing
        is served from the gateway's render cache; warm: the last round's URLs again."""
        figures: dict[str, list[float]] = {s.name: [] for s in servers}
        failed: set[str] = set()
        for round_number in range(rounds):
            for server in servers:
                if server.name in failed:
                    continue
                urls = make(server, round_number)
                try:
                    seconds, _ = await timed(urls, accept)
                except RuntimeError as exc:
                    print(f"{server.name} cannot do '{label}': {str(exc)[-120:]}")
                    failed.add(server.name)
                    continue
                figures[server.name].append(seconds / len(urls) * 1000)
        rows.append(Row(label + " (cold)", "ms", {name: statistics.median(values)
                                                  for name, values in figures.items() if values}))
        gateway = servers[0]
        urls = make(gateway, rounds - 1)
        warm = [(await timed(urls, accept))[0] / len(urls) * 1000 for _ in range(rounds)]
        rows.append(Row(label + " (gateway render cache warm)", "ms",
                        {gateway.name: statistics.median(warm)}))

    def frames(kind: str) -> Callable[[Server], list[str]]:
        return lambda s: [instance_url(s, uids) + "/frames/1" for uids in kinds[kind]]

    await rate("native frames, OHIF Accept (1 client)", frames("native"), OHIF_ACCEPT)
    await rate("native frames, OHIF Accept (4 clients)", frames("native"), OHIF_ACCEPT, 4)
    await rate("RLE frames as stored (transfer-syntax=*)", frames("rle"), OHIF_ACCEPT)
    await rate("RLE frames decoded to Explicit VR LE", frames("rle"), DECODED_ACCEPT)
    await rate("JPEG 2000 frames decoded to Explicit VR LE", frames("j2k"), DECODED_ACCEPT)
    # Rendering: fresh URLs per measurement round would defeat the cache; the cold figure is
    # the first pass over every instance, the warm figure the later passes.
    def rendered(kind: str, thumbnail: bool = False) -> Callable[[Server, int], list[str]]:
        def make(server: Server, round_number: int) -> list[str]:
            tail = "/rendered"
            if thumbnail:
                tail = "/thumbnail?" if server.name == "gateway" else "/rendered?viewport=128,128&"
            else:
                tail += "?"
            return [f"{instance_url(server, uids)}{tail}quality={90 - round_number}"
                    for uids in kinds[kind]]
        return make

    await latency("rendered 512x512 CT JPEG", rendered("native"), "image/jpeg")
    await latency("rendered 512x512 CT JPEG from JPEG 2000", rendered("j2k"), "image/jpeg")
    await latency("thumbnail 128 px from RLE", rendered("rle", thumbnail=True), "image/jpeg")
    return rows


def report(rows: list[Row], names: list[str]) -> None:
    header = f"{'measure':58} " + " ".join(f"{n:>10}" for n in names)
    if "orthanc" in names:
        header += f" {'ratio':>7}"
    print(header)
    for row in rows:
        cells = " ".join(f"{row.values[n]:10.1f}" if n in row.values else f"{'n/a':>10}"
                         for n in names)
        line = f"{row.label + ' [' + row.unit + ']':58} {cells}"
        if "orthanc" in row.values and "gateway" in row.values:
            ratio = (row.values["gateway"] / row.values["orthanc"] if row.unit == "frames/s"
                     else row.values["orthanc"] / row.values["gateway"])
            line += f" {ratio:6.2f}x"
        print(line)
    if "orthanc" in names:
        print("ratio > 1: the gateway is faster (frames/s gateway/orthanc; ms orthanc/gateway)")


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-pixels-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        data = work / "study"
        kinds = make_study(data, args.instances)
        gateway_process, gateway = start_gateway(work, data)
        processes.append(gateway_process)
        servers = [gateway]
        use_orthanc = not args.no_orthanc and ORTHANC.exists() and ORTHANC_DICOMWEB.exists()
        if use_orthanc:
            orthanc_process, orthanc, base = start_orthanc(work)
            processes.append(orthanc_process)
            await wait_for(f"{base}/system")
            await upload_orthanc(base, data)
            servers.append(orthanc)
        else:
            print("Orthanc or its DICOMweb plugin is not installed: gateway figures only")
        await wait_for(gateway.root.removesuffix("/dicomweb") + "/healthz")
        print(f"{len(kinds['native'])} instances per series, 512x512, {args.rounds} rounds, "
              f"{os.cpu_count()} CPUs")
        rows = await measure(servers, kinds, args.rounds)
        report(rows, [s.name for s in servers])
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=30, help="instances per series")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measure (median)")
    parser.add_argument("--no-orthanc", action="store_true", help="measure the gateway only")
    args = parser.parse_args()
    print(library_versions(), flush=True)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
