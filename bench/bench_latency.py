"""End-to-end latency: last CT instance acknowledged -> every SEG and the SR acknowledged by the PACS.

One command. A CT phantom (default 300 x 512 x 512) is sent by DCMTK storescu (TCP_NODELAY=1) to
``dicom-node serve`` (temp config, JSON logs), results go to DCMTK storescp. The models (``--models``): the
shipped ``config.toml`` route's models with their operating points (default), or the phantom-trained
chest_ct_seg fixture alone (``phantom-seg``); on ``--device`` (cpu, cuda, cuda:N). A small warm-up study goes
first so the models are loaded and the process warm, as in service.

The split comes from the node itself: the JSON log's events (study_complete, job_started, job_done with
its t_* stage timings, result_delivered) and the job row's ``timings`` read back through
storage.jobstore. The segmentation runner times its own stages (pre-processing, the network's forward
calls only, measured by hooks on the network, the sliding window's work around them, post-processing and
inversion to the label map), so "forward pass" is the network's time and nothing else. The budget line is
the total minus the completion wait minus that forward pass. The same stages are then taken in-process
on the same series (warm, medians): each model's runner stages, and the encode stage taken apart (SEG
build per segmentation, SR build, write to bytes, read-back check); ``--monai-reference`` also runs the
bundle's own MONAI path (Spacingd, MONAI's sliding window, Invertd) for the models run by the generic
segmentation runner and compares the label maps (the others have no MONAI path: skipped, and said so).

With ``phantom-seg``, if the fixture has no models/model.pt, a copy with random weights (same network_def,
seed 0) is used and the output says so: the forward pass costs the same, the mask (and so SEG size) differs.

    .venv/bin/python bench/bench_latency.py [--device cpu] [--models shipped|phantom-seg] [--slices 300]
        [--size 512] [--stable-seconds 1.0] [--monai-reference] [--no-split]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import StoreSCPPeer, cached_ct_study, workdir
from tests.peers import DCMTK_ENV, PHANTOM_SEG_BUNDLE, STORESCU, NodeProcess, free_port, wait_for, write_config

BUDGET_S = 2.0
REPO = Path(__file__).resolve().parents[1]


def shipped_models() -> list[tuple[str, Path, float | None]]:
    """(name, bundle folder, operating point or None: the bundle's) of the shipped route, as config.toml says."""
    cfg = tomllib.loads((REPO / "config.toml").read_text())
    models = {m["name"]: m for m in cfg["models"]}
    out = []
    for name in cfg["routes"][0]["models"]:
        point = float(models[name].get("min_score", -1.0))
        out.append((name, REPO / models[name]["bundle"], point if point >= 0 else None))
    return out


def models_toml(models: list[tuple[str, Path, float | None]], device: str) -> str:
    """[[models]] tables for write_config, each on ``device``."""
    return "".join(
        f'[[models]]\nname = "{name}"\nbundle = "{bundle}"\ndevice = "{device}"\n'
        + (f"min_score = {point}\n" if point is not None else "")
        for name, bundle, point in models
    )


def random_weight_bundle(dest: Path) -> Path:
    """Copy of the shipped bundle's configs with a seeded random-weight models/model.pt."""
    import torch

    from ai_models.bundle import make_parser

    shutil.copytree(PHANTOM_SEG_BUNDLE / "configs", dest / "configs")
    (dest / "models").mkdir(parents=True)
    torch.manual_seed(0)
    net = make_parser(dest).get_parsed_content("network_def")
    torch.save(net.state_dict(), dest / "models" / "model.pt")
    return dest


def send(port: int, paths: list[Path]) -> float:
    """One storescu association with every file; returns time.time() when storescu is done (all acked)."""
    import subprocess

    cmd = [STORESCU, "-aec", "DICOM_NODE", "-aet", "SCANNER", "127.0.0.1", str(port), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=600)
    done = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {proc.stderr[-2000:]}")
    return done


def events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def delivered(log: Path, study_uid: str) -> list[dict[str, Any]]:
    return [e for e in events(log) if e.get("event") == "result_delivered" and e.get("study_uid") == study_uid]


def run_study(node: NodeProcess, paths: list[Path], timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """Send, wait for SEG and SR delivered; (last instance acked at, this study's log events)."""
    import pydicom

    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    acked = send(node.port, paths)
    failed = ("job_failed", "job_retry_scheduled", "delivery_failed")

    def done() -> bool:
        mine = [e for e in events(node.log_path) if e.get("study_uid") == study_uid]
        bad = [e for e in mine if e.get("event") in failed]
        if bad:
            raise RuntimeError(f"node reported {bad[0]}")
        finished = [e for e in mine if e.get("event") == "job_done"]
        if not finished:
            return False
        expected = str(finished[0].get("results") or "").split(",")  # every SEG (none for an empty mask) and the SR
        return sum(e.get("event") == "result_delivered" for e in mine) >= len([k for k in expected if k])

    wait_for(done, timeout, f"every result of {study_uid} delivered", interval=0.05)
    return acked, [e for e in events(node.log_path) if e.get("study_uid") == study_uid]


def job_timings(data_dir: Path, job_id: int) -> dict[str, float]:
    from storage.db import make_engine
    from storage.jobstore import JobStore

    job = JobStore(make_engine(f"sqlite:///{data_dir / 'node.db'}")).get_job(job_id)
    if job is None or not job.timings:
        raise RuntimeError(f"job {job_id} has no timings")
    return {k: float(v) for k, v in json.loads(job.timings).items()}


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def in_process_split(
    models: list[tuple[str, Path, float | None]], paths: list[Path], monai_reference: bool, device: str
) -> dict[str, float]:
    """The worker's load / inference / encode stages, taken apart in this process (same code, warm)."""
    import highdicom as hd
    import numpy as np
    import pydicom

    from ai_models.bundle import SegmentationRunner, load_model
    from ai_models.nodule_map import MAP_CACHE
    from ai_models.types import ClassificationResult, DetectionResult, SegmentationResult
    from ai_models.volume import read_series
    from dicom_node.results.equipment import NodeIdentity
    from dicom_node.results.seg import EmptySegmentationError, build_seg
    from dicom_node.results.sr import build_sr

    out: dict[str, float] = {}
    read_series(paths)  # warm the page cache and imports
    out["load (read_series: headers + pixels)"], (volume, headers) = timed(lambda: read_series(paths), 3)

    node = NodeIdentity(software_version="bench", device_serial_number="BENCH")
    results = []
    for name, bundle, point in models:
        model = load_model(bundle, name=name, device=device, min_score=point)
        model.run(volume)  # warm
        runs = []
        for _ in range(2):
            MAP_CACHE.clear()  # each model's own cost: the nodule models would share one map otherwise
            t0 = time.perf_counter()
            result, stages = model.run_timed(volume)
            runs.append((time.perf_counter() - t0, stages))
        results.append(result)
        out[f"{name}: run"] = statistics.median(r[0] for r in runs)
        for stage in runs[0][1]:
            out[f"{name}: {stage}"] = statistics.median(r[1][stage] for r in runs)
        if not monai_reference:
            continue
        runner = model._runner  # type: ignore[attr-defined]
        if not isinstance(runner, SegmentationRunner):
            print(f"# --monai-reference: {name} is run by {type(runner).__name__}, which has no MONAI path: skipped")
            continue
        with runner.fast_paths_disabled():
            ref, stages = model.run_timed(volume)
        for stage, secs in stages.items():
            out[f"{name}: MONAI path: {stage}"] = secs
        fast_mask, ref_mask = result.mask, ref.mask  # type: ignore[union-attr]
        out[f"({name}: voxels differing, fast vs MONAI path)"] = float(np.count_nonzero(fast_mask != ref_mask))
        for label in sorted(int(v) for v in np.unique(ref_mask) if v):
            a, b = fast_mask == label, ref_mask == label
            out[f"({name}: Dice label {label}, fast vs MONAI path)"] = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())

    def to_bytes(ds: pydicom.Dataset) -> bytes:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    reported = []
    for i, result in enumerate(r for r in results if isinstance(r, SegmentationResult)):
        name = result.identity.name
        try:
            out[f"encode: {name} SEG build"], seg = timed(
                lambda r=result, i=i: build_seg(
                    headers, r, series_uid=f"2.25.1{i}", sop_uid=f"2.25.2{i}", series_number=900 + i, node=node
                ),
                3,
            )
        except EmptySegmentationError:
            print(f"# {name}: empty segmentation, no SEG (as the worker does)")
            reported.append((result, None))
            continue
        reported.append((result, seg))
        out[f"encode: {name} SEG write to bytes"], seg_bytes = timed(lambda seg=seg: to_bytes(seg), 3)
        out[f"encode: {name} SEG read-back (dcmread + from_dataset)"], _ = timed(
            lambda b=seg_bytes: hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(b)), copy=False), 3
        )
        out[f"({name}: SEG frames)"] = float(seg.NumberOfFrames)
        out[f"({name}: SEG MiB)"] = len(seg_bytes) / 2**20
    out["encode: SR build"], sr = timed(
        lambda: build_sr(
            headers,
            volume,
            segmentations=reported,
            detections=[r for r in results if isinstance(r, DetectionResult)],
            classifications=[r for r in results if isinstance(r, ClassificationResult)],
            series_uid="2.25.3",
            sop_uid="2.25.4",
            series_number=901,
            node=node,
        ),
        3,
    )
    out["encode: SR write to bytes"], sr_bytes = timed(lambda: to_bytes(sr), 3)
    out["encode: SR read-back (dcmread + from_dataset)"], _ = timed(
        lambda: hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(BytesIO(sr_bytes)), copy=False), 3
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--stable-seconds", type=float, default=1.0, help="the node's completion wait")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the results")
    parser.add_argument("--no-split", action="store_true", help="skip the in-process split of the stages")
    parser.add_argument(
        "--monai-reference",
        action="store_true",
        help="in the split, also run the bundle's own MONAI path and compare label maps (~30 s)",
    )
    parser.add_argument("--device", default="cpu", help="the models' device: cpu, cuda, cuda:N (default cpu)")
    parser.add_argument(
        "--models",
        choices=("shipped", "phantom-seg"),
        default="shipped",
        help="shipped: config.toml's route models (default); phantom-seg: the chest_ct_seg fixture",
    )
    args = parser.parse_args()

    study = cached_ct_study(f"ct-{args.slices}x{args.size}", args.slices, args.size, seed=11)  # as bench_receive
    warm = cached_ct_study(f"latency-warm-24x{args.size}", 24, args.size, seed=32)
    with workdir("bench-latency-") as work:
        if args.models == "shipped":
            models = shipped_models()
            weights = "shipped models: " + ", ".join(name for name, _, _ in models)
        elif (PHANTOM_SEG_BUNDLE / "models" / "model.pt").is_file():
            models = [("chest-ct-seg", PHANTOM_SEG_BUNDLE, None)]
            weights = "phantom-trained chest_ct_seg fixture (models/model.pt)"
        else:
            models = [("chest-ct-seg", random_weight_bundle(work / "bundle"), None)]
            weights = "RANDOM weights: the chest_ct_seg fixture has no models/model.pt (same network_def)"
        pacs = StoreSCPPeer(work, fork=False).start()
        port = free_port()
        cfg = write_config(
            work / "config.toml",
            port=port,
            data_dir=work / "var",
            stable_seconds=args.stable_seconds,
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
            extra='format = "json"',
            models=models_toml(models, args.device),
            route_models=[name for name, _, _ in models],
        )
        node = NodeProcess(cfg, port, work / "node.log").start()
        try:
            run_study(node, list(warm.paths), args.timeout)  # loads the models, warms every path
            acked, evs = run_study(node, list(study.paths), args.timeout)
        finally:
            node.stop()
            pacs.stop()
        first = {}
        for e in evs:
            first.setdefault(e["event"], e)
        done = first["job_done"]
        timings = job_timings(work / "var", int(done["job_id"]))
        ends = [float(e["ts"]) for e in evs if e.get("event") == "result_delivered"]
        received = pacs.count()
        split = {} if args.no_split else in_process_split(models, list(study.paths), args.monai_reference, args.device)

    complete, started, finished = (float(first[k]["ts"]) for k in ("study_complete", "job_started", "job_done"))
    stages = [
        ("load", "load (read_series: headers + pixels)"),
        ("model_load", "model load (cached: warm node)"),
        ("inference_pre", "inference: pre-processing"),
        ("inference_forward", "inference: forward pass*"),
        ("inference_window", "inference: sliding window around it"),
        ("inference_post", "inference: post-processing + inversion"),
        ("inference_rest", "inference: worker around it"),
        ("seg_encode", "SEG build"),
        ("sr_encode", "SR build"),
        ("write", "write SEG+SR (serialise, read back, store+fsync)"),
    ]
    # the runner's stages inside "inference"; what the worker spent around the model call stays there
    timings["inference_rest"] = timings["inference"] - sum(v for k, v in timings.items() if k.startswith("inference_"))
    stages = [(key, label) for key, label in stages if key in timings]
    in_stages = sum(v for k, v in timings.items() if not k.startswith("inference_"))
    forward = timings.get("inference_forward", 0.0)
    rows: list[tuple[str, float]] = [
        ("completion wait (stable_seconds + assembler poll)", complete - acked),
        ("job pickup (worker woken by the assembler)", started - complete),
        *[(label, timings.get(key, 0.0)) for key, label in stages],
        ("worker other (not in a stage: DB, digest)", (finished - started) - in_stages),
        (f"sending (sender woken by the worker + {len(ends)} C-STOREs)", max(ends) - finished),
    ]
    total = max(ends) - acked
    print(
        f"End-to-end, {args.slices}x{args.size}x{args.size} CT via storescu -> dicom-node serve -> storescp; "
        f"{weights}; device {args.device} (inference stages summed over the models)"
    )
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"{'stage':56s} {'seconds':>8s}")
    for label, secs in rows:
        print(f"{label:56s} {secs:8.3f}")
    print(f"{'total: last instance acked -> every result acked':56s} {total:8.3f}   (PACS holds {received} objects)")
    budget = total - rows[0][1] - forward
    verdict = "within" if budget <= BUDGET_S else "OVER"
    label = "everything but completion wait and forward pass*"
    print(f"{label:56s} {budget:8.3f}   {verdict} the {BUDGET_S:.0f} s goal")
    print("* the network's forward calls only (hooks on the network, summed over the sliding windows)")
    if split:
        print(f"\nIn-process split of the worker's stages (same models, same series, {args.device}, warm; medians):")
        for label, secs in split.items():
            unit = "" if label.startswith("(") else " s"
            print(f"  {label:56s} {secs:8.3f}{unit}")


if __name__ == "__main__":
    main()
