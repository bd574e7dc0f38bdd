"""Post-processing of label maps on the target grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .resample import array_to_image

POSTPROCESS = ("none", "largest")


def keep_largest_component(labels: sitk.Image, values: list[int], fully_connected: bool = True) -> sitk.Image:
    """Per class, keep only its largest 26-connected component (6-connected: ``fully_connected=False``;
    stray islands removed). Fits single
    connected structures (brain, liver); not structures made of several parts (e.g. both kidneys
    as one label)."""
    arr = sitk.GetArrayFromImage(labels)
    out = np.zeros_like(arr)
    for v in values:
        mask = sitk.GetImageFromArray((arr == v).astype(np.uint8))
        if not sitk.GetArrayViewFromImage(mask).any():
            continue
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask, fully_connected), sortByObjectSize=True)
        out[sitk.GetArrayViewFromImage(cc) == 1] = v
    return array_to_image(out, labels)


def disjoint_groups(masks: list[np.ndarray]) -> list[list[int]]:
    """Indices of ``masks`` split into groups whose masks do not overlap (first fit, in order), so each
    group can be one label map without a structure swallowing another (one group when none overlap)."""
    groups: list[list[int]] = []
    unions: list[np.ndarray] = []
    for i, m in enumerate(masks):
        for g, u in zip(groups, unions):
            if not np.any(u & m):
                g.append(i)
                u |= m
                break
        else:
            groups.append([i])
            unions.append(m.copy())
    return groups


def postprocess(labels: sitk.Image, values: list[int], method: str = "none") -> sitk.Image:
    """Apply a named post-processing ('none' or 'largest')."""
    if method == "none":
        return labels
    if method == "largest":
        return keep_largest_component(labels, values)
    from .errors import InputError

    raise InputError(f"unknown post-processing {method!r}; use one of {', '.join(POSTPROCESS)}")
