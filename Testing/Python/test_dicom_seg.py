"""DICOM in and out (issue [15]): results as DICOM SEG (highdicom) read back by an independent implementation
(dcmqi's segimage2itkimage), references from a DICOM SEG made by dcmqi's itkimage2segimage, a SEG of another
series refused, and an oblique, anisotropic series keeping its geometry. The series are written from the
shipped sample data and the test phantoms with real geometry tags (conftest.write_dicom_series)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import oblique_direction, phantom, write_dicom_series
from iris_core.api import segment
from iris_core.commands.cli import main
from iris_core.errors import InputError
from iris_core.io.dicom_seg import is_dicom_seg
from iris_core.io.results import write_result
from iris_core.resources import SAMPLE_DATA

BIN = Path(sys.executable).parent


def dcmqi(tool: str, *args) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (tool, out.stdout[-2000:], out.stderr[-2000:])
    return out


def dcmqi_segments(seg: Path, folder: Path) -> dict[str, sitk.Image]:
    """dcmqi's reading of a SEG: one image per segment, by segment label."""
    folder.mkdir()
    dcmqi("segimage2itkimage", "--inputDICOM", seg, "--outputDirectory", folder, "-t", "nrrd", "-p", "seg")
    meta = json.loads((folder / "seg-meta.json").read_text())
    out = {}
    for entry in meta["segmentAttributes"]:
        for attr in entry:
            out[attr.get("SegmentLabel") or attr.get("SegmentDescription", "")] = sitk.ReadImage(
                str(folder / f"seg-{attr['labelID']}.nrrd"))
    return out


def dcmqi_seg(seg_nrrd: Path, series_folder: Path, folder: Path) -> Path:
    """A DICOM SEG of ``series_folder`` made by dcmqi's itkimage2segimage from a shipped .seg.nrrd (its label
    map written beside as labels.nrrd), one segment 'brain'."""
    labels = sitk.ReadImage(str(seg_nrrd))
    if labels.GetNumberOfComponentsPerPixel() > 1:
        labels = sitk.VectorIndexSelectionCast(labels, 0)
    lab_path = folder / "labels.nrrd"
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), str(lab_path))
    meta = {"ContentCreatorName": "Tester", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": "brain", "SeriesNumber": "300", "InstanceNumber": "1",
            "segmentAttributes": [[{"labelID": 1, "SegmentDescription": "brain", "SegmentAlgorithmType": "MANUAL",
                                    "SegmentedPropertyCategoryCodeSequence": {
                                        "CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                        "CodeMeaning": "Anatomical Structure"},
                                    "SegmentedPropertyTypeCodeSequence": {
                                        "CodeValue": "12738006", "CodingSchemeDesignator": "SCT",
                                        "CodeMeaning": "Brain"},
                                    "recommendedDisplayRGBValue": [255, 0, 0]}]],
            "ContentLabel": "SEGMENTATION", "ContentDescription": "brain", "ClinicalTrialCoordinatingCenterName": "x",
            "BodyPartExamined": "BRAIN"}
    (folder / "meta.json").write_text(json.dumps(meta))
    seg = folder / "seg.dcm"
    dcmqi("itkimage2segimage", "--inputImageList", lab_path, "--inputDICOMDirectory", series_folder,
          "--outputDICOM", seg, "--inputMetadata", folder / "meta.json")
    return seg


def on_grid(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The shipped pair's target (ICBM 2009a, moved) and reference (Colin27) as DICOM series."""
    root = tmp_path_factory.mktemp("dicom")
    target = write_dicom_series(sitk.ReadImage(str(SAMPLE_DATA / "ICBM2009a-moved.nrrd")), root / "icbm",
                                series_description="ICBM 2009a moved")
    reference = write_dicom_series(sitk.ReadImage(str(SAMPLE_DATA / "Colin27.nrrd")), root / "colin27",
                                   series_description="Colin27")
    return {"target": target, "reference": reference}


def test_result_as_dicom_seg_reads_back_in_dcmqi_as_the_nifti_output(series, tmp_path):
    """One run, written as NIfTI and as DICOM SEG: dcmqi's reading of the SEG equals the NIfTI label map voxel
    for voxel, and the SEG names the class, its SNOMED codes, the algorithm and the source series."""
    refs = [(str(SAMPLE_DATA / "Colin27.nrrd"), str(SAMPLE_DATA / "Colin27.seg.nrrd"))]
    result = segment(str(series["target"]), refs, device="cpu")
    write_result(result, tmp_path / "seg.nii.gz")
    write_result(result, tmp_path / "seg.dcm", series["target"])
    assert is_dicom_seg(tmp_path / "seg.dcm") and (tmp_path / "seg.json").is_file()
    ours = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    truth = sitk.GetArrayFromImage(ours)
    assert (truth == 1).sum() > 50_000
    back = dcmqi_segments(tmp_path / "seg.dcm", tmp_path / "dcmqi")
    assert list(back) == ["brain"]
    assert np.array_equal(on_grid(back["brain"], ours) > 0, truth == 1)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    source = pydicom.dcmread(next(series["target"].iterdir()), stop_before_pixels=True)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    seg = ds.SegmentSequence[0]
    assert seg.SegmentLabel == "brain" and seg.SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentedPropertyTypeCodeSequence[0].CodeValue == "12738006"  # SNOMED CT: Brain
    assert seg.SegmentAlgorithmName == result.sidecar["model"]["name"][:64]


def test_dicom_seg_output_of_a_non_dicom_target_is_refused_before_any_work(capsys, tmp_path):
    code = main(["segment", "--target", str(SAMPLE_DATA / "ICBM2009a-moved.nrrd"), "--reference",
                 str(SAMPLE_DATA / "Colin27.nrrd"), str(SAMPLE_DATA / "Colin27.seg.nrrd"), "--output",
                 str(tmp_path / "seg.dcm"), "--model", "preset:iris-tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "a DICOM SEG references the target's DICOM series" in err and "ICBM2009a-moved.nrrd" in err
    assert not list(tmp_path.iterdir())


def test_reference_from_a_dcmqi_seg_gives_what_its_label_map_gives(series, tmp_path, tiny_model):
    """A SEG made by dcmqi's itkimage2segimage from Colin27's label map works as the reference, and segments
    the target exactly as the label map itself does; a SEG of another series is refused naming both UIDs."""
    seg = dcmqi_seg(SAMPLE_DATA / "Colin27.seg.nrrd", series["reference"], tmp_path)
    lab_path = tmp_path / "labels.nrrd"
    assert is_dicom_seg(seg)
    from_seg = segment(str(series["target"]), [(str(series["reference"]), str(seg))], model=tiny_model, device="cpu")
    from_map = segment(str(series["target"]), [(str(series["reference"]), str(lab_path))], model=tiny_model,
                       device="cpu")
    assert [c.name for c in from_seg.classes] == ["brain"]
    assert np.array_equal(sitk.GetArrayFromImage(from_seg.labels), sitk.GetArrayFromImage(from_map.labels))
    with pytest.raises(InputError, match="is a DICOM SEG of the series .* not of the image series") as err:
        segment(str(series["target"]), [(str(series["target"]), str(seg))], model=tiny_model, device="cpu")
    uid = pydicom.dcmread(next(series["target"].iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert uid in str(err.value)
    with pytest.raises(InputError, match="a DICOM SEG describes a DICOM series"):
        segment(str(series["target"]), [(str(SAMPLE_DATA / "Colin27.nrrd"), str(seg))], model=tiny_model,
                device="cpu")


def test_oblique_anisotropic_series_keeps_its_geometry(tmp_path, tiny_model, capsys, caplog):
    """An oblique series of 1.8 x 1.4 x 3.5 mm voxels: read as the volume it is, and the SEG written from the CLI
    lies on it (dcmqi's reading equals the NIfTI output of the same options, on the same grid, class by class:
    the model finds both, so the comparison cannot be empty). highdicom's INFO lines (one per DICOM module it
    copies) are shown with --debug only."""
    import logging

    img, _ = phantom(size=(40, 44, 20), spacing=(1.8, 1.4, 3.5), direction=oblique_direction(),
                     origin=(-20.0, -5.0, 0.0), seed=2)
    folder = write_dicom_series(img, tmp_path / "oblique")
    read = sitk.ReadImage([str(p) for p in sorted(folder.iterdir())])
    assert np.allclose(read.GetSpacing(), img.GetSpacing(), atol=1e-4)
    assert np.allclose(read.GetDirection(), img.GetDirection(), atol=1e-4)
    assert np.allclose(read.GetOrigin(), img.GetOrigin(), atol=1e-3)
    ref_img, ref_lab = phantom(seed=1)
    sitk.WriteImage(ref_img, str(tmp_path / "ref.nii.gz"))
    sitk.WriteImage(ref_lab, str(tmp_path / "ref_lab.nii.gz"))
    from iris_core.hub.checkpoint import save_checkpoint

    model = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model.model, tiny_model.preprocessing, info={})
    args = ["segment", "--model", str(model), "--device", "cpu", "--quiet", "--target", str(folder), "--reference",
            str(tmp_path / "ref.nii.gz"), str(tmp_path / "ref_lab.nii.gz"), "--classes", "ball=1,box=2", "--output"]
    outputs = {}
    for ext in (".nii.gz", ".dcm"):
        with caplog.at_level(logging.INFO):
            code = main([*args, str(tmp_path / f"out{ext}")])
        assert code == 0, capsys.readouterr().err
        outputs[ext] = tmp_path / f"out{ext}"
    assert not [r for r in caplog.records if r.name.startswith("highdicom")]
    nifti = sitk.ReadImage(str(outputs[".nii.gz"]))
    assert np.allclose(nifti.GetDirection(), img.GetDirection(), atol=1e-4)
    back = dcmqi_segments(outputs[".dcm"], tmp_path / "dcmqi")
    labels = sitk.GetArrayFromImage(nifti)
    assert set(back) == {"ball", "box"} and (labels == 1).any() and (labels == 2).any(), set(back)
    for name, value in (("ball", 1), ("box", 2)):
        assert np.allclose(back[name].GetDirection(), img.GetDirection(), atol=1e-3)
        assert np.array_equal(on_grid(back[name], nifti) > 0, labels == value), name
    shutil.rmtree(tmp_path / "dcmqi")
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        assert main(["--debug", *args, str(tmp_path / "debug.dcm")]) == 0
    assert any(r.name.startswith("highdicom") and r.levelno == logging.INFO for r in caplog.records)


def test_a_series_without_a_frame_of_reference_is_refused_before_any_work(tmp_path, tiny_model_file, capsys):
    """A SEG must share its images' Frame of Reference UID; a series without one (here one file of twenty lost
    it) is refused before anything is read or segmented, naming the file and what to write instead, and nothing
    is written. (It used to segment, then fail in highdicom with a ValueError traceback.)"""
    img, _ = phantom(size=(40, 44, 20), spacing=(1.8, 1.4, 3.5), seed=2)
    folder = write_dicom_series(img, tmp_path / "series")
    stripped = sorted(folder.iterdir())[7]
    ds = pydicom.dcmread(stripped)
    del ds.FrameOfReferenceUID
    ds.save_as(stripped)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--target", str(folder),
                 "--reference", str(SAMPLE_DATA / "Colin27.nrrd"), str(SAMPLE_DATA / "Colin27.seg.nrrd"),
                 "--output", str(out / "seg.dcm")])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith(f"error: output {out / 'seg.dcm'}: the target's DICOM series {folder} has no "
                                   f"Frame of Reference UID (file {stripped.name}"), captured.err
    assert "write .nii.gz, .nrrd or .seg.nrrd instead" in captured.err and "Traceback" not in captured.err
    assert "Segmenting" not in captured.err + captured.out and not list(out.iterdir())
    # the same series as NIfTI output is segmented (the frame of reference is the SEG's need only)
    assert main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--quiet", "--target", str(folder),
                 "--reference", str(SAMPLE_DATA / "Colin27.nrrd"), str(SAMPLE_DATA / "Colin27.seg.nrrd"),
                 "--output", str(out / "seg.nii.gz")]) == 0


def test_evaluate_takes_dicom_seg_truth(series, tmp_path, capsys):
    """A cohort CSV whose label maps are DICOM SEGs of DICOM series: evaluate reads them as the truth (identity
    baseline: the two subjects' brains, moved apart, overlap partly)."""
    rows = ["case,image,labels"]
    for name, nrrd in (("reference", "Colin27.seg.nrrd"), ("target", "ICBM2009a-moved.seg.nrrd")):
        (tmp_path / name).mkdir()
        rows.append(f"{name},{series[name]},{dcmqi_seg(SAMPLE_DATA / nrrd, series[name], tmp_path / name)}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    code = main(["evaluate", "--dataset", str(tmp_path / "cases.csv"), "--method", "identity", "--out",
                 str(tmp_path / "ev"), "--no-overlays"])
    assert code == 0, capsys.readouterr().err
    import csv

    results = list(csv.DictReader((tmp_path / "ev" / "results.csv").open()))
    assert len(results) == 2 and all(0.0 < float(r["dice"]) < 0.9 for r in results), results
