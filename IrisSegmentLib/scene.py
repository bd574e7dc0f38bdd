"""Scene bridge: MRML volume / segmentation nodes <-> SimpleITK images, with full geometry.

Slicer stores IJK-to-RAS matrices; SimpleITK uses LPS. Both index voxels (k, j, i) in their
arrays, so only the geometry is converted: spacing = column norms, direction = normalised
columns (RAS -> LPS flips x and y), origin = translation. Linear parent transforms are
applied (hardened) so what the user sees in the views is what the model gets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class SceneError(Exception):
    """A user-fixable problem with the nodes in the scene."""


def _vtk_to_numpy(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_world(node) -> np.ndarray:
    """IJK-to-RAS (world) 4x4 of a volume node, through any linear parent transforms."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = _vtk_to_numpy(m)
    tnode = node.GetParentTransformNode()
    if tnode is not None:
        if not tnode.IsTransformToWorldLinear():
            raise SceneError(f"'{node.GetName()}' is under a non-linear transform; harden it first")
        w = vtk.vtkMatrix4x4()
        tnode.GetMatrixTransformToWorld(w)
        ijk = _vtk_to_numpy(w) @ ijk
    return ijk


def geometry_from_matrix(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in SimpleITK's LPS convention from an IJK-to-RAS matrix."""
    lps = RAS_TO_LPS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = RAS_TO_LPS @ ijk_to_ras[:3, 3]
    return tuple(spacing), tuple(origin), tuple(direction.flatten())


def matrix_from_image(image: sitk.Image) -> np.ndarray:
    """IJK-to-RAS 4x4 of a SimpleITK image."""
    d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    m = np.eye(4)
    m[:3, :3] = RAS_TO_LPS @ d
    m[:3, 3] = RAS_TO_LPS @ np.array(image.GetOrigin())
    return m


def describe(node, role: str = "volume") -> str:
    """How a node is named in messages: its role and its name as the user sees it."""
    return f"{role} '{node.GetName()}'" if node is not None else role


def volume_to_image(node, role: str = "volume") -> sitk.Image:
    """A SimpleITK image of a scalar volume node (array copied, world geometry)."""
    import slicer.util

    if node is None:
        raise SceneError(f"choose a {role}")
    if node.GetImageData() is None:
        raise SceneError(f"{describe(node, role)} has no image data; load or choose another volume")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise SceneError(f"{describe(node, role)} has several components per voxel; a scalar volume is needed")
    arr = slicer.util.arrayFromVolume(node)
    img = sitk.GetImageFromArray(np.array(arr))
    spacing, origin, direction = geometry_from_matrix(ijk_to_world(node))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def checked_image(node, role: str) -> sitk.Image:
    """``volume_to_image`` plus what the worker would refuse (not 3-D, a single slice, NaN voxels),
    checked here so that the message names the node rather than a temporary file."""
    from iris_core.errors import InputError
    from iris_core.imaging import check_finite, check_volume

    img = volume_to_image(node, role)
    try:
        check_volume(img, describe(node, role))
        check_finite(img, describe(node, role))
    except InputError as exc:
        raise SceneError(str(exc)) from None
    return img


def world_matrix(node) -> np.ndarray:
    """The node's transform to world (identity without a parent transform)."""
    import vtk

    tnode = node.GetParentTransformNode()
    if tnode is None:
        return np.eye(4)
    if not tnode.IsTransformToWorldLinear():
        raise SceneError(f"'{node.GetName()}' is under a non-linear transform; harden it first")
    m = vtk.vtkMatrix4x4()
    tnode.GetMatrixTransformToWorld(m)
    return _vtk_to_numpy(m)


@contextlib.contextmanager
def nodes_removed_after(scene):
    """Remove every node added to ``scene`` inside the block (slicer.util's segment-array helpers
    leave temporary display nodes behind)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
                 if scene.GetNthNode(i).GetID() not in before]
        for node in added:
            scene.RemoveNode(node)


@dataclass
class SegmentInfo:
    """What is copied from a reference segment to the result: name, colour, terminology."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    terminology: str = ""
    value: int = 0


def segment_infos(seg_node, segment_ids: list[str] | None = None) -> list[SegmentInfo]:
    """Name, colour and terminology of the chosen segments (all when ``segment_ids`` is None)."""
    seg = seg_node.GetSegmentation()
    ids = segment_ids if segment_ids else [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    out = []
    for sid in ids:
        s = seg.GetSegment(sid)
        if s is None:
            raise SceneError(f"segmentation '{seg_node.GetName()}' has no segment '{sid}'")
        out.append(SegmentInfo(sid, s.GetName(), tuple(s.GetColor()), _get_tag(s, "TerminologyEntry")))
    return out


def _get_tag(segment, name: str) -> str:
    """A segment tag's value ('' when absent); vtkSegment.GetTag fills a string by reference."""
    try:
        import vtk

        holder = vtk.reference("")
        if segment.GetTag(name, holder):
            return str(holder)
    except (TypeError, AttributeError):
        pass
    return ""


def duplicate_names(infos: list[SegmentInfo]) -> list[str]:
    names = [i.name for i in infos]
    return sorted({n for n in names if names.count(n) > 1})


def segment_masks(seg_node, segment_ids: list[str] | None, volume_node) -> tuple[list[np.ndarray], list[SegmentInfo]]:
    """One boolean mask per chosen segment on ``volume_node``'s grid (segments may overlap: a
    structure inside another stays whole). Empty segments and repeated names are refused."""
    import slicer.util

    infos = segment_infos(seg_node, segment_ids)
    if not infos:
        raise SceneError(f"segmentation '{seg_node.GetName()}' has no segments; draw the structures in the "
                         "Segment Editor or choose another segmentation")
    dup = duplicate_names(infos)
    if dup:
        raise SceneError(f"segmentation '{seg_node.GetName()}' has several segments named "
                         f"{', '.join(repr(n) for n in dup)}; rename them (each name is one class)")
    masks = []
    for info in infos:
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, info.segment_id, volume_node)
        if arr is None or not np.any(arr):
            raise SceneError(f"segment '{info.name}' of '{seg_node.GetName()}' is empty on "
                             f"'{volume_node.GetName()}'")
        masks.append(np.asarray(arr) > 0)
    return masks, infos


def add_labels_as_segmentation(scene, labels: sitk.Image | list[sitk.Image], infos: list[SegmentInfo], target_node,
                               output_node=None, name: str | None = None):
    """Import a label map on the target's grid (values = ``infos[k].value``) as segments with the
    references' names, colours and terminology: into ``output_node`` when given (its segments of
    the same names are replaced), else into a NEW segmentation node named after the target, under
    the target's parent transform. Several label maps (classes that overlap, each value in one of
    them) give segments that overlap. Returns the node; on failure a new node is removed again."""
    import slicer.util

    layers = [sitk.GetArrayFromImage(x) for x in (labels if isinstance(labels, list) else [labels])]
    for arr in layers:
        if arr.shape != tuple(target_node.GetImageData().GetDimensions())[::-1]:
            raise SceneError(f"result size {arr.shape[::-1]} differs from '{target_node.GetName()}'")
    created = None
    try:
        if output_node is None:
            created = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{target_node.GetName()} Iris")
            created.CreateDefaultDisplayNodes()
            created.SetReferenceImageGeometryParameterFromVolumeNode(target_node)
            created.SetAndObserveTransformNodeID(target_node.GetTransformNodeID())
            seg_node = created
        else:
            seg_node = output_node
        segmentation = seg_node.GetSegmentation()
        for info in infos:
            existing = segmentation.GetSegmentIdBySegmentName(info.name)
            if existing:
                segmentation.RemoveSegment(existing)
            sid = segmentation.AddEmptySegment("", info.name, list(info.color))
            single = np.any([arr == info.value for arr in layers], axis=0).astype(np.uint8)
            if single.any():
                # slicer.util removes its temporary label map node but not that node's display node
                with nodes_removed_after(scene):
                    slicer.util.updateSegmentBinaryLabelmapFromArray(single, seg_node, sid, target_node)
            segment = segmentation.GetSegment(sid)
            segment.SetColor(*info.color)
            if info.terminology:
                segment.SetTag("TerminologyEntry", info.terminology)
        return seg_node
    except Exception:
        if created is not None:
            scene.RemoveNode(created)
        raise
