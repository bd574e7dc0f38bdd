"""Overlap and surface metrics from a maintained implementation (MONAI), with the empty cases
made explicit: both empty -> Dice 1 and distances 0; one empty -> Dice 0 and distances inf."""

from __future__ import annotations

import math
import warnings

import numpy as np


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """(HD95, average symmetric surface distance) in mm, with voxel ``spacing`` (array axis order)."""
    import torch  # here, with MONAI: reading the metrics module (a score's checks, a picture) needs neither
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, t = pred.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return 0.0, 0.0
    if not p.any() or not t.any():
        return math.inf, math.inf
    yp = torch.from_numpy(p)[None, None]
    yt = torch.from_numpy(t)[None, None]
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI >= 1.5 warns about an argument it passes to itself
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = float(compute_hausdorff_distance(yp, yt, percentile=95, spacing=sp)[0, 0])
        asd = float(compute_average_surface_distance(yp, yt, symmetric=True, spacing=sp)[0, 0])
    return hd, asd


def segment_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict:
    """Dice, HD95 (mm), ASSD (mm) and both volumes (ml) of one class; ``spacing`` in array axis order."""
    hd, asd = surface_distances(pred, truth, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {"dice": dice_score(pred, truth), "hd95_mm": hd, "assd_mm": asd,
            "volume_pred_ml": float(pred.astype(bool).sum()) * voxel_ml,
            "volume_true_ml": float(truth.astype(bool).sum()) * voxel_ml}


def finite_mean(values) -> float:
    """The mean of the finite values (a distance is inf where one mask is empty); inf when none is finite."""
    a = np.asarray(values, float)
    return float(np.mean(a[np.isfinite(a)])) if np.isfinite(a).any() else math.inf
