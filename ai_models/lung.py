"""Lung segmentation with a pretrained 2D U-Net, run slice by slice over a CT volume, and its clean-up.

The network is knottwill/UNet-Small (MIT; trained on the TCIA LCTSC collection: axial 512x512 slices of
stored values, about HU + 1024, no normalisation; sigmoid output, threshold 0.5). ``LungUNet2D`` has the
source's layers under the source's names, so its published state_dict loads unchanged, and takes a whole
volume: the bundle's ``SimpleInferer`` hands it (B, 1, x, y, z) and it runs the 2D network on batches of
axial slices.

Two things keep that cheap on a CPU without changing what the network sees inside the body:
- each slice is cropped to the bounding box of the body in the volume (air around the patient is not
  lung, and the network is fully convolutional; the crop keeps a margin wider than its receptive field's
  reach into the air, see ``BODY_MARGIN``), and slices without body are skipped;
- convolutions run channels-last in batches of slices (oneDNN's fast layout on x86).
Slices of another matrix size are resized to 512x512 (bilinear) and the probabilities resized back, since
the network only knows the training scale.

``LungSidesd`` turns the binary mask into right lung (1) and left lung (2): the largest connected parts,
split at the anterior junction when the two lungs touch, small islands dropped.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRAINING_MATRIX = 512
STORED_VALUE_OFFSET = 1024.0  # the training slices' stored values are about HU + 1024
BODY_HU = -500.0  # voxels above this are patient (or table), below it air
BODY_MARGIN = 16  # voxels of air kept around the body's box: the U-Net's 3 poolings look 8 pixels out at most
RIGHT_LUNG, LEFT_LUNG = 1, 2


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2, 2, 0), nn.Dropout2d(0.5))  # Dropout2d: the source's, a no-op in eval


class LungUNet2D(nn.Module):
    """knottwill/UNet-Small: three poolings, a 128-channel middle, transposed-convolution upsampling,
    sigmoid output. 4D input (N, 1, rows, columns) in stored values -> probabilities, as the source;
    5D input (B, 1, x, y, z) -> (B, 1, x, y, z) probabilities, slice by slice (see ``forward``)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, slices_per_batch: int = 8) -> None:
        super().__init__()
        self.slices_per_batch = slices_per_batch
        self.conv1 = _conv_block(in_channels, 16)
        self.maxpool1 = _pool()
        self.conv2 = _conv_block(16, 32)
        self.maxpool2 = _pool()
        self.conv3 = _conv_block(32, 64)
        self.maxpool3 = _pool()
        self.middle = _conv_block(64, 128)
        self.upsample3 = nn.ConvTranspose2d(128, 64, 3, 2, 1, 1)
        self.upconv3 = _conv_block(128, 64)
        self.upsample2 = nn.ConvTranspose2d(64, 32, 3, 2, 1, 1)
        self.upconv2 = _conv_block(64, 32)
        self.upsample1 = nn.ConvTranspose2d(32, 16, 3, 2, 1, 1)
        self.upconv1 = _conv_block(32, 16)
        self.final = nn.Conv2d(16, out_channels, 1, 1, 0)

    def forward_slices(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) with H and W multiples of 8 -> (N, 1, H, W) probabilities (the source's forward)."""
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        middle = self.middle(self.maxpool3(conv3))
        up3 = self.upconv3(torch.cat([self.upsample3(middle), conv3], 1))
        up2 = self.upconv2(torch.cat([self.upsample2(up3), conv2], 1))
        up1 = self.upconv1(torch.cat([self.upsample1(up2), conv1], 1))
        return torch.sigmoid(self.final(up1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            return self.forward_slices(x)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"LungUNet2D takes (N, 1, H, W) slices or a (B, 1, x, y, z) volume, not {tuple(x.shape)}")
        return torch.stack([self._volume(v[0]) for v in x]).unsqueeze(1)

    def _volume(self, vol: Tensor) -> Tensor:
        """(x, y, z) stored values -> (x, y, z) probabilities. Axial slices are (rows=y, columns=x) images."""
        out = torch.zeros(vol.shape, dtype=torch.float32, device=vol.device)
        body = vol > (BODY_HU + STORED_VALUE_OFFSET)
        if not bool(body.any()):
            return out
        xs = torch.nonzero(body.any(dim=2).any(dim=1)).flatten()
        ys = torch.nonzero(body.any(dim=2).any(dim=0)).flatten()
        zs = torch.nonzero(body.any(dim=1).any(dim=0)).flatten().tolist()
        nx, ny = vol.shape[0], vol.shape[1]
        x0, x1 = max(0, int(xs[0]) - BODY_MARGIN), min(nx, int(xs[-1]) + 1 + BODY_MARGIN)
        y0, y1 = max(0, int(ys[0]) - BODY_MARGIN), min(ny, int(ys[-1]) + 1 + BODY_MARGIN)
        resize = (nx, ny) != (TRAINING_MATRIX, TRAINING_MATRIX)
        if resize:  # the network's scale: whole slices at 512x512, no crop
            x0, x1, y0, y1 = 0, nx, 0, ny
        for start in range(0, len(zs), self.slices_per_batch):
            idx = zs[start : start + self.slices_per_batch]
            # (x, y, n) -> (n, 1, rows=y, columns=x)
            batch = vol[x0:x1, y0:y1, idx].permute(2, 1, 0).unsqueeze(1).float()
            if resize:
                batch = F.interpolate(batch, size=(TRAINING_MATRIX, TRAINING_MATRIX), mode="bilinear")
            prob = self._padded(batch)
            if resize:
                prob = F.interpolate(prob, size=(ny, nx), mode="bilinear")
            out[x0:x1, y0:y1, idx] = prob[:, 0].permute(2, 1, 0)
        return out

    def _padded(self, batch: Tensor) -> Tensor:
        """Pad rows and columns with air up to multiples of 8 (three poolings), run, crop back."""
        h, w = batch.shape[-2:]
        ph, pw = -h % 8, -w % 8
        if ph or pw:
            batch = F.pad(batch, (0, pw, 0, ph), value=STORED_VALUE_OFFSET - 1000.0)
        batch = batch.contiguous(memory_format=torch.channels_last)
        return self.forward_slices(batch)[..., :h, :w].contiguous()


# ---------------------------------------------------------------------------------------------- clean-up

_MIN_PART = 0.01  # connected parts under this fraction of the largest are noise (airways, bowel gas)
_TWO_LUNGS = 0.15  # a second part at least this fraction of the largest is the other lung
_JUNCTION = 0.35  # a profile minimum under this fraction of its flanks is the junction of touching lungs


def lung_sides(mask: np.ndarray) -> np.ndarray:
    """Binary lung mask (x, y, z) on a grid whose x increases toward the patient's left -> uint8 labels:
    1 right lung, 2 left lung, 0 elsewhere.

    The two largest 26-connected parts are the lungs when the second is at least ``_TWO_LUNGS`` of the first;
    otherwise the lungs touch (anterior junction) or only one is in view: the largest part's profile along x
    (voxels per x) is cut at its deepest minimum in the middle third when that dips below ``_JUNCTION`` of
    the profile on both sides, else the part is one lung, right or left by the side of the image it lies on.
    Parts under ``_MIN_PART`` of the largest are dropped; other parts take the side of the nearer lung."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    out = np.zeros(mask.shape, dtype=np.uint8)
    if count == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    largest = sizes[order[0] - 1]
    keep = [int(p) for p in order if sizes[p - 1] >= _MIN_PART * largest]
    centres_x = {p: float(c[0]) for p, c in zip(keep, ndimage.center_of_mass(mask, labels, keep), strict=True)}
    side_of: dict[int, int] = {}
    split: int | None = None  # the part cut in two at the junction
    if len(keep) >= 2 and sizes[keep[1] - 1] >= _TWO_LUNGS * largest:
        a, b = keep[0], keep[1]
        right, left = (a, b) if centres_x[a] < centres_x[b] else (b, a)
        side_of[right], side_of[left] = RIGHT_LUNG, LEFT_LUNG
        cut = (centres_x[a] + centres_x[b]) / 2.0
    else:
        main = keep[0]
        junction = _junction(np.count_nonzero(labels == main, axis=(1, 2)))
        if junction is None:  # one lung in view: the side of the image it lies on
            cut = (mask.shape[0] - 1) / 2.0
            side_of[main] = RIGHT_LUNG if centres_x[main] < cut else LEFT_LUNG
        else:
            cut, split = junction, main
            part = labels == main
            xs = np.arange(mask.shape[0])[:, None, None]
            out[part & (xs < cut)] = RIGHT_LUNG
            out[part & (xs >= cut)] = LEFT_LUNG
    for p in keep:
        if p in side_of:
            out[labels == p] = side_of[p]
        elif p != split:
            out[labels == p] = RIGHT_LUNG if centres_x[p] < cut else LEFT_LUNG
    return out


def _junction(profile: np.ndarray) -> float | None:
    """The x where two touching lungs meet: the deepest point of the middle third of the occupied range,
    when it is a clear valley (below ``_JUNCTION`` of the maxima on both sides); None when there is none."""
    occupied = np.nonzero(profile)[0]
    if len(occupied) < 6:
        return None
    lo, hi = int(occupied[0]), int(occupied[-1]) + 1
    third = (hi - lo) // 3
    window = profile[lo + third : hi - third].astype(np.float64)
    if window.size == 0:
        return None
    at = lo + third + int(np.argmin(window))
    left_peak, right_peak = float(profile[lo:at].max()), float(profile[at + 1 : hi].max())
    if profile[at] >= _JUNCTION * min(left_peak, right_peak):
        return None
    end = at  # the middle of a flat bottom (a junction several voxels wide)
    while end + 1 < hi - third and profile[end + 1] == profile[at]:
        end += 1
    return (at + end) / 2.0 + 0.5


class LungSidesd:
    """Dictionary transform for a bundle's post-processing: the thresholded prediction (1, x, y, z) on a grid
    oriented LPS (``Orientationd(axcodes="LPS")`` in the pre-processing) -> right (1) / left (2) lung labels."""

    def __init__(self, keys: str | list[str]) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.keys:
            pred = out[key]
            arr = torch.as_tensor(pred).detach().cpu().numpy()
            if arr.ndim != 4 or arr.shape[0] != 1:
                raise ValueError(f"LungSidesd expects a (1, x, y, z) mask, got {arr.shape}")
            sides = torch.from_numpy(lung_sides(arr[0] > 0.5)[None])
            if hasattr(pred, "copy_meta_from"):
                from monai.data import MetaTensor

                sides = MetaTensor(sides, meta=pred.meta, applied_operations=pred.applied_operations)
            out[key] = sides
        return out
