"""Label-to-image synthesis in the SynthSeg manner, for tasks only a reference can define.

A label map (random smooth partition with embedded blobs, or a crop of a real atlas)
is deformed independently for the reference and the query, and each view gets its
own image: every label a random intensity drawn per view (Gaussian mixture), then
blur, bias field, gamma, slice thickness and noise. Intensity alone therefore never
names a structure; which label is the task is known only from the reference mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from iris_core.training.deform import random_grid


def _smooth_noise(n: int, shape: tuple[int, ...], coarse: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, *shape] smooth random fields: Gaussian noise on a coarse grid, trilinearly upsampled."""
    grid = torch.from_numpy(rng.normal(0, 1, (1, n, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(grid, size=shape, mode="trilinear", align_corners=False)[0]


def random_label_map(shape: tuple[int, int, int], rng: np.random.Generator,
                     n_regions: tuple[int, int] = (4, 12), n_blobs: tuple[int, int] = (1, 5)) -> torch.Tensor:
    """An int64 label map: a smooth random partition into regions (label 0 = background region)
    with a few compact blobs of their own labels on top. Labels are 0..L-1."""
    n = int(rng.integers(*n_regions))
    fields = _smooth_noise(n, shape, int(rng.integers(3, 7)), rng)
    fields[0] += float(rng.uniform(0.0, 1.0))  # more or less background
    labels = fields.permute(1, 2, 3, 0).contiguous().argmax(-1)  # channels-last: 2x faster
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    wobble = _smooth_noise(1, shape, 4, rng)[0] * 0.3
    for i in range(int(rng.integers(*n_blobs))):
        c = rng.uniform(-0.6, 0.6, 3)
        r = rng.uniform(0.08, 0.3, 3)
        dist = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        labels[(dist + wobble) < 1.0] = n + i
    return labels


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a [D, H, W] tensor (sigma in voxels)."""
    if sigma < 0.3:
        return x
    radius = max(1, int(round(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None, None]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(k)
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y[0, 0]


def synthesize_image(labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A z-scored image of a label map: per-label Gaussian intensities, blur, bias field, gamma,
    optional thick slices along a random axis, noise."""
    n = int(labels.max()) + 1
    mu = torch.from_numpy(rng.uniform(0, 1, n).astype(np.float32))
    sd = torch.from_numpy(rng.uniform(0, 0.08, n).astype(np.float32))
    img = mu[labels] + sd[labels] * torch.randn(labels.shape)
    img = _gaussian_blur(img, float(rng.uniform(0, 1.2)))
    bias = torch.exp(_smooth_noise(1, tuple(labels.shape), 4, rng)[0] * float(rng.uniform(0, 0.25)))
    img = (img * bias).clamp(min=0)
    img = img / (float(img.max()) + 1e-6)
    img = img ** float(np.exp(rng.uniform(-0.4, 0.4)))
    if rng.random() < 0.3:  # thick slices: average then repeat along one axis
        axis, f = int(rng.integers(3)), int(rng.integers(2, 4))
        coarse = F.interpolate(img[None, None], size=[max(1, s // f) if a == axis else s
                                                     for a, s in enumerate(labels.shape)], mode="area")
        img = F.interpolate(coarse, size=tuple(labels.shape), mode="trilinear", align_corners=False)[0, 0]
    img = img + torch.randn(labels.shape) * float(rng.uniform(0, 0.05))
    return (img - img.mean()) / (img.std() + 1e-6)


def warp_labels(labels: torch.Tensor, rng: np.random.Generator, max_deg: float = 15.0,
                max_shift: float = 0.08, elastic: float = 0.03) -> torch.Tensor:
    """A label map resampled (nearest) through a random affine + smooth elastic deformation."""
    grid = random_grid(tuple(labels.shape), rng, max_deg, max_shift, elastic)
    out = F.grid_sample(labels[None, None].float(), grid, mode="nearest", padding_mode="border",
                        align_corners=False)
    return out[0, 0].long()


def relabel_groups(labels: torch.Tensor, rng: np.random.Generator, max_labels: int = 24) -> torch.Tensor:
    """Merge the labels of a real atlas crop into at most ``max_labels`` random groups (0..L-1), so
    structures of every size and shape appear: single parcels, unions, the whole foreground."""
    values = torch.unique(labels)
    values = values[values != 0]
    n = int(rng.integers(4, max_labels + 1))
    groups = torch.from_numpy(rng.integers(1, n + 1, len(values)))
    lut = torch.zeros(int(labels.max()) + 1, dtype=torch.int64)
    lut[values] = groups
    if rng.random() < 0.5:  # keep each parcel its own label (small structures as tasks)
        lut[values] = torch.arange(1, len(values) + 1)
    return lut[labels]
