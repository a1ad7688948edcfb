"""Study completion: a study is complete once no instance arrived for ``completion.stable_seconds``.

Completing a study routes it and enqueues its jobs in one transaction (idempotent per study, route and
generation). An image a model could read (routing.VOLUME_SOP_CLASSES) arriving after completion re-opens
the study with the next generation, so it is routed again once quiet and the new results supersede the old
(see config ``completion.late_arrivals``); other objects are stored without re-opening it. After retention
purged a study, only series sent again whole are run (``_whole``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.config import Config
from dicom_node.jobs.routing import SeriesInfo, plan_jobs
from dicom_node.logs import log_event
from storage.files import FileStore
from storage.jobstore import JobStore
from storage.records import InstanceRecord, NewJob, StudyRecord
from storage.retention import RetentionStore

log = logging.getLogger("dicom_node.assembly")


def series_infos(files: FileStore, instances: list[InstanceRecord]) -> list[SeriesInfo]:
    by_series: dict[str, list[InstanceRecord]] = defaultdict(list)
    for i in instances:
        by_series[i.series_uid].append(i)
    out = []
    for series_uid, members in by_series.items():
        first = min(members, key=lambda i: i.sop_instance_uid)
        try:
            header = dcmread(files.absolute(first.path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            log_event(
                log,
                "series_header_unreadable",
                logging.WARNING,
                study_uid=first.study_uid,
                series_uid=series_uid,
                error=str(exc),
            )
            continue
        out.append(SeriesInfo(series_uid=series_uid, instance_count=len(members), header=header))
    return out


class Assembler:
    def __init__(self, cfg: Config, files: FileStore, jobs: JobStore, *, started_at: float | None = None) -> None:
        """``started_at``: when this node (re)started; default now."""
        self.cfg = cfg
        self.files = files
        self.jobs = jobs
        self.retention = RetentionStore(jobs.engine, files)
        self.started_at = time.time() if started_at is None else started_at

    def complete(self, study: StudyRecord) -> list[int]:
        """Route one quiet study and enqueue its jobs; returns the job ids."""
        instances = self.jobs.instances_of_study(study.study_uid)
        infos = self._whole(study, series_infos(self.files, instances))
        plan = plan_jobs(self.cfg.routes, infos)
        routes = {r.name: r for r in self.cfg.routes}
        new = [
            NewJob(route=name, series_uid=s.series_uid, models=routes[name].models, destinations=routes[name].send_to)
            for name, s in plan.items()
        ]
        jobs = self.jobs.complete_study(study.study_uid, study.generation, new, instance_count=len(instances))
        if jobs is None:  # an instance arrived while the jobs were planned: once quiet again, planned again
            log_event(log, "study_completion_deferred", study_uid=study.study_uid, generation=study.generation)
            return []
        log_event(
            log,
            "study_complete",
            study_uid=study.study_uid,
            generation=study.generation,
            instances=study.instance_count,
            series=len(infos),
            job_ids=",".join(str(j.id) for j in jobs) or "none",
            routes=",".join(plan) or "none",
        )
        return [j.id for j in jobs]

    def _whole(self, study: StudyRecord, infos: list[SeriesInfo]) -> list[SeriesInfo]:
        """The series the models may read. After retention purged a study's instances, a series counts only
        once at least as many of its instances arrived again as were purged (the series sent again whole);
        fewer are late stragglers: stored, but no model runs on a part of a series."""
        purged = self.retention.purged_series(study.study_uid) if study.generation else {}
        whole = []
        for info in infos:
            before = purged.get(info.series_uid, 0)
            if info.instance_count < before:
                log_event(
                    log,
                    "late_arrival_after_purge_not_run",
                    logging.WARNING,
                    study_uid=study.study_uid,
                    series_uid=info.series_uid,
                    generation=study.generation,
                    instances=info.instance_count,
                    purged=before,
                )
                continue
            whole.append(info)
        return whole

    def run_once(self, now: float | None = None) -> int:
        """Complete every study quiet for stable_seconds as of ``now`` (default: the clock).

        Nothing completes in the first stable_seconds after a (re)start: a study whose transfer a crash or
        restart cut looks quiet at once (no instance arrived while the node was down), though its senders
        are about to send the rest. They get the same quiet period as any study."""
        now = time.time() if now is None else now
        if now < self.started_at + self.cfg.completion.stable_seconds:
            return 0
        done = 0
        for study in self.jobs.due_studies(self.cfg.completion.stable_seconds, now=now):
            self.complete(study)
            done += 1
        return done
