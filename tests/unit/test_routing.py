"""Routing: keyword matching and the choice of the series fed to the models."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_node.config import Route
from dicom_node.jobs.routing import SeriesInfo, not_selectable_reason, select_series, value_matches

CT = "1.2.840.10008.5.1.4.1.1.2"


def _series(
    uid: str,
    n: int,
    *,
    sop_class: str = CT,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    iop=(1, 0, 0, 0, 1, 0),
    modality: str = "CT",
    number: int = 1,
    body: str = "CHEST",
) -> SeriesInfo:
    h = Dataset()
    h.SOPClassUID = sop_class
    h.ImageType = list(image_type)
    h.ImageOrientationPatient = list(iop)
    h.Modality = modality
    h.SeriesNumber = number
    h.BodyPartExamined = body
    return SeriesInfo(series_uid=uid, instance_count=n, header=h)


ROUTE = Route(name="r", models=("m",), send_to=("p",), match={"Modality": "CT"})


def test_value_matching_exact_regex_and_multivalue() -> None:
    assert value_matches("CT", "CT") and not value_matches("CT", "CTX")
    assert value_matches("/CHEST|THORAX/", "THORAX") and not value_matches("/CHEST/", "CHESTY")
    assert value_matches("LOCALIZER", ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert not value_matches("CT", None)


def test_largest_axial_series_wins_and_never_a_localizer_or_derived() -> None:
    series = [
        _series("loc", 500, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), iop=(1, 0, 0, 0, 0, -1)),
        _series("derived", 400, image_type=("DERIVED", "SECONDARY", "MPR")),
        _series("sag", 300, iop=(0, 1, 0, 0, 0, -1)),
        _series("thin", 120, number=3),
        _series("thick", 60, number=2),
        _series("seg", 1000, sop_class="1.2.840.10008.5.1.4.1.1.66.4", modality="SEG"),
        _series("sr", 1, sop_class="1.2.840.10008.5.1.4.1.1.88.34", modality="SR"),
        _series("sc", 200, sop_class="1.2.840.10008.5.1.4.1.1.7"),
        _series("pdf", 1, sop_class="1.2.840.10008.5.1.4.1.1.104.1", modality="DOC"),
    ]
    chosen = select_series(ROUTE, series)
    assert chosen is not None and chosen.series_uid == "thin"
    reasons = {s.series_uid: not_selectable_reason(s, 10) for s in series}
    assert reasons["loc"] and reasons["derived"] and reasons["sag"] == "not axial"
    assert reasons["seg"] and reasons["sr"] and reasons["sc"] and reasons["pdf"]


def test_no_match_or_too_few_slices_gives_no_series() -> None:
    assert select_series(ROUTE, [_series("mr", 100, modality="MR")]) is None
    assert select_series(ROUTE, [_series("few", 5)]) is None
    chest = Route(name="c", models=("m",), send_to=(), match={"Modality": "CT", "BodyPartExamined": "/CHEST|THORAX/"})
    assert select_series(chest, [_series("abd", 100, body="ABDOMEN")]) is None
    assert select_series(chest, [_series("th", 100, body="THORAX")]).series_uid == "th"


def test_ties_go_to_the_lowest_series_number() -> None:
    chosen = select_series(ROUTE, [_series("b", 100, number=5), _series("a", 100, number=2)])
    assert chosen.series_uid == "a"
