"""Codes for segments, findings and measurements.

Label names from model bundles (``metadata.json`` channel names, e.g. the BTCV "Right Kidney",
"Left Kideny", "IVC") map to SNOMED CT where a concept exists, following DICOM CID 7150 (category)
and CID 7154 / 7151 (type): paired organs are the organ code plus a laterality modifier
(SCT 24028007 Right / 7771000 Left), as DICOM does for kidneys and adrenal glands.

Private coding scheme ``99DCMNODE`` (declared in each object's Coding Scheme Identification Sequence)
is used only where no standard concept exists:

- ``PORTSPLVEIN`` "Portal vein and splenic vein": BTCV labels the two veins as one structure; SNOMED
  has each vein (32764006, 35819009) but no concept for the pair.
- ``L-<10 hex>`` "<label name>": any label name not in the table; the value is a hash of the
  normalised name, so the same name always gets the same code. Category ``UNSPECIFIED``.

Choices worth knowing:

- Pulmonary nodule is SCT 786838002 in category SCT 49755003 "Morphologically Abnormal Structure".
- "Anatomical Structure" is SCT 91723000 (current CID 7150); 123037004 is the retired code whose
  SNOMED meaning is now "Body structure".
- Absent is SCT 272519000 (CID 240/241 Present-Absent; replaced the older 2667000). It is said of findings
  (a nodule) only: an anatomical structure, or a label outside the table, that a model did not segment is reported
  "Not detected" (SCT 260415000), for it may simply lie outside the scan.
- Procedure Reported (TID 1500 row 4, DCID 100) follows the source modality: LOINC "CT / MRI / PET
  unspecified body region", else SCT 363679005 "Imaging procedure".
- Detection score and classification probability are DCM 111012 "Certainty of Finding" in percent
  (UCUM "%"), as in DICOM CAD reports (0-100).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99DCMNODE"


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _sct(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def coding_scheme_identification(codings: Iterable[SegmentCoding]) -> list[CodingSchemeIdentificationItem] | None:
    """Declares the private scheme, so receivers can tell where its codes come from, where ``codings`` (those
    an object uses) include one of its codes; else nothing (an undeclared-use warning in every validator)."""
    if not any(c.scheme_designator == PRIVATE_SCHEME for coding in codings for c in coding.concepts):
        return None
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="dicom-node local codes",
            responsible_organization="dicom-node",
        )
    ]


ANATOMICAL_STRUCTURE = hd.sr.CodedConcept.from_code(codes.SCT.AnatomicalStructure)  # 91723000
MORPHOLOGICALLY_ABNORMAL = hd.sr.CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)
UNSPECIFIED_CATEGORY = _private("UNSPECIFIED", "Unspecified category")
PULMONARY_NODULE = _sct("786838002", "Pulmonary nodule")
PORTAL_AND_SPLENIC_VEIN = _private("PORTSPLVEIN", "Portal vein and splenic vein")

PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)  # 52101004
ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)  # 272519000
NOT_DETECTED = _sct("260415000", "Not detected")
RIGHT = hd.sr.CodedConcept.from_code(codes.SCT.Right)
LEFT = hd.sr.CodedConcept.from_code(codes.SCT.Left)

VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)  # 118565006
MILLILITER = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
CERTAINTY_OF_FINDING = hd.sr.CodedConcept.from_code(codes.DCM.CertaintyOfFinding)  # DCM 111012
PERCENT = hd.sr.CodedConcept.from_code(codes.UCUM.Percent)
AREA = hd.sr.CodedConcept.from_code(codes.SCT.Area)  # 42798000
SQUARE_MILLIMETER = hd.sr.CodedConcept.from_code(codes.UCUM.SquareMillimeter)
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)  # 121106


@dataclass(frozen=True)
class SegmentCoding:
    """How one label is coded: segmented property category, type and optional laterality modifier."""

    category: hd.sr.CodedConcept
    type: hd.sr.CodedConcept
    modifier: hd.sr.CodedConcept | None = None

    @property
    def concepts(self) -> tuple[hd.sr.CodedConcept, ...]:
        return (self.category, self.type) if self.modifier is None else (self.category, self.type, self.modifier)

    @property
    def is_finding(self) -> bool:
        """A finding (an abnormal structure such as a nodule), of which a model may say "Absent"; of anything
        else (an organ, a label outside the table) that would be a wrong clinical claim: "Not detected"."""
        return self.category == MORPHOLOGICALLY_ABNORMAL

    @property
    def display(self) -> str:
        """Human-readable meaning including laterality, e.g. "Kidney, Right"."""
        if self.modifier is None:
            return self.type.meaning
        return f"{self.type.meaning}, {self.modifier.meaning}"


def _anat(code: Code | hd.sr.CodedConcept, modifier: hd.sr.CodedConcept | None = None) -> SegmentCoding:
    concept = code if isinstance(code, hd.sr.CodedConcept) else hd.sr.CodedConcept.from_code(code)
    return SegmentCoding(ANATOMICAL_STRUCTURE, concept, modifier)


_NODULE = SegmentCoding(MORPHOLOGICALLY_ABNORMAL, PULMONARY_NODULE)

# Keys are normalised names (see normalise_label).
_TABLE: dict[str, SegmentCoding] = {
    "lung": _anat(codes.SCT.Lung),
    "lungs": _anat(codes.SCT.Lung),
    "nodule": _NODULE,
    "nodules": _NODULE,
    "lung nodule": _NODULE,
    "pulmonary nodule": _NODULE,
    "spleen": _anat(codes.SCT.Spleen),
    "liver": _anat(codes.SCT.Liver),
    "kidney": _anat(codes.SCT.Kidney),
    "right kidney": _anat(codes.SCT.Kidney, RIGHT),
    "kidney right": _anat(codes.SCT.Kidney, RIGHT),
    "left kidney": _anat(codes.SCT.Kidney, LEFT),
    "kidney left": _anat(codes.SCT.Kidney, LEFT),
    "gallbladder": _anat(codes.SCT.Gallbladder),
    "gall bladder": _anat(codes.SCT.Gallbladder),
    "esophagus": _anat(codes.SCT.Esophagus),
    "oesophagus": _anat(codes.SCT.Esophagus),
    "stomach": _anat(codes.SCT.Stomach),
    "aorta": _anat(codes.SCT.Aorta),
    "ivc": _anat(codes.SCT.InferiorVenaCava),
    "inferior vena cava": _anat(codes.SCT.InferiorVenaCava),
    "portal vein": _anat(codes.SCT.PortalVein),
    "splenic vein": _anat(codes.SCT.SplenicVein),
    "portal and splenic veins": _anat(PORTAL_AND_SPLENIC_VEIN),
    "portal vein and splenic vein": _anat(PORTAL_AND_SPLENIC_VEIN),
    "pancreas": _anat(codes.SCT.Pancreas),
    "adrenal gland": _anat(codes.SCT.AdrenalGland),
    "right adrenal gland": _anat(codes.SCT.AdrenalGland, RIGHT),
    "adrenal gland right": _anat(codes.SCT.AdrenalGland, RIGHT),
    "left adrenal gland": _anat(codes.SCT.AdrenalGland, LEFT),
    "adrenal gland left": _anat(codes.SCT.AdrenalGland, LEFT),
    # TotalSegmentator's classes (the model zoo's wholeBody_ct_segmentation); paired structures also take a
    # laterality word (see _lateral), vertebrae and ribs their own rules (see _numbered)
    "trachea": _anat(codes.SCT.Trachea),
    "heart": _anat(codes.SCT.Heart),
    "heart atrium left": _anat(codes.SCT.LeftAtrium),
    "heart atrium right": _anat(codes.SCT.RightAtrium),
    "heart ventricle left": _anat(codes.SCT.LeftVentricle),
    "heart ventricle right": _anat(codes.SCT.RightVentricle),
    "pulmonary artery": _anat(codes.SCT.PulmonaryArtery),
    "brain": _anat(codes.SCT.Brain),
    "small bowel": _anat(codes.SCT.SmallIntestine),
    "small intestine": _anat(codes.SCT.SmallIntestine),
    "duodenum": _anat(codes.SCT.Duodenum),
    "colon": _anat(codes.SCT.Colon),
    "urinary bladder": _anat(codes.SCT.Bladder),
    "bladder": _anat(codes.SCT.Bladder),
    "sacrum": _anat(codes.SCT.Sacrum),
    "face": _anat(codes.SCT.Face),
    "lung middle lobe right": _anat(codes.SCT.MiddleLobeOfRightLung),
    "erector spinae": _anat(codes.SCT.ErectorSpinaeMuscle),
}

# Structures that come in pairs: "<name> left", "left <name>" (any word order) get the laterality modifier.
_PAIRED: dict[str, Code] = {
    "kidney": codes.SCT.Kidney,
    "adrenal gland": codes.SCT.AdrenalGland,
    "lung": codes.SCT.Lung,
    "lung upper lobe": codes.SCT.UpperLobeOfLung,
    "lung lower lobe": codes.SCT.LowerLobeOfLung,
    "iliac artery": codes.SCT.IliacArtery,
    "iliac vena": codes.SCT.IliacVein,
    "iliac vein": codes.SCT.IliacVein,
    "humerus": codes.SCT.Humerus,
    "scapula": codes.SCT.Scapula,
    "clavicula": codes.SCT.Clavicle,
    "clavicle": codes.SCT.Clavicle,
    "femur": codes.SCT.Femur,
    "hip": codes.SCT.Hip,
    "rib": codes.SCT.Rib,
}
_SIDES = {"left": LEFT, "right": RIGHT}
_VERTEBRA = re.compile(r"vertebrae? ([ctl])(\d{1,2})")
_RIB = re.compile(r"rib (left|right) \d{1,2}|(left|right) rib \d{1,2}|rib \d{1,2} (left|right)")
_SPINE_LEVELS = {"c": 7, "t": 12, "l": 5}


def _lateral(key: str) -> SegmentCoding | None:
    """ "kidney left", "left kidney", "lung upper lobe left": a paired structure and its side."""
    words = key.split(" ")
    sides = [w for w in words if w in _SIDES]
    if len(sides) != 1:
        return None
    base = " ".join(w for w in words if w not in _SIDES)
    code = _PAIRED.get(base)
    return None if code is None else _anat(code, _SIDES[sides[0]])


def _numbered(key: str) -> SegmentCoding | None:
    """ "vertebrae l5" (SCT "L5 vertebra"); "rib left 3" (SCT Rib with its side; the label keeps the number)."""
    if (m := _VERTEBRA.fullmatch(key)) is not None:
        level, n = m.group(1), int(m.group(2))
        if 1 <= n <= _SPINE_LEVELS[level]:
            return _anat(getattr(codes.SCT, f"{level.upper()}{n}Vertebra"))
        return None
    if (m := _RIB.fullmatch(key)) is not None:
        side = next(g for g in m.groups() if g)
        return _anat(codes.SCT.Rib, _SIDES[side])
    return None


# Known misspellings in published bundles (model-zoo swin_unetr_btcv: "Left Kideny").
_TYPOS = {"kideny": "kidney"}


def normalise_label(name: str) -> str:
    """Lower-case, separators to spaces, known typos fixed: "Left_Kideny" -> "left kidney"."""
    words = re.sub(r"[\s_\-]+", " ", name.strip().lower()).split(" ")
    return " ".join(_TYPOS.get(w, w) for w in words if w)


def _fresh(concept: hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=concept.value,
        scheme_designator=concept.scheme_designator,
        meaning=concept.meaning,
        scheme_version=concept.scheme_version,
    )


def segment_coding(label_name: str) -> SegmentCoding:
    """Coding for a label name; unknown names get a stable private code (see module docstring).

    The concepts are new objects on every call: they become items of one object's dataset, which its
    builder may extend (a SEG adds the laterality modifier to its type item), and that must reach neither
    the table nor another object."""
    key = normalise_label(label_name)
    known = _TABLE.get(key) or _lateral(key) or _numbered(key)
    if known is not None:
        modifier = None if known.modifier is None else _fresh(known.modifier)
        return SegmentCoding(_fresh(known.category), _fresh(known.type), modifier)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10].upper()
    meaning = label_name.strip()[:64] or "Unnamed label"
    return SegmentCoding(_fresh(UNSPECIFIED_CATEGORY), _private(f"L-{digest}", meaning))


_PROCEDURES = {
    "CT": hd.sr.CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion),  # 25045-6
    "MR": hd.sr.CodedConcept.from_code(codes.LN.MRIUnspecifiedBodyRegion),  # 25056-3
    "PT": hd.sr.CodedConcept.from_code(codes.LN.PETUnspecifiedBodyRegion),  # 44136-0
}
IMAGING_PROCEDURE = _sct("363679005", "Imaging procedure")


def procedure_reported(modality: str) -> hd.sr.CodedConcept:
    """TID 1500 Procedure Reported for a source series of ``modality``."""
    return _fresh(_PROCEDURES.get(modality.strip().upper(), IMAGING_PROCEDURE))
