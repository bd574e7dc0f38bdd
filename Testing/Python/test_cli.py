"""The iris-segment CLI: real files, clear errors for bad input, nothing partial written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iris_core.commands.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def base(phantom_files, tiny_model_file, tmp_path):
    return ["segment", "--model", tiny_model_file, "--device", "cpu", "--quiet",
            "--reference", phantom_files["ref"], phantom_files["ref_lab"]]


def test_segment_writes_labels_sidecar_preview_and_library(capsys, base, phantom_files, tmp_path):
    out = tmp_path / "seg.nii.gz"
    code, stdout, err = run(capsys, *base, "--target", phantom_files["tgt"], "--classes", "ball=1,box=2",
                            "--output", out, "--preview", tmp_path / "p.png", "--save-library", tmp_path / "l.st")
    assert code == 0, err
    assert "wrote" in stdout and out.is_file() and (tmp_path / "p.png").stat().st_size > 10_000
    meta = json.loads((tmp_path / "seg.json").read_text())
    assert [c["name"] for c in meta["classes"]] == ["ball", "box"]
    # each class's voxel count and volume are those of the label map written
    seg = sitk.ReadImage(str(out))
    arr = sitk.GetArrayFromImage(seg)
    for c in meta["classes"]:
        assert c["voxels"] == int((arr == c["value"]).sum())
        assert c["volume_ml"] == pytest.approx(c["voxels"] * np.prod(seg.GetSpacing()) / 1000, abs=1e-3)
    code, _, err = run(capsys, "segment", "--model", base[2], "--device", "cpu", "--quiet", "--library",
                       tmp_path / "l.st", "--target", phantom_files["tgt"], "--output", tmp_path / "lib.nii.gz")
    assert code == 0, err
    # a library's classes by name alone, as the README shows
    code, _, err = run(capsys, "segment", "--model", base[2], "--device", "cpu", "--quiet", "--library",
                       tmp_path / "l.st", "--classes", "box", "--target", phantom_files["tgt"],
                       "--output", tmp_path / "box.nii.gz")
    assert code == 0, err
    meta = json.loads((tmp_path / "box.json").read_text())
    assert [(c["name"], c["value"]) for c in meta["classes"]] == [("box", 2)]
    code, _, err = run(capsys, "segment", "--model", base[2], "--device", "cpu", "--quiet", "--library",
                       tmp_path / "l.st", "--classes", "liver", "--target", phantom_files["tgt"],
                       "--output", tmp_path / "liver.nii.gz")
    assert code == 2 and "['liver'] are not in this embedding" in err and not (tmp_path / "liver.nii.gz").exists()


def _write(tmp_path, name, arr, like=None, spacing=None):
    img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 4 and arr.shape[-1] == 3)
    if like is not None:
        img.CopyInformation(like)
    if spacing is not None:
        img.SetSpacing(spacing)
    p = tmp_path / name
    sitk.WriteImage(img, str(p))
    return p


def bad_cases(tmp_path, files):
    ref = sitk.ReadImage(str(files["ref"]))
    lab = sitk.ReadImage(str(files["ref_lab"]))
    arr = sitk.GetArrayFromImage(ref)
    nan = arr.copy()
    nan[3, 4, 5] = np.nan
    empty = np.zeros_like(sitk.GetArrayFromImage(lab))
    speck = empty.copy()
    speck[10, 10, 10] = 7  # one voxel: vanishes at the model's 4 mm spacing
    speck[sitk.GetArrayFromImage(lab) == 1] = 1
    cases = {
        "missing target": (["--target", tmp_path / "nope.nii.gz"], "target image .*nope.nii.gz: file not found"),
        "unreadable": (["--target", _bytes(tmp_path / "junk.nii.gz")], "junk.nii.gz: unreadable"),
        "2-D": (["--target", _write(tmp_path, "2d.nii.gz", arr[5])], "is 2-D"),
        "4-D": (["--target", _write4d(tmp_path, arr)], "is 4-D"),
        "multi-component": (["--target", _write(tmp_path, "rgb.nrrd", np.stack([arr] * 3, -1))], "3 components"),
        "NaN": (["--target", _write(tmp_path, "nan.mha", nan, like=ref)], "NaN or infinite"),
        "NaN NIfTI": (["--target", _write(tmp_path, "nan.nii.gz", nan, like=ref)], "nan.nii.gz: 1 voxels are NaN"),
        "inf NIfTI reference": (["--target", files["tgt"], "--reference",
                                 _write(tmp_path, "inf.nii", np.where(arr > 250, np.inf, arr), like=ref),
                                 files["ref_lab"]], "inf.nii: .* voxels are NaN or infinite"),
        "labels off grid": (["--target", files["tgt"], "--reference", files["ref"],
                             _write(tmp_path, "offgrid.nii.gz", sitk.GetArrayFromImage(lab), spacing=(2, 2, 2))],
                            "not on the grid of"),
        "empty reference": (["--target", files["tgt"], "--reference", files["ref"],
                             _write(tmp_path, "empty.nii.gz", empty, like=lab)], "empty"),
        "class vanishes": (["--target", files["tgt"], "--reference", files["ref"],
                            _write(tmp_path, "speck.nii.gz", speck, like=lab), "--classes", "7"],
                           "vanishes at the model spacing"),
        "reference swapped": (["--target", files["tgt"], "--reference", files["ref_lab"], files["ref"]],
                              r"ref_lab.nii.gz, .*ref.nii.gz\): the first file holds few integer values"),
        "labels as image": (["--target", files["tgt"], "--reference", files["ref_lab"], files["ref_lab"]],
                            r"ref_lab.nii.gz, .*ref_lab.nii.gz\): the image and the label map hold the same voxels"),
        "window of two edges": (["--target", files["tgt"], "--window", "8,8"], r"--window '8,8': give one size"),
        "no threads": (["--target", files["tgt"], "--threads", "0"], "threads 0 must be >= 1"),
        "negative sw-batch": (["--target", files["tgt"], "--sw-batch", "-1"], "windows per forward pass -1 must be >= 0"),
        "structures with an Iris model": (["--target", files["tgt"], "--structures", "liver"],
                                          r"is an iris model; named structures need a Hermes model .*\(--structures or --reference IMAGE LABELS"),
        "Hermes without modality": (["--target", files["tgt"], "--model", "preset:hermes-tiny", "--structures",
                                     "liver"], r"a Hermes model needs the target's modality: CT, .* \(--hermes-modality\)"),
        "class absent": (["--target", files["tgt"], "--classes", "liver=9"], r"requested class liver=9 is absent"),
        "bad classes": (["--target", files["tgt"], "--classes", "a=b"], "not a label value"),
        "too large": (["--target", _huge(tmp_path)], "needs about .* GiB but only"),
        "bad model": (["--target", files["tgt"], "--model", _bytes(tmp_path / "m.pth")], "m.pth"),
    }
    return cases


def _bytes(path):
    path.write_bytes(b"\x00garbage" * 50)
    return path


def _write4d(tmp_path, arr):
    img = sitk.JoinSeries([sitk.GetImageFromArray(arr)] * 2)
    p = tmp_path / "4d.nii.gz"
    sitk.WriteImage(img, str(p))
    return p


def _huge(tmp_path):
    img = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    img.SetSpacing([3000.0, 3000.0, 3000.0])  # 21 m across: billions of voxels at the model spacing
    p = tmp_path / "huge.nii.gz"
    sitk.WriteImage(img, str(p))
    return p


@pytest.mark.parametrize("case", ["missing target", "unreadable", "2-D", "4-D", "multi-component", "NaN",
                                  "NaN NIfTI", "inf NIfTI reference",
                                  "labels off grid", "empty reference", "reference swapped", "labels as image", "class vanishes",
                                  "window of two edges", "no threads", "negative sw-batch", "structures with an Iris model",
                                  "Hermes without modality", "class absent",
                                  "bad classes", "too large", "bad model"])
def test_bad_input_has_specific_error_and_writes_nothing(capsys, base, phantom_files, tmp_path, case):
    extra, pattern = bad_cases(tmp_path, phantom_files)[case]
    argv = list(base)
    if "--reference" in extra:  # replace the default reference
        argv = argv[:-3]
    if "--model" in extra:
        i = argv.index("--model")
        argv = argv[:i] + argv[i + 2 :]
    out = tmp_path / "out" / "seg.nii.gz"
    code, stdout, err = run(capsys, *argv, *extra, "--output", out)
    assert code != 0
    assert err.startswith("error: ")
    assert "Traceback" not in err
    import re

    assert re.search(pattern, err), err
    assert not out.exists() and not (tmp_path / "out" / "seg.json").exists()


def test_outputs_never_land_on_inputs(capsys, base, phantom_files, tmp_path):
    """An output that is an input (another spelling of its path, a hard link to it), or in a format that
    cannot hold a 3-D volume (PNG, no extension: ITK failed after the work), is refused before any work,
    and the inputs keep their bytes."""
    import hashlib
    import os

    tgt = tmp_path / "tgt.nii.gz"
    tgt.write_bytes(phantom_files["tgt"].read_bytes())
    (tmp_path / "sub").mkdir()
    os.link(phantom_files["ref_lab"], tmp_path / "lab_link.nii.gz")
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tgt, phantom_files["ref_lab"])}
    cases = [
        (["--output", tmp_path / "seg.png"], r"--output .*seg.png: write a 3-D volume as .nii.gz, .nii, .nrrd, .mha"),
        (["--output", tmp_path / "seg"], r"--output .*seg: write a 3-D volume as"),
        (["--output", tmp_path / "seg.nii.gz", "--preview", tmp_path / "p.xyz"],
         r"--preview .*p.xyz: name the picture with one of .png, .jpg"),
        (["--output", tmp_path / "seg.nii.gz", "--preview", tmp_path / "p"], r"--preview .*p: name the picture"),
        (["--output", tmp_path / "sub" / ".." / "tgt.nii.gz"], r"--output .*tgt.nii.gz is the input target image"),
        (["--output", tmp_path / "seg.nii.gz", "--preview", tmp_path / "lab_link.nii.gz"],
         r"--preview .*lab_link.nii.gz is the input reference label map 1 .*ref_lab.nii.gz"),
        (["--output", tmp_path / "a.nii.gz", "--save-library", tmp_path / "a.json"], "the sidecar of --output and --save-library are both .*a.json"),
    ]
    for extra, pattern in cases:
        code, _, err = run(capsys, *base, "--target", tgt, *extra)
        assert code != 0 and err.startswith("error: ") and re.search(pattern, err), (extra, err)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab_link.nii.gz", "sub", "tgt.nii.gz"]


@pytest.mark.slow
def test_real_sample_data_result_is_placed_on_target(capsys, tmp_path):
    """Colin27 brain mask as reference, the ICBM 2009a template moved off MNI space as target:
    the result lies on the moved target's grid, inside its field of view."""
    from iris_core import sampledata
    ref = sampledata.colin27("brain")
    tgt = sampledata.move_off_mni(sampledata.icbm2009a("brain"), seed=3)
    paths = {}
    for name, img in [("ref", ref.image), ("lab", ref.labels), ("tgt", tgt.image)]:
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    out = tmp_path / "brain.nii.gz"
    code, _, err = run(capsys, "segment", "--device", "cpu", "--quiet",  # the bundled model: a real brain
                       "--target", paths["tgt"], "--reference", paths["ref"], paths["lab"],
                       "--classes", "brain=1", "--output", out)
    assert code == 0, err
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == tgt.image.GetSize()
    assert np.allclose(seg.GetDirection(), tgt.image.GetDirection())
    assert np.allclose(seg.GetSpacing(), tgt.image.GetSpacing()) and np.allclose(seg.GetOrigin(), tgt.image.GetOrigin())
    labels = sitk.GetArrayFromImage(seg)
    assert set(np.unique(labels)) == {0, 1}  # not empty
    truth = sitk.GetArrayFromImage(tgt.labels) > 0  # placed where the moved brain is, voxel for voxel
    dice = 2 * float(((labels == 1) & truth).sum()) / float((labels == 1).sum() + truth.sum())
    assert dice > 0.6, dice  # bundled model, brain across templates: about 0.75


def test_thin_target_segments_and_names_what_it_did_not_find(capsys, caplog, tmp_path):
    """A 3-slice slab of the demo's moved MNI152 head (9 mm thick) with the bundled model and Colin27's six
    lobes: it used to fail in ITK's recursive Gaussian (which needs 4 voxels per axis) with a traceback.
    Now it runs; the classes of which no voxel was found are named in a warning with the reason to expect
    it (the slab's thickness against the model's window), and the sidecar counts each class's voxels."""
    from iris_core import sampledata
    ref = sampledata.colin27("lobes")
    mni = sampledata.mni152nlin6asym("brain")
    tgt = sampledata.move_off_mni(mni, seed=0)
    paths = {"ref": tmp_path / "ref.nii.gz", "lab": tmp_path / "lab.nii.gz", "tgt": tmp_path / "slab.nii.gz"}
    slab = tgt.image[:, :, 20:23]
    for path, img in [(paths["ref"], ref.image), (paths["lab"], ref.labels), (paths["tgt"], slab)]:
        sitk.WriteImage(img, str(path))
    out = tmp_path / "slab_seg.nii.gz"
    code, _, err = run(capsys, "segment", "--device", "cpu", "--quiet", "--target", paths["tgt"],
                       "--reference", paths["ref"], paths["lab"], "--output", out)
    assert code == 0, err
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == slab.GetSize()
    meta = json.loads(out.with_name("slab_seg.json").read_text())
    arr = sitk.GetArrayFromImage(seg)
    assert [c["voxels"] for c in meta["classes"]] == [int((arr == c["value"]).sum()) for c in meta["classes"]]
    missing = [c["name"] for c in meta["classes"] if c["voxels"] == 0]
    warnings = [r.getMessage() for r in caplog.records if "not found in slab.nii.gz" in r.getMessage()]
    if missing:  # measured with the bundled model: none of the six lobes is found in 9 mm of head
        (warning,) = warnings
        assert warning.startswith(f"{len(missing)} of 6 classes") and all(n in warning for n in missing)
        assert "9 mm (3 voxels) thick" in warning
    else:  # a model that finds them all says nothing
        assert not warnings


def test_classes_not_found_are_named_with_the_thickness_hint(caplog, tiny_model):
    """The warning itself, on classes absent by construction (zero voxels), for a thin and a thick target."""
    import logging

    from iris_core.api import warn_classes_not_found
    from iris_core.options import SegmentOptions
    from iris_core.pipeline.inference import Engine

    engine = Engine(tiny_model, SegmentOptions(device="cpu"))
    found = [{"name": "liver", "voxels": 0}, {"name": "spleen", "voxels": 12}, {"name": "kidney", "voxels": 0}]
    thin = sitk.Image([100, 100, 3], sitk.sitkFloat32)
    thin.SetSpacing((1.0, 1.0, 3.0))
    with caplog.at_level(logging.WARNING):
        warn_classes_not_found(found, thin, "slab", engine)
        warn_classes_not_found(found, sitk.Image([100, 100, 100], sitk.sitkFloat32), "volume", engine)
        warn_classes_not_found(found[1:2], thin, "found-all", engine)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("2 of 3 classes not found in slab (no voxel): liver, kidney")
    assert "9 mm (3 voxels) thick along its axis 2" in messages[0]
    assert messages[1] == "2 of 3 classes not found in volume (no voxel): liver, kidney"


def test_reference_labels_from_slicer_named_cropped_or_layered(capsys, caplog, phantom_files, tiny_model_file,
                                                                tmp_path):
    """A reference label map saved by 3D Slicer: a .seg.nrrd gives the classes its segments' names; a map
    cropped to its labels (Slicer's 'crop to minimum extent', other tools) or padded past the image lies on
    part of the image's grid and gives the same result as the full map (it was refused); a .seg.nrrd
    whose segments overlap (several layers) is one reference per layer (it was refused as 'RGB/vector')."""
    from iris_core.io.results import with_slicer_segment_metadata
    from iris_core.types import ClassSpec

    lab = sitk.ReadImage(str(phantom_files["ref_lab"]))
    segs = tmp_path / "ref.seg.nrrd"  # the header fields Slicer's storage node reads and writes
    sitk.WriteImage(with_slicer_segment_metadata(lab, [ClassSpec("ball", 1), ClassSpec("box", 2)]), str(segs))
    nz = np.argwhere(sitk.GetArrayViewFromImage(lab) > 0)
    lo, hi = nz.min(0)[::-1], nz.max(0)[::-1] + 1  # x, y, z
    cropped = tmp_path / "cropped.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(lab, [int(h - low) for low, h in zip(lo, hi)], [int(v) for v in lo]),
                    str(cropped))
    padded = tmp_path / "padded.nii.gz"
    sitk.WriteImage(sitk.ConstantPad(lab, [3, 0, 2], [0, 4, 1], 0), str(padded))
    outs = {}
    for name, labels in [("full", phantom_files["ref_lab"]), ("segs", segs), ("cropped", cropped),
                         ("padded", padded)]:
        outs[name] = tmp_path / f"{name}_out.nii.gz"
        code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet",
                           "--target", phantom_files["tgt"], "--reference", phantom_files["ref"], labels,
                           "--output", outs[name])
        assert code == 0, (name, err)
    names = {n: [c["name"] for c in json.loads(outs[n].with_name(f"{n}_out.json").read_text())["classes"]]
             for n in outs}
    assert names == {"full": ["label_1", "label_2"], "segs": ["ball", "box"], "cropped": ["label_1", "label_2"],
                     "padded": ["label_1", "label_2"]}
    full = sitk.GetArrayFromImage(sitk.ReadImage(str(outs["full"])))
    for n in ("segs", "cropped", "padded"):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(outs[n]))), full), n
    # a map reaching past its image with labels out there: those are cut, with a warning
    shifted = sitk.Image(lab)
    shifted.SetOrigin(lab.TransformIndexToPhysicalPoint([-int(lo[0]) - 2, 0, 0]))  # 2 labelled columns out
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    caplog.clear()
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                       phantom_files["tgt"], "--reference", phantom_files["ref"], tmp_path / "shifted.nii.gz",
                       "--output", tmp_path / "shifted_out.nii.gz")
    assert code == 0, err
    lost = int(np.count_nonzero(sitk.GetArrayViewFromImage(lab)[:, :, lo[0]:lo[0] + 2]))
    assert lost > 0 and f"{lost} of its {len(nz)} labelled voxels lie outside" in caplog.text
    # half a voxel off is not the same voxels: refused as before
    half = sitk.Image(lab)
    half.SetOrigin(lab.TransformContinuousIndexToPhysicalPoint([0.5, 0, 0]))
    sitk.WriteImage(half, str(tmp_path / "half.nii.gz"))
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                       phantom_files["tgt"], "--reference", phantom_files["ref"], tmp_path / "half.nii.gz",
                       "--output", tmp_path / "half_out.nii.gz")
    assert code != 0 and "not on the grid of" in err and not (tmp_path / "half_out.nii.gz").exists()
    # overlapping segments: Slicer stores one layer per group of segments that do not overlap (a 4-D
    # .seg.nrrd, 'kinds: list domain domain domain', values reused across layers); each layer becomes
    # a reference on the same image, the segments classes 1..N in the header's order
    arr = sitk.GetArrayFromImage(lab)
    shell = (sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.Cast(lab == 1, sitk.sitkUInt8), [2, 2, 1])) > 0)
    layers = np.stack([np.where(arr == 1, 1, np.where(arr == 2, 2, 0)), shell.astype(np.uint8)]).astype(np.uint8)
    write_layered_seg_nrrd(tmp_path / "layers.seg.nrrd", layers, lab,
                           [("ball", 0, 1), ("shell", 1, 1), ("box", 0, 2)])
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                       phantom_files["tgt"], "--reference", phantom_files["ref"], tmp_path / "layers.seg.nrrd",
                       "--output", tmp_path / "layers_out.nii.gz")
    assert code == 0, err
    meta = json.loads((tmp_path / "layers_out.json").read_text())
    assert [(c["name"], c["value"]) for c in meta["classes"]] == [("ball", 1), ("shell", 2), ("box", 3)]
    # the same as giving the two layers as two references by hand
    for k, values in enumerate([{1: 1, 2: 3}, {1: 2}]):
        m = np.zeros(arr.shape, np.uint8)
        for v, new in values.items():
            m[layers[k] == v] = new
        img = sitk.GetImageFromArray(m)
        img.CopyInformation(lab)
        sitk.WriteImage(img, str(tmp_path / f"layer{k}.nii.gz"))
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                       phantom_files["tgt"], "--reference", phantom_files["ref"], tmp_path / "layer0.nii.gz",
                       "--reference", phantom_files["ref"], tmp_path / "layer1.nii.gz",
                       "--output", tmp_path / "by_hand.nii.gz")
    assert code == 0, err
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "layers_out.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "by_hand.nii.gz"))))
    # where one label per voxel is needed (a target, a cohort's truth) layers are refused, saying so
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                       tmp_path / "layers.seg.nrrd", "--reference", phantom_files["ref"], phantom_files["ref_lab"],
                       "--output", tmp_path / "never.nii.gz")
    assert code != 0 and "stored in 2 layers (its segments overlap)" in err


def test_several_targets_one_task(capsys, caplog, base, phantom_files, tmp_path):
    """`segment --target A B`: the task is encoded once and reused (the second target's sidecar says so), each
    target's label map, sidecar and preview land in the --output / --preview folders, and the second result
    is voxel for voxel what segmenting it alone gives. Folders are required and names must not collide;
    both are refused before any work."""
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="iris_core")
    (tmp_path / "b").mkdir()
    second = tmp_path / "b" / "second.nii.gz"
    shutil.copy(phantom_files["ref"], second)  # another target: the reference image itself
    code, out, err = run(capsys, *base, "--target", phantom_files["tgt"], second, "--output", tmp_path / "segs",
                         "--preview", tmp_path / "pics", "--save-library", tmp_path / "task.safetensors")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "segs").iterdir()) == ["second_seg.json", "second_seg.nii.gz",
                                                                     "tgt_seg.json", "tgt_seg.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["second_seg.png", "tgt_seg.png"]
    assert out.count("wrote ") == 2 and (tmp_path / "task.safetensors").is_file()
    assert caplog.text.count("Encoding reference") == 1 and "target 2 of 2" in caplog.text
    side = json.loads((tmp_path / "segs" / "second_seg.json").read_text())
    assert side["details"] == {"embedding": "computed for an earlier target, reused"}
    code, _, err = run(capsys, *base, "--target", second, "--output", tmp_path / "alone.nii.gz")
    assert code == 0, err
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "segs" / "second_seg.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "alone.nii.gz"))))
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt"], second, "--output", tmp_path / "x.nii.gz")
    assert code != 0 and "with 2 targets --output is a folder" in err and not (tmp_path / "x.nii.gz").exists()
    (tmp_path / "c").mkdir()
    shutil.copy(second, tmp_path / "c" / "second.nii.gz")
    code, _, err = run(capsys, *base, "--target", second, tmp_path / "c" / "second.nii.gz", "--output",
                       tmp_path / "clash")
    assert code != 0 and "would both be written as second_seg.nii.gz" in err and not (tmp_path / "clash").exists()


def test_several_targets_one_failing_the_others_done(capsys, base, phantom_files, tmp_path):
    """A target that cannot be segmented (here constant: no intensity range) is reported by name and
    skipped; the targets after it are still segmented, the exit status says a target failed, and the task
    library is saved from the first target that succeeded. A target that cannot be read is refused before
    any work, with no --output folder left behind."""
    import shutil

    blank = tmp_path / "blank.nii.gz"
    img = sitk.ReadImage(str(phantom_files["tgt"]))
    sitk.WriteImage(sitk.Image(img.GetSize(), sitk.sitkFloat32) + 7.0, str(blank))
    second = tmp_path / "second.nii.gz"
    shutil.copy(phantom_files["ref"], second)
    # --target repeated adds targets (it replaced the earlier ones: argparse's default for nargs="+")
    code, out, err = run(capsys, *base, "--target", blank, phantom_files["tgt"], "--target", second, "--output",
                         tmp_path / "segs", "--save-library", tmp_path / "task.safetensors")
    assert code != 0
    assert "target 1 of 3: blank.nii.gz: no intensity range to normalise" in err
    assert "1 of 3 targets not segmented (nothing written for them): " + str(blank) in err
    assert sorted(p.name for p in (tmp_path / "segs").iterdir()) == ["second_seg.json", "second_seg.nii.gz",
                                                                     "tgt_seg.json", "tgt_seg.nii.gz"]
    assert out.count("wrote ") == 2 and (tmp_path / "task.safetensors").is_file()
    side = json.loads((tmp_path / "segs" / "second_seg.json").read_text())
    assert side["details"] == {"embedding": "computed for an earlier target, reused"}

    unreadable = tmp_path / "notes.nii.gz"
    unreadable.write_text("not an image")
    code, out, err = run(capsys, *base, "--target", phantom_files["tgt"], unreadable, "--output", tmp_path / "none")
    assert code != 0 and f"target image 2 {unreadable}: unreadable" in err and "wrote" not in out
    assert not (tmp_path / "none").exists()


def write_layered_seg_nrrd(path, layers: np.ndarray, like: sitk.Image, segments: list[tuple[str, int, int]]):
    """A .seg.nrrd as 3D Slicer writes one whose segments overlap (vtkMRMLSegmentationStorageNode: a 4-D
    NRRD, the layer axis first with kind 'list' and direction 'none', Segment<i>_Layer / _LabelValue).
    ``layers`` is [L, z, y, x]; ``like`` gives the grid (identity direction); segments are (name, layer, value)."""
    import gzip

    sx, sy, sz = like.GetSpacing()
    ox, oy, oz = like.GetOrigin()
    header = ["NRRD0004", "type: unsigned char", "dimension: 4", "space: left-posterior-superior",
              "sizes: {} {} {} {}".format(layers.shape[0], *like.GetSize()),
              f"space directions: none ({sx},0,0) (0,{sy},0) (0,0,{sz})", "kinds: list domain domain domain",
              "encoding: gzip", f"space origin: ({ox},{oy},{oz})"]
    for i, (name, layer, value) in enumerate(segments):
        header += [f"Segment{i}_ID:=Segment_{i + 1}", f"Segment{i}_Name:={name}", f"Segment{i}_Layer:={layer}",
                   f"Segment{i}_LabelValue:={value}"]
    data = np.ascontiguousarray(np.moveaxis(layers, 0, -1)).tobytes()  # the layer axis fastest
    path.write_bytes(("\n".join(header) + "\n\n").encode() + gzip.compress(data))


def _snapshot(paths):
    return {p: p.read_bytes() for p in paths}


@pytest.mark.parametrize("clash", ["output is target", "output is reference labels", "sidecar is target",
                                   "preview is reference image", "library output is target", "hard link",
                                   "probability map is reference labels"])
def test_output_onto_an_input_is_refused_before_any_work(capsys, base, phantom_files, tmp_path, clash):
    """No output (label map, sidecar, preview, saved library) may land on a file the user gave as input,
    by the same path, another spelling of it, or a hard link to it; the inputs are left byte for byte."""
    import os
    import shutil

    tgt = tmp_path / "in" / "tgt.nii.gz"
    tgt.parent.mkdir()
    shutil.copy(phantom_files["tgt"], tgt)
    ref, lab = tmp_path / "in" / "ref.nii.gz", tmp_path / "in" / "lab.nii.gz"
    shutil.copy(phantom_files["ref"], ref)
    shutil.copy(phantom_files["ref_lab"], lab)
    argv = base[:-3] + ["--reference", ref, lab, "--target", tgt]
    output = tmp_path / "seg.nii.gz"
    extra = []
    if clash == "output is target":
        output = tmp_path / "in" / ".." / "in" / "tgt.nii.gz"
    elif clash == "output is reference labels":
        output = lab
    elif clash == "sidecar is target":
        tgt_json = tmp_path / "in" / "tgt.json"
        shutil.copy(phantom_files["tgt"], tgt_json)
        argv[argv.index(tgt)] = tgt_json
        tgt = tgt_json
        output = tmp_path / "in" / "tgt.nii"  # its sidecar would be in/tgt.json
    elif clash == "preview is reference image":
        extra = ["--preview", ref]
    elif clash == "library output is target":
        extra = ["--save-library", tgt]
    elif clash == "probability map is reference labels":  # in/seg_prob_<class>.nii.gz may be a class's map
        moved = tmp_path / "in" / "seg_prob_1.nii.gz"
        lab.rename(moved)
        argv[argv.index(lab)] = lab = moved
        output = tmp_path / "in" / "seg.nii.gz"
        extra = ["--save-probabilities"]
    else:
        link = tmp_path / "link.nii.gz"
        os.link(tgt, link)
        output = link
    before = _snapshot([tgt, ref, lab])
    code, stdout, err = run(capsys, *argv, *extra, "--output", output)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "input" in err and "choose another" in err, err
    assert _snapshot([tgt, ref, lab]) == before
    assert not (tmp_path / "seg.nii.gz").exists() and not (tmp_path / "seg.json").exists()
    assert not (tmp_path / "in" / "seg.nii.gz").exists()


def test_label_map_as_target_warns(capsys, caplog, base, phantom_files, tmp_path):
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt_lab"], "--output", out)
    assert code == 0, err
    assert "like a label map" in caplog.text and "tgt_lab.nii.gz" in caplog.text
    caplog.clear()
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt"], "--output", out.with_name("b.nii.gz"))
    assert code == 0 and "like a label map" not in caplog.text


def test_other_commands_name_bad_input(capsys, tmp_path):
    """bench, train and check-model: a missing model or config is one 'error:' line and a non-zero exit,
    before any work (no run folder made); a model that fails inside bench's measuring process is
    reported by its message, not its exception class, and the exit code says so."""
    code, _, err = run(capsys, "bench", "--model", tmp_path / "nope.safetensors")
    assert code != 0 and re.fullmatch(r"error: model .*nope.safetensors: no such file, and not a known model "
                                      r"\(default, mass-base\) or preset:NAME\n", err), err
    junk = _bytes(tmp_path / "junk.pth")
    code, out, _ = run(capsys, "bench", "--model", junk, "--window", "16", "--repeats", "1")
    assert code == 1 and re.search(r"\| .*junk.pth \| error: .*junk.pth: not a model file", out), out
    assert "CheckpointError" not in out
    (tmp_path / "bad.toml").write_text("steps = [\n")
    for cfg, pattern in [(tmp_path / "none.toml", "none.toml: file not found"),
                         (tmp_path / "bad.toml", "bad.toml: not readable TOML")]:
        code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--config", cfg)
        assert code != 0 and err.startswith("error: training config") and pattern in err, err
    assert not (tmp_path / "run").exists()
    code, _, err = run(capsys, "check-model", tmp_path / "a.safetensors", "--model", tmp_path / "b.safetensors")
    assert code != 0 and "two models given" in err, err
    # a file where a command's output folder goes: one error line, the file untouched
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    for argv in (["evaluate", "--dataset", "templates", "--method", "identity", "--out", afile],
                 ["embed", "--dataset", "atlases", "--out", afile],
                 ["train", "--preset", "iris-tiny", "--steps", "1", "--out", afile]):
        code, _, err = run(capsys, *argv)
        assert code != 0 and re.fullmatch(r"error: --out .*notes.txt: a file, not a folder; .*\n", err), (argv, err)
    assert afile.read_text() == "keep me"
    code, _, err = run(capsys, "evaluate", "--dataset", tmp_path / "cohort.csv", "--out", tmp_path / "ev")
    assert code != 0 and "cohort.csv: CSV file not found" in err and not (tmp_path / "ev").exists(), err


def test_library_errors_name_their_inputs_and_each_front_end_words_them(phantom_files, tiny_model):
    """Issue [13]: api's messages name no command-line flag (Slicer users read them too); the error carries the
    inputs it concerns, which the CLI words as its options and the Slicer logic as its controls."""
    from iris_core.api import segment
    from iris_core.commands.cli import in_cli_words
    from iris_core.errors import InputError
    from IrisSegmentLib.logic import PreparedRun
    from IrisSegmentLib.runner import WorkerError

    with pytest.raises(InputError) as info:
        segment(phantom_files["tgt"], model=tiny_model, device="cpu")
    assert "--" not in str(info.value) and info.value.inputs == ("references", "library")
    assert in_cli_words(info.value).endswith("(--reference IMAGE LABELS or --library FILE)")
    run = PreparedRun(Path("w"), Path("w/job.json"), Path("w/result.nrrd"), [], None, "one-shot")
    worded = run.explain(WorkerError(str(info.value), "", info.value.inputs))
    assert str(worded).endswith("(see the References table or Task library)") and "--" not in str(worded)


def test_cuda_requested_where_none_is_visible(phantom_files, tiny_model_file, tmp_path):
    """--device cuda with CUDA hidden (CUDA_VISIBLE_DEVICES empty, as on a machine without a GPU): one error
    line, on any machine, GPU or not."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "iris_core.commands.cli", "segment", "--model", str(tiny_model_file),
                          "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--target",
                          str(phantom_files["tgt"]), "--device", "cuda", "--output", str(tmp_path / "s.nii.gz")],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    errors = [line for line in out.stderr.splitlines() if not line.startswith("INFO ")]  # the progress line aside
    assert out.returncode == 3 and len(errors) == 1 and "CUDA is not available" in errors[0], out.stderr
    assert not list(tmp_path.iterdir())
