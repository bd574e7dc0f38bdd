"""Build the small real sample pair shipped in Resources/SampleData (run once; needs the Debian
package mricron-data, nilearn and slicer-core):

- Colin27 T1 (with skull, Debian mricron-data ``ch2.nii.gz``) and its brain segmentation
  (``ch2bet.nii.gz`` > 0), downsampled to 2 mm: the reference;
- the ICBM 2009a symmetric T1 (nilearn) moved off MNI space (rigid, seed 1) onto a 2 x 2 x 3 mm
  grid, with its brain segmentation (T1 > 0.2) as the manual truth: the target.

    PYTHONPATH=. python scripts/make_sample_pair.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

OUT = Path(__file__).resolve().parent.parent / "Resources" / "SampleData"
SPACING = (2.0, 2.0, 2.0)


def downsample(image: sitk.Image, labels: sitk.Image, spacing) -> tuple[sitk.Image, sitk.Image]:
    """Anti-aliased image and label maps (linear on the mask, then > 0.5) on a coarser grid."""
    size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    sigma = [max(0.0, (ns - sp) / 2) for sp, ns in zip(image.GetSpacing(), spacing)]
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    img = sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lab = sitk.Resample(sitk.Cast(labels, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    lab = sitk.Cast(lab > 0.5, sitk.sitkUInt8)
    return img, lab


def as_int16(img: sitk.Image, scale: float) -> sitk.Image:
    arr = np.clip(np.round(sitk.GetArrayFromImage(img) * scale), 0, 32767).astype(np.int16)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def write_segmentation(labels_path: Path, volume_path: Path, out: Path, name: str) -> None:
    """A .seg.nrrd with one 'brain' segment (colour and terminology of IrisSegmentLib.testing)."""
    from IrisSegmentLib import testing
    from IrisSegmentLib.standalone import init_scene

    scene = init_scene()
    vol = testing.load_volume(volume_path, "volume")
    seg = testing.segmentation_from_labelmap(scene, testing.load_volume(labels_path, "tmp", True), vol, name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out))
    storage.SetUseCompression(True)
    if not storage.WriteData(seg):
        raise RuntimeError(f"could not write {out}")


def main() -> None:
    from iris_core import sampledata
    OUT.mkdir(parents=True, exist_ok=True)
    colin = sampledata.colin27("brain")
    img, lab = downsample(colin.image, colin.labels, SPACING)
    tgt = sampledata.move_off_mni(sampledata.icbm2009a("brain"), seed=1, spacing=(2.0, 2.0, 3.0))
    top = float(sitk.GetArrayViewFromImage(tgt.image).max())
    files = {"Colin27": (as_int16(img, 1.0), lab), "ICBM2009a-moved": (as_int16(tgt.image, 1000.0 / top), tgt.labels)}
    tmp = OUT / "_tmp"
    tmp.mkdir(exist_ok=True)
    for name, (image, labels) in files.items():
        vol = OUT / f"{name}.nrrd"
        sitk.WriteImage(image, str(vol), True)
        sitk.WriteImage(labels, str(tmp / f"{name}-labels.nrrd"), True)
        seg_name = "Colin27 segmentation" if name == "Colin27" else "ICBM2009a-moved manual"
        write_segmentation(tmp / f"{name}-labels.nrrd", vol, OUT / f"{name}.seg.nrrd", seg_name)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    for f in sorted(OUT.glob("*.nrrd")):
        print(f"{f.name}: {f.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
