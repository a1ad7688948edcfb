"""Lung segmentation with a pretrained 2D U-Net, run slice by slice over a CT volume, and its clean-up.

The network is knottwill/UNet-Small (MIT; trained on the TCIA LCTSC collection: axial 512x512 slices of
stored values, about HU + 1024, no normalisation; sigmoid output, threshold 0.5). ``LungUNet2D`` has the
source's layers under the source's names, so its published state_dict loads unchanged, and takes a whole
volume: the bundle's ``SimpleInferer`` hands it (B, 1, x, y, z) and it runs the 2D network on batches of
axial slices.

Three things keep that cheap on a CPU (300 slices in about a minute on two cores) without changing the
mask beyond a few boundary voxels (Dice 0.998 against whole slices on the LIDC slab):
- only slices with air enclosed by the body can hold lung: the others are skipped (probability 0), and each
  batch runs on the box around that air plus ``LUNG_MARGIN`` pixels of tissue, not the whole 512x512 slice;
- each BatchNorm is folded into its convolution for inference (the same function to float rounding);
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
LUNG_MARGIN = 32  # pixels of tissue kept around the enclosed air: context for the lung's border
MIN_ENCLOSED_AIR_MM2 = 50.0  # less enclosed air than this on a slice: no lung there
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
        """(x, y, z) stored values -> (x, y, z) probabilities. Axial slices are (rows=y, columns=x) images.
        Only slices with air enclosed by the body can hold lung; each batch of them runs on the box around
        that air plus ``LUNG_MARGIN`` of surrounding tissue (the whole slice when it must be resized)."""
        out = torch.zeros(vol.shape, dtype=torch.float32, device=vol.device)
        nx, ny = vol.shape[0], vol.shape[1]
        resize = (nx, ny) != (TRAINING_MATRIX, TRAINING_MATRIX)
        # on every second pixel (plenty for a box, four times cheaper), as (z, x, y) planes
        body = (vol[::2, ::2].detach().cpu().numpy() > (BODY_HU + STORED_VALUE_OFFSET)).transpose(2, 0, 1)
        boxes = [
            None if b is None else (2 * b[0], 2 * b[1] + 1, 2 * b[2], 2 * b[3] + 1)
            for b in enclosed_air_boxes(body, MIN_ENCLOSED_AIR_MM2 / (0.8 * 2) ** 2)
        ]
        zs = [z for z, box in enumerate(boxes) if box is not None]
        net = self._for_inference()
        for start in range(0, len(zs), self.slices_per_batch):
            idx = zs[start : start + self.slices_per_batch]
            x0, x1, y0, y1 = 0, nx, 0, ny
            if not resize:
                x0 = max(0, min(boxes[z][0] for z in idx) - LUNG_MARGIN)  # type: ignore[index]
                x1 = min(nx, max(boxes[z][1] for z in idx) + LUNG_MARGIN)  # type: ignore[index]
                y0 = max(0, min(boxes[z][2] for z in idx) - LUNG_MARGIN)  # type: ignore[index]
                y1 = min(ny, max(boxes[z][3] for z in idx) + LUNG_MARGIN)  # type: ignore[index]
            # (x, y, n) -> (n, 1, rows=y, columns=x)
            batch = vol[x0:x1, y0:y1, idx].permute(2, 1, 0).unsqueeze(1).float()
            if resize:
                batch = F.interpolate(batch, size=(TRAINING_MATRIX, TRAINING_MATRIX), mode="bilinear")
            prob = _padded(net, batch)
            if resize:
                prob = F.interpolate(prob, size=(ny, nx), mode="bilinear")
            out[x0:x1, y0:y1, idx] = prob[:, 0].permute(2, 1, 0).float()  # autocast on CUDA: half
        return out

    def _for_inference(self) -> LungUNet2D:
        """This network with each BatchNorm folded into its convolution (eval mode: the same function, to
        float rounding, about a third faster on the CPU); made once, after the weights are loaded. The
        module itself keeps the source's layers, so its state_dict stays the published one."""
        fused = self.__dict__.get("_fused")
        if fused is None or self.training:
            from torch.nn.utils.fusion import fuse_conv_bn_eval

            # a fresh module with these weights (a deep copy would also copy hooks others put on this one)
            first = self.conv1[0]  # nn.Sequential types its items as Module
            if not isinstance(first, nn.Conv2d):
                raise TypeError(f"conv1 starts with a {type(first).__name__}, not a Conv2d")
            fused = LungUNet2D(first.in_channels, self.final.out_channels, self.slices_per_batch)
            fused.load_state_dict(self.state_dict())
            fused = fused.to(self.final.weight.device).eval()
            for name in ("conv1", "conv2", "conv3", "middle", "upconv3", "upconv2", "upconv1"):
                block = getattr(fused, name)
                setattr(
                    fused,
                    name,
                    nn.Sequential(
                        fuse_conv_bn_eval(block[0], block[1]), block[2], fuse_conv_bn_eval(block[3], block[4]), block[5]
                    ),
                )
            fused = fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
            if not self.training:
                self.__dict__["_fused"] = fused  # not a submodule: no state_dict entry, no .to() of its own
        return fused

    def train(self, mode: bool = True) -> LungUNet2D:
        self.__dict__.pop("_fused", None)  # weights may change in training: fold again afterwards
        return super().train(mode)


def _padded(net: LungUNet2D, batch: Tensor) -> Tensor:
    """Pad rows and columns with air up to multiples of 8 (three poolings), run, crop back."""
    h, w = batch.shape[-2:]
    ph, pw = -h % 8, -w % 8
    if ph or pw:
        batch = F.pad(batch, (0, pw, 0, ph), value=STORED_VALUE_OFFSET - 1000.0)
    batch = batch.contiguous(memory_format=torch.channels_last)
    return net.forward_slices(batch)[..., :h, :w].contiguous()


def enclosed_air_boxes(body: np.ndarray, min_pixels: float) -> list[tuple[int, int, int, int] | None]:
    """Per slice of a (slice, a, b) stack of body masks: the (a0, a1, b0, b1) box of the air the body encloses
    (lung, airways, bowel gas: air not connected to the slice's border), or None when there are fewer than
    ``min_pixels`` such pixels (no lung on that slice). Both models use it to run only where lung can be."""
    from scipy import ndimage

    out: list[tuple[int, int, int, int] | None] = []
    for plane in body:
        air = ndimage.binary_fill_holes(plane) & ~plane
        if np.count_nonzero(air) < min_pixels:
            out.append(None)
            continue
        a = np.nonzero(air.any(axis=1))[0]
        b = np.nonzero(air.any(axis=0))[0]
        out.append((int(a[0]), int(a[-1]) + 1, int(b[0]), int(b[-1]) + 1))
    return out


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
    # voxels of each part per x (one bincount per x plane): sizes, x centres and profiles without a pass per part
    per_x = np.stack([np.bincount(labels[x].ravel(), minlength=count + 1) for x in range(mask.shape[0])])[:, 1:]
    sizes = per_x.sum(axis=0)
    order = np.argsort(-sizes, kind="stable") + 1
    largest = sizes[order[0] - 1]
    keep = [int(p) for p in order if sizes[p - 1] >= _MIN_PART * largest]
    xs = np.arange(mask.shape[0], dtype=np.float64)
    centres_x = {p: float(xs @ per_x[:, p - 1] / sizes[p - 1]) for p in keep}
    side_of: dict[int, int] = {}
    split: int | None = None  # the part cut in two at the junction
    if len(keep) >= 2 and sizes[keep[1] - 1] >= _TWO_LUNGS * largest:
        a, b = keep[0], keep[1]
        right, left = (a, b) if centres_x[a] < centres_x[b] else (b, a)
        side_of[right], side_of[left] = RIGHT_LUNG, LEFT_LUNG
        cut = (centres_x[a] + centres_x[b]) / 2.0
    else:
        main = keep[0]
        junction = _junction(per_x[:, main - 1])
        if junction is None:  # one lung in view: the side of the image it lies on
            cut = (mask.shape[0] - 1) / 2.0
            side_of[main] = RIGHT_LUNG if centres_x[main] < cut else LEFT_LUNG
        else:
            cut, split = junction, main
            part = labels == main
            right_side = np.arange(mask.shape[0])[:, None, None] < cut
            out[part & right_side] = RIGHT_LUNG
            out[part & ~right_side] = LEFT_LUNG
    lut = np.zeros(count + 1, dtype=np.uint8)  # part -> side, then one pass over the volume
    for p in keep:
        if p != split:
            lut[p] = side_of.get(p, RIGHT_LUNG if centres_x[p] < cut else LEFT_LUNG)
    sided = lut[labels]
    return np.where(out > 0, out, sided) if split is not None else sided


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
