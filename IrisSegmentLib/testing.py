"""The end-to-end scenario shared by the pytest suite (slicer-core) and the Slicer self-test:
real sample files -> real MRML nodes -> Segment through the real worker -> checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.resources import RESOURCES, SAMPLE_DATA

BRAIN_COLOR = (0.85, 0.55, 0.45)
BRAIN_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                     "Structure~SCT^12738006^Brain~^^~Anatomic codes - DICOM master list~^^~^^")


def write_sample_files(folder: str | Path) -> dict[str, Path]:
    """Colin27 T1 + brain mask (reference) and the ICBM 2009a template moved off MNI space with its
    brain mask (target, truth), as NRRD files in ``folder`` (full resolution; needs Debian
    mricron-data and nilearn: the small shipped pair is ``load_sample_pair``)."""
    from iris_core import sampledata
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ref = sampledata.colin27("brain")
    tgt = sampledata.move_off_mni(sampledata.icbm2009a("brain"), seed=1)
    files = {"ref": ref.image, "ref_labels": ref.labels, "target": tgt.image, "truth": tgt.labels}
    paths = {}
    for key, img in files.items():
        paths[key] = folder / f"{key}.nrrd"
        sitk.WriteImage(img, str(paths[key]), True)
    return paths


SAMPLE_DIR = SAMPLE_DATA
# the shipped pair (see Resources/SampleData/NOTICE.md): (file, node name, Slicer file type)
SAMPLE_FILES = [
    ("Colin27.nrrd", "Colin27", "VolumeFile"),
    ("Colin27.seg.nrrd", "Colin27 segmentation", "SegmentationFile"),
    ("ICBM2009a-moved.nrrd", "ICBM2009a moved", "VolumeFile"),
    ("ICBM2009a-moved.seg.nrrd", "ICBM2009a moved manual", "SegmentationFile"),
]


def sample_data_source() -> dict:
    """Keyword arguments of SampleData.SampleDataLogic.registerCustomSampleDataSource for the
    shipped pair: local files as file: URIs (as Slicer's own SampleData tests do, path2uri), every
    list of the same length (SampleDataSource.__init__ checks len() of each), and each file's SHA-256:
    without a checksum SampleDataLogic.downloadFile reuses any non-empty file of that name in Slicer's cache
    ("File already exists in cache - reusing it"), so an updated sample would never replace an old one; with
    one, a cached file that differs is downloaded again (Modules/Scripted/SampleData/SampleData.py)."""
    import hashlib
    import urllib.parse
    import urllib.request

    paths = [SAMPLE_DIR / f for f, _, _ in SAMPLE_FILES]
    return {
        "checksums": ["SHA256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
        "category": "IrisSegment", "sampleName": "IrisBrainPair",
        "uris": [urllib.parse.urljoin("file:", urllib.request.pathname2url(str(p))) for p in paths],
        "fileNames": [f"IrisSegment-{f}" for f, _, _ in SAMPLE_FILES],
        "nodeNames": [n for _, n, _ in SAMPLE_FILES],
        "loadFileTypes": [t for _, _, t in SAMPLE_FILES],
    }


def load_sample_pair(scene) -> dict:
    """The shipped pair as nodes (what Sample Data loads): reference volume + segmentation, target
    volume + its manual segmentation."""
    nodes = []
    for f, name, kind in SAMPLE_FILES:
        path = SAMPLE_DIR / f
        if kind == "VolumeFile":
            nodes.append(load_volume(path, name))
        else:
            seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
            storage.SetFileName(str(path))
            if not storage.ReadData(seg):
                raise RuntimeError(f"could not read {path}")
            seg.SetAndObserveStorageNodeID(storage.GetID())
            seg.CreateDefaultDisplayNodes()
            nodes.append(seg)
    return {"reference": nodes[0], "reference_seg": nodes[1], "target": nodes[2], "manual": nodes[3]}


def load_volume(path: Path, name: str, labelmap: bool = False):
    import slicer

    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
    if node is None:
        raise RuntimeError(f"could not load {path}")
    return node


def segmentation_from_labelmap(scene, label_node, reference_volume, name: str, segment_name: str = "brain"):
    """A segmentation node with one named, coloured segment per label of ``label_node``."""
    import slicer

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label_node, seg):
        raise RuntimeError("labelmap import failed")
    segment = seg.GetSegmentation().GetNthSegment(0)
    segment.SetName(segment_name)
    segment.SetColor(*BRAIN_COLOR)
    segment.SetTag("TerminologyEntry", BRAIN_TERMINOLOGY)
    scene.RemoveNode(label_node)
    return seg


def build_scene(scene, folder: str | Path) -> dict:
    """Reference volume + segmentation, target volume and its manual segmentation in ``scene``."""
    paths = write_sample_files(folder)
    ref = load_volume(paths["ref"], "Colin27")
    ref_seg = segmentation_from_labelmap(scene, load_volume(paths["ref_labels"], "tmp", True), ref,
                                         "Colin27 segmentation")
    target = load_volume(paths["target"], "ICBM2009a moved")
    manual = segmentation_from_labelmap(scene, load_volume(paths["truth"], "tmp", True), target, "ICBM manual")
    return {"reference": ref, "reference_seg": ref_seg, "target": target, "manual": manual, "paths": paths}


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def check_result(result, target, reference_seg) -> None:
    """The result node sits on the target, copies the reference segment's name, colour and
    terminology, and is non-empty."""
    import slicer.util

    from .scene import _get_tag, volume_to_image

    ref_segment = reference_seg.GetSegmentation().GetNthSegment(0)
    seg = result.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1, seg.GetNumberOfSegments()
    s = seg.GetNthSegment(0)
    assert s.GetName() == ref_segment.GetName()
    assert np.allclose(s.GetColor(), ref_segment.GetColor())
    assert _get_tag(s, "TerminologyEntry") == _get_tag(ref_segment, "TerminologyEntry")
    arr = slicer.util.arrayFromSegmentBinaryLabelmap(result, seg.GetNthSegmentID(0), target)
    assert arr.shape == slicer.util.arrayFromVolume(target).shape
    assert arr.sum() > 0
    img = volume_to_image(target)
    assert img.GetSize() == tuple(target.GetImageData().GetDimensions())


def save_and_reload(scene, node, path: str | Path):
    """Write a segmentation node to .seg.nrrd and read it back into a new node."""
    import slicer

    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"could not write {path}")
    back = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    if not reader.ReadData(back):
        raise RuntimeError(f"could not read {path}")
    del slicer
    return back


def register_sample_data() -> None:
    """Register the shipped pair in 3D Slicer's Sample Data module (called once Slicer has started); a sample
    that cannot register must never break Slicer's start-up."""
    import logging

    try:
        import SampleData
    except ImportError:
        return
    icon = RESOURCES / "Icons" / "IrisSegment.png"
    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(thumbnailFileName=str(icon), **sample_data_source())
    except Exception:
        logging.exception("IrisSegment: could not register the sample data")


def run_module_tests() -> bool:
    """Run the module's self-tests (Testing/Python/IrisSegmentModuleTest.py: CMake installs it beside the module, so
    an installed extension finds it as a source checkout does); whether they all passed."""
    import importlib.util

    from iris_core.resources import ROOT

    path = ROOT / "Testing" / "Python" / "IrisSegmentModuleTest.py"
    if not path.is_file():
        raise FileNotFoundError(f"the module's self-test {path} is not installed (CMakeLists.txt installs it)")
    spec = importlib.util.spec_from_file_location("IrisSegmentModuleTest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.runTest()
