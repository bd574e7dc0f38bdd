"""Back to the target: probabilities on the model grid -> the label map (or probability maps) on the exact
target grid, decided where the model's policy decides, then post-processed. One object built from the policy
and the run's stage timer (as nnU-Net's export functions take their plans), used by ``segment_target``: the one
way to labels, so an evaluation scores exactly what segment writes."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from iris_core.io.resample import array_to_image, resample_to
from iris_core.pipeline.policy import Policy
from iris_core.pipeline.postprocess import keep_largest_component, largest_component
from iris_core.pipeline.preprocess import PreparedImage
from iris_core.pipeline.prior import AlignedPrior, fuse
from iris_core.types import Timer


class BackToTarget:
    """The pipeline's last stage for one model policy; its seconds go to ``timer`` ('resample_back')."""

    def __init__(self, policy: Policy, timer: Timer):
        self.policy, self.timer = policy, timer

    def labels(self, probs: np.ndarray, prep: PreparedImage, values: list[int], postprocess: str = "none",
               groups: list[list[int]] | None = None, priors: Sequence[AlignedPrior] = ()
               ) -> sitk.Image | list[sitk.Image]:
        """The label map a run writes, from its probabilities: on the exact target grid, one class per voxel,
        decided where the policy decides (``labels_on``), then ``postprocess`` ('none', 'largest': with the
        policy's connectivity; ``Policy.postprocess_of`` resolves the run's choice). With ``groups`` (classes that
        may overlap), one label map per group. ``priors``: the aligned references' labels, fused into each class's
        probabilities on the target grid with the policy's prior_weight (iris_core.pipeline.prior)."""
        largest = postprocess == "largest"
        if groups is not None:
            return self.to_target_layers(probs, prep, values, groups, largest=largest, priors=priors)
        return self.to_target(probs, prep, values, largest=largest, priors=priors)

    def to_target(self, probs: np.ndarray, prep: PreparedImage, values: list[int], threshold: float | None = None,
                  largest: bool = False, priors: Sequence[AlignedPrior] = ()) -> sitk.Image:
        """Label map on the exact target grid: per voxel the most probable class above ``threshold``
        (default: the policy's); ``largest`` keeps each label's largest connected component (the
        policy's connectivity). Where labels are decided follows the policy's ``labels_on``."""
        t0 = time.perf_counter()
        threshold = self.policy.threshold if threshold is None else threshold
        if self.policy.labels_on_model_grid:
            out = self._labels_on_model_grid(probs, prep, values, threshold, largest)
            self.timer.add("resample_back", t0)
            return out
        target = prep.source
        best = np.full(target.GetSize()[::-1], threshold, dtype=np.float32)
        labels = np.zeros(target.GetSize()[::-1], dtype=np.int32)
        for k, v in enumerate(values):
            pt = self._probability_on_target(probs[k], prep, priors, v)
            win = pt > best
            labels[win] = v
            best[win] = pt[win]
        out = array_to_image(labels.astype(_label_dtype(values)), target)
        if largest:
            out = keep_largest_component(out, values, self.policy.connectivity)
        self.timer.add("resample_back", t0)
        return out

    def to_target_layers(self, probs: np.ndarray, prep: PreparedImage, values: list[int], groups: list[list[int]],
                         threshold: float | None = None, largest: bool = False,
                         priors: Sequence[AlignedPrior] = ()) -> list[sitk.Image]:
        """Label maps on the exact target grid, one per group of class values: within a group one class
        per voxel (as ``to_target``), across groups none decides for another, so classes of different
        groups may overlap (a structure inside another, as the references drew them)."""
        index = {v: k for k, v in enumerate(values)}
        return [self.to_target(probs[[index[v] for v in group]], prep, list(group), threshold, largest, priors)
                for group in groups]

    def _labels_on_model_grid(self, probs: np.ndarray, prep: PreparedImage, values: list[int], threshold: float,
                              largest: bool) -> sitk.Image:
        """The 'model' policy: a voxel of the model grid takes the label of the highest probability
        >= ``threshold`` (classes in the given order, ties to the first), components are filtered
        there, and the label map goes to the target grid by nearest neighbour."""
        best = np.zeros(probs.shape[1:], dtype=np.float32)
        labels = np.zeros(probs.shape[1:], dtype=_label_dtype(values))
        for k, v in enumerate(values):
            win = (probs[k] >= threshold) & (probs[k] > best)
            labels[win] = v
            best[win] = probs[k][win]
        if largest:
            kept = np.zeros_like(labels)
            for v in values:
                if (labels == v).any():
                    kept[largest_component(labels == v, self.policy.connectivity)] = v
            labels = kept
        img = array_to_image(labels, prep.grid)
        return resample_to(img, prep.source, sitk.sitkNearestNeighbor, 0, img.GetPixelID())

    def _probability_on_target(self, p: np.ndarray, prep: PreparedImage, priors: Sequence[AlignedPrior] = (),
                               value: int = 0) -> np.ndarray:
        img = array_to_image(np.ascontiguousarray(p, dtype=np.float32), prep.grid)
        # a copy: an array view of a temporary image would point into freed memory
        out = sitk.GetArrayFromImage(resample_to(img, prep.source, sitk.sitkLinear, 0.0))
        return fuse(out, list(priors), value, self.policy.prior_weight, self.policy.prior_power)

    def probability_maps(self, probs: np.ndarray, prep: PreparedImage, values: list[int] | None = None,
                         priors: Sequence[AlignedPrior] = ()) -> list[sitk.Image]:
        """One float32 probability image per class on the exact target grid (linear, outside: 0), the aligned
        references' prior fused in as for the labels (``values``: the classes' label values, needed with it)."""
        values = list(values) if values is not None else [0] * len(probs)
        return [array_to_image(self._probability_on_target(p, prep, priors, v), prep.source)
                for p, v in zip(probs, values)]


def _label_dtype(values: list[int]) -> type:
    return np.uint16 if max(values, default=0) > 255 else np.uint8
