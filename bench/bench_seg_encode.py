"""SEG encode speed and memory: the node's encoder against highdicom, dcmqi and the bit-packing floor.

300 x 512 x 512 CT grid, 2 segments (a large ellipsoid and a few small spheres), only non-empty frames.
In-process variants run in the same warm process (imports done, one untimed warm-up each); time is the
median of --repeats runs, of building the SEG and of building plus writing it to bytes (what the worker
does); memory is the peak RSS growth during build plus write (kernel high-water mark reset through
/proc/self/clear_refs after malloc_trim before each call; inputs are allocated beforehand and not counted).

- node: dicom_node build_seg (seg_fast.py for stacks of single-frame images)
- highdicom, one-hot input: what most callers pass (the overlap check on one-hot input dominates)
- highdicom, uint8 label map: the node's previous encoder (build_seg_highdicom, still its fallback)
- dcmqi itkimage2segimage (if installed, PyPI ``dcmqi``): a separate process reading a NRRD label map and
  the source files; its time and peak RSS are the whole process, reading its inputs included
- floor: bit-pack the known non-empty frames and write them (no DICOM at all)

    .venv/bin/python bench/bench_seg_encode.py [--slices 300] [--size 512] [--repeats 3] [--no-dcmqi]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ai_models.types import ModelIdentity, SegmentationResult
from dicom_node.results.equipment import NodeIdentity, equipment_kwargs
from dicom_node.results.seg import build_seg, build_seg_highdicom, segment_descriptions, segment_numbers


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


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def measure(build: Callable[[], object], write: Callable[[object], bytes], repeats: int) -> tuple[float, float, float]:
    """(median build s, median build+write s, max peak RSS growth MiB) over ``repeats`` after a warm-up."""
    write(build())
    builds, totals, peaks = [], [], []
    for _ in range(repeats):
        _reset_peak()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        obj = build()
        built = time.perf_counter()
        data = write(obj)
        totals.append(time.perf_counter() - start)
        builds.append(built - start)
        peaks.append((_status_kib("VmHWM") - before) / 1024)
        del obj, data
    return statistics.median(builds), statistics.median(totals), max(peaks)


def headers(n: int, size: int) -> list[pydicom.Dataset]:
    """CT headers without pixel data, as the worker reads them (stop_before_pixels)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
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


# ---- dcmqi -----------------------------------------------------------------------------------------------


def _dcmqi_exe() -> str | None:
    local = Path(sys.executable).with_name("itkimage2segimage")
    return str(local) if local.exists() else shutil.which("itkimage2segimage")


def _write_nrrd(mask: np.ndarray, source: list[pydicom.Dataset], path: Path) -> None:
    """Raw NRRD label map in LPS, x fastest (the mask's C order)."""
    row_mm, col_mm = (float(v) for v in source[0].PixelSpacing)
    step = float(source[1].ImagePositionPatient[2]) - float(source[0].ImagePositionPatient[2])
    origin = ",".join(str(float(v)) for v in source[0].ImagePositionPatient)
    header = (
        "NRRD0004\ntype: unsigned char\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {mask.shape[2]} {mask.shape[1]} {mask.shape[0]}\n"
        f"space directions: ({col_mm},0,0) (0,{row_mm},0) (0,0,{step})\n"
        f"kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: ({origin})\n\n"
    )
    with path.open("wb") as f:
        f.write(header.encode("ascii"))
        f.write(np.ascontiguousarray(mask).tobytes())


def _dcmqi_metadata(descriptions: list[hd.seg.SegmentDescription]) -> dict[str, object]:
    def code(seq: pydicom.Sequence) -> dict[str, str]:
        return {
            "CodeValue": seq[0].CodeValue,
            "CodingSchemeDesignator": seq[0].CodingSchemeDesignator,
            "CodeMeaning": seq[0].CodeMeaning,
        }

    return {
        "ContentCreatorName": "dicom-node^AI",
        "SeriesDescription": "bench",
        "SeriesNumber": "900",
        "InstanceNumber": "1",
        "ContentLabel": "BENCH",
        "ContentDescription": "bench",
        "ClinicalTrialSeriesID": "",
        "ClinicalTrialTimePointID": "",
        "ClinicalTrialCoordinatingCenterName": "",
        "segmentAttributes": [
            [
                {
                    "labelID": int(d.SegmentNumber),
                    "SegmentDescription": str(d.SegmentLabel),
                    "SegmentLabel": str(d.SegmentLabel),
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "bench-seg",
                    "SegmentedPropertyCategoryCodeSequence": code(d.SegmentedPropertyCategoryCodeSequence),
                    "SegmentedPropertyTypeCodeSequence": code(d.SegmentedPropertyTypeCodeSequence),
                }
                for d in descriptions
            ]
        ],
    }


def run_dcmqi(
    exe: str,
    mask: np.ndarray,
    source: list[pydicom.Dataset],
    descriptions: list[hd.seg.SegmentDescription],
    repeats: int,
) -> tuple[float, float, int, int] | str:
    """(median wall s, max peak RSS MiB, frames, empty frames) of itkimage2segimage, or why it could not run."""
    with tempfile.TemporaryDirectory(prefix="bench-dcmqi-") as tmp:
        work = Path(tmp)
        (work / "ct").mkdir()
        pixels = np.zeros((mask.shape[1], mask.shape[2]), dtype=np.int16).tobytes()
        for k, ds in enumerate(source):
            full = pydicom.Dataset(ds)
            full.file_meta = ds.file_meta
            full.PixelData = pixels
            full.save_as(work / "ct" / f"{k:04d}.dcm", enforce_file_format=True)
        _write_nrrd(mask, source, work / "labels.nrrd")
        (work / "meta.json").write_text(json.dumps(_dcmqi_metadata(descriptions)))
        cmd = [
            exe,
            "--inputImageList",
            str(work / "labels.nrrd"),
            "--inputDICOMDirectory",
            str(work / "ct"),
            "--outputDICOM",
            str(work / "seg.dcm"),
            "--inputMetadata",
            str(work / "meta.json"),
        ]
        times, peaks = [], []
        for _ in range(repeats + 1):  # the first run warms the page cache
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - start
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0 or not (work / "seg.dcm").exists():
                return f"exit {proc.returncode}: {out.strip()[-300:]}"
            times.append(elapsed)
            peaks.append(usage.ru_maxrss / 1024)
        seg = pydicom.dcmread(work / "seg.dcm")
        frames, n_pixels = int(seg.NumberOfFrames), seg.Rows * seg.Columns
        bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
        empty = int(np.count_nonzero(~bits[: frames * n_pixels].reshape(frames, n_pixels).any(axis=1)))
    return statistics.median(times[1:]), max(peaks[1:]), frames, empty


# ---- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dcmqi", action="store_true", help="skip dcmqi even if installed")
    args = parser.parse_args()

    source = headers(args.slices, args.size)
    identity = ModelIdentity("bench-seg", "1.0", "segmentation", {1: "lung", 2: "nodule"}, "0" * 64)
    result = SegmentationResult(identity, label_map(args.slices, args.size))
    node = NodeIdentity(software_version="bench", device_serial_number="BENCH")
    one_hot = np.stack([result.mask == 1, result.mask == 2], axis=-1)  # the peer's input, built up front
    descriptions = segment_descriptions(result, segment_numbers(result), "2.25.1")
    frames = [(label, z) for label in (1, 2) for z in range(args.slices) if np.any(result.mask[z] == label)]
    uids = {"series_uid": "2.25.2", "sop_uid": "2.25.1", "series_number": 900, "node": node}

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

    def floor_pack() -> object:
        return [np.packbits(result.mask[z] == label, bitorder="little") for label, z in frames]

    def floor_write(packed: object) -> bytes:
        buf = BytesIO()
        buf.write(b"".join(p.tobytes() for p in packed))  # type: ignore[attr-defined]
        return buf.getvalue()

    rows = [
        ("node build_seg (seg_fast)", *measure(lambda: build_seg(source, result, **uids), _to_bytes, args.repeats)),
        ("highdicom, one-hot input", *measure(peer_one_hot, _to_bytes, args.repeats)),
        (
            "highdicom, uint8 label map",
            *measure(lambda: build_seg_highdicom(source, result, **uids), _to_bytes, args.repeats),
        ),
    ]
    exe = None if args.no_dcmqi else _dcmqi_exe()
    dcmqi_note = "dcmqi: not run (--no-dcmqi)" if args.no_dcmqi else "dcmqi: itkimage2segimage not installed"
    if exe is not None:
        got = run_dcmqi(exe, result.mask, source, descriptions, args.repeats)
        if isinstance(got, str):
            dcmqi_note = f"dcmqi: failed, {got}"
        else:
            seconds, peak, dcmqi_frames, empty = got
            rows.append(("dcmqi itkimage2segimage (process)*", float("nan"), seconds, peak))
            dcmqi_note = (
                f"* whole process incl. reading its inputs; peak is absolute RSS; {dcmqi_frames} frames, "
                f"{empty} of them empty (dcmqi omits only slices outside each segment's extent)"
            )
    rows.append(("floor: packbits + write", *measure(floor_pack, floor_write, args.repeats)))

    ours = rows[0]
    print(
        f"SEG encode, {args.slices}x{args.size}x{args.size}, 2 segments, {len(frames)} non-empty frames, "
        f"median of {args.repeats} (warm process)"
    )
    print(f"{'variant':38s} {'build s':>8s} {'+write s':>9s} {'x node':>7s} {'peak MiB':>9s} {'x node':>7s}")
    for name, built, total, peak in rows:
        print(
            f"{name:38s} {built:8.3f} {total:9.3f} {total / ours[2]:7.1f} {peak:9.0f} "
            f"{peak / ours[3] if ours[3] > 0 else float('nan'):7.1f}"
        )
    print(dcmqi_note)


if __name__ == "__main__":
    main()
