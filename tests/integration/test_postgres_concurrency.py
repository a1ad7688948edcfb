"""Writers of several machines on one PostgreSQL database, run at the same moment (threads with engines of
their own stand in for the machines): no write fails because another made the same study row first, and
no read-modify-write overwrites a change committed in between."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from storage.batching import InstanceIndex
from storage.db import make_engine
from storage.jobstore import JobStore
from storage.records import NewInstance, NewJob

ROUNDS = 40


def _instance(study: int, n: int) -> NewInstance:
    return NewInstance(
        sop_instance_uid=f"1.2.{study}.4.{n}",
        study_uid=f"1.2.{study}",
        series_uid=f"1.2.{study}.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        path=f"{study}/{n}.dcm",
        size=10,
    )


def _at_once(*calls: Callable[[], object]) -> list[object]:
    """Run the calls in threads released together; their results, or the exceptions they raised."""
    start = threading.Barrier(len(calls))
    out: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # reported to the test as a result
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.fixture
def machines(postgres_url: str) -> Iterator[tuple[JobStore, JobStore]]:
    a, b = JobStore(make_engine(postgres_url)), JobStore(make_engine(postgres_url))
    a.create_schema()
    yield a, b
    a.engine.dispose()
    b.engine.dispose()


def test_two_listeners_index_the_first_instances_of_one_new_study(machines: tuple[JobStore, JobStore]) -> None:
    a, b = machines
    index_a, index_b = InstanceIndex(a.engine), InstanceIndex(b.engine)
    try:
        for study in range(ROUNDS):
            got = _at_once(
                lambda s=study: index_a.record([_instance(s, 1)], late_arrivals="rerun"),
                lambda s=study: index_b.record([_instance(s, 2), _instance(s, 3)], late_arrivals="rerun"),
            )
            assert got == [["stored"], ["stored", "stored"]], f"study {study}: {got}"
            assert a.get_study(f"1.2.{study}").instance_count == 3
    finally:
        index_a.close()
        index_b.close()


def test_two_machines_record_the_first_instance_of_one_new_study(machines: tuple[JobStore, JobStore]) -> None:
    a, b = machines
    for study in range(ROUNDS):
        got = _at_once(
            lambda s=study: a.record_instance(_instance(s, 1)), lambda s=study: b.record_instance(_instance(s, 2))
        )
        assert got == ["stored", "stored"], f"study {study}: {got}"
        assert a.get_study(f"1.2.{study}").instance_count == 2


def test_a_late_instance_racing_completion_is_never_lost(machines: tuple[JobStore, JobStore]) -> None:
    """The assembler completes a study (planned from its one instance) while a listener indexes one more.
    Either the completion comes first and the instance re-opens the study as a new generation, or the
    instance comes first and the completion stands back until the study is quiet again; never does the
    instance end up in a generation completed without it."""
    a, b = machines
    index = InstanceIndex(b.engine)
    job = NewJob(route="r", series_uid="s", models=("m",), destinations=("pacs",))
    try:
        for study in range(ROUNDS):
            index.record([_instance(study, 1)], late_arrivals="rerun")
            jobs, outcome = _at_once(
                lambda s=study: a.complete_study(f"1.2.{s}", 0, [job], instance_count=1),
                lambda s=study: index.record([_instance(s, 2)], late_arrivals="rerun"),
            )
            assert not isinstance(jobs, Exception) and not isinstance(outcome, Exception), (jobs, outcome)
            final = a.get_study(f"1.2.{study}")
            if jobs is not None:  # completed first: the instance re-opened the study
                assert outcome == ["reopened"] and (final.state, final.generation) == ("receiving", 1), (study, final)
            else:  # the instance came first: the completion stood back; the assembler comes again
                assert outcome == ["stored"] and (final.state, final.generation) == ("receiving", 0), (study, final)
            assert final.instance_count == 2
    finally:
        index.close()
