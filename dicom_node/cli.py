"""`dicom-node` commands. The only place logging is configured."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node import admin
from dicom_node.audit import cli_actor
from dicom_node.config import Config, ConfigError, load_config
from dicom_node.logs import configure_logging

if TYPE_CHECKING:
    from dicom_node.runtime import Runtime
    from storage.records import JobRecord


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _ts(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    configure_logging(cfg.logging.level, cfg.logging.format)
    from dicom_node.metrics_setup import prepare_multiprocess

    try:  # before the service imports prometheus_client (see dicom_node/metrics.py)
        prepare_multiprocess(cfg.data_dir)
    except OSError as exc:
        raise ConfigError(f"node.data_dir: cannot use {cfg.data_dir}: {exc.strerror or exc}") from exc
    from dicom_node.service import serve

    return serve(cfg)


def cmd_check_config(args: argparse.Namespace) -> int:
    """The config, the data folder, and every model loaded as the worker will load it (weights, network,
    device): what would otherwise show only in the node's log at start, or at a study's job."""
    cfg = _load(args)
    from dicom_node.runtime import data_dir_problem

    problem = data_dir_problem(cfg.data_dir)
    if problem is not None:
        why, certain = problem
        if certain:
            raise ConfigError(f"node.data_dir: cannot use {cfg.data_dir}: {why}")
        print(f"warning: node.data_dir: {why}; the user the node runs as must be able to write it", file=sys.stderr)
    failed = 0
    for i, m in enumerate(cfg.models):
        error = _model_problem(cfg, m.name)
        if error is not None:
            print(f"models[{i}] ({m.name}): {error}", file=sys.stderr)
            failed += 1
    if failed:
        return 2
    print(
        f"{args.config}: OK ({len(cfg.destinations)} destinations, {len(cfg.models)} models, "
        f"{len(cfg.routes)} routes; listening as {cfg.node.ae_title} on {cfg.node.bind}:{cfg.node.port}; "
        f"data in {cfg.data_dir})"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dicom_node.runtime import open_runtime

    rt = open_runtime(cfg, create=False)
    counts = rt.jobs.counts()
    jobs = rt.jobs.list_jobs(limit=args.limit)
    storage = admin.storage_status(cfg, rt)
    if args.json:
        print(
            json.dumps(
                {"counts": counts, "storage": storage, "jobs": [admin.job_json(rt, j) for j in jobs]}, default=str
            )
        )
        return 0
    print(f"instances: {counts['instances']['total']}")
    for k in ("studies", "jobs", "deliveries"):
        print(f"{k}: " + (", ".join(f"{s}={n}" for s, n in sorted(counts[k].items())) or "none"))
    d, r = storage["disk"], cfg.retention
    print(
        f"disk: {d['used_percent']}% used, {d['free_mb']} MiB free (evicts above {r.high_watermark_percent:g}% "
        f"or below {cfg.node.min_free_mb} MiB free, down to {r.low_watermark_percent:g}%)"
    )
    e = storage["eligible"]
    print(
        f"eligible for purge now: {e['studies']} studies, {e['received_mb']} MiB received, "
        f"{e['result_files']} result files, {e['history']} histories"
        + ("" if r.enabled else " (retention.enabled = false: only `dicom-node purge` deletes)")
    )
    _print_jobs(rt, jobs)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Show (--dry-run) or do what the retention rules call for now; --older-than DAYS instead of the rules'
    ages, --study for one study. What a queued or running job or a pending delivery needs is never purged."""
    cfg = _load(args)
    if args.older_than is not None and args.older_than < 0:
        print("error: --older-than must not be negative", file=sys.stderr)
        return 2
    from dicom_node.housekeeping import Housekeeper
    from dicom_node.runtime import open_runtime
    from storage.retention import RetentionStore

    rt = open_runtime(cfg, create=False)
    keeper = Housekeeper(cfg, rt.files, RetentionStore(rt.jobs.engine, rt.files))
    if args.study and not keeper.store.usage(args.study):
        print(f"error: no study {args.study}", file=sys.stderr)
        return 1
    if not args.dry_run and not keeper.lock.acquire(60.0):
        print("error: another purge is still running (waited 60 s)", file=sys.stderr)
        return 1
    try:
        if not args.dry_run:
            keeper.store.finish_pending()
        plan = keeper.plan(study_uid=args.study, older_than_days=args.older_than)
        done = skipped = 0
        for p in plan:
            if args.dry_run:
                size = f", {p.bytes} bytes" if p.bytes else ""
                print(f"would purge {p.what} of {p.study_uid} ({p.reason}; {p.files} files{size})")
                continue
            out = keeper.execute(p)
            if out.skipped:
                skipped += 1
                print(f"kept {p.what} of {p.study_uid}: {out.skipped}")
            else:
                done += 1
                print(f"purged {p.what} of {p.study_uid} ({p.reason}; {out.files} files, {out.bytes} bytes)")
        if args.study:
            for u in keeper.store.usage(args.study):
                if u.busy:
                    print(f"kept {u.study_uid}: {u.busy}")
        if not args.dry_run and done:
            keeper.store.vacuum()
    finally:
        if not args.dry_run:
            keeper.lock.release()
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {len(plan) if args.dry_run else done} item(s)" + (f", {skipped} kept" if skipped else ""))
    return 0


def _print_jobs(rt: Runtime, jobs: Sequence[JobRecord]) -> None:
    if not jobs:
        print("no jobs")
        return
    print(f"{'job':>5}  {'state':<9} {'att':>3}  {'updated':<19}  {'route':<12} {'deliveries':<16} study / error")
    for j in jobs:
        dels = rt.jobs.deliveries_of_job(j.id)
        done = sum(d.state == "done" for d in dels)
        failed = sum(d.state == "failed" for d in dels)
        refused = sum(d.state == "refused" for d in dels)  # rejection notes a destination would not take
        dtxt = (
            (
                f"{done}/{len(dels)} sent"
                + (f", {failed} failed" if failed else "")
                + (f", {refused} refused" if refused else "")
            )
            if dels
            else "-"
        )
        print(
            f"{j.id:>5}  {j.state:<9} {j.attempts:>3}  {_ts(j.updated_at):<19}  {j.route[:12]:<12} "
            f"{dtxt:<16} {j.study_uid}"
        )
        if j.error:
            print(f"{'':>7}error: {j.error[:300]}")
        for d in dels:
            if d.state in ("failed", "refused") or (d.state == "pending" and d.error):
                print(f"{'':>7}{d.result.kind} -> {d.destination}: {d.state} {d.last_status} {d.error[:200]}")


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dicom_node.runtime import open_runtime

    rt = open_runtime(cfg, create=False)
    _print_jobs(rt, rt.jobs.list_jobs(state=args.state, limit=args.limit, or_failed_deliveries=args.state == "failed"))
    return 0


def _job_action(args: argparse.Namespace, action: str) -> int:
    """Run a JobStore admin action on args.job; a refused action prints why and exits 1."""
    cfg = _load(args)
    from dicom_node.runtime import open_runtime
    from storage.jobstore import JobStoreError

    try:
        job = admin.job_action(cfg, open_runtime(cfg, create=False), action, args.job, actor=cli_actor())
    except JobStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(admin.job_action_message(action, job))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    return _job_action(args, "retry")


def cmd_cancel(args: argparse.Namespace) -> int:
    return _job_action(args, "cancel")


def cmd_echo(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        r = admin.echo_destination(cfg, args.destination, actor=cli_actor())
    except KeyError:
        names = ", ".join(d.name for d in cfg.destinations) or "none"
        print(f"error: unknown destination {args.destination!r} (configured: {names})", file=sys.stderr)
        return 2
    print(f"C-ECHO {r.ae_title}@{r.host}:{r.port}: {'OK' if r.ok else 'FAILED'} ({r.detail})")
    return 0 if r.ok else 1


def _model_problem(cfg: Config, name: str) -> str | None:
    """Why the worker could not load model ``name`` (loading it as the worker does), or None."""
    from ai_models.bundle import load_model
    from ai_models.types import ModelError

    m = cfg.model(name)
    try:
        load_model(cfg.bundle_path(name), name=name, device=m.device or cfg.worker.device, min_score=m.operating_point)
    except ModelError as exc:
        return str(exc)
    except Exception as exc:  # a bundle's own config or files can fail in MONAI or torch in any way: report it
        return f"{type(exc).__name__}: {exc}"
    return None


def cmd_models(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{'name':<20} {'task':<15} {'version':<10} {'device':<8} {'min score':<10} labels")
    failed = 0
    for m in admin.models(cfg):
        if m["error"]:
            print(f"{m['name']:<20} error: {m['error']}")
            failed += 1
            continue
        labels = ", ".join(f"{k}={v}" for k, v in m["labels"].items())
        shown = "" if m["min_score"] is None else f"{m['min_score']:g}"
        print(f"{m['name']:<20} {m['task']:<15} {m['version']:<10} {m['device']:<8} {shown:<10} {labels}")
    return 2 if failed else 0


def cmd_make_phantom(args: argparse.Namespace) -> int:
    """Write a generated CT chest phantom study (for trying the node with storescu)."""
    from pydicom import uid as pduid

    from ai_models.phantom import generate_phantom
    from dicom_node.synth import StudyIds, localizer_datasets, phantom_datasets, write_datasets

    ph = generate_phantom(args.seed, shape=args.shape, n_nodules=args.nodules)
    ids = StudyIds.new(args.seed)
    ts = getattr(pduid, args.transfer_syntax)
    out = Path(args.out)
    paths = write_datasets(phantom_datasets(ph, ids, transfer_syntax=ts), out)
    if args.localizer:
        paths += write_datasets(localizer_datasets(ph, ids), out)
    print(
        f"wrote {len(paths)} files to {out} (study {ids.study_uid}, {len(ph.nodules)} nodules, "
        f"shape {ph.hu.shape}, spacing {tuple(round(s, 3) for s in ph.spacing)})"
    )
    return 0


def _zyx(text: str) -> tuple[int, int, int]:
    """A volume shape given as ZxYxX."""
    try:
        z, y, x = (int(v) for v in text.split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected ZxYxX (three whole numbers, e.g. 120x256x256): {text!r}") from exc
    return z, y, x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="DICOM AI node: receive, infer, send SEG and SR")
    p.add_argument("--config", default="config.toml", help="path to config.toml (default: ./config.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", default=argparse.SUPPRESS, help="path to config.toml")
        sp.set_defaults(fn=fn)
        return sp

    add("serve", cmd_serve, "run listener, worker and sender until SIGTERM or Ctrl-C")
    sp = add("status", cmd_status, "queue counts, disk use against the watermarks, what may be purged, recent jobs")
    sp.add_argument("--limit", type=int, default=10)
    sp.add_argument("--json", action="store_true")
    sp = add("purge", cmd_purge, "delete what the retention rules call for now (see README: Retention)")
    sp.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    sp.add_argument("--study", metavar="UID", help="only this study")
    sp.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="every finished study older than this, whatever the keep_* settings",
    )
    sp = add("jobs", cmd_jobs, "list jobs")
    sp.add_argument(
        "--state",
        choices=["queued", "running", "done", "failed", "cancelled"],
        help="failed: also done jobs with a result a destination did not take",
    )
    sp.add_argument("--limit", type=int, default=50)
    sp = add("retry", cmd_retry, "run a failed or cancelled job again; for a done job, re-send its results")
    sp.add_argument("job", type=int)
    sp = add("cancel", cmd_cancel, "cancel a queued or running job")
    sp.add_argument("job", type=int)
    sp = add("echo", cmd_echo, "C-ECHO a configured destination")
    sp.add_argument("destination")
    add("check-config", cmd_check_config, "validate config.toml and the model bundles it names")
    add("models", cmd_models, "list installed models")
    sp = add("make-phantom", cmd_make_phantom, "write a generated CT chest phantom study as DICOM files")
    sp.add_argument("out")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--nodules", type=int, default=None)
    sp.add_argument("--shape", type=_zyx, default=None, help="ZxYxX, e.g. 120x256x256")
    sp.add_argument(
        "--transfer-syntax",
        default="ExplicitVRLittleEndian",
        help="pydicom UID name, e.g. RLELossless, JPEG2000Lossless",
    )
    sp.add_argument("--localizer", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dicom-node status | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
