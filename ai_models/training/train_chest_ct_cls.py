"""Train the shipped nodule-presence classifier (bundles/chest_ct_cls) on generated chest CT phantoms.

    python -m ai_models.training.train_chest_ct_cls            # full run: weights, threshold, metrics
    python -m ai_models.training.train_chest_ct_cls --smoke    # a few steps on tiny data, writes nothing

The network and preprocessing are the bundle's own. The network learns on patches of the size the
bundle's ``PatchMaxInferer`` tiles with: positives hold a whole nodule, negatives touch none (drawn from
studies with and without nodules). A study's probability is then the sigmoid of the largest patch logit.
The decision threshold is picked on validation studies (best balanced accuracy), written into
inference.json, and the shipped bundle is scored through ``load_model`` - the node's own path - on
separate held-out studies, half with nodules and half without; AUC and accuracy go into metadata.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai_models.bundle import load_model, make_parser
from ai_models.phantom import Phantom, generate_phantom, to_volume
from ai_models.training.common import eval_seed, train_seed
from ai_models.training.phantom_data import (
    WorkingCase,
    build_pool,
    crop,
    draw_training_phantom,
    smoke_bundle,
    update_json,
)

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "chest_ct_cls"
MINE_EVERY, MINE_POOL, MINE_KEEP, HARD_BANK = 20, 96, 8, 128  # hard-negative mining schedule (iterations, patches)


# ---------------------------------------------------------------------------------------------- metrics


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney: ties count one half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative studies")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def best_threshold(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Threshold with the best balanced accuracy, halfway between neighbouring scores."""
    s = np.sort(np.unique(np.asarray(scores, dtype=np.float64)))
    candidates = np.r_[(s[:-1] + s[1:]) / 2, 0.5] if len(s) > 1 else np.array([0.5])
    y = np.asarray(labels, dtype=bool)
    sc = np.asarray(scores, dtype=np.float64)

    def balanced(t: float) -> float:
        return 0.5 * (np.mean(sc[y] >= t) if y.any() else 1.0) + 0.5 * (np.mean(sc[~y] < t) if (~y).any() else 1.0)

    # ties broken towards 0.5, the untuned sigmoid midpoint
    return float(max(candidates, key=lambda t: (balanced(float(t)), -abs(float(t) - 0.5))))


# ---------------------------------------------------------------------------------------------- patches


def _touches(start: np.ndarray, size: np.ndarray, centre: np.ndarray, radius: np.ndarray) -> bool:
    """Whether the sphere (grown by one voxel) reaches into the patch [start, start + size)."""
    nearest = np.clip(centre, start, start + size - 1)
    return bool(np.sum(((nearest - centre) / (radius + 1.0)) ** 2) <= 1.0)


def sample_patch(
    case: WorkingCase, size: np.ndarray, rng: np.random.Generator, positive: bool
) -> tuple[torch.Tensor, float] | None:
    """A patch holding one whole nodule (positive) or touching none (negative); None if not found."""
    shape = np.asarray(case.image.shape[1:])
    if positive:
        k = int(rng.integers(len(case.centres)))
        c, r = case.centres[k], np.ceil(case.radii[k]) + 1
        lo = np.ceil(c + r - size + 1).astype(int)
        hi = np.floor(c - r).astype(int)
        if np.any(hi < lo):
            return None
        start = np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)])
        return crop(case.image, start, size.tolist()).float(), 1.0
    for _ in range(20):
        start = np.array(
            [int(rng.integers(min(0, s - z), max(0, s - z) + 1)) for s, z in zip(shape, size, strict=True)]
        )
        if not any(_touches(start, size, c, r) for c, r in zip(case.centres, case.radii, strict=True)):
            return crop(case.image, start, size.tolist()).float(), 0.0
    return None


def _mirror(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    for axis in (1, 2, 3):  # nodules and anatomy appear either way round
        if rng.random() < 0.5:
            image = torch.flip(image, dims=[axis])
    return image


def sample_batch(
    pool: Sequence[WorkingCase],
    batch: int,
    size: np.ndarray,
    rng: np.random.Generator,
    hard: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half positives; negatives drawn at random, half of them from the hard-negative bank when it has any."""
    with_nodules = [c for c in pool if len(c.centres)]
    images, labels = [], []
    while len(images) < batch:
        positive = bool(with_nodules) and rng.random() < 0.5
        if not positive and hard and rng.random() < 0.5:
            images.append(_mirror(hard[int(rng.integers(len(hard)))].float(), rng))
            labels.append(0.0)
            continue
        source = with_nodules if positive else pool
        got = sample_patch(source[int(rng.integers(len(source)))], size, rng, positive)
        if got is None:
            continue
        images.append(_mirror(got[0], rng))
        labels.append(got[1])
    return torch.stack(images), torch.tensor(labels, dtype=torch.float32)[:, None]


def mine_hard_negatives(
    network: torch.nn.Module, pool: Sequence[WorkingCase], size: np.ndarray, rng: np.random.Generator, n: int, keep: int
) -> list[torch.Tensor]:
    """The `keep` highest-scoring of `n` random negative patches: what a study without nodules would
    wrongly fire on, since the study score is the maximum over all its patches."""
    candidates = []
    while len(candidates) < n:
        got = sample_patch(pool[int(rng.integers(len(pool)))], size, rng, positive=False)
        if got is not None:
            candidates.append(got[0])
    was_training = network.training
    network.eval()
    with torch.no_grad():
        logits = torch.cat([network(torch.stack(candidates[i : i + 16])) for i in range(0, n, 16)])[:, 0]
    network.train(was_training)
    top = torch.topk(logits, keep).indices.tolist()
    return [candidates[i].half() for i in top]


def train(
    bundle: Path,
    *,
    seed: int,
    n_train: int,
    iterations: int,
    batch: int,
    lr: float,
    max_matrix: int | None,
    max_slices: int | None,
    log: Any = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Trained state dict of network_def, and seconds spent (pool preparation included)."""
    start = time.perf_counter()
    log = log or (lambda _msg: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    parser = make_parser(bundle)
    preprocessing = parser.get_parsed_content("preprocessing")
    size = np.asarray(parser.get_parsed_content("patch_size"), dtype=int)
    pool = build_pool(
        preprocessing,
        (train_seed(seed, i) for i in range(n_train)),
        max_matrix=max_matrix,
        max_slices=max_slices,
        log=log,
    )
    pool = [WorkingCase(c.image.half(), c.centres, c.radii, c.radii_mm) for c in pool]
    network = parser.get_parsed_content("network")
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=iterations, pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    running = None
    hard: list[torch.Tensor] = []
    for it in range(1, iterations + 1):
        if it > iterations // 5 and it % MINE_EVERY == 0:
            hard = (hard + mine_hard_negatives(network, pool, size, rng, MINE_POOL, MINE_KEEP))[-HARD_BANK:]
        images, labels = sample_batch(pool, batch, size, rng, hard)
        loss = loss_fn(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if it % 50 == 0 or it == iterations:
            log(f"iter {it}/{iterations} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
    return {k: v.detach().clone() for k, v in network.state_dict().items()}, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- evaluation


def balanced_phantoms(
    first_index: int, n: int, seed: int, max_matrix: int | None, max_slices: int | None
) -> list[tuple[Phantom, bool]]:
    """n studies, alternately with (1-4 nodules, every size of the convention) and without nodules."""
    out: list[tuple[Phantom, bool]] = []
    for i in range(n):
        s = eval_seed(seed, first_index + i)
        positive = i % 2 == 0
        if not positive:
            out.append((draw_training_phantom(s, max_matrix=max_matrix, max_slices=max_slices, n_nodules=0), False))
            continue
        phantom = None
        for want in range(int(np.random.default_rng(s).integers(1, 5)), 0, -1):
            try:
                phantom = draw_training_phantom(s, max_matrix=max_matrix, max_slices=max_slices, n_nodules=want)
                break
            except ValueError:  # the lungs are too small for that many nodules
                continue
        if phantom is None:  # not even one fits: a differently drawn study
            phantom = generate_phantom(s + 1, n_nodules=1)
        out.append((phantom, True))
    return out


def classify_all(bundle: Path, studies: Sequence[tuple[Phantom, bool]]) -> list[float]:
    model = load_model(bundle, device="cpu")
    return [model.run(to_volume(p)).probability for p, _ in studies]  # type: ignore[union-attr]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-phantoms", type=int, default=60)
    ap.add_argument("--val-phantoms", type=int, default=20)
    ap.add_argument("--test-phantoms", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="a few steps on tiny phantoms into a temporary copy")
    ap.add_argument("--eval-only", action="store_true", help="keep the bundle's weights; pick threshold, score")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    max_matrix = max_slices = None
    bundle = args.bundle
    tmp = None
    if args.smoke:
        tmp = bundle = smoke_bundle(args.bundle, "cls_smoke_")
        max_matrix, max_slices = 128, 48
        args.train_phantoms, args.val_phantoms, args.test_phantoms = 2, 2, 2
        args.iterations, args.batch = 2, 2
    try:
        if not args.eval_only:
            state, seconds = train(
                bundle,
                seed=args.seed,
                n_train=args.train_phantoms,
                iterations=args.iterations,
                batch=args.batch,
                lr=args.lr,
                max_matrix=max_matrix,
                max_slices=max_slices,
                log=lambda msg: print(msg, flush=True),
            )
            torch.save(state, bundle / "models" / "model.pt")
            update_json(bundle / "configs" / "metadata.json", {"eval_metrics": {"training_seconds": round(seconds)}})
            print(f"trained in {seconds:.0f} s", flush=True)
        t0 = time.perf_counter()
        val = balanced_phantoms(0, args.val_phantoms, args.seed, max_matrix, max_slices)
        threshold = round(best_threshold(classify_all(bundle, val), [y for _, y in val]), 4)
        update_json(bundle / "configs" / "inference.json", {"threshold": threshold})
        test = balanced_phantoms(1000, args.test_phantoms, args.seed, max_matrix, max_slices)
        probs = classify_all(bundle, test)
        labels = [y for _, y in test]
        correct = [(p >= threshold) == y for p, y in zip(probs, labels, strict=True)]
        previous = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["eval_metrics"]
        metrics = {
            "auc": round(auc(probs, labels), 4),
            "accuracy_at_threshold": round(float(np.mean(correct)), 4),
            "threshold": threshold,
            "held_out_studies": len(test),
            "held_out_with_nodules": int(sum(labels)),
            "training_seconds": previous.get("training_seconds"),
            "training_device": f"cpu, {args.threads} thread(s)",
        }
        update_json(bundle / "configs" / "metadata.json", {"eval_metrics": metrics})
        print(json.dumps(metrics, indent=2), f"\nevaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
