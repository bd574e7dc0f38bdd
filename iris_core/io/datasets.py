"""Labelled cohorts for evaluation and training: the nnU-Net / Medical Segmentation Decathlon
layout, a CSV of cases, and the built-in real template pairs."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from iris_core import sampledata
from iris_core.errors import InputError
from iris_core.io.dicom_seg import dicom_seg_truth, is_dicom_seg
from iris_core.io.imaging import read_image, read_labels
from iris_core.resources import SAMPLE_DATA

log = logging.getLogger(__name__)


@dataclass
class Case:
    """A labelled case: an image and its label map (files, or in-memory images)."""

    name: str
    image: str | sitk.Image
    labels: str | sitk.Image
    group: str = ""  # dataset / modality, for embedding maps

    def read(self) -> tuple[sitk.Image, sitk.Image]:

        if isinstance(self.image, sitk.Image):
            return self.image, self.labels
        img = read_image(self.image, f"case {self.name} image")
        if is_dicom_seg(self.labels):  # DICOM SEG truth of a DICOM series: one label map (segment k = value k)
            return img, dicom_seg_truth(self.labels, self.image, img)
        return img, read_labels(self.labels, img, f"case {self.name} image {self.image}")


@dataclass
class Dataset:
    name: str
    cases: list[Case]
    label_names: dict[int, str] = field(default_factory=dict)
    modality: str = "auto"
    # explicit (target, reference) pairs; empty: references are drawn from the other cases
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise InputError(f"dataset {self.name}: no case {name!r}")


def load_nnunet(folder: str | Path) -> Dataset:
    """imagesTr/CASE_0000.nii.gz + labelsTr/CASE.nii.gz + dataset.json (nnU-Net v2 or MSD)."""
    folder = Path(folder)
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"{folder}: no dataset.json (expected the nnU-Net / MSD layout)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    labels = meta.get("labels", {})
    # nnU-Net v2: {"background": 0, "liver": 1}; MSD: {"0": "background", "1": "liver"}
    if labels and all(str(k).isdigit() for k in labels):
        names = {int(k): v for k, v in labels.items() if int(k)}
    else:
        names = {int(v): k for k, v in labels.items() if isinstance(v, int) and v}
    modality = str((meta.get("channel_names") or meta.get("modality") or {"0": "auto"}).get("0", "auto"))
    modality = "CT" if modality.upper() == "CT" else ("MR" if modality.upper() in {"MR", "MRI", "T1", "T2"} else
                                                       "auto")
    ext = meta.get("file_ending", ".nii.gz")
    cases = []
    for lab in sorted((folder / "labelsTr").glob(f"*{ext}")):
        if lab.name.startswith("."):
            continue
        stem = lab.name[: -len(ext)]
        img = folder / "imagesTr" / f"{stem}_0000{ext}"
        if not img.is_file():
            img = folder / "imagesTr" / lab.name  # MSD 4-D / single-channel naming
        if not img.is_file():
            raise InputError(f"{folder}: label {lab.name} has no image in imagesTr")
        cases.append(Case(stem, str(img), str(lab), meta.get("name", folder.name)))
    if not cases:
        raise InputError(f"{folder}/labelsTr holds no {ext} files")
    return Dataset(meta.get("name", folder.name), cases, names, modality)


def load_csv(path: str | Path) -> Dataset:
    """Columns ``case,image,labels[,group]`` (references drawn from other cases), or
    ``target_image,target_labels,reference_image,reference_labels`` (explicit pairs). Relative paths are
    read from the CSV's folder; a spreadsheet's UTF-8 byte-order mark and spaces around cells are ignored.
    In the pairs form a case is an image file (named by the shortest end of its path that tells it from
    the others: ``s1/image.nii.gz``, ``s2/image.nii.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset {path}: CSV file not found")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        raise InputError(f"{path}: no rows")
    base = path.parent
    for i, r in enumerate(rows):
        empty = [k for k in ("image", "labels", "target_image", "target_labels", "reference_image",
                             "reference_labels") if k in r and not r[k]]
        if empty:
            raise InputError(f"{path}: row {i + 2} has no {' and no '.join(empty)}")
    cases: dict[str, Case] = {}
    rows_of: dict[str, int] = {}
    pairs = []
    if all({"image", "labels"} <= set(r) for r in rows):
        for i, r in enumerate(rows):
            name = r.get("case") or f"case{i}"
            if name in cases:
                raise InputError(f"{path}: case {name!r} is listed twice (rows {rows_of[name]} and {i + 2})")
            cases[name], rows_of[name] = Case(name, str(base / r["image"]), str(base / r["labels"]),
                                              r.get("group", "")), i + 2
    elif all({"target_image", "target_labels", "reference_image", "reference_labels"} <= set(r) for r in rows):
        def at(cell: str) -> Path:  # one spelling per file, relative to the CSV's folder
            return Path(os.path.normpath(base / cell))

        files: dict[Path, tuple[Path, int]] = {}  # image -> (labels, row)
        for i, r in enumerate(rows):
            for img, lab in ((r["target_image"], r["target_labels"]), (r["reference_image"], r["reference_labels"])):
                key, lab_path = at(img), at(lab)
                if key in files and files[key][0] != lab_path:
                    raise InputError(f"{path}: image {img} is given two label maps (rows {files[key][1]} and "
                                     f"{i + 2})")
                files.setdefault(key, (lab_path, i + 2))
        names = _distinct_names(list(files))
        for key, (lab_path, _) in files.items():
            cases[names[key]] = Case(names[key], str(key), str(lab_path))
        pairs = [(names[at(r["target_image"])], names[at(r["reference_image"])]) for r in rows]
    else:
        bad = next(i for i, r in enumerate(rows) if not ({"image", "labels"} <= set(r) or
                                                        {"target_image", "reference_image"} <= set(r)))
        raise InputError(f"{path}: row {bad + 2} lacks the columns image,labels or "
                         "target_image,target_labels,reference_image,reference_labels")
    # every file checked before the first case runs, not found missing after an hour of the cohort
    missing = [f for c in cases.values() for f in (c.image, c.labels)  # an image may be a DICOM series folder
               if not (Path(f).is_file() or (f == c.image and Path(f).is_dir()))]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{path}: {len(missing)} listed files not found (relative paths are read from "
                         f"{base}): {', '.join(missing[:5])}{more}")
    return Dataset(path.stem, list(cases.values()), {}, "auto", pairs)


def _distinct_names(paths: list[Path]) -> dict[Path, str]:
    """Each path's shortest ending (file name, then with its folders) that no other path shares."""
    names = {}
    for p in paths:
        for n in range(1, len(p.parts) + 1):
            tail = Path(*p.parts[-n:]).as_posix()
            if not any(q != p and Path(*q.parts[-n:]).as_posix() == tail for q in paths):
                break
        names[p] = tail
    return names


def template_pairs(labels: str = "brain", seeds: tuple[int, ...] = (0,),
                   names: tuple[str, ...] | None = None) -> Dataset:
    """The real template pairs of DATA.md: every direction among the available templates (Colin27,
    ICBM 2009a, MNI152NLin6Asym when nimare is installed), the target moved off MNI space (rigid
    5-15 degrees, 20-40 mm, 1 x 1 x 3 mm grid), one random move per seed."""
    if labels != "brain":
        raise InputError("template pairs have brain masks only (label 1)")
    samples = []
    for name in names or tuple(sampledata.TEMPLATES):
        try:
            samples.append(sampledata.TEMPLATES[name]("brain"))
        except InputError as exc:
            if names:  # explicitly requested: missing data is an error
                raise
            log.warning("template %s left out of the template pairs: %s", name, exc)
    cases = [Case(s.name, s.image, s.labels, s.name) for s in samples]
    pairs = []
    for seed in seeds:
        for tgt in samples:
            moved = sampledata.move_off_mni(tgt, seed=seed)
            cases.append(Case(moved.name, moved.image, moved.labels, tgt.name))
            pairs += [(moved.name, ref.name) for ref in samples if ref.name != tgt.name]
    return Dataset("templates", cases, {1: "brain"}, "MR", pairs)


def atlases() -> Dataset:
    """Labelled real atlases: Colin27 AAL regions (116), Colin27 brain, ICBM 2009a grey/white matter
    and brain: for embedding maps."""
    out = []
    names: dict[int, str] = {}
    for sample, group in ((sampledata.colin27("aal"), "colin27 AAL"), (sampledata.icbm2009a("tissue"), "icbm tissue"),
                          (sampledata.colin27("brain"), "colin27 brain"), (sampledata.icbm2009a("brain"), "icbm brain")):
        # distinct label values per atlas so that names do not collide
        offset = 1000 * len(out)
        arr = sitk.GetArrayFromImage(sample.labels).astype("int32")
        arr[arr > 0] += offset
        lab = sitk.GetImageFromArray(arr)
        lab.CopyInformation(sample.labels)
        names.update({v + offset: n for v, n in sample.label_names.items()})
        out.append(Case(f"{sample.name}-{group.split()[-1]}", sample.image, lab, group))
    return Dataset("atlases", out, names, "MR")


def macaque_pairs(seed: int = 0) -> Dataset:
    """The held-out species check (EVALUATION ONLY): inia19 with four structures as the reference,
    and as the target a smoothly warped (up to 2 mm) and rigidly moved (5-15 degrees, 20-40 mm) copy
    of itself resampled onto a 0.5 x 0.5 x 1.5 mm grid."""
    ref = sampledata.inia19()
    moved = sampledata.move_off_mni(sampledata.warp_smooth(ref, seed=seed, max_mm=2.0, smooth_mm=6.0), seed=seed,
                                    spacing=(0.5, 0.5, 1.5))
    cases = [Case(ref.name, ref.image, ref.labels, "inia19"), Case(moved.name, moved.image, moved.labels, "inia19")]
    return Dataset("macaque", cases, dict(ref.label_names), "MR", [(moved.name, ref.name)])


def cross_atlas_pairs(seed: int = 0) -> Dataset:
    """Held-out structures across templates: Colin27 with AAL regions as the reference, the moved
    MNI152NLin6Asym (rigid 5-15 degrees, 20-40 mm, 1 x 1 x 3 mm) with the Harvard-Oxford regions that
    mean the same (sampledata.CROSS_ATLAS) as its independent truth."""
    ref, tgt = sampledata.cross_atlas_samples()
    moved = sampledata.move_off_mni(tgt, seed=seed)
    cases = [Case(ref.name, ref.image, ref.labels, "colin27"), Case(moved.name, moved.image, moved.labels, "mni")]
    return Dataset("cross-atlas", cases, dict(ref.label_names), "MR", [(moved.name, ref.name)])


def copy_pairs(moved: bool = False, seed: int = 0) -> Dataset:
    """The copy test as a cohort (issue [11]): Colin27 with the ten bilateral AAL gyri of
    ``sampledata.COPY_STRUCTURES`` as the reference; the target is the same image (``moved=False``: the copy test
    itself, where identity scores 1) or a rigidly moved copy of it (5-15 degrees, 20-40 mm, 1 x 1 x 3 mm)."""

    image, labels, names = sampledata.copy_labels()
    label_names = {i: n for i, n in enumerate(names, start=1)}
    ref = sampledata.Sample("colin27-gyri", image, labels, label_names)
    tgt = sampledata.move_off_mni(ref, seed=seed) if moved else sampledata.Sample("colin27-itself", image, labels,
                                                                                 label_names)
    cases = [Case(ref.name, ref.image, ref.labels, "colin27"), Case(tgt.name, tgt.image, tgt.labels, "colin27")]
    return Dataset("gyri-moved" if moved else "copy", cases, label_names, "MR", [(tgt.name, ref.name)])


def sample_pair() -> Dataset:
    """The pair shipped for 3D Slicer's Sample Data (Resources/SampleData, see its NOTICE.md): Colin27 2 mm
    with its brain segmentation as the reference, ICBM 2009a moved off MNI space with its own, independent
    brain mask as the target: the first thing a clinician tries."""
    folder = SAMPLE_DATA
    if not (folder / "Colin27.nrrd").is_file():
        raise InputError(f"the shipped sample pair is not in {folder} (it ships with the source tree, not the "
                         "Python package)")
    cases = [Case("Colin27", str(folder / "Colin27.nrrd"), str(folder / "Colin27.seg.nrrd"), "colin27"),
             Case("ICBM2009a-moved", str(folder / "ICBM2009a-moved.nrrd"), str(folder / "ICBM2009a-moved.seg.nrrd"),
                  "icbm2009a")]
    return Dataset("sample-pair", cases, {1: "brain"}, "MR", [("ICBM2009a-moved", "Colin27")])


#: the built-in real cohorts, by name
BUILT_IN = {"templates": template_pairs, "atlases": atlases, "macaque": macaque_pairs, "cross-atlas": cross_atlas_pairs,
            "copy": copy_pairs, "gyri-moved": lambda: copy_pairs(moved=True), "sample-pair": sample_pair}


def load_dataset(spec: str) -> Dataset:
    """``templates`` (built-in real pairs), ``atlases``, ``macaque`` (held-out species, evaluation only),
    ``cross-atlas`` (AAL -> Harvard-Oxford), ``copy`` and ``gyri-moved`` (the copy test, on the image itself
    and on a moved copy), ``sample-pair`` (the Slicer sample data), a CSV file, or an nnU-Net / MSD folder."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]()
    p = Path(spec)
    if p.is_dir():
        return load_nnunet(p)
    if p.suffix.lower() == ".csv":
        return load_csv(p)
    raise InputError(f"dataset {spec!r}: not one of {', '.join(repr(n) for n in BUILT_IN)}, a CSV file or an "
                     "nnU-Net folder")
