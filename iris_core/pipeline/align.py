"""Alignment of a reference to a target before the position-aware readout (issue [20]).

A deterministic affine registration with SimpleITK: Mattes mutual information on both images brought to a
coarse isotropic grid, measured inside each image's foreground (Otsu, dilated: the background and a
different field of view must not pull the scale), a rigid transform first from the images' centres of
mass, then a full affine, each over two resolutions, regular metric sampling (no random draws), one
thread. The result maps reference positions (mm, LPS) into the target's space; the readout
then weighs a reference voxel by how near it lies to the target voxel it is compared with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from iris_core.io.resample import smooth_for_downsampling

log = logging.getLogger(__name__)

#: the grid (mm) the registration runs on: the smallest extent of the two images over ALIGN_VOXELS, within
#: ALIGN_SPACING_MM (4 mm for a human head, finer for a small brain); the metric's histogram bins, the share
#: of voxels it samples
ALIGN_SPACING_MM = (1.0, 4.0)
ALIGN_VOXELS = 48
ALIGN_BINS = 32
ALIGN_SAMPLING = 0.25
#: an alignment is refused when its linear part scales any axis outside these bounds (a failed optimisation)
ALIGN_SCALE_RANGE = (0.6, 1.6)


@dataclass(frozen=True)
class Alignment:
    """An affine map of reference positions (mm, LPS) into the target's space: ``y = matrix @ x + offset``."""

    matrix: np.ndarray
    offset: np.ndarray
    seconds: float = 0.0
    metric: float = float("nan")
    details: dict = field(default_factory=dict)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Points [..., 3] (mm) of the reference mapped into the target's space."""
        return points @ self.matrix.T + self.offset

    def target_to_reference(self) -> sitk.AffineTransform:
        """The SimpleITK transform that resamples reference images onto a target grid (it maps target
        positions to reference positions: this map's inverse)."""
        inverse = np.linalg.inv(self.matrix)
        tr = sitk.AffineTransform(3)
        tr.SetMatrix(inverse.ravel().tolist())
        tr.SetTranslation((-inverse @ self.offset).tolist())
        return tr

    def warp_labels(self, labels: sitk.Image, target: sitk.Image) -> sitk.Image:
        """The reference's label map resampled onto the target's grid through this alignment (nearest
        neighbour): the alignment alone as a segmenter, the deterministic affine baseline of ``evaluate``."""
        return sitk.Resample(labels, target, self.target_to_reference(), sitk.sitkNearestNeighbor, 0,
                             labels.GetPixelID())

    @staticmethod
    def identity() -> Alignment:
        return Alignment(np.eye(3), np.zeros(3))

    def report(self) -> dict:
        """What a sidecar records: the matrix, the shift, the seconds, the final metric."""
        return {"matrix": np.round(self.matrix, 5).tolist(), "offset_mm": np.round(self.offset, 3).tolist(),
                "seconds": round(self.seconds, 3), "metric": round(float(self.metric), 5)} | self.details


class AlignmentError(RuntimeError):
    """The registration failed or gave an implausible transform; the caller segments unaligned."""


def _coarse(image: sitk.Image, spacing: float) -> sitk.Image:
    """The image as float32 on an isotropic grid of ``spacing`` mm covering it, anti-aliased first."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise AlignmentError("multi-component images cannot be aligned")
    img = smooth_for_downsampling(sitk.Cast(image, sitk.sitkFloat32), (spacing,) * 3)
    old_spacing = np.array(img.GetSpacing())
    size = np.maximum(np.ceil(np.array(img.GetSize()) * old_spacing / spacing).astype(int), 4)
    out = sitk.Resample(img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        [spacing] * 3, img.GetDirection(), float("nan"), sitk.sitkFloat32)
    # intensities from 0 at the 1st percentile up (the centre-of-mass start weighs voxels by intensity: CT air
    # at -1000 HU or a z-scored background would weigh negative); outside the image: 0
    arr = sitk.GetArrayFromImage(out)
    inside = np.isfinite(arr)
    if not inside.any():
        raise AlignmentError("the image is empty")
    arr = np.where(inside, np.clip(arr - np.percentile(arr[inside], 1), 0, None), 0).astype(np.float32)
    res = sitk.GetImageFromArray(arr)
    res.CopyInformation(out)
    return res


def _register(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, masks: tuple[sitk.Image, sitk.Image],
              threads: int) -> tuple[sitk.Transform, float]:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(ALIGN_BINS)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(ALIGN_SAMPLING, 1)
    reg.SetMetricFixedMask(masks[0])
    reg.SetMetricMovingMask(masks[1])
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=100,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    reg.SetNumberOfThreads(threads)
    out = reg.Execute(fixed, moving)
    return sitk.CompositeTransform(out).GetNthTransform(0), float(reg.GetMetricValue())


def _foreground(image: sitk.Image) -> sitk.Image:
    """Otsu's foreground of a coarse image, dilated by two voxels (the metric's mask)."""
    return sitk.BinaryDilate(sitk.OtsuThreshold(image, 0, 1), [2, 2, 2])


def align_spacing(*images: sitk.Image) -> float:
    """The registration grid (mm): the smallest physical extent of the images over ALIGN_VOXELS, within
    ALIGN_SPACING_MM."""
    extent = min(float(np.min(np.array(i.GetSize()) * np.array(i.GetSpacing()))) for i in images)
    return float(np.clip(extent / ALIGN_VOXELS, *ALIGN_SPACING_MM))


def align_affine(target: sitk.Image, reference: sitk.Image, threads: int = 1) -> Alignment:
    """Register ``reference`` (moving) to ``target`` (fixed): rigid, then affine (Mattes MI inside both
    foregrounds, regular sampling, centres of mass to start). Deterministic for a given image pair. Raises
    :class:`AlignmentError` when the registration fails or its result is implausible."""
    t0 = time.perf_counter()
    spacing = align_spacing(target, reference)
    # ITK's metric sums its samples per thread: one thread gives the same transform on every run and machine
    threads_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        fixed = _coarse(target, spacing)
        moving = _coarse(reference, spacing)
        masks = (_foreground(fixed), _foreground(moving))
        start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        rigid, _ = _register(fixed, moving, start, masks, threads)
        rigid = sitk.Euler3DTransform(rigid)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        final, metric = _register(fixed, moving, affine, masks, threads)
        final = sitk.AffineTransform(final)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for ITK exceptions
        raise AlignmentError(f"registration failed: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads_before)
    # the sitk transform maps target (fixed) points to reference (moving) points: invert it
    a = np.array(final.GetMatrix()).reshape(3, 3)
    c = np.array(final.GetCenter())
    t = np.array(final.GetTranslation())
    # y_ref = a (x - c) + c + t  ->  x = a^-1 (y_ref - c - t) + c
    scales = np.linalg.svd(a, compute_uv=False)
    if scales.min() < 1 / ALIGN_SCALE_RANGE[1] or scales.max() > 1 / ALIGN_SCALE_RANGE[0]:
        raise AlignmentError(f"registration gave an implausible scaling (singular values {np.round(scales, 2)})")
    inv = np.linalg.inv(a)
    offset = c - inv @ (c + t)
    return Alignment(inv, offset, time.perf_counter() - t0, metric, {"grid_mm": round(spacing, 2)})
