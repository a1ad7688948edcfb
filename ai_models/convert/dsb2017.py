"""Convert the DSB 2017 nodule identifier's Keras 1 HDF5 weights into the shipped PyTorch state_dict.

    python -m ai_models.convert.dsb2017 WEIGHTS.h5 [--bundles DIR ...] [--reference FILE.npz]

Reads the HDF5 once (h5py, from the optional ``convert`` extra; never needed at run time), flips every
kernel along z, y and x (Keras 1 / Theano ``conv3d`` is a true convolution, PyTorch's a cross-correlation:
see ``ai_models.nodule_net``), and writes ``models/model.pt`` into each bundle folder. It also writes a small
reference for the unit test: a fixed synthetic slab and the probability map that ``keras_forward_numpy``, a
plain numpy implementation of the Keras layers working on the HDF5 arrays as stored (true convolution,
no PyTorch), gives for it; the test checks the shipped state_dict in ``DSB2017NoduleNet`` reproduces it.
"""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path

import numpy as np
import torch

from ai_models.nodule_net import KERAS_LAYERS, SLAB

AI_MODELS = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLES = tuple(
    AI_MODELS / "bundles" / n for n in ("dsb2017_nodule_det", "dsb2017_nodule_seg", "dsb2017_nodule_cls")
)
DEFAULT_REFERENCE = AI_MODELS.parent / "tests" / "unit" / "data" / "dsb2017_reference.npz"
REFERENCE_SHAPE = (1, 1, SLAB, 24, 28)  # N, C, z, y, x: H and W multiples of 4, not square (catches a y/x swap)


def read_keras_convolutions(h5_path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of each Convolution3D layer, in the model's layer order (the file's ``layer_names``); W as stored,
    Theano layout (out, in, kz, ky, kx)."""
    import h5py  # the optional "convert" extra

    with h5py.File(h5_path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        layers = []
        for name in names:
            group = f[name]
            weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs["weight_names"]]
            if not weight_names:
                continue
            if len(weight_names) != 2 or not name.startswith("convolution3d"):
                raise ValueError(f"unexpected layer {name} with weights {weight_names}")
            w, b = (np.asarray(group[n], dtype=np.float32) for n in weight_names)
            layers.append((w, b))
    if len(layers) != len(KERAS_LAYERS):
        raise ValueError(f"{h5_path}: {len(layers)} convolution layers, the network has {len(KERAS_LAYERS)}")
    return layers


def to_state_dict(layers: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """PyTorch state_dict for DSB2017NoduleNet: kernels flipped along z, y, x (convolution -> correlation)."""
    state: dict[str, torch.Tensor] = {}
    for name, (w, b) in zip(KERAS_LAYERS, layers, strict=True):
        state[f"{name}.weight"] = torch.from_numpy(w[:, :, ::-1, ::-1, ::-1].copy())
        state[f"{name}.bias"] = torch.from_numpy(b.copy())
    return state


# ---------------------------------------------------------------------------------------------- numpy reference


def _conv_same(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Theano conv3d, border_mode 'half' (Keras 'same'), filter_flip=True, straight from the definition of a
    convolution: out[o, p] = b[o] + sum_{i, k} w[o, i, k] * x[i, p + c - k], zero outside x (c = kernel centre)."""
    c_out, c_in, kz, ky, kx = w.shape
    _, nz, ny, nx = x.shape
    cz, cy, cx = kz // 2, ky // 2, kx // 2
    padded = np.zeros((c_in, nz + 2 * cz, ny + 2 * cy, nx + 2 * cx), dtype=np.float64)
    padded[:, cz : cz + nz, cy : cy + ny, cx : cx + nx] = x
    out = np.zeros((c_out, nz, ny, nx), dtype=np.float64)
    for dz, dy, dx in product(range(kz), range(ky), range(kx)):
        # x[p + c - k] sits at padded[p + 2c - k]
        window = padded[
            :, 2 * cz - dz : 2 * cz - dz + nz, 2 * cy - dy : 2 * cy - dy + ny, 2 * cx - dx : 2 * cx - dx + nx
        ]
        out += np.einsum("oi,izyx->ozyx", w[:, :, dz, dy, dx].astype(np.float64), window)
    return out + b.astype(np.float64)[:, None, None, None]


def _pool(x: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    c, nz, ny, nx = x.shape
    sz, sy, sx = size
    x = x[:, : nz // sz * sz, : ny // sy * sy, : nx // sx * sx]
    return x.reshape(c, nz // sz, sz, ny // sy, sy, nx // sx, sx).max(axis=(2, 4, 6))


def _up(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, axis=1).repeat(2, axis=2).repeat(2, axis=3)


def keras_forward_numpy(layers: list[tuple[np.ndarray, np.ndarray]], slab: np.ndarray) -> np.ndarray:
    """The Keras model on one (1, 8, H, W) slab, float64 numpy, weights as stored in the HDF5 -> (H, W)."""
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    it = iter(layers)

    def conv(x: np.ndarray) -> np.ndarray:
        return relu(_conv_same(x, *next(it)))

    c1 = conv(conv(slab))
    c2 = conv(conv(_pool(c1, (2, 2, 2))))
    c4 = conv(conv(_pool(c2, (2, 2, 2))))
    c6 = conv(conv(np.concatenate([_up(c4), c2])))
    c7 = conv(conv(np.concatenate([_up(c6), c1])))
    z = _pool(c7, (2, 1, 1))
    z = _pool(conv(conv(z)), (2, 1, 1))
    z = _pool(conv(conv(z)), (2, 1, 1))
    w, b = next(it)
    logits = _conv_same(z, w, b)
    return (1.0 / (1.0 + np.exp(-logits)))[0, 0]


def reference_input() -> np.ndarray:
    """A fixed slab in the network's value range: lung-like background with noise, a vessel-like rod and a
    solid sphere (a nodule of about 10 mm at 2 mm voxels), so the reference output is not flat."""
    rng = np.random.default_rng(20170412)
    _, _, nz, ny, nx = REFERENCE_SHAPE
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    hu = np.full((nz, ny, nx), -850.0) + rng.normal(0.0, 40.0, (nz, ny, nx))
    hu[(z - 3.5) ** 2 + (y - 12) ** 2 + (x - 9) ** 2 <= 2.6**2] = 30.0
    hu[((y - 5) ** 2 + (x - 21) ** 2) <= 1.2**2] = 40.0
    scaled = (np.clip(hu, -1000.0, 400.0) + 1000.0) / 1400.0 - 0.028
    return scaled.astype(np.float32).reshape(REFERENCE_SHAPE)


def write_reference(layers: list[tuple[np.ndarray, np.ndarray]], path: Path) -> np.ndarray:
    slab = reference_input()
    out = keras_forward_numpy(layers, slab[0].astype(np.float64)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, input=slab, output=out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="d8_2x2x2_best_weights.h5")
    parser.add_argument("--bundles", type=Path, nargs="*", default=list(DEFAULT_BUNDLES))
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    args = parser.parse_args(argv)
    layers = read_keras_convolutions(args.weights)
    state = to_state_dict(layers)
    for bundle in args.bundles:
        target = bundle / "models" / "model.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target)
        print(f"wrote {target}")
    out = write_reference(layers, args.reference)
    print(f"wrote {args.reference} (output range {out.min():.4f} .. {out.max():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
