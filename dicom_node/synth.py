"""Write generated CT phantoms as real DICOM series (for demos, tests and benchmarks).

The files are ordinary CT Image Storage instances that any PACS accepts, in any transfer syntax pydicom can
encode here, with optional localizer series so routing has something to skip.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import uid as pduid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from ai_models.phantom import Phantom

CT_IMAGE_STORAGE = pduid.CTImageStorage
_PREFIX = "1.2.826.0.1.3680043.10.1234."  # generated test data only


@dataclass(frozen=True)
class StudyIds:
    study_uid: str
    patient_name: str = "PHANTOM^CHEST"
    patient_id: str = "PH0001"
    accession: str = "ACC0001"
    study_id: str = "1"

    @staticmethod
    def new(seed: int | str) -> StudyIds:
        short = f"{zlib.crc32(str(seed).encode()):08X}"  # IDs stay within SH/LO lengths whatever the seed
        return StudyIds(
            study_uid=generate_uid(prefix=_PREFIX, entropy_srcs=[f"study-{seed}"]),
            patient_id=f"PH{short}",
            accession=f"ACC{short}",
        )


def _base(ids: StudyIds, series_uid: str, series_number: int, modality: str, description: str) -> Dataset:
    now = dt.datetime(2026, 1, 15, 9, 30, 0)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = ids.study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = ids.study_id
    ds.AccessionNumber = ids.accession
    ds.StudyDescription = "CT CHEST PHANTOM"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "dicom-node phantom"
    ds.PatientPosition = "HFS"
    return ds


def _finish(ds: Dataset, sop_uid: str, transfer_syntax: str) -> Dataset:
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = pduid.UID(sop_uid)
    meta.TransferSyntaxUID = pduid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pduid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if transfer_syntax != pduid.ExplicitVRLittleEndian:
        if transfer_syntax in (pduid.ImplicitVRLittleEndian, pduid.DeflatedExplicitVRLittleEndian):
            meta.TransferSyntaxUID = pduid.UID(transfer_syntax)
        else:
            ds.compress(transfer_syntax)
    return ds


def _pixels(ds: Dataset, hu: np.ndarray, unsigned: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    if unsigned:
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.PixelData = np.clip(hu.astype(np.int32) + 1024, 0, 65535).astype(np.uint16).tobytes()
    else:
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.PixelData = hu.astype(np.int16).tobytes()


def phantom_datasets(
    phantom: Phantom,
    ids: StudyIds,
    *,
    series_uid: str | None = None,
    series_number: int = 2,
    unsigned: bool = False,
    transfer_syntax: str = pduid.ExplicitVRLittleEndian,
    origin: Sequence[float] = (-200.0, -200.0, 0.0),
    descending: bool = False,
) -> list[Dataset]:
    """One CT Image Storage dataset per axial slice of the phantom."""
    series_uid = series_uid or generate_uid(prefix=_PREFIX, entropy_srcs=[ids.study_uid, "axial", str(series_number)])
    dz, dy, dx = phantom.spacing
    for_uid = generate_uid(prefix=_PREFIX, entropy_srcs=[ids.study_uid, "for"])
    out = []
    nz = phantom.hu.shape[0]
    for k in range(nz):
        ds = _base(ids, series_uid, series_number, "CT", "Chest axial")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        z = origin[2] + (nz - 1 - k if descending else k) * dz
        ds.ImagePositionPatient = [f"{origin[0]:.3f}", f"{origin[1]:.3f}", f"{z:.3f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.3f}"
        ds.PixelSpacing = [f"{dy:.4f}", f"{dx:.4f}"]
        ds.SliceThickness = f"{dz:.4f}"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        _pixels(ds, phantom.hu[nz - 1 - k if descending else k], unsigned)
        sop = generate_uid(prefix=_PREFIX, entropy_srcs=[series_uid, str(k)])
        out.append(_finish(ds, sop, transfer_syntax))
    return out


def localizer_datasets(phantom: Phantom, ids: StudyIds, *, series_number: int = 1) -> list[Dataset]:
    """A coronal scout built from the phantom (ImageType LOCALIZER): routing must never pick it."""
    series_uid = generate_uid(prefix=_PREFIX, entropy_srcs=[ids.study_uid, "localizer"])
    for_uid = generate_uid(prefix=_PREFIX, entropy_srcs=[ids.study_uid, "for"])
    proj = phantom.hu.astype(np.float32).mean(axis=1)[::-1]  # (z, x) coronal projection, head up
    ds = _base(ids, series_uid, series_number, "CT", "Scout")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-200, 0, phantom.spacing[0] * (phantom.hu.shape[0] - 1)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [f"{phantom.spacing[0]:.4f}", f"{phantom.spacing[2]:.4f}"]
    ds.SliceThickness = "1"
    ds.KVP = 120
    _pixels(ds, np.round(proj).astype(np.int16), unsigned=False)
    sop = generate_uid(prefix=_PREFIX, entropy_srcs=[series_uid, "0"])
    return [_finish(ds, sop, pduid.ExplicitVRLittleEndian)]


def write_datasets(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
