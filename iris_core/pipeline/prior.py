"""Label fusion after alignment (issue [20]): the aligned reference's labels as a prior on the model's logits,
weighted voxel by voxel by how well the aligned reference image agrees with the target there.

The model's readout works on a coarse grid (its memory positions are compared at half the model grid), so a
structure defined by where it lies is capped by that grid even when the alignment is near perfect; the
aligned label map has the target's own resolution. Patch-based label fusion (Coupé et al., NeuroImage 2011)
trusts a reference where its image looks like the target's: here the local normalised cross-correlation
(Gaussian window) of the target and the aligned reference image, clipped to [0, 1], scales the prior, so
that a moved copy of the reference takes the aligned labels almost as they are while tissue that the
alignment misplaces keeps the model's answer. The fused probability of class k is
``sigmoid(logit(p_k) + weight * s**power * (2 q_k - 1))`` with ``q_k`` the aligned reference's share of class
k (its labels through the alignment by nearest neighbour, or its indicator interpolated linearly: the policy's
prior_labels) and ``s`` the agreement; the weight and the power are policy fields chosen on
held-out tasks (the model card says how), never on the benchmark.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from iris_core.pipeline.align import Alignment

#: the Gaussian window (mm, standard deviation) of the local agreement
AGREEMENT_SIGMA_MM = 3.0


def local_agreement(target: sitk.Image, warped: sitk.Image, sigma_mm: float = AGREEMENT_SIGMA_MM) -> np.ndarray:
    """Local normalised cross-correlation of two images on the same grid (Gaussian window of ``sigma_mm``),
    clipped to [0, 1]: 1 where the aligned reference looks like the target, 0 where it does not or is flat."""
    t = sitk.Cast(target, sitk.sitkFloat32)
    r = sitk.Cast(warped, sitk.sitkFloat32)

    small = min(target.GetSize()) < 4  # the recursive filter needs four voxels along every axis

    def mean(x: sitk.Image) -> np.ndarray:
        if small:
            return sitk.GetArrayFromImage(sitk.DiscreteGaussian(x, sigma_mm**2, useImageSpacing=True))
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(x, sigma_mm))

    mt, mr = mean(t), mean(r)
    vt, vr = mean(t * t) - mt * mt, mean(r * r) - mr * mr
    # flat on either side (background, outside the reference, the inside of a uniform structure): no evidence.
    # Relative to each image's own variance: in a flat region E[x^2] - E[x]^2 is rounding noise of either sign
    flat = (vt <= 1e-4 * float(vt.mean()) + 1e-12) | (vr <= 1e-4 * float(vr.mean()) + 1e-12)
    out = (mean(t * r) - mt * mr) / np.sqrt(np.where(flat, 1.0, vt * vr))
    out[flat] = 0.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class AlignedPrior:
    """One aligned reference's evidence on the target grid: its agreement map, and its labels' shares."""

    def __init__(self, target: sitk.Image, reference_image: sitk.Image, reference_labels: sitk.Image,
                 alignment: Alignment, nearest: bool = False):
        """``nearest``: the labels go to the target by nearest neighbour (atlas label propagation: a share of 0 or
        1, one label map kept); else each label's indicator is interpolated linearly (a share in [0, 1])."""
        self.transform = alignment.target_to_reference()
        self.target = target
        self.labels = reference_labels
        # the same label map as the alignment alone gives (evaluate --method align)
        self.warped_labels = sitk.GetArrayFromImage(alignment.warp_labels(reference_labels, target)) if nearest else None
        warped = sitk.Resample(sitk.Cast(reference_image, sitk.sitkFloat32), target, self.transform,
                               sitk.sitkLinear, 0.0)
        self.agreement = local_agreement(target, warped)
        self.values = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(reference_labels))}

    def holds(self, value: int) -> bool:
        """Whether the reference draws label ``value`` at all (a reference without it says nothing about it:
        several references may hold different classes)."""
        return int(value) in self.values

    def share(self, value: int) -> np.ndarray:
        """The aligned reference's share of label ``value`` at each target voxel: 0 or 1 (nearest neighbour) or
        the linear interpolation of its indicator, in [0, 1]."""
        if self.warped_labels is not None:
            return (self.warped_labels == int(value)).astype(np.float32)
        indicator = sitk.Cast(self.labels == int(value), sitk.sitkFloat32)
        return sitk.GetArrayFromImage(sitk.Resample(indicator, self.target, self.transform, sitk.sitkLinear, 0.0))


def fuse(probability: np.ndarray, priors: list[AlignedPrior], value: int, weight: float,
         power: float = 1.0) -> np.ndarray:
    """Class ``value``'s probabilities on the target grid with the aligned references' labels as a prior on the
    logit (the mean of the priors of the references that hold the class), each weighted by its agreement to the
    ``power`` (the policy's prior_power: how sharply the weight falls as the images differ); unchanged with
    none or a weight of 0."""
    priors = [pr for pr in priors if pr.holds(value)]
    if not priors or weight <= 0:
        return probability
    p = np.clip(probability.astype(np.float32), 1e-6, 1 - 1e-6)
    logit = np.log(p) - np.log1p(-p)
    prior = sum((pr.agreement if power == 1 else pr.agreement**power) * (2 * pr.share(value) - 1)
                for pr in priors) / len(priors)
    return (1 / (1 + np.exp(-np.clip(logit + weight * prior, -60, 60)))).astype(np.float32)
