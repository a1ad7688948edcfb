"""The shipped models on the committed real CT slices, on CUDA and on the CPU: seconds and agreement.

One command, for a machine with a GPU (``bench/gpu_check.sh`` runs it there); ``--devices cpu`` runs the
CPU half alone:

    python3 bench/gpu_real_ct.py [--devices "cuda cpu"] [--cpu-threads 16] [--slices 300] [--json out.json]

Runs the models of the shipped ``config.toml`` route, loaded as the worker loads them (``load_model`` with
each model's operating point), on ``tests/data/lidc_idri_0314`` (40 real 512x512 slices, JPEG 2000, read by
the node's own volume reader). Per device and model: load seconds and warm seconds (run twice, the second
timed). Between the first device (CUDA) and each other one: Dice per segmentation label, detection counts
and the distance from each detection's centre to the nearest one of the other device, the classification
probability difference. Against the readers, per device: lung Dice against a classical threshold +
connected-component mask, the annotated nodule found or not (within 10 mm of the 2-of-4 readers' consensus
centroid), its distance and the false detections at the operating point, nodule Dice against that consensus.
Then warm seconds per model on the first device for a ``--slices``-slice series (the 40 slices mirrored
along z: real anatomy, a whole chest CT's size). A markdown table comes last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_models.evaluation import (  # noqa: E402  (the repo root goes on sys.path first)
    classical_lung_mask,
    consensus_mask,
    detection_centre_lps,
    dice,
    mask_centroid_lps,
    match_detections,
)
from ai_models.types import (  # noqa: E402
    ClassificationResult,
    DetectionResult,
    ModelResult,
    SegmentationResult,
    Volume,
)
from bench.bench_real_ct import lung_labels, mirrored, nodule_labels, shipped_models  # noqa: E402

SLICES = REPO / "tests" / "data" / "lidc_idri_0314"
RADIUS_MM = 10.0


@dataclass
class Run:
    """One model on one device: its result on the 40 slices and its seconds."""

    model: str
    device: str
    result: ModelResult
    load_s: float
    warm_s: float


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (measure, model, value)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, measure: str, model: str, value: Any) -> None:
        self.rows.append((measure, model, _fmt(value)))
        self.figures[f"{model} | {measure}"] = value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "none"
    return str(value)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_models(device: str, volume: Volume, warm_runs: int = 2) -> tuple[list[Run], float]:
    """Every shipped model on ``device``: load, then ``warm_runs`` runs, the last one timed, each computing
    its own nodule map (the shared-map cache emptied first, so each model's seconds are its whole cost);
    and the seconds of the route as the worker runs it (models in order, the nodule map computed once)."""
    from ai_models.bundle import load_model
    from ai_models.nodule_map import MAP_CACHE

    runs, loaded = [], []
    for name, bundle, point in shipped_models():
        t0 = time.perf_counter()
        model = load_model(bundle, name=name, device=device, min_score=point)
        load_s = time.perf_counter() - t0
        result, warm_s = None, 0.0
        for _ in range(warm_runs):
            MAP_CACHE.clear()
            _sync(device)
            t0 = time.perf_counter()
            result = model.run(volume)
            _sync(device)
            warm_s = time.perf_counter() - t0
        runs.append(Run(name, device, result, load_s, warm_s))
        loaded.append(model)
        print(f"{device}: {name} loaded in {load_s:.2f} s, warm run {warm_s:.3f} s", flush=True)
    MAP_CACHE.clear()
    _sync(device)
    t0 = time.perf_counter()
    for model in loaded:
        model.run(volume)
    _sync(device)
    route_s = time.perf_counter() - t0
    MAP_CACHE.clear()
    print(f"{device}: the route (models in order, shared nodule map) {route_s:.3f} s", flush=True)
    return runs, route_s


def agreement(report: Report, ref: Run, other: Run, volume: Volume) -> None:
    """How far ``other`` (e.g. the CPU) is from ``ref`` (e.g. CUDA) on the same model and series."""
    tag = f"{other.device} vs {ref.device}"
    a, b = ref.result, other.result
    if isinstance(a, SegmentationResult) and isinstance(b, SegmentationResult):
        labels = sorted(set(a.identity.labels) | set(int(v) for v in np.unique(b.mask) if v))
        for label in labels:
            name = a.identity.labels.get(label, str(label))
            report.add(f"{tag}: Dice {name}", ref.model, dice(a.mask == label, b.mask == label))
        report.add(f"{tag}: voxels differing", ref.model, int(np.count_nonzero(a.mask != b.mask)))
    elif isinstance(a, DetectionResult) and isinstance(b, DetectionResult):
        report.add(f"{tag}: detections", ref.model, f"{len(a.detections)} vs {len(b.detections)}")
        ca = np.array([detection_centre_lps(d, volume) for d in a.detections]).reshape(-1, 3)
        cb = np.array([detection_centre_lps(d, volume) for d in b.detections]).reshape(-1, 3)
        if len(ca) and len(cb):
            dist = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2)
            report.add(f"{tag}: centre distance to nearest, mm (max)", ref.model, float(dist.min(axis=1).max()))
            scores_a = sorted((d.score for d in a.detections), reverse=True)
            scores_b = sorted((d.score for d in b.detections), reverse=True)
            n = min(len(scores_a), len(scores_b))
            diff = max(abs(x - y) for x, y in zip(scores_a[:n], scores_b[:n], strict=True))
            report.add(f"{tag}: score difference, ranked (max)", ref.model, float(diff))
    elif isinstance(a, ClassificationResult) and isinstance(b, ClassificationResult):
        report.add(f"{tag}: probability difference", ref.model, abs(a.probability - b.probability))


def against_readers(report: Report, run: Run, volume: Volume, lungs_ref: np.ndarray, nodule_ref: np.ndarray) -> None:
    """The goals bench_real_ct.py measures, for one model on one device."""
    tag, result = run.device, run.result
    if isinstance(result, SegmentationResult):
        lungs = lung_labels(result)
        if lungs.any():
            report.add(f"{tag}: lung Dice vs classical mask", run.model, dice(lungs, lungs_ref))
        nodules = nodule_labels(result)
        if nodules is not None:
            report.add(f"{tag}: nodule Dice vs 2-of-4 consensus", run.model, dice(nodules, nodule_ref))
    elif isinstance(result, DetectionResult):
        centre = mask_centroid_lps(nodule_ref, volume)
        match = match_detections(result.detections, volume, [centre], radius_mm=RADIUS_MM)
        report.add(f"{tag}: nodule found (within {RADIUS_MM:.0f} mm)", run.model, match.found[0])
        report.add(f"{tag}: distance to consensus centroid, mm", run.model, match.distances_mm[0])
        report.add(f"{tag}: false detections", run.model, match.false_detections)
        report.add(f"{tag}: detection scores", run.model, [round(s, 3) for s in match.scores])
    elif isinstance(result, ClassificationResult):
        report.add(f"{tag}: probability (present)", run.model, f"{result.probability:.3f} ({result.present})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cuda cpu", help="devices, the first the reference (default: cuda cpu)")
    parser.add_argument("--cpu-threads", type=int, default=16, help="torch threads on the CPU")
    parser.add_argument("--slices", type=int, default=300, help="mirrored series length timed on the first device")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import torch

    from ai_models.volume import load_series

    devices = args.devices.split()
    torch.set_num_threads(args.cpu_threads)
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
        f"{torch.get_num_threads()} CPU threads",
        flush=True,
    )
    t0 = time.perf_counter()
    volume = load_series(sorted(SLICES.glob("*.dcm")))
    print(
        f"{SLICES.name}: {volume.array.shape} read in {time.perf_counter() - t0:.2f} s; "
        f"{len(volume.warnings)} reader warning(s)",
        flush=True,
    )
    lungs_ref = classical_lung_mask(volume)
    nodule_ref = consensus_mask(SLICES / "nodule_annotations.json", volume, min_readers=2)

    report = Report()
    by_device, route_s = {}, {}
    for device in devices:
        by_device[device], route_s[device] = run_models(device, volume)
    ref_runs = by_device[devices[0]]
    for device in devices:
        report.add(f"{device}: route warm s ({volume.array.shape[0]} slices, shared map)", "(all)", route_s[device])
        for run in by_device[device]:
            report.add(f"{device}: load s", run.model, run.load_s)
            report.add(f"{device}: warm run s ({volume.array.shape[0]} slices)", run.model, run.warm_s)
            against_readers(report, run, volume, lungs_ref, nodule_ref)
    for device in devices[1:]:
        for ref, other in zip(ref_runs, by_device[device], strict=True):
            agreement(report, ref, other, volume)
    if args.slices:
        big = mirrored(volume, args.slices)
        big_runs, big_route_s = run_models(devices[0], big)
        for run in big_runs:
            report.add(f"{devices[0]}: warm run s ({args.slices} slices, mirrored)", run.model, run.warm_s)
        report.add(f"{devices[0]}: route warm s ({args.slices} slices, mirrored, shared map)", "(all)", big_route_s)

    print("\n| model | measure | value |\n|---|---|---|")
    for measure, model, value in sorted(report.rows, key=lambda r: r[1]):
        print(f"| {model} | {measure} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(report.figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
