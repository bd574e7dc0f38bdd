"""Reading and checking images and label maps (everything SimpleITK reads, DICOM folders too),
and writing results without leaving partial files."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError, reason
from iris_core.io.names import publish

# the output checks live in io.outputs (torch- and ITK-free); imported here, where callers have found them
from iris_core.io.outputs import (  # noqa: F401
    VOLUME_EXTENSIONS,
    check_output_place,
    check_volume_output,
    output_folder,
    refuse_overwriting_inputs,
)

log = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 1e-3  # relative tolerance (spacing, direction) / mm (origin) for "same grid"


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _series_description(files: list[str]) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
        desc = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        desc = ""
    return f"{len(files)} files" + (f", '{desc}'" if desc else "")


def dicom_series_files(path: Path, what: str) -> list[str]:
    """The files of the DICOM series to read: a folder's only series, or the whole series one given
    file belongs to. A folder of several series is refused with the list (no silent first pick: a
    localizer read instead of the T1 would be segmented without a word)."""
    folder = path if path.is_dir() else path.parent
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{what} {path}: folder holds no DICOM series")
    files = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series}
    if path.is_file():
        for names in files.values():
            if any(os.path.samefile(n, path) for n in names if Path(n).name == path.name):
                return names
        raise InputError(f"{what} {path}: not part of a DICOM series in {folder}")
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({_series_description(names)}, e.g. {Path(names[0]).name})"
                            for uid, names in files.items())
        raise InputError(f"{what} {path}: folder holds {len(series)} DICOM series: {listing}. Pass one file of "
                         "the series you want (its whole series is read) or a folder holding that series only")
    return files[series[0]]


def _unreadable(what: str, path: str | Path, exc: RuntimeError) -> InputError:
    """The error for a file ITK cannot read: its last message line (the reason), not the whole trace."""
    return InputError(f"{what} {path}: unreadable ({reason(exc)})")


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image: a file SimpleITK reads, a DICOM series folder, or one file of a DICOM
    series (the whole series is read)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path}: file not found")
    try:
        if path.is_dir() or _is_dicom_file(path):
            files = dicom_series_files(path, what)
            if len(files) == 1:  # one file holds the volume (enhanced multi-frame DICOM)
                image = sitk.ReadImage(files[0])
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(what, path, exc) from None
    if image.GetNumberOfComponentsPerPixel() > 1 and path.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"{what} {path}: a 3D Slicer segmentation stored in {image.GetNumberOfComponentsPerPixel()} "
                         "layers (its segments overlap); a label map holds one label per voxel here (a "
                         "reference's label map may have layers): export the segments you need without "
                         "overlaps (Segmentations module, Export to label map)")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        bad = nifti_nonfinite_voxels(path)
        if bad:
            raise InputError(f"{what} {path}: {bad} voxels are NaN or infinite; clean or mask the image first")
    return check_volume(image, f"{what} {path}")


# NIfTI floating datatypes (code -> numpy type): ITK's NIfTI reader turns NaN/inf into 0, so the
# file's own voxels are checked
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def nifti_nonfinite_voxels(path: Path) -> int:
    """Count of NaN or infinite voxels in a floating-point NIfTI-1/2 file, read directly (0 for
    integer data or a header this does not recognise)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        for order in "<>":
            size = int(np.frombuffer(head[:4], order + "i4")[0])
            if size == 348:  # NIfTI-1
                dims = np.frombuffer(head[40:56], order + "i2")
                code = int(np.frombuffer(head[70:72], order + "i2")[0])
                offset = int(np.frombuffer(head[108:112], order + "f4")[0])
                break
            if size == 540:  # NIfTI-2
                dims = np.frombuffer(head[16:80], order + "i8")
                code = int(np.frombuffer(head[12:14], order + "i2")[0])
                offset = int(np.frombuffer(head[168:176], order + "i8")[0])
                break
        else:
            return 0
        if code not in _NIFTI_FLOATS or not 1 <= dims[0] <= 7:
            return 0
        count = int(np.prod(dims[1 : int(dims[0]) + 1], dtype=np.int64))
        f.seek(offset)
        dtype = np.dtype(order + _NIFTI_FLOATS[code])
        bad, left = 0, count
        while left > 0:  # in chunks of 4M voxels: the file's voxels are never held whole a second time
            buf = f.read(min(left, 2**22) * dtype.itemsize)
            data = np.frombuffer(buf[: len(buf) - len(buf) % dtype.itemsize], dtype)
            if not data.size:
                break
            bad += int(np.count_nonzero(~np.isfinite(data)))
            left -= data.size
    return bad


def check_shape(components: int, size: tuple[int, ...], name: str) -> None:
    """Refuse what the model cannot take: several components, not 3-D (a 4-D file of one volume is
    3-D), a single slice. The dimension is told first: a 2-D RGBA picture converted to grey would still be
    refused as 2-D."""
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) != 3:
        kind = f", {components} components per voxel (RGB/vector)" if components != 1 else ""
        raise InputError(f"{name}: is {len(size)}-D (size {tuple(size)}{kind}); a 3-D volume is needed (a picture "
                         "or a single slice cannot be segmented in 3-D)")
    if components != 1:
        raise InputError(f"{name}: has {components} components per voxel (RGB/vector); a scalar image is needed")
    if min(size) < 2:
        raise InputError(f"{name}: size {tuple(size)} is a single slice; a 3-D volume is needed")


def check_volume(image: sitk.Image, name: str) -> sitk.Image:
    """Refuse what the model cannot take: not 3-D, several components, empty."""
    check_shape(image.GetNumberOfComponentsPerPixel(), image.GetSize(), name)
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    return image


def probe_image(path: str | Path, what: str = "image") -> None:
    """What ``read_image`` refuses, found from the file's header alone (a DICOM series: its file list):
    missing, unreadable, not a 3-D scalar volume. For checking many inputs before hours of work."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path}: file not found")
    if path.is_dir() or _is_dicom_file(path):
        files = dicom_series_files(path, what)
        if len(files) > 1:
            return  # a series of slices: read_image stacks it into a volume
        path = Path(files[0])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(what, path, exc) from None
    if reader.GetNumberOfComponents() > 1 and path.name.lower().endswith(".seg.nrrd"):
        return  # read_image explains a layered segmentation
    check_shape(reader.GetNumberOfComponents(), reader.GetSize(), f"{what} {path}")


def check_finite(image: sitk.Image, name: str) -> np.ndarray:
    """Array of ``image`` (z, y, x); NaN or infinite voxels are an error."""
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"{name}: {bad} voxels are NaN or infinite; clean or mask the image first")
    return arr


LABEL_MAP_MAX_VALUES = 256  # an integer image with at most this many distinct values looks like a label map


def label_compactness(image: sitk.Image) -> float:
    """Share of neighbouring voxel pairs (along each axis) holding the same value, among the pairs not both
    the most common value (the background, whatever its value): near 1 for a label map, whose values form
    compact regions, near 0 for an intensity image, even an 8-bit one (Colin27's uint8 T1: 0.09; its AAL
    map: 0.90, its brain mask: 0.94). One value everywhere counts as 1. Large volumes are sampled every
    second voxel."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.ndim > 3:  # a vector image: its first component
        arr = arr[..., 0]
    if arr.size > 8_000_000:
        arr = arr[::2, ::2, ::2]
    values, counts = np.unique(arr[::4, ::4, ::4] if arr.size > 1_000_000 else arr, return_counts=True)
    background = values[counts.argmax()]
    same = pairs = 0
    for axis in range(arr.ndim):
        if arr.shape[axis] < 2:
            continue
        a = np.moveaxis(arr, axis, 0)
        p, q = a[1:], a[:-1]
        fg = (p != background) | (q != background)
        same += int(np.count_nonzero((p == q) & fg))
        pairs += int(np.count_nonzero(fg))
    return same / pairs if pairs else 1.0


#: a label map's regions are compact: at least this share of its non-background neighbour pairs agree
LABEL_MAP_MIN_COMPACTNESS = 0.5


def looks_like_labels(image: sitk.Image) -> bool:
    """True for a label map: few integer values (at most LABEL_MAP_MAX_VALUES) that form compact regions
    (:func:`label_compactness`); False for an intensity image, including an 8-bit MR of at most 256 values.
    Decided on a strided sample first so a CT or MR volume of many values is ruled out quickly."""
    arr = sitk.GetArrayViewFromImage(image)
    for sample in (arr[::3, ::3, ::3], arr):
        if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(sample, np.round(sample)):
            return False
        if len(np.unique(sample)) > LABEL_MAP_MAX_VALUES:
            return False
    return label_compactness(image) >= LABEL_MAP_MIN_COMPACTNESS


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when both images share size, spacing, origin and direction (within tolerance)."""
    if a.GetSize() != b.GetSize():
        return False
    sp = np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=GEOMETRY_TOLERANCE)
    org = np.allclose(a.GetOrigin(), b.GetOrigin(), atol=GEOMETRY_TOLERANCE * max(a.GetSpacing()) * 10)
    dr = np.allclose(a.GetDirection(), b.GetDirection(), atol=GEOMETRY_TOLERANCE)
    return bool(sp and org and dr)


def _offset_subgrid(labels: sitk.Image, image: sitk.Image) -> np.ndarray | None:
    """The index of ``labels``' first voxel in ``image``'s grid when both share spacing and direction and
    their voxels coincide (a label map cropped to its labels, or padded: the origin moved by whole
    voxels), else None."""
    if not (np.allclose(labels.GetSpacing(), image.GetSpacing(), rtol=GEOMETRY_TOLERANCE)
            and np.allclose(labels.GetDirection(), image.GetDirection(), atol=GEOMETRY_TOLERANCE)):
        return None
    index = np.array(image.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
    if not np.allclose(index, np.round(index), atol=1e-3):
        return None
    return np.round(index).astype(int)


def read_labels(path: str | Path, image: sitk.Image, image_name: str) -> sitk.Image:
    """Read a label map that must lie on ``image``'s grid, or on a part of it (same spacing and direction,
    voxels coinciding: a map cropped to its labels is padded with 0, one reaching past the image is cut,
    with a warning when labels are cut); returned as an integer image."""
    return labels_on_grid(read_image(path, "label map"), path, image, image_name)


def labels_on_grid(labels: sitk.Image, path: str | Path, image: sitk.Image, image_name: str) -> sitk.Image:
    """``labels`` (read from ``path``) checked against and placed on ``image``'s grid, as :func:`read_labels`."""
    index = None if same_grid(labels, image) else _offset_subgrid(labels, image)
    if index is not None:
        placed = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, labels.GetPixelID())
        kept, had = (int(np.count_nonzero(sitk.GetArrayViewFromImage(x))) for x in (placed, labels))
        if kept < had:
            log.warning("label map %s: %d of its %d labelled voxels lie outside %s and are left out", path,
                        had - kept, had, image_name)
        log.info("label map %s: on a part of the grid of %s (first voxel at index %s), placed on it", path,
                 image_name, tuple(int(i) for i in index))
        labels = placed
    if not same_grid(labels, image):
        raise InputError(
            f"label map {path}: not on the grid of {image_name} "
            f"(size {labels.GetSize()} vs {image.GetSize()}, spacing {_fmt(labels.GetSpacing())} vs "
            f"{_fmt(image.GetSpacing())}, origin {_fmt(labels.GetOrigin())} vs {_fmt(image.GetOrigin())}); "
            "resample it onto the image first (a map on part of the grid, same spacing and direction, is taken)"
        )
    arr = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
            raise InputError(f"label map {path}: holds non-integer values; a label map has integer labels")
    labels = sitk.Cast(labels, sitk.sitkInt32)
    labels.CopyInformation(image)
    return labels


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def write_image_partial(image: sitk.Image, path: str | Path) -> Path:
    """Write ``image`` to a hidden temporary file beside ``path`` (``publish`` moves it into place);
    nothing is left behind if writing fails."""
    check_volume_output(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.partial{suffix.lower()}")  # ITK's NIfTI writer wants .nii.gz, not .NII.GZ
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_image_atomic(image: sitk.Image, path: str | Path) -> Path:
    """Write ``image`` to ``path`` through a temporary file in the same folder, so a failure
    leaves no partial file."""
    tmp = write_image_partial(image, path)
    try:
        publish(tmp, Path(path))
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)
