"""Model results -> DICOM: SEG (seg.py) and TID 1500 Comprehensive 3D SR (sr.py); deterministic UIDs (uids.py)
and the UIDs and numbers of each result object (naming.py)."""

from .equipment import NodeIdentity
from .seg import EmptySegmentationError, build_seg, segment_numbers
from .sr import build_sr, segment_volumes_ml
from .uids import derive_uid

__all__ = [
    "EmptySegmentationError",
    "NodeIdentity",
    "build_seg",
    "build_sr",
    "derive_uid",
    "segment_numbers",
    "segment_volumes_ml",
]
