"""Result naming: the Series/SOP Instance UIDs and Instance/Series Numbers of the objects a job writes.

One rule for every kind of result. The series UID depends on what made the object (source series, model
identities, route), so every run of the same models on the same series lands in one result series. The SOP
Instance UID adds the set of input instances (``input_digest``): a re-run after a crash writes the same
object again (the PACS keeps one copy), while a re-run after late arrivals changed the input makes a new
instance in the same series that follows (supersedes) the earlier one and says so in its UID and number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ai_models.types import ModelIdentity
from storage.records import ResultRecord

from .uids import derive_uid


@dataclass(frozen=True)
class ResultName:
    """Where one result object goes and what it follows."""

    series_uid: str
    sop_uid: str
    series_number: int
    instance_number: int
    follows: tuple[ResultRecord, ...] = ()  # the earlier objects this one supersedes, latest run's


def input_digest(sop_uids: Sequence[str]) -> str:
    """The set of input instances, order-free, as 32 hex digits."""
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()[:32]


def seg_name(
    source_series_uid: str,
    identity: ModelIdentity,
    digest: str,
    earlier: Sequence[ResultRecord],
    generation: int,
    series_number: int,
) -> ResultName:
    """A model's SEG: one series per (source series, model identity)."""
    key = (source_series_uid, identity.name, identity.version, identity.bundle_hash)
    series_uid = derive_uid("seg-series", *key)
    sop_uid = derive_uid("seg", *key, digest)
    number, follows = _succession(_in_series(earlier, "seg", series_uid), sop_uid, generation)
    if follows:
        sop_uid = derive_uid("seg", *key, digest, "number", str(number))
    return ResultName(series_uid, sop_uid, series_number, number, tuple(follows))


def sr_name(
    source_series_uid: str,
    route: str,
    identities: Sequence[ModelIdentity],
    digest: str,
    earlier: Sequence[ResultRecord],
    generation: int,
    series_number: int,
) -> ResultName:
    """The route's full report: one series per (source series, route, set of model identities)."""
    key = _report_key(source_series_uid, route, identities)
    series_uid = derive_uid("sr-series", *key)
    sop_uid = derive_uid("sr", *key, digest)
    number, follows = _succession(_in_series(earlier, "sr", series_uid), sop_uid, generation)
    if follows:
        sop_uid = derive_uid("sr", *key, digest, "supersedes", str(number), *(r.sop_instance_uid for r in follows))
    return ResultName(series_uid, sop_uid, series_number, number, tuple(follows))


def findings_sr_name(
    source_series_uid: str,
    route: str,
    identities: Sequence[ModelIdentity],
    report_sop_uid: str,
    earlier: Sequence[ResultRecord],
    generation: int,
    series_number: int,
) -> ResultName:
    """The findings-only SR that goes with a report: its own series, one instance per report."""
    series_uid = derive_uid("findings-sr-series", *_report_key(source_series_uid, route, identities))
    sop_uid = derive_uid("findings-sr", report_sop_uid)
    number, follows = _succession(_in_series(earlier, "sr", series_uid), sop_uid, generation)
    return ResultName(series_uid, sop_uid, series_number, number, tuple(follows))


def rejection_name(
    study_uid: str, route: str, rejected_sop_uids: Sequence[str], generation: int, series_number: int
) -> ResultName:
    """The IOCM rejection note of a re-run: one series per (study, route), one note per rejected set."""
    return ResultName(
        series_uid=derive_uid("rejection-series", study_uid, route),
        sop_uid=derive_uid("rejection", study_uid, route, *sorted(rejected_sop_uids)),
        series_number=series_number,
        instance_number=generation + 1,
    )


def _report_key(source_series_uid: str, route: str, identities: Sequence[ModelIdentity]) -> tuple[str, ...]:
    models = sorted(f"{i.name}:{i.version}:{i.bundle_hash}" for i in identities)
    return (source_series_uid, route, *models)


def _in_series(earlier: Sequence[ResultRecord], kind: str, series_uid: str) -> list[ResultRecord]:
    return [e for e in earlier if e.kind == kind and e.series_uid == series_uid]


def _succession(earlier: list[ResultRecord], uid: str, generation: int) -> tuple[int, list[ResultRecord]]:
    """(Instance Number, the earlier results it follows) for a result object about to get ``uid``.

    A re-run after late arrivals follows the latest earlier run's objects in their series, and its SR names
    that SR as predecessor. What it follows is content, so the caller puts it in the object's UID; a first
    run's UID carries no succession part. An earlier object with this very UID was made from the same
    instances: this one is the same object again (number 1, following nothing). Retries of a job find the
    same earlier results, so they rebuild the same UIDs and bytes."""
    if not earlier or any(e.sop_instance_uid == uid for e in earlier):
        return 1, []
    return generation + 1, earlier
