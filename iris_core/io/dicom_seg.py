"""DICOM SEG in and out (highdicom): a result written as a DICOM Segmentation of the target's DICOM series, and a
reference's segments read from a DICOM SEG of its image series.

Out: one segment per class, named as the class, with its colour and SNOMED CT category and type
(``io.terminology``; 'Tissue' where the name has none), an AUTOMATIC segment whose algorithm is the model (name,
version, fingerprint), BINARY, referencing the source series and each frame's source image; classes that
overlap stay overlapping (each segment has its own frames). In: the segments of a SEG become classes named by
their labels, on the referenced image's grid; overlapping segments become layers, as a layered ``.seg.nrrd``
reference does. A SEG that references another series than the image given with it is refused naming both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError, reason
from iris_core.io.colours import colour_rgb
from iris_core.io.imaging import _is_dicom_file, dicom_series_files
from iris_core.io.segmentations import (
    disjoint_groups,
    slicer_layer_count,
    slicer_segment_names,
    slicer_segments,
)
from iris_core.io.terminology import structure_codes

#: the SOP Class of a DICOM Segmentation
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: for a class name SNOMED CT has no entry for here: Tissue / Tissue (DICOM CID 7150 / 7151)
TISSUE = ("85756007", "Tissue")


def is_dicom_seg(path: str | Path) -> bool:
    """True for a DICOM file of the Segmentation SOP Class (the header alone is read)."""
    path = Path(path)
    if not path.is_file() or not _is_dicom_file(path):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001  (any unreadable header: not a SEG)
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEGMENTATION_STORAGE


def dicom_seg_names(path: str | Path) -> dict[int, str]:
    """Segment k (1..K, in the SEG's order, as ``read_dicom_seg`` numbers them) -> its label, from the header."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001  (read_dicom_seg words an unreadable SEG)
        return {}
    return {k: str(getattr(item, "SegmentLabel", "") or f"segment_{k}")
            for k, item in enumerate(getattr(ds, "SegmentSequence", []), start=1)}


def segment_names(path: str | Path) -> dict[int, str]:
    """The names a label file gives its classes, from its header alone: a 3D Slicer ``.seg.nrrd`` (label value ->
    segment name; a layered one: segment i -> class i + 1, as ``read_layered_segmentation`` numbers them) or a
    DICOM SEG (segment k -> class k, as ``read_dicom_seg``); {} for a plain label map. (Here, beside the DICOM
    SEG reader, which builds on segmentations.py.)"""
    if is_dicom_seg(path):
        return dicom_seg_names(path)
    if slicer_layer_count(path) > 1:
        return {i + 1: name for i, (_, _, name) in enumerate(slicer_segments(path))}
    return slicer_segment_names(path)


def is_dicom_series(path: str | Path) -> bool:
    """A DICOM series as read_image takes it: a folder, or one DICOM file of the series."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and _is_dicom_file(path))


def check_dicom_seg_output(output: str | Path, target: str | Path) -> None:
    """Refuse, before any work, a ``.dcm`` output for a target that is not a DICOM series (a SEG describes
    the frames of a DICOM series; a NIfTI or NRRD target has none to reference), or for a series without a
    Frame of Reference UID: a SEG shares its images' frame of reference (highdicom refuses to write one without
    it), and one made up here would tie the SEG to no image's space."""
    if not str(output).lower().endswith(".dcm"):
        return
    if not is_dicom_series(target):
        raise InputError(f"output {output}: a DICOM SEG references the target's DICOM series, and the target "
                         f"{target} is not one (a DICOM folder or a file of the series); write .nii.gz, .nrrd or "
                         ".seg.nrrd instead", inputs=("output",))
    import pydicom

    for name in dicom_series_files(Path(target), "target image"):  # the headers only
        ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
        if not str(getattr(ds, "FrameOfReferenceUID", "") or "").strip():
            raise InputError(f"output {output}: the target's DICOM series {target} has no Frame of Reference UID "
                             f"(file {Path(name).name}: tag (0020,0052) missing or empty), and a DICOM SEG must "
                             "share its images' frame of reference; write .nii.gz, .nrrd or .seg.nrrd instead, or "
                             "export the series again with its Frame of Reference UID", inputs=("output",))


def _series(target: str | Path, what: str) -> tuple[list[str], list]:
    """The target's series files in the order SimpleITK reads them (slice k of the volume = file k) and their
    datasets."""
    import pydicom

    files = dicom_series_files(Path(target), what)
    return files, [pydicom.dcmread(f) for f in files]


def _coded(code: tuple[str, str]):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[0], scheme_designator="SCT", meaning=code[1])


def build_dicom_seg(labels: sitk.Image | list[sitk.Image], classes: list, target: str | Path, model: dict):
    """``labels`` (one label map, or several whose classes may overlap) on the grid of the DICOM series
    ``target`` as a highdicom Segmentation. ``classes``: ClassSpec (name, value); ``model``: the sidecar's model
    record (name, fingerprint)."""
    import highdicom as hd
    from highdicom.color import CIELabColor
    from pydicom.sr.codedict import codes

    from iris_core import __version__

    files, datasets = _series(target, "target image")
    layers = labels if isinstance(labels, list) else [labels]
    arrays = [sitk.GetArrayViewFromImage(layer) for layer in layers]
    if arrays[0].shape[0] != len(datasets):
        raise InputError(f"target {target}: its series has {len(datasets)} files, the label map "
                         f"{arrays[0].shape[0]} slices")
    # slice k of the volume is file k: checked by position, so no frame is ever attributed to another slice
    for k in (0, len(datasets) - 1):
        ipp = np.array([float(v) for v in datasets[k].ImagePositionPatient])
        if not np.allclose(ipp, layers[0].TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-2):
            raise InputError(f"target {target}: slice {k} of the volume is not at file {files[k]}'s position")
    masks = []
    for c in classes:
        arr = next((a for a in arrays if (a == c.value).any()), arrays[0])
        masks.append(arr == c.value)
    pixels = np.stack(masks, axis=-1).astype(np.uint8)  # frames, rows, columns, segments
    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model.get("name", "iris-segment"))[:64], version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
        source=str(model.get("fingerprint", ""))[:64] or None)
    descriptions = []
    for i, c in enumerate(classes, start=1):
        codes = structure_codes(c.name)
        category, kind = (codes[0], codes[1]) if codes else (TISSUE, TISSUE)
        rgb = [int(round(255 * v)) for v in colour_rgb(i - 1)]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=c.name[:64], segmented_property_category=_coded(category),
            segmented_property_type=_coded(kind), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=CIELabColor.from_rgb(*rgb)))
        descriptions[-1].SegmentDescription = c.name[:64]  # what viewers and dcmqi show beside the label
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="IrisSegment", manufacturer_model_name=str(model.get("name", ""))[:64] or "-",
        software_versions=__version__, device_serial_number=str(model.get("fingerprint", "0"))[:16] or "0",
        series_description=f"IrisSegment {model.get('name', '')}"[:64], content_label="IRISSEGMENT",
        omit_empty_frames=False)
    return seg


def read_dicom_seg(seg_path: str | Path, image_series: str | Path, image: sitk.Image, what: str = "reference"
                   ) -> tuple[list[sitk.Image], dict[int, str]]:
    """The segments of the DICOM SEG ``seg_path`` on the grid of ``image`` (read from the DICOM series
    ``image_series``): label maps of groups of segments that do not overlap (one map when none does), with the
    label value of each segment (1..K, in the SEG's order) and its name."""
    import highdicom as hd

    if not is_dicom_series(image_series):
        raise InputError(f"{what} ({image_series}, {seg_path}): a DICOM SEG describes a DICOM series; give that "
                         "series (its folder or one of its files) as the image", inputs=("references",))
    files, datasets = _series(image_series, f"{what} image")
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as exc:  # noqa: BLE001  (highdicom raises several kinds on a bad file)
        raise InputError(f"{what} label map {seg_path}: not a readable DICOM SEG ({reason(exc)})") from None
    series_uid = str(datasets[0].SeriesInstanceUID)
    referenced = [str(s.SeriesInstanceUID) for s in getattr(seg, "ReferencedSeriesSequence", [])]
    if series_uid not in referenced:
        raise InputError(f"{what} label map {seg_path} is a DICOM SEG of the series {', '.join(referenced) or '?'}, "
                         f"not of the image series {series_uid} ({image_series}): give the series it was drawn on",
                         inputs=("references",))
    frame = str(getattr(datasets[0], "FrameOfReferenceUID", ""))
    if frame and str(getattr(seg, "FrameOfReferenceUID", frame)) != frame:
        raise InputError(f"{what} label map {seg_path}: its frame of reference {seg.FrameOfReferenceUID} is not the "
                         f"image series' {frame}", inputs=("references",))
    numbers = list(seg.get_segment_numbers())
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        # frames placed by the source image each one derives from (dcmqi and highdicom record it per frame);
        # dcmqi does not state that spatial locations are preserved, which a segmentation of that very frame
        # implies: the frame of reference is checked instead
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                                   assert_missing_frames_are_empty=True,
                                                   ignore_spatial_locations=True)
    except (ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{what} label map {seg_path}: its frames cannot be placed on the series {series_uid} "
                         f"({reason(exc)})") from None
    masks = [np.ascontiguousarray(pixels[..., k] > 0) for k in range(len(numbers))]
    if masks and masks[0].shape != sitk.GetArrayViewFromImage(image).shape:
        raise InputError(f"{what} label map {seg_path}: {masks[0].shape} voxels, the image "
                         f"{sitk.GetArrayViewFromImage(image).shape}")
    names = {k + 1: str(seg.get_segment_description(n).SegmentLabel) for k, n in enumerate(numbers)}
    maps = []
    for group in disjoint_groups(masks):
        arr = np.zeros(masks[0].shape, np.uint16)
        for k in group:
            arr[masks[k]] = k + 1
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(image)
        maps.append(out)
    return maps, names


def dicom_seg_truth(seg_path: str | Path, image_series: str | Path, image: sitk.Image) -> sitk.Image:
    """One label map of a DICOM SEG on its series' grid (``image``, for evaluation truth): segment k has value
    k; where segments overlap, the later one."""
    maps, _ = read_dicom_seg(seg_path, image_series, image, "truth")
    out = np.zeros(sitk.GetArrayViewFromImage(maps[0]).shape, np.uint16)
    for m in maps:
        arr = sitk.GetArrayViewFromImage(m)
        out[arr > 0] = arr[arr > 0]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(image)
    return img


