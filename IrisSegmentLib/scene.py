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


#: volume node classes that are not one scalar per voxel (a DTI volume IsA vtkMRMLScalarVolumeNode with one
#: scalar component, but arrayFromVolume gives [k, j, i, 3, 3] tensors): what the message calls them
NOT_SCALAR = {"vtkMRMLDiffusionTensorVolumeNode": "a diffusion tensor volume",
              "vtkMRMLDiffusionWeightedVolumeNode": "a diffusion weighted volume",
              "vtkMRMLVectorVolumeNode": "a vector (e.g. colour) volume",
              "vtkMRMLMultiVolumeNode": "a multi-volume (time series)"}


def volume_to_image(node, role: str = "volume") -> sitk.Image:
    """A SimpleITK image of a scalar volume node (array copied, world geometry)."""
    import slicer.util

    if node is None:
        raise SceneError(f"choose a {role}")
    kind = next((what for cls, what in NOT_SCALAR.items() if node.IsA(cls)), None)
    if kind is not None:
        raise SceneError(f"{describe(node, role)} is {kind}; IrisSegment segments scalar volumes (one intensity "
                         "per voxel: CT, MR, PET); choose a scalar volume or extract one (e.g. a DTI's FA map)")
    if node.GetImageData() is None:
        raise SceneError(f"{describe(node, role)} has no image data; load or choose another volume")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise SceneError(f"{describe(node, role)} has several components per voxel; a scalar volume is needed")
    arr = slicer.util.arrayFromVolume(node)
    if arr.ndim != 3:
        raise SceneError(f"{describe(node, role)} holds {arr.ndim - 3} more dimensions per voxel; a scalar "
                         "volume (one intensity per voxel) is needed")
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
    from iris_core.io.imaging import check_finite, check_volume

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
    """Names given to several segments, ignoring case: vtkSegmentation::GetSegmentIdBySegmentName compares
    names case-insensitively (Libs/vtkSegmentationCore/vtkSegmentation.cxx), so 'Left' and 'left' are one
    name to Slicer and one of them would be lost on import."""
    folded = [i.name.casefold() for i in infos]
    return sorted({i.name for i in infos if folded.count(i.name.casefold()) > 1})


BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter::GetSegmentationBinaryLabelmapRepresentationName()


def source_representation(seg_node) -> str:
    """The segmentation's source (formerly 'master') representation name."""
    seg = seg_node.GetSegmentation()
    get = getattr(seg, "GetSourceRepresentationName", None) or seg.GetMasterRepresentationName  # before 5.4
    return get()


@contextlib.contextmanager
def labelmap_view(seg_node, volume_node=None):
    """The segmentation itself when it holds binary labelmaps, else a temporary copy converted to them:
    reading a segment as an array converts it in place (slicer.util.arrayFromSegmentBinaryLabelmap ->
    vtkMRMLSegmentationNode::GetBinaryLabelmapRepresentation creates the representation), and the user's
    node must not change. The copy is removed afterwards."""
    seg = seg_node.GetSegmentation()
    if seg.ContainsRepresentation(BINARY_LABELMAP):
        yield seg_node
        return
    scene = seg_node.GetScene()
    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{seg_node.GetName()} (IrisSegment copy)")
    try:
        copy.GetSegmentation().DeepCopy(seg)
        copy.SetAndObserveTransformNodeID(seg_node.GetTransformNodeID())
        if volume_node is not None:  # converted on the volume's grid (else a default, often very fine one)
            copy.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if not copy.GetSegmentation().CreateRepresentation(BINARY_LABELMAP):
            raise SceneError(f"segmentation '{seg_node.GetName()}' ({source_representation(seg_node)}) cannot be "
                             "converted to a binary labelmap; convert it in the Segmentations module first")
        yield copy
    finally:
        scene.RemoveNode(copy)


def _segment_ml(seg_node, segment_id: str) -> float:
    """A segment's volume in ml in its own binary labelmap (before it is resampled onto a volume's grid)."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    img = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, img)
    scalars = img.GetPointData().GetScalars() if img.GetPointData() is not None else None
    if scalars is None:
        return 0.0
    return float((vtk_to_numpy(scalars) > 0).sum()) * float(np.prod(img.GetSpacing())) / 1000.0


def segment_masks(seg_node, segment_ids: list[str] | None, volume_node
                  ) -> tuple[list[np.ndarray], list[SegmentInfo], list[float]]:
    """One boolean mask per chosen segment on ``volume_node``'s grid (segments may overlap: a
    structure inside another stays whole), and the share of each segment that lies inside the volume
    (1 when whole; less when the volume cuts it off). Empty segments and repeated names (ignoring case)
    are refused. A segmentation held as closed surfaces is read through a converted copy: the user's node
    gains no representation."""
    import slicer.util

    infos = segment_infos(seg_node, segment_ids)
    if not infos:
        raise SceneError(f"segmentation '{seg_node.GetName()}' has no segments; draw the structures in the "
                         "Segment Editor or choose another segmentation")
    dup = duplicate_names(infos)
    if dup:
        raise SceneError(f"segmentation '{seg_node.GetName()}' has several segments named "
                         f"{', '.join(repr(n) for n in dup)} (names that differ only in upper/lower case are one "
                         "name to Slicer); rename them (each name is one class)")
    masks, kept = [], []
    voxel_ml = float(np.prod(volume_to_image(volume_node).GetSpacing())) / 1000.0
    # slicer.util's export leaves a temporary colour table behind: every node added here is removed again
    with nodes_removed_after(seg_node.GetScene()), labelmap_view(seg_node, volume_node) as view:
        for info in infos:
            arr = slicer.util.arrayFromSegmentBinaryLabelmap(view, info.segment_id, volume_node)
            if arr is None or not np.any(arr):
                raise SceneError(f"segment '{info.name}' of '{seg_node.GetName()}' is empty on "
                                 f"'{volume_node.GetName()}'")
            masks.append(np.asarray(arr) > 0)
            own = _segment_ml(view, info.segment_id)
            kept.append(min(1.0, masks[-1].sum() * voxel_ml / own) if own > 0 else 1.0)
    return masks, infos, kept


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
    if output_node is not None:
        check_output(output_node)
    created = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{target_node.GetName()} Iris")
    try:
        created.CreateDefaultDisplayNodes()
        created.SetReferenceImageGeometryParameterFromVolumeNode(target_node)
        created.SetAndObserveTransformNodeID(target_node.GetTransformNodeID())
        segmentation = created.GetSegmentation()
        for info in infos:
            sid = segmentation.AddEmptySegment("", info.name, list(info.color))
            single = np.any([arr == info.value for arr in layers], axis=0).astype(np.uint8)
            if single.any():
                # slicer.util removes its temporary label map node but not that node's display node
                with nodes_removed_after(scene):
                    slicer.util.updateSegmentBinaryLabelmapFromArray(single, created, sid, target_node)
            segment = segmentation.GetSegment(sid)
            segment.SetColor(*info.color)
            if info.terminology:
                segment.SetTag("TerminologyEntry", info.terminology)
        if output_node is None:
            return created
        # into the user's node only once every segment was made: the same-named segments are replaced by
        # copies (a failure above leaves the user's node as it was)
        out = output_node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            sid = segmentation.GetNthSegmentID(i)
            existing = out.GetSegmentIdBySegmentName(segmentation.GetSegment(sid).GetName())
            if existing:
                out.RemoveSegment(existing)
            if not out.CopySegmentFromSegmentation(segmentation, sid):
                raise SceneError(f"segment '{segmentation.GetSegment(sid).GetName()}' could not be copied into "
                                 f"'{output_node.GetName()}'")
        # the result's grid is the target's: the chosen output keeps another volume's geometry no more (the Segment
        # Editor and export would work on that volume's grid)
        output_node.SetReferenceImageGeometryParameterFromVolumeNode(target_node)
        scene.RemoveNode(created)
        created = None
        return output_node
    except Exception:
        if created is not None:
            scene.RemoveNode(created)
        raise


def check_output(output_node) -> None:
    """Refuse an output segmentation the result cannot be written into: one whose source representation is
    not a binary labelmap (closed surfaces, say). Slicer refuses to import a labelmap into it
    (vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode: 'Source representation of the
    target segmentation node ... is not binary labelmap'), after its same-named segments were removed."""
    rep = source_representation(output_node)
    if rep != BINARY_LABELMAP:
        raise SceneError(f"the output segmentation '{output_node.GetName()}' is held as {rep.lower()} (its source "
                         "representation); the result is a binary labelmap and cannot be written into it: choose "
                         "'Create new segmentation', or change its source representation in the Segmentations "
                         "module")


# -- which volume a segmentation belongs to (the module's first choices, "edit, then reuse") ----------
def volume_of_segmentation(scene, seg_node):
    """The scalar volume a segmentation belongs to: its reference image geometry node reference (set by
    vtkMRMLSegmentationNode::SetReferenceImageGeometryParameterFromVolumeNode: a segmentation read from a
    file has none), else the volume whose grid equals the segmentation's reference image geometry (which a
    .seg.nrrd file stores); None when neither tells."""
    import slicer

    ref = seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole())
    if ref is not None:
        return ref
    geometry = seg_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not geometry:
        return None
    for vol in scalar_volumes(scene):
        if vol.GetImageData() is not None and _same_geometry(geometry, _geometry_of(vol)):
            return vol
    return None


def _geometry_of(volume) -> str:
    import slicer
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(m, volume.GetImageData())


def _same_geometry(a: str, b: str, tol: float = 1e-3) -> bool:
    """Two serialized image geometries (16 matrix elements, then the extent) agree within ``tol``."""
    try:
        x = [float(v) for v in a.strip(";").split(";")]
        y = [float(v) for v in b.strip(";").split(";")]
    except ValueError:
        return False
    return len(x) == len(y) and all(abs(p - q) <= tol for p, q in zip(x, y))


def scalar_volumes(scene) -> list:
    """Scalar volumes of the scene in the order they were added (label map volumes left out)."""
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        n = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if not n.IsA("vtkMRMLLabelMapVolumeNode"):
            out.append(n)
    return out
