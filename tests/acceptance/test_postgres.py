"""The node with its job store on PostgreSQL (``node.database_url``), as sites run it when several machines
share the work: received instances are indexed there by every listener process, the job runs, SEG and SR
reach the PACS, the admin commands read the same database, and no SQLite file is made on the side."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.acceptance.test_end_to_end import _check_study, _results_by_study, _study
from tests.peers import NodeProcess, StoreSCP, free_port, running, storescu, wait_for, write_config


def test_node_on_postgresql_receives_runs_and_delivers(tmp_path: Path, postgres_url: str) -> None:
    study = _study(tmp_path / "in", "pg", 31, nodules=1)
    pacs = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    cfg = write_config(
        tmp_path / "config.toml",
        port=port,
        data_dir=tmp_path / "var",
        destinations=[{"name": "pacs", "port": pacs.port}],
        node_extra=f'database_url = "{postgres_url}"\nlistener_processes = 2',
    )
    node = NodeProcess(cfg, port, tmp_path / "node.log").start()
    with running(pacs, node):
        half = len(study.paths) // 2  # two associations at once: both listener processes index rows
        first = threading.Thread(target=storescu, args=(port, study.paths[:half]))
        first.start()
        storescu(port, study.paths[half:])
        first.join()
        got = wait_for(
            lambda: (r := _results_by_study(pacs).get(study.ids.study_uid, {})) and len(r) == 2 and r,
            300,
            "SEG and SR at the PACS",
        )
        _check_study(study, got)
        storescu(port, study.paths[:3])  # a resend: kept first, acknowledged, nothing indexed twice
        status = node.cli("status")
        assert status.returncode == 0, status.stderr
        assert "jobs: done=1" in status.stdout, status.stdout
        assert "deliveries: done=2" in status.stdout, status.stdout
        log = node.log_text()
        assert "database=postgresql" in log and "job_done" in log
        assert node.stop() == 0
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        instances = conn.execute(text("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")).one()
        studies = conn.execute(text("SELECT study_uid, instance_count FROM studies")).all()
    engine.dispose()
    assert tuple(instances) == (len(study.paths), len(study.paths))
    assert [tuple(s) for s in studies] == [(study.ids.study_uid, len(study.paths))]
    assert not list((tmp_path / "var").glob("*.db*"))  # no SQLite job store beside the configured one
