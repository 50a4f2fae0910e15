"""C-STORE ingest benchmark: storescu over 1 and 4 associations, gateway vs Orthanc.

Prints instances/s and MB/s for each case, in both TCP settings (BENCHMARKING.md, "The TCP
trap"): "as packaged" (TCP_NODELAY unset for storescu and Orthanc) and "tuned" (TCP_NODELAY=1 for
both). The gateway sets TCP_NODELAY and re-arms TCP_QUICKACK on its own sockets in both.

    .venv/bin/python bench/store.py --count 500 --kind ct
    .venv/bin/python bench/store.py --count 500 --kind tiny --associations 1 4
    .venv/bin/python bench/store.py --count 2000 --kind tiny --workers 2
    .venv/bin/python bench/store.py --count 2000 --kind tiny --settings tuned --repeat 5
    .venv/bin/python bench/store.py --count 2000 --kind tiny --settings tuned --repeat 8 \
        --peer-checkout ../before     # a worktree of an earlier commit in Orthanc's place

On a shared machine the rate of both servers moves by a quarter or more from one minute to the
next: ``--repeat`` runs each cell several times, the gateway and Orthanc in turn, and prints the
median of the ratios, the figure to compare.

With ``--workers 2`` the kernel spreads the associations over the two processes by a hash of
each connection's addresses (``SO_REUSEPORT``): four associations may land 2:2, 3:1 or 4:0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    ORTHANC,
    GatewayServer,
    OrthancServer,
    dcmtk_env,
    library_versions,
    process_cpu_seconds,
)

from sample_dicom.generator import SeriesSpec, StudySpec, generate_study  # noqa: E402


def make_files(folder: Path, count: int, kind: str) -> int:
    size = 512 if kind == "ct" else 64
    spec = StudySpec(series=(SeriesSpec(instances=count, rows=size, columns=size),),
                     key_object=False)
    total = 0
    for i, ds in enumerate(generate_study(spec, seed=7)):
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def split(files: list[Path], parts: int, root: Path) -> list[Path]:
    folders = []
    for k in range(parts):
        folder = root / f"part{k}"
        folder.mkdir()
        for path in files[k::parts]:
            os.link(path, folder / path.name)
        folders.append(folder)
    return folders


def measured_send(server: GatewayServer | OrthancServer, folders: list[Path],
                  tuned: bool) -> tuple[float, float]:
    """Wall seconds of the whole send, and the server's CPU seconds spent meanwhile."""
    assert server.proc is not None
    cpu = process_cpu_seconds(server.proc.pid)
    seconds = send(server.dimse_port, server.ae_title, folders, tuned)
    return seconds, process_cpu_seconds(server.proc.pid) - cpu


def send(port: int, ae_title: str, folders: list[Path], tuned: bool) -> float:
    env = dcmtk_env(tuned)
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", ae_title, "+sd", "127.0.0.1", str(port),
                               str(folder)], env=env, stderr=subprocess.PIPE)
             for folder in folders]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--kind", choices=["ct", "tiny"], default="ct")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--settings", nargs="+", default=["tuned", "packaged"],
                        choices=["tuned", "packaged"])
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--peer-checkout", type=Path, default=None,
                        help="run the gateway of this checkout (git worktree add ../before "
                             "<commit>) as the peer instead of Orthanc: the ratio is this "
                             "checkout's rate over that one's")
    parser.add_argument("--workers", type=int, default=1,
                        help="the gateway's [dimse] workers (processes sharing the port)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per cell, the gateway and Orthanc in turn (each first every "
                             "other run); prints the median ratio")
    parser.add_argument("--settle", type=float, default=65.0,
                        help="seconds to wait before the first send (see below)")
    args = parser.parse_args()
    print(library_versions(), flush=True)
    if shutil.which("storescu") is None:
        raise SystemExit("storescu (dcmtk) is needed: make system-deps")

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        root = Path(tmp)
        source = root / "files"
        source.mkdir()
        total_bytes = make_files(source, args.count, args.kind)
        files = sorted(source.glob("*.dcm"))
        mb = total_bytes / 1e6
        print(f"{args.count} {args.kind} instances, {mb:.1f} MB; storescu; {args.repeat} "
              "run(s) per cell, the gateway and Orthanc in turn, each first every other run; "
              "'ms CPU' is the server's CPU time per instance")
        # ext4 without a journal skips inodes freed less than 60 s ago (360 s while the inode
        # table's block is not written back) when it allocates new ones, reading each one's
        # deletion time: a run started right after another one's clean-up (thousands of files
        # deleted) pays for it on every file its first cells create.
        time.sleep(args.settle)
        peer = "peer inst/s" if args.peer_checkout else "orthanc inst/s"
        print(f"{'setting':9} {'assoc':>5} {'gateway inst/s':>15} {'MB/s':>7} {'ms CPU':>7} "
              f"{peer:>15} {'MB/s':>7} {'ms CPU':>7} {'ratio':>6}")
        for setting in args.settings:
            for n in args.associations:
                ratios = []
                for run in range(args.repeat):
                    run_root = root / f"{setting}-{n}-{run}"
                    run_root.mkdir()
                    line, ratio = run_cell(run_root, split(files, n, run_root), setting, n,
                                           args, mb, gateway_first=run % 2 == 0)
                    print(line, flush=True)
                    if ratio is not None:
                        ratios.append(ratio)
                if len(ratios) > 1:
                    print(f"{'':9} {'':>5} ratio over {len(ratios)} runs: median "
                          f"{statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f}",
                          flush=True)


def run_cell(run_root: Path, folders: list[Path], setting: str, n: int,
             args: argparse.Namespace, mb: float, *,
             gateway_first: bool = True) -> tuple[str, float | None]:
    """One send to the gateway and the same to Orthanc: the printed line and the ratio."""
    tuned = setting == "tuned"
    with_orthanc = bool(args.peer_checkout or ORTHANC) and not args.no_orthanc
    if with_orthanc and not gateway_first:
        o_seconds, o_cpu = peer_send(run_root, folders, tuned, args)
    with GatewayServer(run_root / "gw",
                       env={"GATEWAY_DIMSE_WORKERS": str(args.workers)}) as gateway:
        seconds, cpu = measured_send(gateway, folders, tuned)
    gw_rate = args.count / seconds
    line = (f"{setting:9} {n:>5} {gw_rate:>15.1f} {mb / seconds:>7.1f} "
            f"{cpu / args.count * 1000:>7.2f}")
    if not with_orthanc:
        return line + f" {'(not installed)':>15}", None
    if gateway_first:
        o_seconds, o_cpu = peer_send(run_root, folders, tuned, args)
    o_rate = args.count / o_seconds
    line += (f" {o_rate:>15.1f} {mb / o_seconds:>7.1f} "
             f"{o_cpu / args.count * 1000:>7.2f} {gw_rate / o_rate:>6.2f}")
    return line, gw_rate / o_rate


def peer_send(run_root: Path, folders: list[Path], tuned: bool,
              args: argparse.Namespace) -> tuple[float, float]:
    """The same send to the peer: Orthanc, or the gateway of ``--peer-checkout``."""
    if args.peer_checkout:
        with GatewayServer(run_root / "peer", env={"GATEWAY_DIMSE_WORKERS": str(args.workers)},
                           source=args.peer_checkout.resolve()) as peer:
            return measured_send(peer, folders, tuned)
    with OrthancServer(run_root / "orthanc", tuned=tuned, dicomweb=False) as orthanc:
        return measured_send(orthanc, folders, tuned)


if __name__ == "__main__":
    main()
