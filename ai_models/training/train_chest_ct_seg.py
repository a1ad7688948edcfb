"""Train the shipped chest CT lung/nodule segmentation bundle (ai_models/bundles/chest_ct_seg) on phantoms.

Usage: ``python -m ai_models.training.train_chest_ct_seg --out ai_models/bundles/chest_ct_seg`` retrains
the shipped weights (about 15-20 minutes on 2 CPU cores, one torch thread; the run is seeded and
reproducible on the same machine and library versions). ``--out`` is a bundle folder: its
configs/inference.json defines the network and the preprocessing the training data go through (a new
folder gets a copy of the shipped configs), and the script writes models/model.pt and the held-out
results into configs/metadata.json (``eval_metrics``). Training cases are generated phantoms
(``ai_models.phantom``, seeds ``seed * 1e6 + i``) cut to a slab of slices around the lungs, run through
the bundle's own preprocessing, and sampled as patches (half of them centred on nodules). Evaluation uses
``--eval-cases`` held-out phantoms (seeds from 2e9, never used for training) at full size, run through
``LoadedModel.run`` exactly as the node runs them, and scores Dice on the source grid. ``--steps``,
``--train-cases``, ``--patch`` and ``--case-shape`` make quick runs possible (the CI smoke test uses them).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai_models.bundle import load_model, make_parser
from ai_models.phantom import Phantom, generate_phantom, to_volume
from ai_models.training.common import dice, eval_seed, prepare_case, train_seed

SHIPPED = Path(__file__).resolve().parents[1] / "bundles" / "chest_ct_seg"
log = logging.getLogger("train_chest_ct_seg")


@dataclass(frozen=True)
class Options:
    out: Path
    steps: int
    seed: int
    eval_cases: int
    train_cases: int
    crops_per_case: int
    patch: int
    batch: int
    lr: float
    slab_mm: float
    case_shape: tuple[int, int, int] | None
    threads: int
    eval_only: bool


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=SHIPPED, help="bundle folder to train (configs are read here)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-cases", type=int, default=6)
    p.add_argument("--train-cases", type=int, default=48)
    p.add_argument("--crops-per-case", type=int, default=12)
    p.add_argument("--patch", type=int, default=64, help="training patch edge, working-grid voxels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--slab-mm", type=float, default=120.0, help="slab of source slices per training case")
    p.add_argument(
        "--case-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="fixed phantom shape (small for smoke tests); default: drawn per the convention",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="keep models/model.pt, re-run the held-out evaluation (e.g. after an inferer change)",
    )
    a = p.parse_args(argv)
    return Options(
        out=a.out,
        steps=a.steps,
        seed=a.seed,
        eval_cases=a.eval_cases,
        train_cases=a.train_cases,
        crops_per_case=a.crops_per_case,
        patch=a.patch,
        batch=a.batch,
        lr=a.lr,
        slab_mm=a.slab_mm,
        case_shape=tuple(a.case_shape) if a.case_shape else None,
        threads=a.threads,
        eval_only=a.eval_only,
    )


def _ensure_bundle(out: Path) -> None:
    """A fresh --out gets the shipped configs; an existing bundle keeps its own."""
    if (out / "configs" / "inference.json").is_file():
        (out / "models").mkdir(exist_ok=True)
        return
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    for name in ("inference.json", "metadata.json"):
        shutil.copy(SHIPPED / "configs" / name, out / "configs" / name)


def _phantom(seed: int, rng: np.random.Generator, shape: tuple[int, int, int] | None, nodules: int | None) -> Phantom:
    try:
        return generate_phantom(seed, shape=shape, n_nodules=nodules)
    except ValueError:  # those nodules do not fit this phantom's lungs: take what the convention draws
        return generate_phantom(seed, shape=shape)


def _slab(ph: Phantom, rng: np.random.Generator, slab_mm: float) -> Phantom:
    """A run of consecutive slices (a shorter series), through a nodule whenever the phantom has one."""
    nz = ph.hu.shape[0]
    length = min(nz, max(8, int(np.ceil(slab_mm / ph.spacing[0]))))
    if length == nz:
        return ph
    nodule_z = np.flatnonzero((ph.labels == 2).any(axis=(1, 2)))
    r = rng.random()
    if nodule_z.size and r < 0.9:
        centre = int(rng.choice(nodule_z))
    elif r < 0.95:
        lung_z = np.flatnonzero((ph.labels == 1).any(axis=(1, 2)))
        centre = int(rng.choice(lung_z)) if lung_z.size else nz // 2
    else:
        centre = int(rng.integers(nz))
    z0 = int(np.clip(centre - length // 2 + rng.integers(-length // 4, length // 4 + 1), 0, nz - length))
    return Phantom(hu=ph.hu[z0 : z0 + length], labels=ph.labels[z0 : z0 + length], spacing=ph.spacing, nodules=())


def _crop(image: torch.Tensor, label: torch.Tensor, centre: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A size^3 crop around centre, padded with the background (0 after scaling: air) at the edges."""
    out_img = torch.zeros((1, size, size, size), dtype=torch.float16)
    out_lab = torch.zeros((size, size, size), dtype=torch.uint8)
    shape = np.array(label.shape)
    lo = centre - size // 2
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, shape)
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    s = tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    d = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))
    out_img[(slice(None), *d)] = image[(slice(None), *s)].half()
    out_lab[d] = label[s]
    return out_img, out_lab


def build_pool(opts: Options, preprocessing: Any, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches (a little larger than the training patch, for random shifts) from generated cases."""
    store = opts.patch + 8
    images, labels = [], []
    for i in range(opts.train_cases):
        nodules = int(rng.integers(1, 5)) if rng.random() < 0.85 else 0
        ph = _slab(_phantom(train_seed(opts.seed, i), rng, opts.case_shape, nodules), rng, opts.slab_mm)
        case = prepare_case(preprocessing, ph)
        lab = case.label
        nodule_vox = torch.nonzero(lab == 2).numpy()
        lung_vox = torch.nonzero(lab == 1).numpy()
        for _ in range(opts.crops_per_case):
            r = rng.random()
            if nodule_vox.size and r < 0.6:
                centre = nodule_vox[int(rng.integers(len(nodule_vox)))]
            elif lung_vox.size and r < 0.8:
                centre = lung_vox[int(rng.integers(len(lung_vox)))]
            else:
                centre = np.array([int(rng.integers(n)) for n in lab.shape])
            img, lb = _crop(case.image, lab, centre + rng.integers(-8, 9, size=3), store)
            images.append(img)
            labels.append(lb)
    return torch.stack(images), torch.stack(labels)


def train(
    opts: Options, network: torch.nn.Module, pool: tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator
) -> list[float]:
    from monai.losses import DiceCELoss

    images, labels = pool
    # nodules are ~0.1 % of a patch: Dice without the background and a heavier CE weight keep the
    # network from settling on "never nodule"
    loss_fn = DiceCELoss(
        to_onehot_y=True, softmax=True, batch=True, include_background=False, weight=torch.tensor([1.0, 1.0, 8.0])
    )
    optimiser = torch.optim.AdamW(network.parameters(), lr=opts.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=opts.lr, total_steps=max(opts.steps, 1), pct_start=0.1
    )
    store, size = images.shape[-1], opts.patch
    network.train()
    losses: list[float] = []
    hits = totals = 0
    for step in range(opts.steps):
        idx = rng.integers(len(images), size=opts.batch)
        xs, ys = [], []
        for j in idx:
            o = rng.integers(0, store - size + 1, size=3)
            win = (slice(o[0], o[0] + size), slice(o[1], o[1] + size), slice(o[2], o[2] + size))
            x = images[j][(slice(None), *win)].float()
            y = labels[j][win].long()
            if rng.random() < 0.5:  # left-right mirror: lungs and nodules appear on both sides
                x, y = x.flip(1), y.flip(0)
            xs.append(x)
            ys.append(y[None])
        x, y = torch.stack(xs), torch.stack(ys)
        logits = network(x)
        loss = loss_fn(logits, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            pred = logits.argmax(1)
            hits += int(((pred == 2) & (y[:, 0] == 2)).sum())
            totals += int((pred == 2).sum()) + int((y[:, 0] == 2).sum())
        if step % 100 == 0 or step == opts.steps - 1:
            log.info(
                "step %d/%d loss %.4f (mean of last 100: %.4f), patch nodule dice %.3f",
                step,
                opts.steps,
                losses[-1],
                float(np.mean(losses[-100:])),
                2 * hits / max(totals, 1),
            )
            hits = totals = 0
    network.eval()
    return losses


def evaluate(bundle: Path, opts: Options) -> dict[str, Any]:
    """Held-out phantoms through LoadedModel.run; Dice on the source grid."""
    model = load_model(bundle, device="cpu")
    lung, nodule, seconds, fp_free, without = [], [], [], 0, 0
    for i in range(opts.eval_cases):
        ph = _phantom(eval_seed(opts.seed, i), np.random.default_rng(i), opts.case_shape, 1 + i % 4)
        start = time.perf_counter()
        mask = model.run(to_volume(ph)).mask
        seconds.append(time.perf_counter() - start)
        d_lung = dice(mask == 1, ph.labels == 1)
        d_nod = dice(mask == 2, ph.labels == 2)
        if d_lung is not None:
            lung.append(d_lung)
        if ph.nodules and d_nod is not None:
            nodule.append(d_nod)
        elif not ph.nodules:
            without += 1
            fp_free += int(not (mask == 2).any())
        log.info(
            "eval %d shape %s spacing %s nodules %s: dice lung %.4f nodule %s, %.1f s",
            i,
            ph.hu.shape,
            tuple(round(s, 3) for s in ph.spacing),
            [round(n.radius_mm, 1) for n in ph.nodules],
            d_lung or 0.0,
            f"{d_nod:.4f}" if d_nod is not None else "n/a",
            seconds[-1],
        )
    return {
        "mean_dice_lung": round(float(np.mean(lung)), 4) if lung else None,
        "mean_dice_nodule": round(float(np.mean(nodule)), 4) if nodule else None,
        "min_dice_nodule": round(float(np.min(nodule)), 4) if nodule else None,
        "eval_cases": opts.eval_cases,
        "cases_without_nodules": without,
        "nodule_free_cases_without_false_positives": fp_free,
        "eval_seeds": f"{eval_seed(opts.seed, 0)}..{eval_seed(opts.seed, max(opts.eval_cases - 1, 0))}",
        "eval_grid": "source (DICOM) grid, via LoadedModel.run",
        "mean_inference_seconds_cpu": round(float(np.mean(seconds)), 2) if seconds else None,
    }


def _train_and_evaluate(opts: Options, rng: np.random.Generator) -> dict[str, Any]:
    started = time.perf_counter()
    parser = make_parser(opts.out, device="cpu")
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network_def")
    pool = build_pool(opts, preprocessing, rng)
    log.info("pool: %d patches from %d cases in %.0f s", len(pool[0]), opts.train_cases, time.perf_counter() - started)
    losses = train(opts, network, pool, rng)
    torch.save(network.state_dict(), opts.out / "models" / "model.pt")
    train_seconds = time.perf_counter() - started
    log.info("trained %d steps in %.0f s", opts.steps, train_seconds)
    metrics = evaluate(opts.out, opts) if opts.eval_cases > 0 else {}
    metrics.update(
        {
            "train_seconds": round(train_seconds, 1),
            "train_steps": opts.steps,
            "train_cases": opts.train_cases,
            "train_seed": opts.seed,
            "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        }
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    from monai.utils import set_determinism

    set_determinism(seed=opts.seed)
    _ensure_bundle(opts.out)
    meta_path = opts.out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if opts.eval_only:
        previous = meta.get("eval_metrics") or {}
        metrics = evaluate(opts.out, opts)
        metrics.update({k: v for k, v in previous.items() if k.startswith("train") or k == "final_loss"})
    else:
        metrics = _train_and_evaluate(opts, rng)
    meta["eval_metrics"] = metrics
    meta_path.write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    log.info("eval_metrics %s", json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
