"""Intensity policy by modality and preparation of images on a model grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import Preprocessing
from .device import check_memory
from .errors import InputError
from .imaging import check_finite
from .options import INTENSITY_POLICIES
from .resample import model_grid, model_grid_geometry, resample_to, smooth_for_downsampling


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


def intensity_map(arr: np.ndarray, modality: str, policy: Preprocessing) -> IntensityMap:
    """Clip window and z-score statistics: CT clipped to the policy's HU window, MR/PET to
    percentiles; mean and std of the clipped voxels."""
    if modality not in INTENSITY_POLICIES:
        raise InputError(f"unknown intensity policy {modality!r}; use one of {', '.join(INTENSITY_POLICIES)}")
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
        raise InputError("image is constant (no intensity range to normalise)")
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


def prepare_image(image: sitk.Image, name: str, policy: Preprocessing, modality: str = "auto",
                  multiple: int = 16) -> PreparedImage:
    """Normalise intensities, anti-alias and resample ``image`` onto its model grid."""
    size, _ = model_grid_geometry(image, policy.spacing, multiple)
    # model grid as uint8 + float32 resampled + float32 normalised, plus the source as float32
    check_memory(int(np.prod(size.astype(np.float64))) * 9 + int(np.prod(image.GetSize())) * 8,
                 torch.device("cpu"), f"preparing {name} at {policy.spacing} mm")
    arr = check_finite(image, name)
    imap = intensity_map(arr, modality, policy)
    grid = model_grid(image, policy.spacing, multiple)
    img = sitk.Cast(image, sitk.sitkFloat32)
    img = smooth_for_downsampling(img, policy.spacing)
    res = resample_to(img, grid, sitk.sitkLinear, default=imap.lo)
    return PreparedImage(imap.apply(sitk.GetArrayViewFromImage(res)), grid, image, imap, name)
