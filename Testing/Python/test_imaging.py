"""Reading what SimpleITK reads (DICOM series folders too), devices and threads."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import phantom
from iris_core.errors import InputError, ResourceError
from iris_core.io.imaging import read_image, read_labels, write_image_atomic
from iris_core.pipeline.device import choose_device, select_device, set_threads


def write_dicom_series(image: sitk.Image, folder, series: str = "2", description: str = "", prefix: str = "") -> None:
    folder.mkdir(exist_ok=True)
    img = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(img.GetDepth()):
        sl = img[:, :, z]
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0020|000e", f"1.2.826.0.1.3680043.2.1125.{series}")
        if description:
            sl.SetMetaData("0008|103e", description)
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0028|0030", "\\".join(map(str, img.GetSpacing()[:2])))
        sl.SetMetaData("0018|0050", str(img.GetSpacing()[2]))
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(tmp_path):
    img, _ = phantom(size=(32, 30, 12), spacing=(1.0, 1.0, 2.5))
    write_dicom_series(img, tmp_path / "series")
    back = read_image(tmp_path / "series")
    assert back.GetSize() == img.GetSize()
    assert np.allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-3)
    assert np.allclose(sitk.GetArrayFromImage(back), np.round(sitk.GetArrayFromImage(img)), atol=1)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "emptydir")


def test_dicom_folder_of_several_series_is_refused_and_one_file_picks_its_series(tmp_path):
    """A study folder holding a localizer and a T1 is not read as whichever series comes first: the
    error lists both; one file of the wanted series reads that whole series."""
    t1, _ = phantom(size=(32, 30, 12), spacing=(1.0, 1.0, 2.5), seed=1)
    loc, _ = phantom(size=(20, 20, 3), spacing=(2.0, 2.0, 5.0), seed=2)
    study = tmp_path / "study"
    write_dicom_series(t1, study, series="2", description="T1 MPRAGE", prefix="t1_")
    write_dicom_series(loc, study, series="3", description="localizer", prefix="loc_")
    with pytest.raises(InputError, match=r"study: folder holds 2 DICOM series: .*\(12 files, 'T1 MPRAGE', e\.g\. "
                                         r"t1_\d+\.dcm\); .*\(3 files, 'localizer', .*Pass one file of the series"):
        read_image(study, "target image")
    back = read_image(study / "t1_005.dcm", "target image")
    assert back.GetSize() == t1.GetSize()
    assert np.allclose(sitk.GetArrayFromImage(back), np.round(sitk.GetArrayFromImage(t1)), atol=1)
    assert read_image(study / "loc_000.dcm").GetSize() == loc.GetSize()


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".NII.GZ", ".Nrrd"])  # capitals: Windows users
def test_formats_round_trip_atomically(tmp_path, ext):
    img, lab = phantom()
    p = write_image_atomic(lab, tmp_path / f"lab{ext}")
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]
    back = read_labels(p, img, "phantom")
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(lab))


def test_float_labels_with_fractions_are_refused(tmp_path):
    img, lab = phantom()
    arr = sitk.GetArrayFromImage(lab).astype(np.float32) * 0.5
    f = sitk.GetImageFromArray(arr)
    f.CopyInformation(img)
    sitk.WriteImage(f, str(tmp_path / "f.nii.gz"))
    with pytest.raises(InputError, match="non-integer"):
        read_labels(tmp_path / "f.nii.gz", img, "phantom")


@pytest.mark.parametrize("cuda,mps,auto", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                           (False, False, "cpu")])
def test_device_choice_on_every_kind_of_machine(cuda, mps, auto):
    """The decision on a machine with CUDA and Apple's GPU, with one of them, and with neither: 'auto' prefers
    CUDA, then MPS, then the CPU; a device asked for by name is given only where it exists."""
    assert choose_device("auto", cuda, mps) == auto
    assert choose_device("cpu", cuda, mps) == "cpu"
    for name in ("cuda", "cuda:1"):
        if cuda:
            assert choose_device(name, cuda, mps) == name
        else:
            with pytest.raises(ResourceError, match=f"device '{name}' requested but CUDA is not available"):
                choose_device(name, cuda, mps)
    if mps:
        assert choose_device("mps", cuda, mps) == "mps"
    else:
        with pytest.raises(ResourceError, match="Apple MPS is not available"):
            choose_device("mps", cuda, mps)
    for name in ("tpu", "gpu", "cuda1", ""):
        with pytest.raises(ResourceError, match="unknown device"):
            choose_device(name, cuda, mps)


def test_device_choice_and_threads():
    """select_device asks torch what this machine has (here: whatever it is) and decides as choose_device."""
    mps = getattr(torch.backends, "mps", None)
    here = torch.cuda.is_available(), bool(mps and mps.is_available())
    assert select_device("auto") == torch.device(choose_device("auto", *here))
    assert select_device("cpu").type == "cpu"
    if not here[0]:
        with pytest.raises(ResourceError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ResourceError, match="unknown device"):
        select_device("tpu")
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
