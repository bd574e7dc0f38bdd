"""Random spatial deformations of training crops: one sampling grid for an image and its masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def random_grid(shape: tuple[int, int, int], rng: np.random.Generator, max_deg: float = 20.0,
                max_shift: float = 0.08, elastic: float = 0.03) -> torch.Tensor:
    """A sampling grid [1, D, H, W, 3] for grid_sample: random rotation (+-max_deg per axis), scale
    0.85-1.15, shift (normalised units) and a smooth elastic field."""
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    a = rx @ ry @ rz @ np.diag(rng.uniform(0.85, 1.15, 3))
    theta = torch.tensor(np.concatenate([a, rng.uniform(-max_shift, max_shift, (3, 1))], 1), dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 1, *shape], align_corners=False)
    coarse = torch.from_numpy(rng.normal(0, elastic, (1, 3, 5, 5, 5)).astype(np.float32))
    return grid + F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False).permute(0, 2, 3, 4, 1)


def random_warp(image: torch.Tensor, masks: torch.Tensor, background: float, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random deformation (:func:`random_grid`) applied to an image [D,H,W] and masks
    [K,D,H,W] (masks interpolated and thresholded)."""
    grid = random_grid(tuple(image.shape), rng)
    stack = torch.cat([image[None], masks.float()])[None]
    out = F.grid_sample(stack - torch.tensor([background] + [0.0] * len(masks)).view(1, -1, 1, 1, 1), grid,
                        mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return out[0] + background, out[1:] > 0.5
