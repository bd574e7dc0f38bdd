"""The mistakes a new user made that the CLI let through (issue [17]): each is caught with one clear line,
before any work where it can be, and nothing is written."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from iris_core.commands.cli import main
from iris_core.io.imaging import LABEL_MAP_MAX_VALUES, label_compactness, looks_like_labels

CH2 = "/usr/share/mricron/templates/ch2.nii.gz"  # Colin27, a uint8 T1 (Debian mricron-data)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def brain_mask(tmp_path_factory):
    """Colin27's brain mask as a uint8 label map (ch2bet > 0), on the T1's grid."""
    bet = sitk.ReadImage("/usr/share/mricron/templates/ch2bet.nii.gz")
    mask = sitk.Cast(bet > 0, sitk.sitkUInt8)
    path = tmp_path_factory.mktemp("mask") / "ch2_brain.nii.gz"
    sitk.WriteImage(mask, str(path))
    return path


def test_an_8bit_mr_is_told_from_a_label_map_by_its_regions(brain_mask):
    """Item 1 and 2: Colin27's T1 holds few enough values to pass for a label map by counting them, so the
    decision rests on whether the values form compact regions."""
    t1 = sitk.ReadImage(CH2)
    assert len(np.unique(sitk.GetArrayViewFromImage(t1))) <= LABEL_MAP_MAX_VALUES  # counting cannot tell
    assert label_compactness(t1) < 0.3 and not looks_like_labels(t1)
    mask = sitk.ReadImage(str(brain_mask))
    aal = sitk.ReadImage("/usr/share/mricron/templates/aal.nii.gz")
    assert looks_like_labels(mask) and looks_like_labels(aal) and label_compactness(aal) > 0.8


def test_reference_given_as_labels_then_image_is_refused(capsys, brain_mask, tiny_model_file, tmp_path):
    """Item 1: ``--reference ch2_brain.nii.gz ch2.nii.gz`` (label map first) on our own sample data ends in one
    error line naming both files, and nothing is written."""
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--reference",
                       brain_mask, CH2, "--target", CH2, "--output", out)
    assert code == 2 and err.startswith("error: reference (") and "the first file holds few integer values" in err
    assert "give the image first, then its label map" in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_no_label_map_warning_on_an_8bit_mr_target(caplog, tiny_model):
    """Item 2: the 'looks like a label map' warning fires on a label map given as the target, not on
    Colin27's uint8 T1."""
    from iris_core.api import segment
    from iris_core.resources import SAMPLE_DATA

    ref = [(str(SAMPLE_DATA / "Colin27.nrrd"), str(SAMPLE_DATA / "Colin27.seg.nrrd"))]
    with caplog.at_level(logging.WARNING):
        segment(CH2, ref, model=tiny_model, device="cpu")
    assert not [r for r in caplog.records if "like a label map" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        segment(str(SAMPLE_DATA / "Colin27.seg.nrrd"), ref, model=tiny_model, device="cpu")
    assert [r for r in caplog.records if "like a label map" in r.getMessage()]


@pytest.mark.parametrize("option", ["--output", "--preview"])
def test_output_under_a_file_is_refused_before_any_work(capsys, option, phantom_files, tiny_model_file, tmp_path):
    """Item 3: an output whose folder is a file: one error line before anything runs, not a FileExistsError
    traceback after the segmentation."""
    (tmp_path / "notes.txt").write_text("mine")
    bad = tmp_path / "notes.txt" / ("seg.nii.gz" if option == "--output" else "p.png")
    args = {"--output": tmp_path / "seg.nii.gz", "--preview": None} | {option: bad}
    argv = ["segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--reference", phantom_files["ref"],
            phantom_files["ref_lab"], "--target", phantom_files["tgt"], "--output", args["--output"]]
    argv += ["--preview", args["--preview"]] if args["--preview"] else []
    code, _, err = run(capsys, *argv)
    assert code == 2 and err == f"error: {option} {bad}: {tmp_path / 'notes.txt'} is a file, not a folder; choose " \
                                "another output path\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_debug_is_accepted_after_the_command(capsys, phantom_files, tiny_model_file, tmp_path):
    """Item 5: ``--debug`` after the sub-command shows the traceback, as before it."""
    code, out, _ = run(capsys, "presets", "--debug")
    assert code == 0 and "iris-tiny" in out
    argv = ["segment", "--model", tiny_model_file, "--reference", phantom_files["ref"], phantom_files["ref_lab"],
            "--target", phantom_files["tgt"], "--output", tmp_path / "seg.png"]
    assert main([str(a) for a in argv]) == 2  # without --debug: one error line
    from iris_core.errors import InputError

    with pytest.raises(InputError, match="write a 3-D volume"):
        main([str(a) for a in [*argv, "--debug"]])


def test_registration_baseline_without_its_package_is_refused_before_the_first_case(capsys, tmp_path):
    """Item 6: ``evaluate --method elastix`` without itk-elastix stops before any case, saying what to
    install (where it is installed, the check lets the method through)."""
    from iris_core.commands.evaluate import parse_method, require_method_packages

    if importlib.util.find_spec("itk") is None:
        code, _, err = run(capsys, "evaluate", "--dataset", "sample-pair", "--method", "iris:one-shot", "elastix",
                           "--out", tmp_path / "ev")
        assert code == 2 and "method elastix needs itk-elastix, which is not installed: pip install itk-elastix" in err
        assert not (tmp_path / "ev").exists()
    else:
        require_method_packages([parse_method("elastix")])
    require_method_packages([parse_method("ants:Affine"), parse_method("identity")])  # antspyx: a test dependency


def test_missing_class_is_named_as_typed(capsys, phantom_files, tiny_model_file, tmp_path):
    """Item 7: ``--classes 1,3`` with no label 3 in the reference names '3', not a spelling the user never
    typed; a named class keeps its name."""
    base = ["segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--reference", phantom_files["ref"],
            phantom_files["ref_lab"], "--target", phantom_files["tgt"], "--output", tmp_path / "s.nii.gz"]
    code, _, err = run(capsys, *base, "--classes", "1,3")
    assert code == 2 and "requested class 3 is absent from every reference label map (labels present: 1, 2)" in err
    assert "label_3" not in err
    code, _, err = run(capsys, *base, "--classes", "ball=1,liver=3,spleen=4")
    assert code == 2 and "requested classes liver=3, spleen=4 are absent" in err


def test_training_config_reports_every_problem_at_once(capsys, tmp_path):
    """Item 8: a wrong type, a value out of range and an unknown key, all in one message."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[train]\nsteps = "ten"\nbatch = 0\ncrop_probs = [0.5, 0.6]\nstepz = 3\n')
    code, _, err = run(capsys, "train", "--config", cfg, "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    for part in ["unknown keys ['stepz']", "steps = 'ten' is not a int", "batch must be >= 1, got 0",
                 "crop_probs [0.5, 0.6] must be non-negative and sum to 1"]:
        assert part in err, (part, err)
    assert not (tmp_path / "run").exists()
