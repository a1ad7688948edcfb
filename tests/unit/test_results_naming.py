"""Result naming (dicom_node/results/naming.py): the UIDs are pinned to the values the worker has always
derived for a fixed input, because a PACS recognises a re-sent object only by its UIDs: a changed rule would
make every re-run after an upgrade a second copy instead of the same object again."""

from __future__ import annotations

from ai_models.types import ModelIdentity
from dicom_node.results.naming import findings_sr_name, input_digest, rejection_name, seg_name, sr_name
from storage.records import ResultRecord

SRC = "1.2.826.0.1.3680043.8.498.1"
SEG_MODEL = ModelIdentity("chest-ct-seg", "1.0.0", "segmentation", {1: "lung"}, "ab" * 32)
DET_MODEL = ModelIdentity("lung-nodules", "2.1.0", "detection", {1: "nodule"}, "cd" * 32)
DIGEST = input_digest([SRC + ".2", SRC + ".1"])

SEG_SERIES = "2.25.208104856324954859553363662923347864948"
SR_SERIES = "2.25.197563902333550761351962065020538647443"
FINDINGS_SERIES = "2.25.199194864598736147518420622106939328520"


def _first_run() -> tuple[str, str, str]:
    """SOP UIDs of a first run on one instance fewer (what a re-run after a late arrival follows)."""
    digest = input_digest([SRC + ".1"])
    seg = seg_name(SRC, SEG_MODEL, digest, (), 0, 300)
    sr = sr_name(SRC, "chest", [SEG_MODEL, DET_MODEL], digest, (), 0, 301)
    findings = findings_sr_name(SRC, "chest", [SEG_MODEL, DET_MODEL], sr.sop_uid, (), 0, 302)
    return seg.sop_uid, sr.sop_uid, findings.sop_uid


def _earlier() -> list[ResultRecord]:
    seg, sr, findings = _first_run()
    return [
        ResultRecord(1, 1, "seg", "chest-ct-seg", "9", SEG_SERIES, seg, "1.2.840.10008.5.1.4.1.1.66.4", "a"),
        ResultRecord(2, 1, "sr", "", "9", SR_SERIES, sr, "1.2.840.10008.5.1.4.1.1.88.33", "b"),
        ResultRecord(3, 1, "sr", "lung-nodules", "9", FINDINGS_SERIES, findings, "1.2.840.10008.5.1.4.1.1.88.34", "c"),
    ]


def test_input_digest_ignores_order() -> None:
    assert DIGEST == "5422ca29156696a44b71fbc95c5159ed"
    assert input_digest([SRC + ".1", SRC + ".2"]) == DIGEST


def test_first_run_names_are_the_pinned_uids() -> None:
    seg = seg_name(SRC, SEG_MODEL, DIGEST, (), 0, 300)
    assert (seg.series_uid, seg.sop_uid) == (SEG_SERIES, "2.25.74811828400583739147936400346577416049")
    assert (seg.series_number, seg.instance_number, seg.follows) == (300, 1, ())
    # the report's key is the set of models: their order in the route does not matter
    sr = sr_name(SRC, "chest", [DET_MODEL, SEG_MODEL], DIGEST, (), 0, 301)
    assert (sr.series_uid, sr.sop_uid) == (SR_SERIES, "2.25.308105645711433520078972813484481459870")
    assert (sr.series_number, sr.instance_number, sr.follows) == (301, 1, ())
    findings = findings_sr_name(SRC, "chest", [SEG_MODEL, DET_MODEL], sr.sop_uid, (), 0, 302)
    assert findings.series_uid == FINDINGS_SERIES
    assert findings.sop_uid == "2.25.304756921740143733546719573485392695128"
    assert (findings.series_number, findings.instance_number) == (302, 1)


def test_rerun_after_late_arrivals_follows_the_earlier_objects() -> None:
    earlier = _earlier()
    seg = seg_name(SRC, SEG_MODEL, DIGEST, earlier, 2, 300)
    assert (seg.series_uid, seg.sop_uid) == (SEG_SERIES, "2.25.319961322418308932474943732337950400458")
    assert (seg.instance_number, seg.follows) == (3, (earlier[0],))
    sr = sr_name(SRC, "chest", [SEG_MODEL, DET_MODEL], DIGEST, earlier, 2, 301)
    assert (sr.series_uid, sr.sop_uid) == (SR_SERIES, "2.25.14594747994565836331515324073948769847")
    assert (sr.instance_number, sr.follows) == (3, (earlier[1],))
    findings = findings_sr_name(SRC, "chest", [SEG_MODEL, DET_MODEL], sr.sop_uid, earlier, 2, 302)
    assert (findings.series_uid, findings.sop_uid) == (
        FINDINGS_SERIES,
        "2.25.141322363056059349529613832543208429818",
    )
    assert (findings.instance_number, findings.follows) == (3, (earlier[2],))


def test_retry_of_the_same_input_names_the_same_object_again() -> None:
    """An earlier object with the same UID was made from the same instances: number 1, following nothing."""
    first_seg = _first_run()[0]
    earlier = [r for r in _earlier() if r.sop_instance_uid == first_seg]
    again = seg_name(SRC, SEG_MODEL, input_digest([SRC + ".1"]), earlier, 2, 300)
    assert (again.sop_uid, again.instance_number, again.follows) == (first_seg, 1, ())


def test_rejection_note_name_is_pinned_and_order_free() -> None:
    seg, _, findings = _first_run()
    note = rejection_name("9.9", "chest", [seg, findings], 2, 303)
    assert note.series_uid == "2.25.176638980102710085867303707606442379778"
    assert note.sop_uid == "2.25.145897665156905216532393524245336265688"
    assert (note.series_number, note.instance_number) == (303, 3)
    assert rejection_name("9.9", "chest", [findings, seg], 2, 303) == note
