"""Copy knottwill/UNet-Small's published weights into the lung_seg bundle as a CPU state_dict.

The source file was saved from Apple's ``mps`` device; the bundle's copy is the same tensors on the CPU, so
``torch.load(map_location="cpu", weights_only=True)`` reads it anywhere. Keys are the source's: the
network in ``ai_models.lung.LungUNet2D`` keeps its layer names.

    python -m ai_models.convert.lung_unet_small ../shared/realdata/weights/knottwill_UNet-Small/UNet_wdk24.pt
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from ai_models.lung import LungUNet2D

SOURCE_SHA256 = "2d9356d7a7766aecfa02b7d40ecebc4daba0b151d3705e2b77b1a389e7588b07"
BUNDLE_WEIGHTS = Path(__file__).resolve().parents[1] / "bundles" / "lung_seg" / "models" / "model.pt"


def convert(source: Path, out: Path = BUNDLE_WEIGHTS) -> dict[str, torch.Tensor]:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{source}: sha256 {digest} is not the published UNet_wdk24.pt ({SOURCE_SHA256})")
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    LungUNet2D().load_state_dict(state, strict=True)  # every key fits the re-written network
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="UNet_wdk24.pt from knottwill/UNet-Small")
    parser.add_argument("--out", type=Path, default=BUNDLE_WEIGHTS)
    args = parser.parse_args()
    state = convert(args.source, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values())} values")


if __name__ == "__main__":
    main()
