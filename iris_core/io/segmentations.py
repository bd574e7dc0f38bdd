"""3D Slicer segmentation files (.seg.nrrd): their segments, names and layers (segments that overlap are
stored in several layers), and the one grouping of masks (and of classes) into layers that do not overlap."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError
from iris_core.io.imaging import _unreadable, labels_on_grid, same_grid
from iris_core.types import ClassSpec, Reference


def _seg_nrrd_header(path: str | Path) -> sitk.ImageFileReader | None:
    """A reader holding the header of a ``.seg.nrrd`` file (no voxels read); None for any other file or
    one ITK cannot read."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd") or not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def slicer_segments(path: str | Path) -> list[tuple[int, int, str]]:
    """(layer, label value, name) of each segment in a 3D Slicer ``.seg.nrrd`` header, in the file's order
    (``Segment<i>_Layer``, ``_LabelValue``, ``_Name``, as vtkMRMLSegmentationStorageNode writes them; a file
    without label values numbers its segments from 1); [] for any other file."""
    reader = _seg_nrrd_header(path)
    if reader is None:
        return []
    keys = set(reader.GetMetaDataKeys())

    def field(i: int, name: str, default: str) -> str:
        return reader.GetMetaData(f"Segment{i}_{name}").strip() if f"Segment{i}_{name}" in keys else default

    out = []
    i = 0
    while f"Segment{i}_Name" in keys or f"Segment{i}_ID" in keys:
        try:
            out.append((int(field(i, "Layer", "0")), int(field(i, "LabelValue", str(i + 1))),
                        field(i, "Name", "") or field(i, "ID", f"segment_{i + 1}")))
        except ValueError:
            pass
        i += 1
    return out


def slicer_layer_count(path: str | Path) -> int:
    """Number of layers of a ``.seg.nrrd`` (its components per voxel: one per group of overlapping
    segments); 1 for a 3-D one or any other file."""
    reader = _seg_nrrd_header(path)
    return 1 if reader is None else max(1, reader.GetNumberOfComponents())


def read_layered_segmentation(path: str | Path, image: sitk.Image,
                              image_name: str) -> tuple[list[sitk.Image], dict[int, str]]:
    """A 3D Slicer ``.seg.nrrd`` whose segments overlap (one layer per group of segments that do not) as one
    label map per layer on ``image``'s grid. The layers reuse label values, so segment i of the header
    becomes class i + 1 in every layer; returns the label maps and {class value: segment name}."""
    path = Path(path)
    segments = slicer_segments(path)
    try:
        stack = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable("label map", path, exc) from None
    layers = stack.GetNumberOfComponentsPerPixel()
    if not segments:
        raise InputError(f"label map {path}: {layers} layers but no segment fields (Segment<i>_Layer, "
                         "_LabelValue) in its header to tell which label of which layer is which segment")
    maps, names = [], {}
    for k in range(layers):
        layer = sitk.VectorIndexSelectionCast(stack, k)
        arr = sitk.GetArrayViewFromImage(layer)
        out = np.zeros(arr.shape, dtype=np.int32)
        for i, (seg_layer, value, name) in enumerate(segments):
            if seg_layer == k:
                out[arr == value] = i + 1
                names[i + 1] = name
        remapped = sitk.GetImageFromArray(out)
        remapped.CopyInformation(layer)
        maps.append(labels_on_grid(remapped, f"{path} (layer {k})", image, image_name))
    return maps, names


def slicer_segment_names(path: str | Path) -> dict[int, str]:
    """Label value -> segment name from a one-layer 3D Slicer ``.seg.nrrd`` header; {} for any other file."""
    names: dict[int, str] = {}
    for _, value, name in slicer_segments(path):
        names.setdefault(value, name or f"label_{value}")
    return names


def find_segment(name: str, names: dict[int, str]) -> int | None:
    """The label value of the segment called ``name`` (as spelt, else ignoring case, as Slicer compares
    segment names), None when no segment has it."""
    for same in (lambda n: n == name, lambda n: n.casefold() == name.casefold()):
        found = [v for v, n in names.items() if same(n)]
        if found:
            return found[0]
    return None


def matching_value(name: str | None, value: int, names: dict[int, str]) -> int | None:
    """The value, in a label file whose segments are ``names``, of a class called ``name`` (None: a class with no
    name of its own, ``label_<value>``) of label value ``value`` elsewhere: by name when both sides name their
    classes (None when no segment has it), else by value."""
    if name is not None and names:
        return find_segment(name, names)
    return value


def unknown_segment(name: str, names: dict[int, str], present: set[int] | None = None) -> InputError:
    """The error for a class asked for by a name no reference segment has: the names there are, or (plain label
    maps) that only values can be asked for."""
    if names:
        return InputError(f"classes: no segment of the references is named {name!r}; their segments: "
                          f"{', '.join(repr(n) for n in names.values())} (or give a label value, or NAME=VALUE)",
                          inputs=("classes",))
    values = f" (labels present: {', '.join(map(str, sorted(present))) or 'none'})" if present is not None else ""
    return InputError(f"classes: {name!r} is not a label value, and the reference label maps name no segments"
                      f"{values}; give label values (1,3) or NAME=VALUE (liver=1)", inputs=("classes",))


def disjoint_groups(masks: Iterable[np.ndarray]) -> list[list[int]]:
    """Indices of ``masks`` split into groups whose masks do not overlap (first fit, in order), so each
    group can be one label map without a structure swallowing another (one group when none overlap). The one
    grouping: a segmentation's layers (Slicer, DICOM SEG) and classes that may overlap
    (:func:`overlapping_class_groups`). ``masks`` may be a generator: one is held at a time."""
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


def overlapping_class_groups(refs: list[Reference], classes: list[ClassSpec]) -> list[list[int]]:
    """The class values in groups such that classes whose voxels overlap in some reference (label maps of
    one image: a Slicer segmentation's layers, a structure inside another) fall in different groups and
    the others share one (:func:`disjoint_groups`, first fit in class order): within a group the result has one
    class per voxel, across groups classes may overlap as the references do. One group when nothing overlaps.
    A class's mask is where any label map of an image shown by several references holds it (label maps of
    different images say nothing of overlaps)."""
    images: list[list[Reference]] = []  # the references of one image (same grid, same voxels)
    for r in refs:
        for same in images:
            first = same[0]
            if same_grid(first.labels, r.labels) and (first.image is r.image or np.array_equal(
                    sitk.GetArrayViewFromImage(first.image), sitk.GetArrayViewFromImage(r.image))):
                same.append(r)
                break
        else:
            images.append([r])
    shared = [same for same in images if len(same) > 1]

    def mask(value: int) -> np.ndarray:
        return np.concatenate([np.logical_or.reduce([sitk.GetArrayViewFromImage(r.labels) == value for r in same])
                               .ravel() for same in shared]) if shared else np.zeros(0, bool)

    return [[classes[i].value for i in g] for g in disjoint_groups(mask(c.value) for c in classes)]
