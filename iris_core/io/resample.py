"""The one place where files' geometry is handled: model grids and resampling back.

Every image is presented to the model on an axis-aligned (identity direction)
grid at the model spacing covering the image's physical extent, so references
and targets of any orientation meet in the same physical frame. Predictions go
back onto the exact target grid (size, spacing, origin, direction) by physical
coordinates.
"""

from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk


def crop_padded(x, start, size, fill: float):
    """The box of edge(s) ``size`` at voxel ``start`` (z, y, x) of the last three dims of ``x`` (a numpy
    array or a torch tensor, any leading dims); the parts of the box outside ``x`` are ``fill``. The one
    crop of the project: inference's reference windows and training's episode crops."""
    start = [int(v) for v in start]
    sizes = [int(size)] * 3 if np.isscalar(size) else [int(v) for v in size]
    shape = tuple(x.shape[:-3]) + tuple(sizes)
    out = np.full(shape, fill, dtype=x.dtype) if isinstance(x, np.ndarray) else x.new_full(shape, fill)
    src = tuple(slice(max(a, 0), min(a + w, n)) for a, w, n in zip(start, sizes, x.shape[-3:]))
    if all(s.stop > s.start for s in src):
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start))
        out[(..., *dst)] = x[(..., *src)]
    return out


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Min and max physical corner (LPS mm) of the voxel-centre box of ``image``."""
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*[(0.0, float(s - 1)) for s in size])
    ]
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def model_grid_geometry(image: sitk.Image, spacing: tuple[float, float, float], multiple: int = 1
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Size (x, y, z) and origin of :func:`model_grid`, computed without allocating it."""
    lo, hi = physical_bounds(image)
    sp = np.array(spacing, dtype=float)
    size = np.floor((hi - lo) / sp + 1e-6).astype(int) + 1
    padded = (np.ceil(size / multiple) * multiple).astype(int)
    return padded, lo - (padded - size) / 2.0 * sp


def model_grid(image: sitk.Image, spacing: tuple[float, float, float], multiple: int = 1) -> sitk.Image:
    """Empty identity-direction reference grid at ``spacing`` covering ``image``; sizes are
    rounded up to a multiple of ``multiple`` (padding spread evenly around the image)."""
    padded, origin = model_grid_geometry(image, spacing, multiple)
    sp = np.array(spacing, dtype=float)
    grid = sitk.Image([int(s) for s in padded], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in sp])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection(np.eye(3).flatten().tolist())
    return grid


def resample_to(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkLinear,
                default: float = 0.0, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid by physical coordinates (identity transform)."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default), pixel_type)


def smooth_for_downsampling(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """Gaussian anti-aliasing before resampling to a coarser spacing (sigma per axis from the ratio)."""
    src = np.array(image.GetSpacing())
    dst = np.array(spacing)
    # direction-aware: compare each image axis with the target spacing of its dominant world axis
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    dst_axis = dst[direction.argmax(axis=0)]
    sigma = np.sqrt(np.clip((dst_axis / src) ** 2 - 1.0, 0, None)) * src / 2.0
    if np.all(sigma < 1e-3):
        return image
    image = sitk.Cast(image, sitk.sitkFloat32)
    if min(image.GetSize()) < 4:
        # the recursive filter needs four voxels along every axis (a 3-slice slab, a small crop): the
        # sampled kernel has no such limit (zero-flux borders), at the cost of time on large sigmas
        return sitk.DiscreteGaussian(image, [float(s) ** 2 for s in sigma], 32, 0.01, True)
    return sitk.SmoothingRecursiveGaussian(image, [float(s) for s in np.maximum(sigma, 1e-3)])


def labels_to_masks(labels: sitk.Image, grid: sitk.Image, values: list[int]) -> np.ndarray:
    """Binary masks [K, z, y, x] of label ``values`` on ``grid``: each class is resampled as a
    soft mask (anti-aliased when the grid is coarser, then linear) and thresholded at 0.5, i.e.
    a model voxel belongs to the class when most of it does."""
    arr = sitk.GetArrayViewFromImage(labels)
    out = np.zeros((len(values), *grid.GetSize()[::-1]), dtype=np.uint8)
    for i, v in enumerate(values):
        m = sitk.GetImageFromArray((arr == v).astype(np.float32))
        m.CopyInformation(labels)
        m = smooth_for_downsampling(m, grid.GetSpacing())
        resampled = resample_to(m, grid)  # held: an array view must not outlive its image
        out[i] = sitk.GetArrayViewFromImage(resampled) >= 0.5
    return out


def nearest_masks(labels: sitk.Image, grid: sitk.Image, values: list[int]) -> np.ndarray:
    """Binary masks [K, z, y, x] of label ``values`` after nearest-neighbour resampling onto ``grid``."""
    resampled = resample_to(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    arr = sitk.GetArrayViewFromImage(resampled)
    return np.stack([arr == v for v in values]).astype(np.uint8)


def array_to_image(arr: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``arr`` (z, y, x) with ``grid``'s geometry."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(grid)
    return img
