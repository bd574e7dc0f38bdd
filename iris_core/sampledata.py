"""Real labelled sample data that ships inside packages (see README, "Sample data"), and the structures defined
on it: the AAL regions grouped into lobes, the copy test's ten gyri, the structures two atlases share, the macaque
template's groups. Domain data, beside the io it reads files with (``iris_core.io``), not in it.

- Colin27 (Debian ``mricron-data``): T1 with skull, brain mask (``ch2bet`` > 0), AAL parcellation.
- ICBM 2009a symmetric (PyPI ``nilearn``): brain-extracted T1, brain mask, grey/white matter maps.

Paths are looked up through the installed packages at run time; nothing is copied.
DATA.md's warning applies: templates share MNI space, so benchmarks first move the target
off it (``move_off_mni``).
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError
from iris_core.io.resample import physical_bounds

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


# AAL regions (label values of aal.nii.txt) grouped into disjoint lobes and structures, left and right
AAL_LOBES = {1: ("frontal lobe", [*range(1, 17), *range(19, 29)]), 2: ("parietal lobe", list(range(57, 71))),
             3: ("temporal lobe", list(range(79, 91))), 4: ("occipital lobe", list(range(43, 57))),
             5: ("deep grey nuclei", list(range(71, 79))), 6: ("cerebellum", list(range(91, 117)))}


def colin27(labels: str = "brain") -> Sample:
    """Colin27 T1 (with skull) and its brain mask (``labels='brain'``), AAL regions (``'aal'``), Brodmann
    areas (``'brodmann'``) or the AAL regions grouped into six lobes and structures (``'lobes'``,
    ``AAL_LOBES``), all on the T1's grid (Debian mricron-data)."""
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
    elif labels == "lobes":
        aal = sitk.GetArrayFromImage(sitk.ReadImage(str(_mricron("aal.nii.gz"))))
        lookup = np.zeros(max(max(v) for _, v in AAL_LOBES.values()) + 1, np.uint8)
        for value, (_, regions) in AAL_LOBES.items():
            lookup[regions] = value
        lab = sitk.GetImageFromArray(lookup[np.clip(aal, 0, len(lookup) - 1).astype(np.int64)])
        names = {v: name for v, (name, _) in AAL_LOBES.items()}
    else:
        raise InputError(f"unknown Colin27 labels {labels!r}; use 'brain', 'aal', 'brodmann' or 'lobes'")
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
    d = _nimare_templates()
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
    lo, hi = physical_bounds(sample.image)
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


def warp_smooth(sample: Sample, seed: int = 0, max_mm: float = 3.0, smooth_mm: float = 12.0) -> Sample:
    """A smoothly warped copy on the same grid: a random displacement field (Gaussian-smoothed noise,
    ``smooth_mm`` correlation length, largest displacement ``max_mm``), images linear, labels nearest."""
    rng = np.random.default_rng(seed)
    size = sample.image.GetSize()
    field = []
    for _ in range(3):
        comp = sitk.GetImageFromArray(rng.normal(size=size[::-1]).astype(np.float64))
        comp.CopyInformation(sample.image)
        field.append(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(comp, smooth_mm)))
    vec = np.stack(field, -1)
    vec *= max_mm / np.abs(vec).max()
    disp = sitk.GetImageFromArray(vec, isVector=True)
    disp.CopyInformation(sample.image)
    tf = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    img = sitk.Resample(sample.image, sample.image, tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lab = sitk.Resample(sample.labels, sample.labels, tf, sitk.sitkNearestNeighbor, 0, sample.labels.GetPixelID())
    return Sample(f"{sample.name}-warped{seed}", img, lab, sample.label_names)


# -- the macaque template: evaluation only ---------------------------------------------------------

#: How the 724 NeuroMaps labels of inia19 are grouped into the macaque check's structures. The
#: labels' names file is not shipped with mricron-data (and was not found elsewhere here), so the
#: groups are rules on the label map itself, checked by overlay (scripts/model_card_eval.sh's macaque
#: overlays): the map codes the two sides of a structure as v and 1000 + v, and every value below 1000 lies
#: left of the midline (centroids checked in ``inia19``).
INIA19_GROUPS = {
    1: ("cerebellum", "labels centred more than 22 mm behind and 2 mm below the origin (the posterior "
                      "fossa: cerebellum with the dorsal brainstem)"),
    2: ("left cortex", "left labels (values 1-999) that are neither cerebellum, white matter nor label 497: "
                       "left cortex with the left deep grey nuclei"),
    3: ("cerebral white matter", "labels whose mean T1 exceeds 100, outside the cerebellum group"),
    4: ("deep grey 497", "the single left label 497, a 0.5 ml deep grey nucleus beside the third "
                         "ventricle (thalamic region)"),
}


def inia19() -> Sample:
    """Macaque template inia19 (T1, brain-extracted, 0.5 mm) with the four disjoint structures of
    INIA19_GROUPS as one label map (1 cerebellum, 2 left cortex, 3 cerebral white matter, 4 label 497).
    EVALUATION ONLY (DATA.md): never a training source."""
    from scipy import ndimage

    image = sitk.ReadImage(str(_mricron("inia19-t1-brain.nii.gz")), sitk.sitkFloat32)
    nm = sitk.ReadImage(str(_mricron("inia19-NeuroMaps.nii.gz")))
    arr = sitk.GetArrayFromImage(nm).astype(np.int32)
    t1 = sitk.GetArrayViewFromImage(image)
    values = [int(v) for v in np.unique(arr) if v]
    centres = ndimage.center_of_mass(np.ones_like(arr), arr, values)
    means = dict(zip(values, ndimage.mean(t1, arr, values)))
    # LPS physical centroids -> RAS (x right, y anterior, z superior)
    ras = {v: np.array(nm.TransformContinuousIndexToPhysicalPoint([float(c[2]), float(c[1]), float(c[0])]))
           * [-1, -1, 1] for v, c in zip(values, centres)}
    left = [v for v in values if v < 1000]
    if not np.mean([ras[v][0] for v in left]) < 0:
        raise InputError("inia19-NeuroMaps: values below 1000 are not on the left side; the label coding "
                         "differs from the one this check was written for")
    cerebellum = {v for v in values if ras[v][1] < -22 and ras[v][2] < -2}
    white = {v for v in values if means[v] > 100} - cerebellum
    groups = {1: cerebellum, 3: white, 4: {497}}
    groups[2] = set(left) - cerebellum - white - {497}
    lab = np.zeros(arr.shape, np.uint8)
    for g, vals in groups.items():
        lab[np.isin(arr, sorted(vals))] = g
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(image)
    return Sample("inia19", image, out, {g: n for g, (n, _) in INIA19_GROUPS.items()})


# -- held-out structures across templates ---------------------------------------------------------

#: Structures that mean the same in Colin27's AAL and in Harvard-Oxford cortical (FSL maxprob thr0,
#: 48 bilateral labels). AAL regions are taken on both sides, since Harvard-Oxford's are bilateral.
#: The two atlases draw borders differently (AAL angular vs HO angular: the overlap peaks on HO
#: lateral occipital), so registration of the same reference is the fair peer, not Dice 1.
CROSS_ATLAS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "precentral gyrus": (("Precentral",), (7,)),
    "postcentral gyrus": (("Postcentral",), (17,)),
    "insula": (("Insula",), (2,)),
    "precuneus": (("Precuneus",), (31,)),
    "lingual gyrus": (("Lingual",), (36,)),
    "Heschl's gyrus": (("Heschl",), (45,)),
    "cuneus": (("Cuneus",), (32,)),
    "anterior cingulate": (("Cingulum_Ant",), (29,)),
    "calcarine cortex": (("Calcarine",), (24, 47)),  # HO intracalcarine + supracalcarine
}


def _nimare_templates() -> Path:

    spec = importlib.util.find_spec("nimare")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("sample data MNI152NLin6Asym needs the nimare package: pip install nimare")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "templates"


def harvard_oxford_mni152(flip: bool = True) -> Sample:
    """MNI152NLin6Asym T1 1 mm with the mricron Harvard-Oxford cortical map (48 labels) on its grid.
    The mricron file shares the T1's voxel grid but its header is not usable (origin (-90, 0, 0)) and
    its array is stored left-right flipped: flipped back (``flip``), its labels overlap nimare's own
    Harvard-Oxford map (2 mm, correctly oriented) at mean Dice 0.74 against 0.62 as stored."""
    image = sitk.ReadImage(str(_nimare_templates() / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(_mricron("HarvardOxford-cort-maxprob-thr0-1mm.nii.gz"))))
    if arr.shape != sitk.GetArrayViewFromImage(image).shape:
        raise InputError("HarvardOxford-cort-maxprob-thr0-1mm does not share the MNI152NLin6Asym 1 mm grid")
    if flip:
        arr = arr[:, :, ::-1]
    lab = sitk.GetImageFromArray(np.ascontiguousarray(arr).astype(np.uint8))
    lab.CopyInformation(image)
    return Sample("mni152nlin6asym-ho", image, lab, {})


def cross_atlas_samples() -> tuple[Sample, Sample]:
    """(Colin27 with the CROSS_ATLAS structures from AAL, MNI152NLin6Asym with the same structures from
    Harvard-Oxford), label value i + 1 for the i-th structure of CROSS_ATLAS in both."""
    aal = colin27("aal")
    ho = harvard_oxford_mni152()
    a_arr, h_arr = sitk.GetArrayViewFromImage(aal.labels), sitk.GetArrayViewFromImage(ho.labels)
    a_out, h_out = np.zeros(a_arr.shape, np.uint8), np.zeros(h_arr.shape, np.uint8)
    names = {}
    for i, (name, (aal_names, ho_values)) in enumerate(CROSS_ATLAS.items(), start=1):
        vals = [v for v, n in aal.label_names.items() if n.rsplit("_", 1)[0] in aal_names]
        if not vals:
            raise InputError(f"AAL has no region {aal_names}")
        a_out[np.isin(a_arr, vals)] = i
        h_out[np.isin(h_arr, ho_values)] = i
        names[i] = name
    a_img, h_img = sitk.GetImageFromArray(a_out), sitk.GetImageFromArray(h_out)
    a_img.CopyInformation(aal.labels)
    h_img.CopyInformation(ho.labels)
    return (Sample("colin27-aal", aal.image, a_img, names), Sample("mni152nlin6asym-ho", ho.image, h_img, names))


#: The copy test's ten structures (issue [11]): bilateral AAL gyri, 23-79 ml each, a few voxels thick on a
#: 3 mm grid. Colin27 with these as the reference and the same Colin27 image as the target: a model that can
#: copy what its reference shows gives them back.
COPY_STRUCTURES: dict[str, tuple[str, ...]] = {
    "precentral gyrus": ("Precentral_L", "Precentral_R"),
    "postcentral gyrus": ("Postcentral_L", "Postcentral_R"),
    "superior frontal gyrus": ("Frontal_Sup_L", "Frontal_Sup_R"),
    "middle frontal gyrus": ("Frontal_Mid_L", "Frontal_Mid_R"),
    "insula": ("Insula_L", "Insula_R"),
    "superior temporal gyrus": ("Temporal_Sup_L", "Temporal_Sup_R"),
    "lingual gyrus": ("Lingual_L", "Lingual_R"),
    "cuneus": ("Cuneus_L", "Cuneus_R"),
    "precuneus": ("Precuneus_L", "Precuneus_R"),
    "angular gyrus": ("Angular_L", "Angular_R"),
}


def aal_values(patterns: tuple[str, ...], names: dict[int, str]) -> list[int]:
    """AAL label values matching the name patterns; ``*_L`` means the left cerebral regions only."""
    out = set()
    for pat in patterns:
        for v, n in names.items():
            if pat == "*_L":
                if n.endswith("_L") and not n.startswith(("Cerebelum", "Vermis")):
                    out.add(v)
            elif fnmatch.fnmatchcase(n, pat):
                out.add(v)
    if not out:
        raise ValueError(f"no AAL region matches {patterns}")
    return sorted(out)


def aal_groups(groups: dict[str, tuple[str, ...]], name: str = "colin27-aal-groups") -> Sample:
    """Colin27 (1 mm T1) and a label map of AAL region groups on its grid: group i (1-based, in the order
    given) is every AAL region matching its name patterns (``aal_values``); groups are disjoint when their
    regions are, a later group wins otherwise."""
    aal = colin27("aal")
    arr = sitk.GetArrayViewFromImage(aal.labels)
    out = np.zeros(arr.shape, np.uint8)
    for value, patterns in enumerate(groups.values(), start=1):
        out[np.isin(arr, aal_values(patterns, aal.label_names))] = value
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(aal.labels)
    return Sample(name, aal.image, labels, dict(enumerate(groups, start=1)))


def copy_labels():
    """Colin27 (1 mm T1) and a label map of COPY_STRUCTURES (values 1..10, disjoint) on its grid, with the
    structures' names: the copy test's reference, whose image is also its target."""
    sample = aal_groups(COPY_STRUCTURES, "colin27-copy")
    return sample.image, sample.labels, list(COPY_STRUCTURES)
