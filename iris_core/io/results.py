"""Writing a segmentation's result: the label map (or a Slicer .seg.nrrd with segment names and colours), its
JSON sidecar and the probability maps, atomically, never over an input; class volumes for the sidecar."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError, reason
from iris_core.io.colours import COLOURS
from iris_core.io.dicom_seg import build_dicom_seg, check_dicom_seg_output
from iris_core.io.imaging import write_image_partial
from iris_core.io.names import publish, sidecar_path, split_volume_name
from iris_core.io.outputs import same_file, stamp
from iris_core.types import ClassSpec, SegmentationResult


def class_volumes(labels: sitk.Image | list[sitk.Image], classes: list[ClassSpec]) -> list[dict]:
    """Each class's name, label value, voxel count and volume (mL) in a label map on the target grid (or
    in label maps whose classes may overlap: each class counted in the map that holds it)."""
    count: dict[int, int] = {}
    for layer in labels if isinstance(labels, list) else [labels]:
        values, counts = np.unique(sitk.GetArrayViewFromImage(layer), return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist()):
            if v:
                count[v] = count.get(v, 0) + n
    first = labels[0] if isinstance(labels, list) else labels
    voxel_ml = float(np.prod(first.GetSpacing())) / 1000.0
    return [{"name": c.name, "value": c.value, "voxels": int(count.get(c.value, 0)),
             "volume_ml": round(count.get(c.value, 0) * voxel_ml, 3)} for c in classes]


def _probability_stem_ext(output: Path) -> tuple[str, str]:
    """``seg.nii.gz`` -> (``seg``, ``.nii.gz``); ``seg.seg.nrrd`` -> (``seg``, ``.nrrd``): a probability is a
    scalar volume, which Slicer would read as segments under ``.seg.nrrd``."""
    stem, ext = split_volume_name(output.name)
    ext = ext or ".nii.gz"
    return stem, ext[-len(".nrrd"):] if ext.lower() == ".seg.nrrd" else ext


def probability_paths(output: str | Path, classes: list[ClassSpec]) -> list[Path]:
    """``seg.nii.gz`` and class 'left caudate' -> ``seg_prob_left_caudate.nii.gz`` (one per class)."""
    p = Path(output)
    stem, ext = _probability_stem_ext(p)
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", c.name).strip("_") or f"label_{c.value}" for c in classes]
    # names that differ only in characters a file name cannot hold, or only in case (one file on the
    # case-insensitive file systems of Windows and macOS)
    if len({n.casefold() for n in names}) != len(names):
        names = [f"{n}_{c.value}" for n, c in zip(names, classes)]
    return [p.with_name(f"{stem}_prob_{n}{ext}") for n in names]


def refuse_probability_map_collisions(output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Before any work (the class names are not known yet): refuse when an input file could be one of
    the probability maps of ``output`` (``<stem>_prob_<anything><ext>`` in the output's folder)."""


    p = Path(output)
    stem, ext = _probability_stem_ext(p)
    pattern = f"{stem}_prob_*{ext}"
    for what, src in inputs.items():
        if src is None:
            continue
        src = Path(src)
        # case-folded: one file on Windows and macOS
        if fnmatch.fnmatchcase(src.name.casefold(), pattern.casefold()) and same_file(src.parent, p.parent):
            raise InputError(f"the input {what} {src} is named like a probability map of the output {p} "
                             f"({pattern}): saving the probability maps could overwrite it; choose another output "
                             "path", inputs=("output",))


def existing_probability_maps(output: str | Path) -> list[Path]:
    """The files already in the output's folder named like its probability maps (``<stem>_prob_*<ext>``, in
    any case): before any work (the class names are not known yet), each must be ours to be replaced."""
    p = Path(output)
    stem, ext = _probability_stem_ext(p)
    pattern = f"{stem}_prob_*{ext}".casefold()
    return sorted(f for f in p.parent.glob("*") if fnmatch.fnmatchcase(f.name.casefold(), pattern) and f.is_file())


def with_slicer_segment_metadata(labels: sitk.Image | list[sitk.Image], classes: list[ClassSpec]) -> sitk.Image:
    """A copy of ``labels`` carrying the header fields by which 3D Slicer reads a ``.seg.nrrd`` as named
    segments (vtkMRMLSegmentationStorageNode::ReadBinaryLabelmapRepresentation: ``Segment<i>_ID``, ``_Name``,
    ``_Color``, ``_LabelValue``, ``_Layer``, ``_Extent`` and ``Segmentation_*``); without them Slicer
    names the segments Segment_1, Segment_2... Colours are the preview's, in class order. Several label
    maps (classes that overlap) become one image with a layer per map, each segment naming its layer:
    Slicer reads that as segments that overlap (checked with its storage node in test_cli)."""

    layer_of = {c.value: 0 for c in classes}
    if isinstance(labels, list) and len(labels) > 1:
        for k, layer in enumerate(labels):
            for v in np.unique(sitk.GetArrayViewFromImage(layer)).tolist():
                if v in layer_of:
                    layer_of[v] = k
        out = sitk.Compose(labels)  # NRRD: the layer axis first ("kinds: vector domain domain domain")
    else:
        out = sitk.Image(labels[0] if isinstance(labels, list) else labels)
    nx, ny, nz = out.GetSize()
    extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
    out.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    out.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    out.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for i, c in enumerate(classes):
        hexcol = COLOURS[i % len(COLOURS)].lstrip("#")
        rgb = " ".join(f"{int(hexcol[k:k + 2], 16) / 255:.6g}" for k in (0, 2, 4))
        # a name is one header line: line breaks (possible in a Slicer segment's name) become spaces
        fields = {"ID": f"Segment_{c.value}", "Name": " ".join(c.name.split()), "Color": rgb, "ColorAutoGenerated": "0",
                  "NameAutoGenerated": "0", "LabelValue": str(c.value), "Layer": str(layer_of[c.value]),
                  "Extent": extent}
        for key, value in fields.items():
            out.SetMetaData(f"Segment{i}_{key}", value)
    return out


def write_result(result: SegmentationResult, output: str | Path, target: str | Path | None = None
                 ) -> tuple[Path, Path]:
    """Write the label map, its probability maps (when computed) and its JSON sidecar: every file is
    written to a temporary first and all are moved into place only once all are written, so a
    failure or an interrupt (disk full, Ctrl-C) leaves none of them, not some maps without the labels.
    An output ending in ``.dcm`` is a DICOM SEG of ``target``, the DICOM series segmented."""
    output = Path(output)
    if output.name.lower().endswith(".dcm"):
        if target is None:
            raise InputError(f"output {output}: a DICOM SEG needs the target's DICOM series it references")
        check_dicom_seg_output(output, target)
    staged: list[tuple[Path, Path]] = []  # (temporary, destination)
    try:
        if result.probabilities is not None:
            paths = probability_paths(output, result.classes)
            for img, path in zip(result.probabilities, paths):
                staged.append((write_image_partial(img, path), path))
            result.sidecar["probability_maps"] = {c.name: p.name for c, p in zip(result.classes, paths)}
        labels = result.labels
        if str(output).lower().endswith(".seg.nrrd"):  # opens in 3D Slicer as named, coloured segments
            # (that overlap, one layer per group, where the classes overlap: result.layers)
            labels = with_slicer_segment_metadata(result.layers or labels, result.classes)
        if output.name.lower().endswith(".dcm"):  # the classes keep their overlaps (DICOM SEG allows them)
            seg = build_dicom_seg(result.layers or result.labels, result.classes, target, result.sidecar["model"])
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = output.with_name(f".{output.name}.partial")
            staged.append((tmp, output))
            seg.save_as(tmp)
        else:
            staged.append((write_image_partial(labels, output), output))
        side = sidecar_path(output)
        tmp = side.with_name("." + side.name + ".partial")
        staged.append((tmp, side))
        result.sidecar = stamp(result.sidecar)  # says this tool wrote it: a later run may replace the result
        tmp.write_text(json.dumps(result.sidecar, indent=2))
        for tmp, dest in staged:
            publish(tmp, dest)
    except (OSError, RuntimeError) as exc:  # RuntimeError: ITK's writers (disk full, a folder in the way)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else reason(exc)
        raise InputError(f"cannot write the result {output} ({why}); nothing was written: free disk space or "
                         "choose another output") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return output, side
