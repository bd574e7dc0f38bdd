"""Real labelled sample data that ships inside packages (see README, "Sample data").

- Colin27 (Debian ``mricron-data``): T1 with skull, brain mask (``ch2bet`` > 0), AAL parcellation.
- ICBM 2009a symmetric (PyPI ``nilearn``): brain-extracted T1, brain mask, grey/white matter maps.

Paths are looked up through the installed packages at run time; nothing is copied.
DATA.md's warning applies: templates share MNI space, so benchmarks first move the target
off it (``move_off_mni``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


@dataclass
class Sample:
    name: str
    image: sitk.Image
    labels: sitk.Image
    label_names: dict[int, str]


def _mricron(name: str) -> Path:
    p = MRICRON_TEMPLATES / name
    if not p.is_file():
        raise InputError(f"sample data {p} is missing: install the Debian package mricron-data "
                         "(apt-get install mricron-data)")
    return p


def _binary(img: sitk.Image, thr: float) -> sitk.Image:
    out = sitk.Cast(sitk.BinaryThreshold(sitk.Cast(img, sitk.sitkFloat32), thr, 1e30, 1, 0), sitk.sitkUInt8)
    out.CopyInformation(img)
    return out


def colin27(labels: str = "brain") -> Sample:
    """Colin27 T1 (with skull) and its brain mask (``labels='brain'``), AAL regions (``'aal'``) or
    Brodmann areas (``'brodmann'``), all on the T1's grid (Debian mricron-data)."""
    image = sitk.ReadImage(str(_mricron("ch2.nii.gz")), sitk.sitkFloat32)
    if labels == "brain":
        lab = _binary(sitk.ReadImage(str(_mricron("ch2bet.nii.gz"))), 1e-3)
        names = {1: "brain"}
    elif labels == "aal":
        lab = sitk.Cast(sitk.ReadImage(str(_mricron("aal.nii.gz"))), sitk.sitkUInt16)
        names = {}
        for line in _mricron("aal.nii.txt").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    elif labels == "brodmann":
        lab = sitk.Cast(sitk.ReadImage(str(_mricron("brodmann.nii.gz"))), sitk.sitkUInt16)
        names = {v: f"Brodmann area {v}" for v in np.unique(sitk.GetArrayViewFromImage(lab)).tolist() if v}
    else:
        raise InputError(f"unknown Colin27 labels {labels!r}; use 'brain', 'aal' or 'brodmann'")
    lab.CopyInformation(image)
    return Sample("colin27", image, lab, names)


def _nilearn_data() -> Path:
    try:
        import nilearn.datasets
    except ImportError:
        raise InputError("sample data needs the nilearn package: pip install nilearn") from None
    return Path(nilearn.datasets.__file__).parent / "data"


def icbm2009a(labels: str = "brain") -> Sample:
    """ICBM 2009a symmetric T1 (brain-extracted) with its brain mask (T1 > 0.2, nilearn's rule)
    or grey/white matter (``labels='tissue'``: 1 grey, 2 white, where probability > 0.5)."""
    d = _nilearn_data()
    image = sitk.ReadImage(str(d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    if labels == "brain":
        lab = _binary(image, 0.2)
        names = {1: "brain"}
    elif labels == "tissue":
        gm = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")))
        wm = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")))
        arr = np.zeros(gm.shape, np.uint8)
        arr[(gm > 0.5) & (gm >= wm)] = 1
        arr[(wm > 0.5) & (wm > gm)] = 2
        lab = sitk.GetImageFromArray(arr)
        names = {1: "grey matter", 2: "white matter"}
    else:
        raise InputError(f"unknown ICBM labels {labels!r}; use 'brain' or 'tissue'")
    lab.CopyInformation(image)
    return Sample("icbm2009a", image, lab, names)


def mni152nlin6asym(labels: str = "brain") -> Sample:
    """MNI152NLin6Asym T1 1 mm (with skull) and its brain mask, from the PyPI package nimare (found
    without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("nimare")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("sample data MNI152NLin6Asym needs the nimare package: pip install nimare")
    d = Path(list(spec.submodule_search_locations)[0]) / "resources" / "templates"
    if labels != "brain":
        raise InputError("MNI152NLin6Asym has a brain mask only (labels='brain')")
    image = sitk.ReadImage(str(d / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"), sitk.sitkFloat32)
    lab = _binary(sitk.ReadImage(str(d / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz")), 0.5)
    lab.CopyInformation(image)
    return Sample("mni152nlin6asym", image, lab, {1: "brain"})


TEMPLATES = {"colin27": colin27, "icbm2009a": icbm2009a, "mni152nlin6asym": mni152nlin6asym}


def move_off_mni(sample: Sample, seed: int = 0, spacing=(1.0, 1.0, 3.0), angle_deg=(5, 15),
                 shift_mm=(20, 40)) -> Sample:
    """A rigidly moved copy (random rotation 5-15 degrees about a random axis, shift 20-40 mm)
    resampled onto a clinical grid (default 1 x 1 x 3 mm): DATA.md's honest benchmark target."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(*angle_deg))
    shift = rng.normal(size=3)
    shift = shift / np.linalg.norm(shift) * rng.uniform(*shift_mm)
    tf = sitk.VersorRigid3DTransform()
    lo = np.array(sample.image.TransformContinuousIndexToPhysicalPoint([0, 0, 0]))
    hi = np.array(sample.image.TransformContinuousIndexToPhysicalPoint([s - 1 for s in sample.image.GetSize()]))
    tf.SetCenter(((lo + hi) / 2).tolist())
    tf.SetRotation(axis.tolist(), float(angle))
    tf.SetTranslation(shift.tolist())
    # the anatomy moves by the inverse of ``tf``: output(p) = input(tf(p)); the new axis-aligned
    # grid covers the moved field of view
    inv = tf.GetInverse()
    corners = [np.array(inv.TransformPoint(sample.image.TransformIndexToPhysicalPoint(
        [int(c) for c in corner]))) for corner in np.ndindex(2, 2, 2)
        for corner in [np.array(corner) * (np.array(sample.image.GetSize()) - 1)]]
    pts = np.array(corners)
    origin = pts.min(0)
    size = np.ceil((pts.max(0) - origin) / np.array(spacing)).astype(int) + 1
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin(origin.tolist())
    img = sitk.Resample(sample.image, grid, tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lab = sitk.Resample(sample.labels, grid, tf, sitk.sitkNearestNeighbor, 0, sample.labels.GetPixelID())
    return Sample(f"{sample.name}-moved{seed}", img, lab, sample.label_names)
