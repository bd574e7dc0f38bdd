"""The one connected-component filter and the 'largest' post-processing of label maps (which post-processing a
run applies: ``Policy.postprocess_of``; where: ``BackToTarget``)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from iris_core.io.resample import array_to_image


def largest_component(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """The largest connected component of a binary array (connectivity 6: faces; 26: faces, edges and corners);
    ties go to the component met first in array order. The one component filter: the model-grid policy of the
    MASS pipeline, the target-grid 'largest' post-processing and the body crop all use it."""
    from scipy import ndimage

    if connectivity not in (6, 26):
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    lab, n = ndimage.label(mask, structure)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def keep_largest_component(labels: sitk.Image, values: list[int], connectivity: int = 26) -> sitk.Image:
    """Per class, keep only its largest connected component (stray islands removed). Fits single connected
    structures (brain, liver); not structures made of several parts (e.g. both kidneys as one label)."""
    arr = sitk.GetArrayFromImage(labels)
    out = np.zeros_like(arr)
    for v in values:
        mask = arr == v
        if mask.any():
            out[largest_component(mask, connectivity)] = v
    return array_to_image(out, labels)
