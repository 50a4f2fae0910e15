"""``python -m sample_dicom OUTDIR [--patients N] [--seed S]``: write synthetic studies."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from sample_dicom.generator import generate_corpus, generate_study, write_datasets


def main(argv: list[str] | None = None) -> int:
    """Write the demo study, or a corpus of ``--patients`` small studies, under OUTDIR."""
    parser = argparse.ArgumentParser(prog="python -m sample_dicom", description=__doc__)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--patients", type=int, help="write a corpus of N patients "
                        "instead of the demo study")
    parser.add_argument("--studies-per-patient", type=int, default=1)
    parser.add_argument("--size", type=int, default=16, help="corpus image size (pixels)")
    parser.add_argument("--instances", type=int, default=2, help="corpus images per series")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.patients is None:
        studies = iter([generate_study(seed=args.seed)])
    else:
        studies = generate_corpus(args.patients, studies_per_patient=args.studies_per_patient,
                                  size=args.size, instances=args.instances, seed=args.seed)
    paths = write_datasets(args.outdir, itertools.chain.from_iterable(studies))
    print(f"wrote {len(paths)} files under {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
