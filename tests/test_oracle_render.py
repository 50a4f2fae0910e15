"""Oracle for the hand-folded rendering lookup tables of :mod:`gateway.render`: every grey level
of a frame is what pydicom's own pipeline gives (``apply_modality_lut``, then ``apply_voi_lut``
for a window of each VOI LUT Function or a VOI LUT Sequence, PS3.4 Annex N, PS3.3 C.11), scaled
to 8 bits, on many seeded random frames, bit depths, rescales and windows.

pydicom's VOI output spans the range of its input (PS3.3 C.11.2.1.2: ``ymin`` to ``ymax``); it
is read from pydicom itself (by windowing two values far outside the window) and scaled to
0..255, the gateway's display range. The gateway rounds to the nearest level: each of its
values is within half a level of pydicom's. The Presentation LUT inversion of MONOCHROME1 and
INVERSE (PS3.3 C.11.6) is ``255 - v``. The stored values are given to the gateway
with garbage above Bits Stored, which it must ignore (PS3.5 §8.1.1), and to pydicom clean.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from gateway.render import Window, grayscale_to_display

CASES = 300
FUNCTIONS = ["LINEAR", "LINEAR_EXACT", "SIGMOID"]


@dataclass
class Frame:
    raw: np.ndarray  # as decoded: bits above Bits Stored left as stored
    clean: np.ndarray  # the stored values, sign-extended from Bits Stored
    bits_stored: int
    signed: bool


def random_frame(rng: random.Random, nrng: np.random.Generator, itemsize: int) -> Frame:
    bits = itemsize * 8
    bits_stored = rng.randint(2, bits)
    signed = rng.random() < 0.5
    words = nrng.integers(0, 1 << bits, size=(24, 24), dtype=np.uint64)
    mask = (1 << bits_stored) - 1
    words[0, :4] = [0, mask, mask >> 1, (mask >> 1) + 1]  # the extremes of the domain
    raw = words.astype(f"u{itemsize}")
    values = (words & mask).astype(np.int64)
    if signed:
        raw = raw.view(f"i{itemsize}")
        values = np.where(values >= 1 << (bits_stored - 1), values - (1 << bits_stored), values)
    return Frame(raw, values, bits_stored, signed)


def header(frame: Frame, rng: random.Random, photometric: str) -> Dataset:
    ds = Dataset()
    ds.BitsAllocated = frame.raw.dtype.itemsize * 8
    ds.BitsStored = frame.bits_stored
    ds.HighBit = frame.bits_stored - 1
    ds.PixelRepresentation = int(frame.signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if rng.random() < 0.3 and photometric == "MONOCHROME2":
        ds.PresentationLUTShape = "INVERSE"
    return ds


def add_rescale(ds: Dataset, rng: random.Random, integer: bool) -> None:
    if rng.random() < 0.4:
        return
    ds.RescaleSlope = 1 if integer else rng.choice([1, 0.5, 2, 1.5, -1, 0.25, 3])
    ds.RescaleIntercept = rng.choice([0, -1024, 1000, 7] if integer else [0, -1024, 1000, -0.5,
                                                                          7.25])


def voi_range(ds: Dataset) -> tuple[float, float]:
    """pydicom's ``ymin`` and ``ymax`` for ``ds``: far below and far above the window."""
    with np.errstate(over="ignore"):
        low, high = apply_voi_lut(np.array([-1e15, 1e15]), ds, prefer_lut=False)
    return float(low), float(high)


def inverted(ds: Dataset) -> bool:
    return bool(ds.PhotometricInterpretation == "MONOCHROME1"
                or ds.get("PresentationLUTShape") == "INVERSE")


def check(ours: np.ndarray, expected: np.ndarray, label: object) -> None:
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    worst = float(np.max(np.abs(ours.astype(np.float64) - expected)))
    assert worst <= 0.5 + 1e-6, (label, worst)


def test_windows_are_pydicoms_apply_voi_lut() -> None:
    """Rescale (or none) and a window of each function, from the request or the data set."""
    for seed in range(CASES):
        rng, nrng = random.Random(seed), np.random.default_rng(seed)
        frame = random_frame(rng, nrng, rng.choice([1, 2, 2, 4]))
        photometric = rng.choice(["MONOCHROME1", "MONOCHROME2"])
        ds = header(frame, rng, photometric)
        add_rescale(ds, rng, integer=False)
        modality = np.asarray(apply_modality_lut(frame.clean, ds), dtype=np.float64)
        low, high = float(modality.min()), float(modality.max())
        function = rng.choice(FUNCTIONS)
        center = round(rng.uniform(low - 10, high + 10), 2)
        width = round(rng.uniform(1, max(2.0, 1.5 * (high - low))), 2)
        window = Window(center, width, function)
        from_request = rng.random() < 0.5
        oracle_ds = Dataset()
        oracle_ds.update(ds)
        oracle_ds.WindowCenter, oracle_ds.WindowWidth = center, width
        oracle_ds.VOILUTFunction = function
        if not from_request:
            ds.update(oracle_ds)
        ymin, ymax = voi_range(oracle_ds)
        expected = (apply_voi_lut(modality, oracle_ds) - ymin) / (ymax - ymin) * 255.0
        if inverted(ds):
            expected = 255.0 - expected
        ours = grayscale_to_display(frame.raw, ds, 0, photometric,
                                    window if from_request else None,
                                    bits_stored=frame.bits_stored, signed=frame.signed)
        check(ours, expected, (seed, window, ds.get("RescaleSlope"),
                               ds.get("RescaleIntercept"), frame.bits_stored, frame.signed))


def test_voi_lut_sequences_are_pydicoms_apply_voi_lut() -> None:
    """A VOI LUT Sequence item (PS3.3 C.11.2.1.1) of 10 to 16 bits per entry, its first mapped
    value anywhere around the frame's values; integer rescales (pydicom's LUT takes integers)."""
    for seed in range(CASES):
        rng, nrng = random.Random(seed), np.random.default_rng(seed)
        frame = random_frame(rng, nrng, rng.choice([1, 2]))
        photometric = rng.choice(["MONOCHROME1", "MONOCHROME2"])
        ds = header(frame, rng, photometric)
        add_rescale(ds, rng, integer=True)
        modality = np.asarray(apply_modality_lut(frame.clean, ds)).astype(np.int64)
        depth = rng.choice([10, 12, 16])
        entries = rng.randint(2, 4096)
        first = rng.randint(int(modality.min()) - entries, int(modality.max()))
        item = Dataset()
        item.add_new(0x00283002, "SS" if first < 0 else "US", [entries, first, depth])
        item.add_new(0x00283006, "US",
                     [rng.randint(0, (1 << depth) - 1) for _ in range(entries)])
        ds.VOILUTSequence = [item]
        expected = apply_voi_lut(modality, ds).astype(np.float64) / ((1 << depth) - 1) * 255.0
        if inverted(ds):
            expected = 255.0 - expected
        ours = grayscale_to_display(frame.raw, ds, 0, photometric,
                                    bits_stored=frame.bits_stored, signed=frame.signed)
        check(ours, expected, (seed, entries, first, depth))


def test_a_modality_lut_sequence_then_a_window_is_pydicoms() -> None:
    """A Modality LUT Sequence (PS3.3 C.11.1) ahead of a window: pydicom's window then spans
    the Modality LUT's output range."""
    for seed in range(CASES // 4):
        rng, nrng = random.Random(seed), np.random.default_rng(seed)
        frame = random_frame(rng, nrng, rng.choice([1, 2]))
        frame.signed = False
        frame.raw = frame.raw.view(f"u{frame.raw.dtype.itemsize}")
        frame.clean = frame.clean & ((1 << frame.bits_stored) - 1)
        ds = header(frame, rng, "MONOCHROME2")
        depth = rng.choice([8, 16])  # what pydicom's apply_modality_lut reads
        entries = rng.randint(2, 2048)
        item = Dataset()
        item.add_new(0x00283002, "US", [entries, rng.randint(0, 100), depth])
        item.add_new(0x00283006, "US",
                     [rng.randint(0, (1 << depth) - 1) for _ in range(entries)])
        item.ModalityLUTType = "HU"
        ds.ModalityLUTSequence = [item]
        center = round(rng.uniform(0, (1 << depth) - 1), 2)
        width = round(rng.uniform(1, 1 << depth), 2)
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.VOILUTFunction = rng.choice(FUNCTIONS)
        modality = np.asarray(apply_modality_lut(frame.clean, ds), dtype=np.float64)
        ymin, ymax = voi_range(ds)
        expected = (apply_voi_lut(modality, ds) - ymin) / (ymax - ymin) * 255.0
        if inverted(ds):
            expected = 255.0 - expected
        ours = grayscale_to_display(frame.raw, ds, 0, "MONOCHROME2",
                                    bits_stored=frame.bits_stored, signed=False)
        check(ours, expected, (seed, entries, depth, center, width))
