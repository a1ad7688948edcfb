"""Recommended Display CIELab Value of each segment: fixed colours for the chest labels, a stable palette for
the rest, so every viewer shows a structure in the same colour and two structures never share one.

| label (normalised)            | colour (sRGB)       |
| lung, lungs                   | sky blue 80,160,255 |
| right lung                    | blue 40,100,230     |
| left lung                     | teal 0,200,200      |
| nodule (any nodule label)     | red 230,40,40       |
| anything else                 | hue from a hash of the label, saturation 0.65, value 0.95 |
"""

from __future__ import annotations

import colorsys
import hashlib

import highdicom as hd

from .codes import normalise_label, segment_coding

RGB = tuple[int, int, int]

NODULE: RGB = (230, 40, 40)
_FIXED: dict[str, RGB] = {
    "lung": (80, 160, 255),
    "lungs": (80, 160, 255),
    "right lung": (40, 100, 230),
    "lung right": (40, 100, 230),
    "left lung": (0, 200, 200),
    "lung left": (0, 200, 200),
}


def segment_rgb(label_name: str) -> RGB:
    """sRGB colour of a label: fixed for the chest labels (any nodule label is red), else from its name."""
    key = normalise_label(label_name)
    if key in _FIXED:
        return _FIXED[key]
    if segment_coding(label_name).is_finding and "nodule" in key:
        return NODULE
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return (round(r * 255), round(g * 255), round(b * 255))


def segment_color(label_name: str) -> hd.color.CIELabColor:
    """The label's colour as DICOM's Recommended Display CIELab Value."""
    return hd.color.CIELabColor.from_rgb(*segment_rgb(label_name))
