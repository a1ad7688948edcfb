"""The node's models on real chest CT, against radiologists' outlines and a classical lung mask.

One command; skips cleanly (exit 0, says why) where ``../shared/realdata`` is absent:

    .venv/bin/python bench/bench_real_ct.py [--realdata ../shared/realdata] [--slices 300] [--threads 2]

Runs the models of the shipped ``config.toml`` route, loaded as the worker loads them (``load_model`` with
each model's operating point), on ``ct/LIDC-IDRI-0314-slab`` (64 real slices, read by the node's own volume
reader, FrameOfReferenceUID tolerance included), and, as the peer measured in the same run, the phantom-trained
fixtures that were the shipped models before (``tests/fixtures/phantom_bundles``). It prints, per model set:
- lung Dice against a classical threshold + connected-component lung mask (``classical_lung_mask``);
- the annotated nodule found or not, and the distance of the nearest detection to the readers' consensus
  centroid (consensus: at least 2 of 4 outlines), the false detections at the operating point;
- nodule Dice of the nodule segment against that consensus;
- seconds per stage on this machine's CPU (torch threads as given).
Then the CPU seconds for a ``--slices``-slice 512x512 series (the slab mirrored along z to that length: real
anatomy, the size of a whole chest CT) for the shipped models.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_models.evaluation import classical_lung_mask, consensus_mask, dice, mask_centroid_lps, match_detections  # noqa: E402
from ai_models.types import ClassificationResult, DetectionResult, SegmentationResult, Volume  # noqa: E402

GOALS = {"lung_dice": 0.95, "distance_mm": 10.0, "false_detections": 1, "nodule_dice": 0.6}
PHANTOM = REPO / "tests" / "fixtures" / "phantom_bundles"


@dataclass
class Figures:
    name: str
    lung_dice: float | None = None
    distance_mm: float | None = None
    found: bool | None = None
    false_detections: int | None = None
    detection_scores: list[float] = field(default_factory=list)
    nodule_dice: float | None = None
    present: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def shipped_models() -> list[tuple[str, Path, float | None]]:
    """(name, bundle folder, operating point or None) of the shipped route's models, as config.toml says."""
    cfg = tomllib.loads((REPO / "config.toml").read_text())
    models = {m["name"]: m for m in cfg["models"]}
    out = []
    for name in cfg["routes"][0]["models"]:
        m = models[name]
        point = float(m.get("min_score", -1.0))
        out.append((name, REPO / m["bundle"], point if point >= 0 else None))
    return out


def phantom_models() -> list[tuple[str, Path, float | None]]:
    return [(n, PHANTOM / f"chest_ct_{n}", None) for n in ("seg", "det", "cls")]


def lung_labels(result: SegmentationResult) -> np.ndarray:
    names = {v: k for k, v in result.identity.labels.items()}
    values = [v for n, v in names.items() if "lung" in n.lower() and "nodule" not in n.lower()]
    return np.isin(result.mask, values)


def nodule_labels(result: SegmentationResult) -> np.ndarray | None:
    values = [k for k, v in result.identity.labels.items() if "nodule" in v.lower()]
    return np.isin(result.mask, values) if values else None


def run_models(
    name: str, models: list[tuple[str, Path, float | None]], volume: Volume, annotations: Path, threads: int
) -> Figures:
    import torch

    from ai_models.bundle import load_model

    torch.set_num_threads(threads)
    fig = Figures(name)
    lungs_ref = classical_lung_mask(volume)
    nodule_ref = consensus_mask(annotations, volume, min_readers=2)
    centre = mask_centroid_lps(nodule_ref, volume)
    for model_name, bundle, point in models:
        t0 = time.perf_counter()
        model = load_model(bundle, name=model_name, device="cpu", min_score=point)
        fig.seconds[f"{model_name} load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = model.run(volume)
        fig.seconds[model_name] = time.perf_counter() - t0
        if isinstance(result, SegmentationResult):
            lungs = lung_labels(result)
            if lungs.any():
                fig.lung_dice = dice(lungs, lungs_ref)
            nodules = nodule_labels(result)
            if nodules is not None:
                fig.nodule_dice = dice(nodules, nodule_ref)
        elif isinstance(result, DetectionResult):
            match = match_detections(result.detections, volume, [centre], radius_mm=GOALS["distance_mm"])
            fig.found = match.found[0]
            fig.distance_mm = match.distances_mm[0]
            fig.false_detections = match.false_detections
            fig.detection_scores = [round(s, 3) for s in match.scores]
        elif isinstance(result, ClassificationResult):
            fig.present = f"{'present' if result.present else 'absent'} (p={result.probability:.3f})"
    return fig


def mirrored(volume: Volume, slices: int) -> Volume:
    """The volume extended to ``slices`` slices by mirroring it along z (real anatomy, a whole CT's size)."""
    reps = []
    k = 0
    while sum(len(r) for r in reps) < slices:
        reps.append(volume.array if k % 2 == 0 else volume.array[::-1])
        k += 1
    array = np.ascontiguousarray(np.concatenate(reps)[:slices])
    uids = tuple(f"{volume.sop_instance_uids[0]}.{i}" for i in range(slices))
    return replace(volume, array=array, sop_instance_uids=uids)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realdata", type=Path, default=REPO.parent / "shared" / "realdata")
    parser.add_argument("--slices", type=int, default=300, help="series length for the whole-CT timing (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip the phantom-trained fixtures")
    args = parser.parse_args()
    slab = args.realdata / "ct" / "LIDC-IDRI-0314-slab"
    annotations = args.realdata / "ct" / "LIDC-IDRI-0314_nodule_annotations.json"
    if not slab.is_dir() or not annotations.is_file():
        print(f"skipped: {slab} or {annotations} is absent (the real data lives in ../shared/realdata)")
        return 0
    from ai_models.volume import read_series

    t0 = time.perf_counter()
    volume, _ = read_series(sorted(slab.glob("*.dcm")))
    load_s = time.perf_counter() - t0
    print(
        f"LIDC-IDRI-0314 slab: {volume.array.shape[0]} slices of {volume.array.shape[1]}x{volume.array.shape[2]}, "
        f"read in {load_s:.2f} s; {len(volume.warnings)} reader warning(s): {'; '.join(volume.warnings)[:200]}"
    )
    sets = [run_models("dicom-node (shipped)", shipped_models(), volume, annotations, args.threads)]
    if not args.no_peer:
        sets.append(run_models("phantom fixtures (before)", phantom_models(), volume, annotations, args.threads))

    rows = [
        ("lung Dice vs classical mask", "lung_dice", f">= {GOALS['lung_dice']}"),
        ("nodule found (within 10 mm)", "found", "yes"),
        ("distance to consensus centroid, mm", "distance_mm", f"<= {GOALS['distance_mm']}"),
        ("false detections at the operating point", "false_detections", f"<= {GOALS['false_detections']}"),
        ("detection scores", "detection_scores", ""),
        ("nodule Dice vs 2-of-4 consensus", "nodule_dice", f">= {GOALS['nodule_dice']}"),
        ("nodule present", "present", "present"),
    ]
    print()
    print("| measure | " + " | ".join(s.name for s in sets) + " | goal |")
    print("|---|" + "---|" * len(sets) + "---|")
    for label, key, goal in rows:
        print(f"| {label} | " + " | ".join(_fmt(getattr(s, key)) for s in sets) + f" | {goal} |")
    for s in sets:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in s.seconds.items())
        print(f"\nseconds ({s.name}, {args.threads} threads, 64 slices): {stages}")

    if args.slices:
        big = mirrored(volume, args.slices)
        timing = run_models("shipped", shipped_models(), big, annotations, args.threads).seconds
        inference = {k: v for k, v in timing.items() if not k.endswith(" load")}
        print(
            f"\n{args.slices} x 512x512 slices (the slab mirrored along z), {args.threads} threads: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in inference.items())
            + f"; all models {sum(inference.values()):.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
