"""Unanswered C-STOREs: many SCU associations storing small instances back-to-back, CPU loaded.

Replays the soak's "no response (association lost)" (docs/benchmarks.md, Soak) in a minute:
``--threads`` associations each send ``--count`` 64x64 instances as fast as they are answered
while ``--busy`` processes spin, and the C-STOREs left without a C-STORE-RSP are counted, with
pynetdicom's warnings (its association reactor logs "Received unexpected C-STORE service
message" when it takes a response off the queue that ``send_c_store`` is waiting on).

    .venv/bin/python bench/scu_race.py                    # pynetdicom, as it is: some lost
    .venv/bin/python bench/scu_race.py --workaround       # the soak's work-around: none lost
    .venv/bin/python bench/scu_race.py --scu dcmtk        # storescu: none lost
    .venv/bin/python bench/scu_race.py --widen 50         # the race's window widened by 50 ms

``--widen`` makes the reactor sleep after its checkpoint wait returns, the moment the race
needs; ``--dimse-timeout`` is how long a sender waits for a lost response (the gateway's own
``[dimse] network_timeout`` is longer, so the SCU gives up first).
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing as mp
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GatewayServer  # noqa: E402
from soak import keep_responses_for_sender  # noqa: E402

STORAGE_TIMEOUT = 60.0  # seconds for ACSE and the network


def spin() -> None:
    """A busy loop: the load under which the race shows."""
    while True:
        pass


class Warnings(logging.Handler):
    """pynetdicom's warnings and errors, with the thread that logged them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{threading.current_thread().name}: {record.getMessage()}")


def pynetdicom_store(args: argparse.Namespace, files: list[list[Path]], port: int,
                     ae_title: str) -> Counter[str]:
    """Each thread sends its files on one association; the outcomes counted."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    _config.STORE_SEND_CHUNKED_DATASET = args.chunked
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def associate(ae: Any) -> Any:
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if args.workaround:
            keep_responses_for_sender(assoc)
        if args.widen:
            checkpoint = assoc._reactor_checkpoint  # noqa: SLF001
            wait = checkpoint.wait

            def widened(timeout: float | None = None) -> bool:
                passed = bool(wait(timeout))
                if threading.current_thread().name.startswith("RequestorThread"):
                    time.sleep(args.widen / 1000)
                return passed

            checkpoint.wait = widened
        return assoc

    def worker(w: int) -> None:
        ae = AE(ae_title=f"RACE{w:02d}")
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        ae.acse_timeout = ae.network_timeout = STORAGE_TIMEOUT
        ae.dimse_timeout = args.dimse_timeout
        assoc = None
        for path in files[w]:
            if assoc is None or not assoc.is_established:
                assoc = associate(ae)
            status = assoc.send_c_store(path if args.chunked else _read(path))
            code = getattr(status, "Status", None)
            with lock:
                outcomes["unanswered" if code is None else f"0x{code:04X}"] += 1
            if code is None:
                assoc.abort()
                assoc = None
        if assoc is not None and assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def dcmtk_store(args: argparse.Namespace, files: list[list[Path]], port: int,
                ae_title: str) -> Counter[str]:
    """One ``storescu`` per thread, all its files on one association."""
    timeout = str(int(args.dimse_timeout))
    procs = [subprocess.Popen(
        ["storescu", "-v", "-aet", f"RACE{w:02d}", "-aec", ae_title, "-to", timeout,
         "-td", timeout, "-xs", "127.0.0.1", str(port), *map(str, files[w])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for w in range(args.threads)]
    outcomes: Counter[str] = Counter()
    for proc in procs:
        out, _ = proc.communicate()
        answered = out.count("Received Store Response")
        outcomes["0x0000"] += out.count("Received Store Response (Success)")
        outcomes["other"] += answered - out.count("Received Store Response (Success)")
        outcomes["unanswered"] += args.count - answered
    return outcomes


def _read(path: Path) -> Any:
    from pydicom import dcmread

    return dcmread(path)


def write_files(root: Path, threads: int, count: int) -> list[list[Path]]:
    """``count`` distinct 64x64 instances per thread."""
    from sample_dicom.generator import SeriesSpec, StudySpec, generate_study

    template = generate_study(StudySpec(series=(SeriesSpec(instances=1, rows=64, columns=64),),
                                        key_object=False), seed=int(time.time()))[0]
    stamp = int(time.time() * 1000)
    files = []
    for w in range(threads):
        ds = copy.deepcopy(template)
        mine = []
        for i in range(count):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
                f"2.25.{stamp}{w:03d}{i:06d}"
            path = root / f"{w:03d}-{i:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            mine.append(path)
        files.append(mine)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8, help="associations at once")
    parser.add_argument("--count", type=int, default=400, help="C-STOREs per association")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes")
    parser.add_argument("--scu", choices=("pynetdicom", "dcmtk"), default="pynetdicom")
    parser.add_argument("--chunked", action="store_true",
                        help="send files as they are (STORE_SEND_CHUNKED_DATASET, as the soak)")
    parser.add_argument("--workaround", action="store_true",
                        help="the soak's keep_responses_for_sender on each association")
    parser.add_argument("--widen", type=float, default=0.0, metavar="MS",
                        help="sleep this long in the reactor after its checkpoint wait")
    parser.add_argument("--dimse-timeout", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=0,
                        help="a gateway already listening on 127.0.0.1 (called AE DICOMGW)")
    args = parser.parse_args()

    catch = Warnings()
    logging.getLogger("pynetdicom").addHandler(catch)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="scu-race-") as tmp:
        root = Path(tmp)
        files = write_files(root, args.threads, args.count)
        store = dcmtk_store if args.scu == "dcmtk" else pynetdicom_store
        spinners = [mp.get_context("spawn").Process(target=spin, daemon=True)
                    for _ in range(args.busy)]
        for p in spinners:
            p.start()
        started = time.time()
        try:
            if args.port:
                outcomes = store(args, files, args.port, "DICOMGW")
            else:
                with GatewayServer(root / "data", log=root / "gateway.log") as gateway:
                    outcomes = store(args, files, gateway.dimse_port, gateway.ae_title)
        finally:
            for p in spinners:
                p.kill()
    print(f"{args.scu}{' (work-around)' if args.workaround else ''}: "
          f"{sum(outcomes.values())} C-STOREs in {time.time() - started:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    unexpected = sum("Received unexpected" in line for line in catch.lines)
    print(f"pynetdicom warnings: {len(catch.lines)} ({unexpected} 'Received unexpected')")
    for line in catch.lines[:10]:
        print("  ", line)
    return 1 if outcomes["unanswered"] else 0


if __name__ == "__main__":
    sys.exit(main())
