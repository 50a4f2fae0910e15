"""The fuzz targets (fuzz/): what they found stays fixed, and each still runs.

Each finding is replayed here against the code it broke, with the refusal it must now get;
the inputs themselves are kept in ``fuzz/regressions/<target>/``. Then every target runs for
a fixed number of inputs with a fixed seed (libFuzzer through atheris, in a subprocess: it
takes over the process), its corpus the seeds plus those regression inputs: an input that
raises anything but the target's documented refusals fails the run.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from gateway.errors import InvalidInstance
from gateway.metadata import MAX_NESTING, parse_instance

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
REGRESSIONS = FUZZ / "regressions"
# Inputs per target in the suite's run: a few seconds each on a loaded machine.
RUNS = {"dicom": 300, "pdu": 300, "qido": 5000, "links": 3000, "stow": 150}


def _instance(ts: str, insert: bytes = b"") -> bytes:
    """A small Basic Text SR instance in ``ts``, ``insert`` put before (0020,000D)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3.2"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    order = "<" if ts == ExplicitVRLittleEndian else ">"
    at = data.index(struct.pack(order + "HH", 0x0020, 0x000D), 144)
    return data[:at] + insert + data[at:]


def _nested(ts: str, depth: int) -> bytes:
    """Sequences of one undefined-length item each, ``depth`` deep."""
    order = "<" if ts == ExplicitVRLittleEndian else ">"
    opening = (struct.pack(order + "HH", 0x0008, 0x1140) + b"SQ\0\0"
               + struct.pack(order + "I", 0xFFFFFFFF)
               + struct.pack(order + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = (struct.pack(order + "HHI", 0xFFFE, 0xE00D, 0)
               + struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0))
    return _instance(ts, opening * depth + closing * depth)


# -- findings, each replayed against the function it broke -------------------------------------
def test_an_unknown_vr_in_the_file_meta_is_an_invalid_instance() -> None:
    """fuzz_dicom: pydicom converts a file meta element when first asked for it; an unknown
    VR raised NotImplementedError out of parse_instance (a C-STORE aborted, not refused)."""
    data = (REGRESSIONS / "dicom" / "meta-unknown-vr").read_bytes()
    with pytest.raises(InvalidInstance, match="cannot be decoded"):
        parse_instance(data)


@pytest.mark.parametrize("name", ["plausible-not-a-transfer-syntax",
                                  "pixel-check-not-a-transfer-syntax"])
def test_a_transfer_syntax_uid_that_names_no_transfer_syntax_is_refused(name: str) -> None:
    """fuzz_dicom: a TransferSyntaxUID that is a valid UID but no transfer syntax made
    pydicom's UID properties raise ValueError (in check_plausible, in the pixel data check)."""
    data = (REGRESSIONS / "dicom" / name).read_bytes()
    with pytest.raises(InvalidInstance):
        parse_instance(data)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_sequences_nested_past_the_limit_are_refused(ts: str) -> None:
    """Found while building the recovery test: sequences nested some hundred levels deep
    raised RecursionError out of gateway.dicom_json's reader (and, shallower, were stored
    whole, beyond what pydicom and the JSON writers can read back)."""
    assert parse_instance(_nested(ts, MAX_NESTING)).sop_instance_uid
    with pytest.raises(InvalidInstance, match=f"nested deeper than {MAX_NESTING}"):
        parse_instance(_nested(ts, MAX_NESTING + 1))
    with pytest.raises(InvalidInstance):
        parse_instance(_nested(ts, 600))
    with pytest.raises(InvalidInstance):
        parse_instance((REGRESSIONS / "dicom" / "sequences-nested-600-deep").read_bytes())


# -- the targets, run briefly ------------------------------------------------------------------
@pytest.mark.slow  # about 35 s for the five on a shared machine: start-up and seed corpora
@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_target_runs_clean(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-runs={RUNS[target]}", "-seed=1",
         "-max_len=65536", f"-artifact_prefix={tmp_path}/"],
        env={**os.environ, "FUZZ_CORPUS_DIR": str(tmp_path / "corpus")}, cwd=tmp_path,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done " in result.stderr
    assert not list(tmp_path.glob("crash-*"))
