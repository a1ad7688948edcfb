"""Write the committed real CT test slices: 40 consecutive slices of LIDC-IDRI-0314 around its annotated
nodule (z -539.8 ... -500.8 mm), from ``../shared/realdata/ct/LIDC-IDRI-0314-slab``, recompressed JPEG 2000
lossless (pixel values unchanged; 8 MB instead of 21 MB) and otherwise untouched: every slice keeps its own
FrameOfReferenceUID, as the archive has it. Also copies the readers' annotations. Run once:

    python tests/data/make_lidc_slices.py ../shared/realdata
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless

Z_RANGE = (-540.0, -500.0)
OUT = Path(__file__).resolve().parent / "lidc_idri_0314"


def main(realdata: Path) -> None:
    slab = realdata / "ct" / "LIDC-IDRI-0314-slab"
    kept = 0
    for path in sorted(slab.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        z = float(ds.ImagePositionPatient[2])
        if not Z_RANGE[0] <= z <= Z_RANGE[1]:
            continue
        before = ds.pixel_array.copy()
        ds.compress(JPEG2000Lossless)
        target = OUT / path.name
        ds.save_as(target, enforce_file_format=True)
        if not (pydicom.dcmread(target).pixel_array == before).all():
            raise SystemExit(f"{path.name}: JPEG 2000 round trip changed pixel values")
        kept += 1
    shutil.copy(realdata / "ct" / "LIDC-IDRI-0314_nodule_annotations.json", OUT / "nodule_annotations.json")
    print(f"wrote {kept} slices to {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
