"""Reference crops: what of a reference the task encoder sees, as the model's policy says: the classes' masks
on the reference's model grid, and the box around them ('volume': the whole volume where the network takes
it; 'union': a window around the classes; 'per-label': one window per label, normalised on its own)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from iris_core.errors import InputError
from iris_core.io.resample import crop_padded, labels_to_masks, nearest_masks
from iris_core.pipeline.policy import Policy
from iris_core.pipeline.preprocess import PreparedImage, reorient, volume_intensity_map
from iris_core.types import ClassSpec, Reference

log = logging.getLogger(__name__)


class ReferenceCrops:
    """The crops of one engine: its policy, window, the network's size multiple (``divisor``) and largest
    reference edge, the intensity policy (per-label crops are normalised on their own), whether the crops
    carry voxel positions (a position-aware readout), and the device the tensors go to."""

    def __init__(self, policy: Policy, window: tuple[int, int, int], divisor: int, largest_reference: int,
                 intensity: str, positions: bool, device: torch.device):
        self.policy, self.window, self.divisor, self.largest_reference = policy, window, divisor, largest_reference
        self.intensity, self.positions, self.device = intensity, positions, device

    def masks(self, ref: Reference, prep: PreparedImage, classes: list[ClassSpec]) -> np.ndarray:
        """Binary masks of ``classes`` on the reference's model grid; empty classes are an error."""
        values = [c.value for c in classes]
        if self.policy.nearest_reference_masks:
            masks = nearest_masks(reorient(ref.labels, self.policy.orientation), prep.grid, values)
        else:
            masks = labels_to_masks(ref.labels, prep.grid, values)
        for c, m in zip(classes, masks):
            if not m.any():
                raise InputError(
                    f"reference {ref.name}: class '{c.name}' (label {c.value}) vanishes at the model spacing "
                    f"{self.policy.spacing} mm; it is too small for this model"
                )
        return masks

    def groups(self, masks: np.ndarray) -> list[list[int]]:
        """The classes encoded in one pass each: one per label ('per-label'); else all together when their union
        fits one window, one by one otherwise."""
        if self.policy.crops_per_label:
            return [[i] for i in range(len(masks))]
        zyx = np.argwhere(masks.any(axis=0))
        if np.all(zyx.max(0) - zyx.min(0) + 1 <= np.array(self.window)):
            return [list(range(len(masks)))]
        return [[i] for i in range(len(masks))]

    def crop(self, prep: PreparedImage, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's crop of a group of classes: :meth:`per_label` or :meth:`reference`."""
        return self.per_label(prep, masks) if self.policy.crops_per_label else self.reference(prep, masks)

    def box(self, masks: np.ndarray) -> tuple[slice, ...]:
        """The reference box (z, y, x) around the masks' union: a window-sized box centred on it ('union'), or
        ('volume') the whole volume where the network takes it (padded evenly to a multiple of 16), else as
        much of it as the network takes, centred on the union and kept inside the volume."""
        zyx = np.argwhere(masks.any(axis=0))
        lo, hi = zyx.min(0), zyx.max(0) + 1
        if self.policy.crops_whole_reference:
            shape = np.array(masks.shape[1:])
            d = self.divisor
            size = np.minimum(np.maximum(-(-shape // d) * d, self.window), self.largest_reference // d * d)
            centre = (lo + hi) // 2
            start = np.where(size >= shape, -((size - shape) // 2), np.clip(centre - size // 2, 0, shape - size))
            if np.any(hi - lo > size):
                log.warning("reference structure extent %s exceeds the largest reference %s: it is encoded partly",
                            hi - lo, size)
            return tuple(slice(int(s), int(s + w)) for s, w in zip(start, size))
        win = np.array(self.window)
        extent = hi - lo
        if np.any(extent > win):
            log.warning("reference structure extent %s exceeds the window %s: it is encoded partly", extent, win)
        centre = (lo + hi) // 2
        start = centre - win // 2
        return tuple(slice(int(s), int(s + w)) for s, w in zip(start, win))

    def reference(self, prep: PreparedImage, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [1,1,w,w,w] and masks [1,K,w,w,w] tensors of the box around the structures (image and voxel
        positions [1,4,w,w,w] where the model weighs positions)."""
        box = self.box(masks)
        img = _crop(prep.array, box, prep.intensity.background)[None]
        if self.positions:
            img = np.concatenate([img, prep.positions([b.start for b in box], img.shape[1:])])
        m = np.stack([_crop(mk, box, 0) for mk in masks])
        return (torch.from_numpy(img)[None].to(self.device),
                torch.from_numpy(m.astype(np.float32))[None].to(self.device))

    def per_label(self, prep: PreparedImage, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The 'per-label' reference crop: a window centred on the label's bounding box (centre
        rounded half to even, as Python's round), zero-padded outside the volume, the image crop
        z-scored on its own."""
        if prep.raw is None:
            raise InputError(f"{prep.name}: prepared as a target; per-label reference crops need the "
                             "reference prepared with target=False")
        zyx = np.argwhere(masks.any(axis=0))
        centre = np.array([int(round((int(lo) + int(hi)) / 2.0)) for lo, hi in zip(zyx.min(0), zyx.max(0))])
        win = np.array(self.window)
        box = tuple(slice(int(s), int(s + w)) for s, w in zip(centre - win // 2, win))
        raw = _crop(prep.raw, box, 0.0)
        img = volume_intensity_map(raw, self.intensity, self.policy).apply(raw)
        m = np.stack([_crop(mk, box, 0) for mk in masks])
        return (torch.from_numpy(img)[None, None].to(self.device),
                torch.from_numpy(m.astype(np.float32))[None].to(self.device))


def _crop(arr: np.ndarray, box: tuple[slice, ...], fill: float) -> np.ndarray:
    return crop_padded(arr, [s.start for s in box], [s.stop - s.start for s in box], fill)
