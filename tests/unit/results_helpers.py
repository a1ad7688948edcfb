"""Synthetic CT series and model results for the results (SEG/SR) tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ai_models.types import ModelIdentity, Volume
from dicom_node.results.equipment import NodeIdentity
from dicom_node.results.naming import ResultName, input_digest, seg_name, sr_name

NODE = NodeIdentity(software_version="0.1.0", device_serial_number="TEST-0001")


def make_ct_series(
    n_slices: int = 20,
    rows: int = 64,
    cols: int = 64,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.7),
    origin: tuple[float, float, float] = (-22.4, -25.6, -100.0),
    with_pixels: bool = True,
    seed: int = 0,
) -> list[pydicom.Dataset]:
    """Axial CT Image IOD datasets, sorted by increasing z (the volume's z order)."""
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for k in range(n_slices):
        ds = pydicom.Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Chest", "PH001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20240102", "101500"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, "CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.Manufacturer = "Phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = "20240102", "101500", 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.KVP = 120
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "CHEST"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        if with_pixels:
            ds.PixelData = rng.integers(-1000, 80, (rows, cols), dtype=np.int16).tobytes()
        slices.append(ds)
    return slices


def volume_of(series: list[pydicom.Dataset]) -> Volume:
    """Geometry-only Volume for a series made by make_ct_series (array is a tiny placeholder)."""
    first = series[0]
    step = float(series[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    return Volume(
        array=np.zeros((1, 1, 1), dtype=np.float32),
        spacing=(step, float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        origin=tuple(float(v) for v in first.ImagePositionPatient),
        row_cosines=(1.0, 0.0, 0.0),
        column_cosines=(0.0, 1.0, 0.0),
        normal=(0.0, 0.0, 1.0),
        sop_instance_uids=tuple(ds.SOPInstanceUID for ds in series),
        series_instance_uid=first.SeriesInstanceUID,
        study_instance_uid=first.StudyInstanceUID,
        frame_of_reference_uid=first.FrameOfReferenceUID,
    )


def identity(
    task: str = "segmentation",
    labels: dict[int, str] | None = None,
    version: str = "1.0.0",
    name: str = "chest-ct-seg",
) -> ModelIdentity:
    return ModelIdentity(
        name=name,
        version=version,
        task=task,  # type: ignore[arg-type]
        labels=labels if labels is not None else {1: "lung", 2: "nodule"},
        bundle_hash="ab12cd34ef56" + "0" * 52,
    )


def sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, ...]) -> np.ndarray:
    """Boolean ellipsoid in voxel index space (z, y, x)."""
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    rz, ry, rx = radii if len(radii) == 3 else radii * 3
    return ((zz - centre[0]) / rz) ** 2 + ((yy - centre[1]) / ry) ** 2 + ((xx - centre[2]) / rx) ** 2 <= 1.0


def lung_nodule_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Label map: two lung ellipsoids (1) and one nodule inside the left one (2)."""
    mask = np.zeros(shape, dtype=np.uint8)
    z, y, x = shape
    mask[sphere(shape, (z / 2, y / 2, x * 0.3), (z * 0.4, y * 0.35, x * 0.18))] = 1
    mask[sphere(shape, (z / 2, y / 2, x * 0.7), (z * 0.4, y * 0.35, x * 0.18))] = 1
    mask[sphere(shape, (z / 2, y / 2, x * 0.7), (2.0, 4.0, 4.0))] = 2
    return mask


def write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy output that report an error (dciodvfy prints "Error - ..." lines)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise FileNotFoundError("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    if proc.returncode != 0 and not errors:  # dciodvfy exits 1 on errors: never let a failure pass silently
        errors.append(f"dciodvfy exited {proc.returncode}: {out.strip()[-500:]}")
    return errors


def seg_uids(source: list[pydicom.Dataset], model: ModelIdentity) -> ResultName:
    """The worker's naming for a first run's SEG of ``model`` on ``source``."""
    digest = input_digest([str(ds.SOPInstanceUID) for ds in source])
    return seg_name(str(source[0].SeriesInstanceUID), model, digest, (), 0, 901)


def sr_uids(source: list[pydicom.Dataset], route: str, models: list[ModelIdentity] | None = None) -> ResultName:
    """The worker's naming for a first run's report of ``route``; distinct routes give distinct UIDs."""
    digest = input_digest([str(ds.SOPInstanceUID) for ds in source])
    return sr_name(str(source[0].SeriesInstanceUID), route, models or [], digest, (), 0, 902)
