"""Fuzz the DICOM reader and the DICOM JSON writer: what C-STORE and STOW-RS hand to ingest.

``parse_instance`` (gateway/metadata.py, gateway/dicom_json.py) reads a received Part 10 file;
its DICOM JSON is then written as the stored metadata. Documented refusals:
:class:`~gateway.errors.InvalidInstance` and :class:`~gateway.errors.TooLarge`. Anything else
raised, or a DICOM JSON text that strict JSON readers refuse (PostgreSQL's ``jsonb`` among
them), or index fields of the wrong type, is a finding.

Run: ``.venv/bin/python fuzz/fuzz_dicom.py -max_total_time=60``
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, main  # noqa: E402

with atheris.instrument_imports(include=["gateway", "pydicom"]):
    import orjson

    from gateway.errors import InvalidInstance, TooLarge
    from gateway.metadata import parse_instance

NAME = "dicom"
REFUSALS = (InvalidInstance, TooLarge)
MAX_SEED = 64 * 1024
MAX_INFLATED = 4 * 1024**2  # keeps a run's memory small; the limit is what is checked


def seeds() -> Iterator[bytes]:
    """The committed sample files and pydicom's own test files (up to 64 KB each)."""
    import pydicom

    folders = [ROOT / "sample_dicom" / "files",
               Path(pydicom.__file__).parent / "data" / "test_files"]
    for folder in folders:
        for path in sorted(folder.rglob("*.dcm")):
            if path.stat().st_size <= MAX_SEED:
                yield path.read_bytes()


def check(data: bytes) -> None:
    try:
        parsed = parse_instance(data, max_inflated_bytes=MAX_INFLATED)
    except REFUSALS:
        return
    for text in (parsed.metadata_json(), parsed.study_attributes_json(),
                 parsed.series_attributes_json()):
        text.encode("utf-8")  # a lone surrogate cannot be stored
        orjson.loads(text)  # strict JSON: no NaN, no Infinity
    for name, value in parsed.fields.items():
        if value is not None and not isinstance(value, str | int):
            raise TypeError(f"index field {name} is a {type(value).__name__}")


if __name__ == "__main__":
    main(NAME, seeds, check)
