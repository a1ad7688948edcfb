"""Routes: which series of a complete study go to which models and destinations.

A route matches DICOM keywords against exact values or ``/regex/`` patterns (full match). The series fed to
the models is, by default, the axial cross-sectional image series with the most instances; localizers,
derived images, secondary captures, SEG, SR and other non-image objects are never picked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.config import Route

# Cross-sectional image storage classes a volume model can read (CT, enhanced CT, MR, enhanced MR, PET).
VOLUME_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.4.1",
        "1.2.840.10008.5.1.4.1.1.128",
    }
)
_EXCLUDED_IMAGE_TYPES = {"LOCALIZER", "SECONDARY", "DERIVED", "SCOUT", "PROJECTION IMAGE"}


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    instance_count: int
    header: Dataset  # one instance's header, pixel data not read


def _value_str(value: object) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, list | tuple | MultiValue):
        return ["\\".join(str(v) for v in value)] + [str(v) for v in value]
    return [str(value)]


def value_matches(pattern: str, value: object) -> bool:
    """Exact match, or full regex match for ``/pattern/``; multi-valued elements match on any value."""
    candidates = _value_str(value)
    if len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
        rx = re.compile(pattern[1:-1])
        return any(rx.fullmatch(c) for c in candidates)
    return any(c == pattern for c in candidates)


def route_matches(route: Route, header: Dataset) -> bool:
    return all(value_matches(p, header.get(kw)) for kw, p in route.match.items())


def not_selectable_reason(info: SeriesInfo, min_slices: int) -> str | None:
    """Why a series cannot feed a volume model, or None if it can."""
    h = info.header
    if str(h.get("SOPClassUID", "")) not in VOLUME_SOP_CLASSES:
        return "not a cross-sectional image series"
    image_type = [str(v).upper() for v in (h.get("ImageType") or [])]
    if image_type and image_type[0] == "DERIVED":
        return "derived images"
    if _EXCLUDED_IMAGE_TYPES & set(image_type):
        return "localizer, secondary or derived"
    iop = h.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        if abs(normal[2]) < 0.8:
            return "not axial"
    nframes = int(h.get("NumberOfFrames", 1) or 1)
    if max(info.instance_count, nframes) < min_slices:
        return f"fewer than {min_slices} slices"
    return None


def select_series(route: Route, series: Sequence[SeriesInfo]) -> SeriesInfo | None:
    """The series a route sends to its models: matching, selectable, most slices (lowest SeriesNumber on ties)."""
    ok = [s for s in series if route_matches(route, s.header) and not_selectable_reason(s, route.min_slices) is None]
    if not ok:
        return None
    return max(ok, key=lambda s: (s.instance_count, -int(s.header.get("SeriesNumber", 0) or 0)))


def plan_jobs(routes: Sequence[Route], series: Sequence[SeriesInfo]) -> Mapping[str, SeriesInfo]:
    """Route name -> chosen series, for every route that found one."""
    out = {}
    for r in routes:
        chosen = select_series(r, series)
        if chosen is not None:
            out[r.name] = chosen
    return out
