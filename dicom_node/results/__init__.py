"""Model results -> DICOM: SEG (seg.py) and TID 1500 Comprehensive 3D SR (sr.py), deterministic UIDs."""

from .equipment import NodeIdentity
from .seg import EmptySegmentationError, build_seg, segment_numbers
from .sr import build_sr, segment_volumes_ml
from .uids import ResultUids, derive_uid, result_uids

__all__ = [
    "EmptySegmentationError",
    "NodeIdentity",
    "ResultUids",
    "build_seg",
    "build_sr",
    "derive_uid",
    "result_uids",
    "segment_numbers",
    "segment_volumes_ml",
]
