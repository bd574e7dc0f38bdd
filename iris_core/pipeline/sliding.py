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


# MONAI's layout (issue [21]): the same windows, weights and arithmetic as monai.inferers.sliding_window_inference
# (MONAI 1.6.1, monai/inferers/utils.py: centred constant padding, _get_scan_interval, dense_patch_slices,
# compute_importance_map's Gaussian clamped at its minimum or 1e-3, weighted sums divided by the summed weights).
# Written out because importing any part of MONAI runs monai/__init__.py, which loads every MONAI submodule
# (about 2 s of a CLI start); Testing/Python/test_sliding.py checks it against MONAI's own function.


def monai_starts(size: int, window: int, overlap: float) -> list[int]:
    """MONAI's window starts along one axis (``size`` already padded to at least ``window``): an interval of
    int(window * (1 - overlap)) (at least 1; the whole window when it fits exactly), the last start pulled
    back to end flush with the volume."""
    interval = window if window == size else max(int(window * (1 - overlap)), 1)
    count = next((d for d in range(int(np.ceil(size / interval))) if d * interval + window >= size), 0) + 1
    return [i * interval - max(i * interval + window - size, 0) for i in range(count)]


def monai_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's Gaussian importance map: exp(-x^2 / 2 sigma^2) per axis about (w - 1) / 2, sigma = sigma_scale *
    w, multiplied, then clamped below at its own minimum or 1e-3, whichever is larger."""
    out = None
    for w in window:
        x = torch.arange(-(w - 1) / 2.0, (w - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x**2 / (-2 * (w * sigma_scale) ** 2))
        out = g if out is None else out.unsqueeze(-1) * g
    return torch.clamp(out, min=max(float(out.min()), 1e-3))


def sliding_window_monai(x: torch.Tensor, window: tuple[int, int, int], batch: int, overlap: float,
                         predictor: Callable[[torch.Tensor], torch.Tensor], cval: float) -> torch.Tensor:
    """Blended outputs [1, K, z, y, x] of ``predictor`` (a [B, C, *window] batch of windows -> [B, K, *window],
    on any device) over ``x`` [1, C, z, y, x], in MONAI's layout: a volume smaller than the window is padded
    with ``cval`` on both sides (the extra voxel at the far end), ``batch`` windows per call."""
    shape = tuple(x.shape[2:])
    pads = [(max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2) for s, w in zip(shape, window)]
    if any(lo or hi for lo, hi in pads):
        x = F.pad(x, [p for pair in reversed(pads) for p in pair], mode="constant", value=cval)
    padded = tuple(x.shape[2:])
    per_axis = [monai_starts(s, w, overlap) for s, w in zip(padded, window)]
    boxes = [tuple(slice(a, a + w) for a, w in zip(starts, window))
             for starts in np.stack(np.meshgrid(*per_axis, indexing="ij"), -1).reshape(-1, 3).tolist()]
    weight = monai_importance(window)[None, None]
    out = count = None
    for first in range(0, len(boxes), batch):
        group = boxes[first:first + batch]
        p = predictor(torch.cat([x[(slice(None), slice(None), *b)] for b in group]))
        p = (p * weight.to(p.device)).to("cpu", torch.float32)
        if out is None:
            out = torch.zeros((1, p.shape[1], *padded), dtype=torch.float32)
            count = torch.zeros((1, 1, *padded), dtype=torch.float32)
            for b in boxes:
                count[(slice(None), slice(None), *b)] += weight
        for b, pb in zip(group, p):
            out[(slice(None), slice(None), *b)] += pb
    out /= count
    return out[(slice(None), slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(pads, shape)))]
