"""Sliding-window inference as the MASS authors' pipeline does it, where MONAI's differs: the volume
is zero-padded at the far end only (MONAI pads both sides) and windows are blended with a separable
Gaussian centred at (edge - 1) / 2, sigma 0.125 x edge, normalised to a maximum of 1 (MONAI centres
its kernel on a voxel and floors its minimum)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices along one axis: every round(window * (1 - overlap)) voxels, plus a last window
    flush with the end; a single window at 0 when the axis fits in one."""
    if size <= window:
        return [0]
    step = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def window_boxes(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    """Every window (z, y, x slices) of a volume of ``shape`` (already padded to at least ``window``)."""
    per_axis = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return [tuple(slice(a, a + w) for a, w in zip(starts, window))
            for starts in np.stack(np.meshgrid(*per_axis, indexing="ij"), -1).reshape(-1, 3).tolist()]


def gaussian_weights(window: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights [w0, w1, w2]: a separable Gaussian with its maximum 1 at the window centre."""
    axes = []
    for size in window:
        sigma = max(float(size) * sigma_scale, 1e-6)
        x = np.arange(size)
        axes.append(np.exp(-((x - (size - 1) / 2) ** 2) / (2 * sigma**2)))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return torch.from_numpy((w / w.max()).astype(np.float32))


def sliding_window(x: torch.Tensor, window: tuple[int, int, int], overlap: float, k: int,
                   probs_fn: Callable[[torch.Tensor], torch.Tensor],
                   on_window: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Blended probabilities [1, K, z, y, x] of ``probs_fn`` (a [1, 1, *window] patch -> [1, K, *window]
    probabilities) over the volume ``x`` [1, 1, z, y, x]; ``on_window(done, total)`` after each window."""
    shape = tuple(x.shape[2:])
    pad = [max(0, w - s) for s, w in zip(shape, window)]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    padded = tuple(x.shape[2:])
    boxes = window_boxes(padded, window, overlap)
    g = gaussian_weights(window)
    out = torch.zeros((1, k, *padded), dtype=torch.float32)
    weight = torch.zeros(padded, dtype=torch.float32)
    for i, box in enumerate(boxes):
        p = probs_fn(x[(slice(None), slice(None), *box)]).float().cpu()
        out[(slice(None), slice(None), *box)] += p * g
        weight[box] += g
        if on_window is not None:
            on_window(i + 1, len(boxes))
    out /= torch.clamp(weight, min=1e-8)
    return out[:, :, : shape[0], : shape[1], : shape[2]]
