"""SEG encode speed and memory: dicom_node build_seg (uint8 label map) vs highdicom given one-hot.

300 x 512 x 512 CT grid, 2 segments (a large ellipsoid and a few small spheres). Both variants run in
the same warm process (imports done, one untimed warm-up each); time is the median of --repeats runs,
memory is the peak RSS growth during the call (kernel high-water mark reset through
/proc/self/clear_refs after malloc_trim before each call; input arrays are allocated beforehand and not counted).

    .venv/bin/python bench/bench_seg_encode.py [--slices 300] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ai_models.types import ModelIdentity, SegmentationResult
from dicom_node.results.equipment import NodeIdentity, equipment_kwargs
from dicom_node.results.seg import build_seg, segment_descriptions, segment_numbers


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


_LIBC = ctypes.CDLL("libc.so.6")


def _reset_peak() -> None:
    gc.collect()
    _LIBC.malloc_trim(0)  # hand freed heap back, so the next call's growth is measured from the floor
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds, max peak RSS growth in MiB) over ``repeats`` calls after one warm-up."""
    fn()
    times, peaks = [], []
    for _ in range(repeats):
        _reset_peak()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        peaks.append((_status_kib("VmHWM") - before) / 1024)
        del out
    return statistics.median(times), max(peaks)


def headers(n: int, size: int) -> list[pydicom.Dataset]:
    """CT headers without pixel data, as the worker reads them (stop_before_pixels)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Seg", "B1", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 1, "CT"
        ds.FrameOfReferenceUID, ds.InstanceNumber = frame, k + 1
        ds.ImagePositionPatient = [-200.0, -200.0, k * 1.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.78, 0.78], 1.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size, size, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def label_map(n: int, size: int, seed: int = 0) -> np.ndarray:
    mask = np.zeros((n, size, size), dtype=np.uint8)
    zz, yy, xx = np.ogrid[:n, :size, :size]
    big = ((zz - n / 2) / (n * 0.4)) ** 2 + ((yy - size / 2) / (size * 0.35)) ** 2
    mask[big + ((xx - size / 2) / (size * 0.4)) ** 2 <= 1] = 1
    rng = np.random.default_rng(seed)
    for _ in range(4):
        c = rng.uniform([n * 0.2, size * 0.3, size * 0.3], [n * 0.8, size * 0.7, size * 0.7])
        r = rng.uniform(4, 10)
        mask[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r] = 2
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = headers(args.slices, args.size)
    identity = ModelIdentity("bench-seg", "1.0", "segmentation", {1: "lung", 2: "nodule"}, "0" * 64)
    result = SegmentationResult(identity, label_map(args.slices, args.size))
    node = NodeIdentity(software_version="bench", device_serial_number="BENCH")
    one_hot = np.stack([result.mask == 1, result.mask == 2], axis=-1)  # the peer's input, built up front
    descriptions = segment_descriptions(result, segment_numbers(result), "2.25.1")

    def ours() -> object:
        return build_seg(source, result, series_uid="2.25.2", sop_uid="2.25.1", series_number=900, node=node)

    def peer_one_hot() -> object:
        return hd.seg.Segmentation(
            source_images=source,
            pixel_array=one_hot,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid="2.25.2",
            series_number=900,
            sop_instance_uid="2.25.1",
            instance_number=1,
            omit_empty_frames=True,
            **equipment_kwargs(node),
        )

    rows = [("highdicom, one-hot input (peer)", *measure(peer_one_hot, args.repeats))]
    rows.append(("dicom_node build_seg, uint8 label map", *measure(ours, args.repeats)))
    frames = int(ours().NumberOfFrames)
    peer_t, peer_m = rows[0][1], rows[0][2]
    print(
        f"SEG encode, {args.slices}x{args.size}x{args.size}, 2 segments, {frames} frames, "
        f"median of {args.repeats} (warm)"
    )
    print(f"{'variant':40s} {'time s':>8s} {'x peer':>7s} {'peak RSS MiB':>13s} {'x peer':>7s}")
    for name, t, m in rows:
        print(f"{name:40s} {t:8.2f} {t / peer_t:7.2f} {m:13.0f} {m / peer_m if peer_m else float('nan'):7.2f}")


if __name__ == "__main__":
    main()
