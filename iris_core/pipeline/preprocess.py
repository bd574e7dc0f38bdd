"""Intensity policy by modality and preparation of images on a model grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from iris_core.errors import InputError
from iris_core.io.imaging import check_finite
from iris_core.io.resample import model_grid, model_grid_geometry, resample_to, smooth_for_downsampling
from iris_core.options import INTENSITY_POLICIES, check_choice
from iris_core.pipeline.device import check_memory
from iris_core.pipeline.policy import Preprocessing
from iris_core.pipeline.postprocess import largest_component


def guess_modality(arr: np.ndarray) -> str:
    """'CT' when the intensities look like Hounsfield units (air near -1000), else 'MR'."""
    lo = float(np.percentile(arr, 1))
    return "CT" if lo < -500 else "MR"


@dataclass(frozen=True)
class IntensityMap:
    """An affine intensity map after clipping: (clip(x, lo, hi) - mean) / std."""

    lo: float
    hi: float
    mean: float
    std: float
    modality: str

    def apply(self, arr: np.ndarray) -> np.ndarray:
        return ((np.clip(arr, self.lo, self.hi) - self.mean) / self.std).astype(np.float32)

    @property
    def background(self) -> float:
        """The normalised value of the lowest intensity (used for padding)."""
        return (self.lo - self.mean) / self.std


def intensity_map(arr: np.ndarray, modality: str, policy: Preprocessing, name: str = "image") -> IntensityMap:
    """Clip window and z-score statistics: CT clipped to the policy's HU window, MR/PET to
    percentiles; mean and std of the clipped voxels."""
    check_choice(modality, INTENSITY_POLICIES, "intensity policy", InputError)
    if modality == "auto":
        modality = guess_modality(arr)
    sample = arr.ravel()
    if sample.size > 2_000_000:  # statistics of a strided sample: same numbers, a fraction of the time
        sample = sample[:: sample.size // 2_000_000]
    sample = sample.astype(np.float64)
    if modality == "CT":
        lo, hi = policy.ct_window
    else:
        lo, hi = np.percentile(sample, policy.mr_percentiles)
    if hi <= lo:
        what = (f"the policy's CT window [{lo:g}, {hi:g}] HU is empty" if modality == "CT" else
                f"its {policy.mr_percentiles[0]:g} and {policy.mr_percentiles[1]:g} percentiles both {lo:g}")
        raise InputError(f"{name}: no intensity range to normalise ({what}: a constant or nearly empty image)")
    clipped = np.clip(sample, lo, hi)
    std = float(clipped.std()) or 1.0
    return IntensityMap(float(lo), float(hi), float(clipped.mean()), std, modality)


@dataclass
class PreparedImage:
    """An image on the model grid, normalised: ``array`` is (z, y, x) float32."""

    array: np.ndarray
    grid: sitk.Image
    source: sitk.Image
    intensity: IntensityMap
    name: str
    #: the resampled image before normalisation (policies that normalise each reference crop on its own)
    raw: np.ndarray | None = None

    def positions(self, start: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Positions (mm) [3, z, y, x] of the model grid's voxels, or of a box of it (first voxel, shape)."""
        return grid_positions(self.grid, tuple(start or (0, 0, 0)), tuple(shape or self.array.shape))


def prepare_image(image: sitk.Image, name: str, policy: Preprocessing, modality: str = "auto",
                  multiple: int = 16, target: bool = True) -> PreparedImage:
    """Normalise intensities, anti-alias and resample ``image`` onto its model grid (the policy's
    'native' grid: see :func:`prepare_native`)."""
    if policy.native_grid:
        return prepare_native(image, name, policy, modality, body_crop=target)
    size, _ = model_grid_geometry(image, policy.spacing, multiple)
    # model grid as uint8 + float32 resampled + float32 normalised, plus the source as float32
    check_memory(int(np.prod(size.astype(np.float64))) * 9 + int(np.prod(image.GetSize())) * 8,
                 torch.device("cpu"), f"preparing {name} at {policy.spacing} mm")
    arr = check_finite(image, name)
    imap = intensity_map(arr, modality, policy, name)
    grid = model_grid(image, policy.spacing, multiple)
    img = sitk.Cast(image, sitk.sitkFloat32)
    img = smooth_for_downsampling(img, policy.spacing)
    res = resample_to(img, grid, sitk.sitkLinear, default=imap.lo)
    return PreparedImage(imap.apply(sitk.GetArrayViewFromImage(res)), grid, image, imap, name)


def grid_positions(grid: sitk.Image, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Physical positions (mm, LPS x, y, z) [3, z, y, x] of the voxels of a box of ``grid`` given by its first
    voxel ``start`` and ``shape`` (z, y, x order; the box may reach outside the grid)."""
    spacing = np.array(grid.GetSpacing())
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    origin = np.array(grid.GetOrigin())
    axes = [np.arange(s, s + n, dtype=np.float64) for s, n in zip(start[::-1], shape[::-1])]  # i, j, k
    out = np.empty((3, *shape), np.float32)
    for row in range(3):
        step = direction[row] * spacing  # mm per voxel along i, j, k
        out[row] = (origin[row] + step[2] * axes[2][:, None, None] + step[1] * axes[1][None, :, None]
                    + step[0] * axes[0][None, None, :])
    return out


# -- the 'native' grid policy (the MASS authors' pipeline) -------------------------------------------

def guess_modality_mass(arr: np.ndarray) -> str:
    """The MASS rule: CT when the 0.5th percentile < -200 and the 99.5th > 300; PET when >= 0 and > 5."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return "CT"
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if lo < -200 and hi > 300:
        return "CT"
    if lo >= 0 and hi > 5:
        return "PET"
    return "MR"


def _modality(arr: np.ndarray, modality: str, policy: Preprocessing) -> str:
    check_choice(modality, INTENSITY_POLICIES, "intensity policy", InputError)
    if modality != "auto":
        return modality
    return guess_modality_mass(arr) if policy.mass_modality_rule else guess_modality(arr)


def volume_intensity_map(arr: np.ndarray, modality: str, policy: Preprocessing, eps: float = 1e-6) -> IntensityMap:
    """Clip (CT: the policy's HU window; MR/PET: its percentiles of every voxel, when they differ),
    then z-score over the whole clipped array."""
    modality = _modality(arr, modality, policy)
    a = arr.astype(np.float32, copy=False)
    if modality == "CT":
        lo, hi = policy.ct_window
    else:
        lo, hi = np.percentile(a[np.isfinite(a)], policy.mr_percentiles) if a.size else (0.0, 0.0)
        if not hi > lo:
            lo, hi = -np.inf, np.inf
    clipped = np.clip(a, np.float32(lo), np.float32(hi))
    mean, std = float(clipped.mean()), float(clipped.std())
    return IntensityMap(float(lo), float(hi), mean, std if std > eps else 1.0, modality)


def reorient(image: sitk.Image, orientation: str) -> sitk.Image:
    """``image`` with its axes reordered/flipped to a DICOM orientation code ('' keeps it)."""
    return sitk.DICOMOrient(image, orientation) if orientation else image


def native_grid(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """Empty grid at ``spacing`` with ``image``'s origin and direction, size round(size * old / new)."""
    size = [max(1, int(round(n * s / float(t)))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([float(t) for t in spacing])
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def body_box(arr: np.ndarray, modality: str, policy: Preprocessing) -> tuple[slice, ...] | None:
    """The body's bounding box (z, y, x slices) plus the policy's margin, clamped to the volume: CT
    voxels above the body threshold, else |value| above 1e-3 of the 99th percentile of |values|;
    closed (2 iterations), holes filled, largest component. None when nothing is found."""
    from scipy import ndimage

    finite = np.isfinite(arr)
    if _modality(arr, modality, policy) == "CT":
        mask = finite & (arr > policy.ct_body_threshold)
    else:
        if not finite.any():
            return None
        thr = max(float(np.percentile(np.abs(arr[finite]), 99)) * 1e-3, 1e-6)
        mask = finite & (np.abs(arr) > thr)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))
    mask = largest_component(mask, 6)
    if not mask.any():
        return None
    box = []
    for axis, margin in enumerate(policy.body_margin):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(box)


def prepare_native(image: sitk.Image, name: str, policy: Preprocessing, modality: str = "auto",
                   body_crop: bool = True) -> PreparedImage:
    """The MASS preparation: reorient, resample linearly (outside: 0) onto the native grid at the
    policy spacing, crop a target to its body box, z-score the (cropped) array."""
    grid = native_grid(reorient(image, policy.orientation), policy.spacing)
    check_memory(int(np.prod(grid.GetSize())) * 12 + int(np.prod(image.GetSize())) * 8,
                 torch.device("cpu"), f"preparing {name} at {policy.spacing} mm")
    check_finite(image, name)
    oriented = reorient(image, policy.orientation)
    res = resample_to(oriented, grid, sitk.sitkLinear, 0.0)
    if body_crop and policy.body_margin:
        box = body_box(sitk.GetArrayViewFromImage(res), modality, policy)
        if box is not None:
            res = sitk.RegionOfInterest(res, [b.stop - b.start for b in box[::-1]], [b.start for b in box[::-1]])
    raw = sitk.GetArrayFromImage(res)
    imap = volume_intensity_map(raw, modality, policy)
    grid = sitk.Image(res.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(res)
    return PreparedImage(imap.apply(raw), grid, image, imap, name, raw=None if body_crop else raw)
