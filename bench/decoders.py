"""Decoder plugins compared: ms per frame for each compressed sample and each installed plugin.

Usage::

    python bench/decoders.py [--rounds 5] [--calls 50] [FOLDER]

Each compressed file of ``FOLDER`` (default: ``sample_dicom/files``) is decoded ``--calls``
times per round by each pydicom plugin that is installed for its transfer syntax (pylibjpeg,
GDCM, Pillow, pyjpegls); the figure is the median over ``--rounds`` rounds, with half the
spread between the fastest and slowest round. Install the candidates in a throwaway
environment to compare them all (the default install has no libjpeg, README).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from sample_dicom import FILES_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import library_versions  # noqa: E402

PLUGINS = ("pylibjpeg", "gdcm", "pillow", "pyjpegls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=FILES_DIR)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(library_versions(), flush=True)
    for path in sorted(args.folder.glob("*.dcm")):
        ds = dcmread(path)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if not syntax.is_compressed:
            continue
        decoder = get_decoder(syntax)
        figures = []
        for plugin in PLUGINS:
            if plugin not in decoder.available_plugins:
                continue
            rounds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.calls):
                    decoder.as_array(ds, decoding_plugin=plugin)
                rounds.append((time.perf_counter() - start) / args.calls * 1e3)
            spread = (max(rounds) - min(rounds)) / 2
            figures.append(f"{plugin} {statistics.median(rounds):.2f} ms (±{spread:.2f})")
        print(f"{path.name} {ds.Rows}x{ds.Columns} {syntax.name}: {'; '.join(figures)}")


if __name__ == "__main__":
    main()
