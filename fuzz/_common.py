"""What the fuzz targets share: the seed corpus on disk, the refusal check, the libFuzzer run.

Each ``fuzz/fuzz_<name>.py`` defines ``seeds()`` (real inputs), ``check(data)`` (feeds one
input to the code under test and raises only on a finding: a documented refusal is caught
there, anything else is a crash) and calls :func:`main`. Inputs that once crashed are kept in
``fuzz/regressions/<name>/`` and replayed by ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "fuzz" / "regressions"
# The corpus grows across runs (libFuzzer adds what reaches new code); kept out of git.
CORPUS = Path(os.environ.get("FUZZ_CORPUS_DIR", ROOT / ".fuzz-corpus"))


def write_seeds(name: str, seeds: Iterable[bytes]) -> Path:
    """The target's corpus folder, with the seeds and the regression inputs in it."""
    folder = CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    regressions = REGRESSIONS / name
    found = sorted(regressions.iterdir()) if regressions.is_dir() else []
    for data in [*seeds, *(p.read_bytes() for p in found)]:
        path = folder / f"seed-{hashlib.sha1(data).hexdigest()}"  # noqa: S324 - a name
        if not path.exists():
            path.write_bytes(data)
    return folder


def quiet() -> None:
    """pydicom warns and logs about each malformed input: millions of lines in a run."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)


def regression_inputs(name: str) -> list[Path]:
    folder = REGRESSIONS / name
    return sorted(folder.iterdir()) if folder.is_dir() else []


def main(name: str, seeds: Callable[[], Iterable[bytes]],
         check: Callable[[bytes], None]) -> None:
    """Run libFuzzer (atheris) on ``check`` over the target's corpus; libFuzzer's options
    (``-max_total_time=60``, ``-runs=N``, ``-seed=1``) pass through from the command line.
    Files named on the command line are run once each instead (a crash's replay)."""
    import atheris

    quiet()
    args = [sys.argv[0], *sys.argv[1:]]
    if not any(not a.startswith("-") for a in args[1:]):  # no inputs named: the corpus
        args.append(str(write_seeds(name, seeds())))
    if not any(a.startswith("-artifact_prefix=") for a in args):
        artifacts = CORPUS / f"{name}-crashes"
        artifacts.mkdir(parents=True, exist_ok=True)
        args.append(f"-artifact_prefix={artifacts}/")
    atheris.Setup(args, check)
    atheris.Fuzz()
