"""The DSB 2017 (8th place, A. Stochniol) nodule identifier re-written in PyTorch.

``unet_model_xd3_2_6l_grid(nb_filter=20, dim=8)`` of github.com/astoc/kaggle_dsb2017 (MIT,
code/Andre/py/fit_unet_d8g_222_swrap_01.py), a Keras 1.2.2 model trained on LUNA16 at 2 mm isotropic: an
8-slice slab (1, 8, H, W) in, the nodule probability of one axial slice (1, 1, H, W) out. A small 3D U-Net
(two poolings of 2 in z, y and x, nearest upsampling, skip concatenation), then three (2, 1, 1) poolings with
(3, 1, 1) convolutions collapse the 8 slices to 1. Every convolution is "same" with ReLU; the last is 1x1x1
with a sigmoid. H and W must be multiples of 4.

Kernel orientation: the weights were trained under Keras 1's Theano backend, whose ``conv3d`` calls
``theano.tensor.nnet.conv3d`` without ``filter_flip``, i.e. with Theano's default ``filter_flip=True``: a
true convolution (the kernel is flipped along its three spatial axes before sliding). PyTorch's ``Conv3d``
is a cross-correlation, so the converter (``ai_models.convert.dsb2017``) flips every kernel along z, y and x;
``KERAS_LAYERS`` gives the Keras layer each PyTorch convolution takes its arrays from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# PyTorch convolution name -> position among the Keras Convolution3D layers, in the HDF5's layer order
KERAS_LAYERS: tuple[str, ...] = (
    "enc1a",
    "enc1b",
    "enc2a",
    "enc2b",
    "bottom_a",
    "bottom_b",
    "dec2a",
    "dec2b",
    "dec1a",
    "dec1b",
    "zred1a",
    "zred1b",
    "zred2a",
    "zred2b",
    "head",
)
SLAB = 8  # slices per input slab (dim)
CENTRE = SLAB // 2  # the slab slice the output map belongs to: masks[:, :, dim // 2] in training
DIVISOR = 4  # H and W must be multiples of this (two poolings of 2)


def _conv(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, padding=(kernel[0] // 2, kernel[1] // 2, kernel[2] // 2))


class DSB2017NoduleNet(nn.Module):
    """(N, 1, 8, H, W) slabs, values (HU clipped to [-1000, 400], scaled to [0, 1], minus 0.028) -> (N, 1, H, W)
    nodule probability of each slab's slice 4 (0-based)."""

    def __init__(self, nb_filter: int = 20) -> None:
        super().__init__()
        f = nb_filter
        k3, kz = (3, 3, 3), (3, 1, 1)
        self.enc1a, self.enc1b = _conv(1, f, k3), _conv(f, f, k3)
        self.enc2a, self.enc2b = _conv(f, 2 * f, k3), _conv(2 * f, 2 * f, k3)
        self.bottom_a, self.bottom_b = _conv(2 * f, 4 * f, k3), _conv(4 * f, 4 * f, k3)
        self.dec2a, self.dec2b = _conv(6 * f, 2 * f, k3), _conv(2 * f, 2 * f, k3)
        self.dec1a, self.dec1b = _conv(3 * f, f, k3), _conv(f, f, k3)
        self.zred1a, self.zred1b = _conv(f, 2 * f, kz), _conv(2 * f, 2 * f, kz)
        self.zred2a, self.zred2b = _conv(2 * f, 2 * f, kz), _conv(2 * f, 2 * f, kz)
        self.head = nn.Conv3d(2 * f, 1, 1)

    @staticmethod
    def _pair(a: nn.Conv3d, b: nn.Conv3d, x: Tensor) -> Tensor:
        return F.relu(b(F.relu(a(x))))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != SLAB:
            raise ValueError(f"expected (N, 1, {SLAB}, H, W) slabs, got {tuple(x.shape)}")
        if x.shape[3] % DIVISOR or x.shape[4] % DIVISOR:
            raise ValueError(f"H and W must be multiples of {DIVISOR}, got {tuple(x.shape[3:])}")
        c1 = self._pair(self.enc1a, self.enc1b, x)
        c2 = self._pair(self.enc2a, self.enc2b, F.max_pool3d(c1, 2))
        c4 = self._pair(self.bottom_a, self.bottom_b, F.max_pool3d(c2, 2))
        # Keras merge([UpSampling3D(deeper), skip], concat_axis=1): upsampled channels first
        c6 = self._pair(self.dec2a, self.dec2b, torch.cat([F.interpolate(c4, scale_factor=2.0), c2], 1))
        c7 = self._pair(self.dec1a, self.dec1b, torch.cat([F.interpolate(c6, scale_factor=2.0), c1], 1))
        z = F.max_pool3d(c7, (2, 1, 1))
        z = F.max_pool3d(self._pair(self.zred1a, self.zred1b, z), (2, 1, 1))
        z = F.max_pool3d(self._pair(self.zred2a, self.zred2b, z), (2, 1, 1))
        return torch.sigmoid(self.head(z))[:, :, 0]
