"""What a newcomer still tripped on (issue [24]): outputs that replaced the user's files, classes not found by
their segment names, refusals that came after the work (or after seconds of imports), a server that said nothing
and named its own files, no way to score an existing result, a picture refused for the wrong reason, a preview
titled with a strategy that did not run. Real files, real processes, the tiny model on the phantoms."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iris_core.commands.cli import main
from iris_core.io.results import with_slicer_segment_metadata
from iris_core.resources import SAMPLE_DATA
from iris_core.types import ClassSpec

PROC = Path("/proc")  # a folder nothing can be written in, whoever runs the tests (root too)
needs_proc = pytest.mark.skipif(not PROC.is_dir(), reason="/proc: Linux")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def segment_argv(phantom_files, model, output, *more):
    return ["segment", "--model", model, "--device", "cpu", "--threads", "2", "--quiet", "--target",
            phantom_files["tgt"], "--reference", phantom_files["ref"], phantom_files["ref_lab"], "--output", output,
            *more]


def slicer_seg(path: Path, labels: sitk.Image, classes: list[tuple[str, int]]) -> Path:
    """``labels`` as a 3D Slicer .seg.nrrd naming its segments (the header fields Slicer's storage node reads)."""
    sitk.WriteImage(with_slicer_segment_metadata(labels, [ClassSpec(n, v) for n, v in classes]), str(path))
    return path


@pytest.fixture(scope="module")
def named_reference(tmp_path_factory, phantom_files):
    """The phantom reference's labels as a Slicer segmentation: ball (1) and box (2)."""
    folder = tmp_path_factory.mktemp("named")
    return slicer_seg(folder / "ref.seg.nrrd", sitk.ReadImage(str(phantom_files["ref_lab"])), [("ball", 1), ("box", 2)])


# -- item 1: an existing file is replaced only when it is a result of ours, or with --overwrite ----------------------


def test_a_users_segmentation_at_the_output_is_refused_and_kept(capsys, phantom_files, tiny_model_file, tmp_path):
    """The quick-start mistake: the output named as the target's own manual segmentation (``<image>.seg.nrrd``,
    as Slicer names them) is refused before any work, in one line, and neither it nor a sidecar is written; a
    JSON of the user's where the sidecar would go is refused too."""
    manual = tmp_path / "tgt.seg.nrrd"
    shutil.copy(SAMPLE_DATA / "ICBM2009a-moved.seg.nrrd", manual)
    before = manual.read_bytes()
    code, _, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, manual))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --output {manual} exists and is not a result of iris-segment") and \
        "--overwrite" in err
    assert manual.read_bytes() == before and not (tmp_path / "tgt.json").exists()
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    code, _, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, tmp_path / "notes.nii.gz"))
    assert code == 2 and "the sidecar of --output" in err and (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "tgt.seg.nrrd"]


def test_a_result_of_ours_is_replaced_and_overwrite_replaces_the_rest_but_never_an_input(
        capsys, phantom_files, tiny_model_file, tmp_path):
    """A second run onto the same output (its sidecar, preview and library are ours) needs no flag;
    ``--overwrite`` replaces a file of the user's; an input is refused whatever the flags."""
    out, pic, lib = tmp_path / "seg.nii.gz", tmp_path / "seg.png", tmp_path / "task.safetensors"
    argv = segment_argv(phantom_files, tiny_model_file, out, "--preview", pic, "--save-library", lib)
    assert run(capsys, *argv)[0] == 0
    side = json.loads((tmp_path / "seg.json").read_text())
    assert side["written_by"].startswith("iris-segment ") and side["preview"] == "seg.png"
    first = out.stat().st_mtime_ns
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert out.stat().st_mtime_ns > first
    for option, name in (("--preview", "user.png"), ("--save-library", "user.safetensors")):
        (tmp_path / name).write_bytes(b"the user's")
        code, _, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, tmp_path / "b.nii.gz", option,
                                                 tmp_path / name))
        assert code == 2 and err.startswith(f"error: {option} {tmp_path / name} exists and is not a result"), err
        assert (tmp_path / name).read_bytes() == b"the user's" and not (tmp_path / "b.nii.gz").exists()
    (tmp_path / "user.nii.gz").write_bytes(b"the user's")
    code, _, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, tmp_path / "user.nii.gz", "--overwrite"))
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "user.nii.gz")).GetSize() == sitk.ReadImage(str(phantom_files["tgt"])).GetSize()
    code, _, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, phantom_files["ref_lab"], "--overwrite"))
    assert code == 2 and "is the input reference label map 1" in err


def test_probability_maps_of_the_users_are_refused(capsys, phantom_files, tiny_model_file, tmp_path):
    """A file named like a probability map of the output (``seg_prob_*.nii.gz``) that is not one of ours is refused
    before any work with --save-probabilities; the maps of an earlier run of ours are replaced."""
    out = tmp_path / "seg.nii.gz"
    assert run(capsys, *segment_argv(phantom_files, tiny_model_file, out, "--save-probabilities"))[0] == 0
    assert run(capsys, *segment_argv(phantom_files, tiny_model_file, out, "--save-probabilities"))[0] == 0
    (tmp_path / "seg_prob_mine.nii.gz").write_bytes(b"the user's")
    code, _, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, out, "--save-probabilities"))
    assert code == 2 and "a probability map of --output" in err and "seg_prob_mine.nii.gz" in err


# -- item 3: every output place checked before any work, in one line --------------------------------------------------


@needs_proc
def test_an_unwritable_output_is_refused_before_the_segmentation(capsys, phantom_files, tiny_model_file):
    """``--output /proc/seg.nii.gz`` was found only after the whole segmentation, with ITK's raw error and advice
    to free disk space."""
    code, out, err = run(capsys, *segment_argv(phantom_files, tiny_model_file, PROC / "seg.nii.gz"))
    assert code == 2 and err.count("\n") == 1 and not out, err
    assert err.startswith("error: --output /proc/seg.nii.gz: cannot write in /proc") and "ERROR" not in err


@needs_proc
@pytest.mark.parametrize("argv", [
    ["bench", "--model", "preset:iris-tiny", "--window", "32", "--classes", "1", "--repeats", "1", "--json",
     "/proc/bench.json"],
    ["bench", "--model", "preset:iris-tiny", "--window", "32", "--classes", "1", "--repeats", "1", "--json",
     "{tmp}/notes.txt/bench.json"],
    ["evaluate", "--dataset", "copy", "--method", "identity", "--out", "/proc/eval"],
    ["demo", "--model", "preset:iris-tiny", "--registration", "none", "--output", "/proc/demo"],
    ["embed", "--dataset", "{tmp}", "--out", "{tmp}/notes.txt"],
    ["check-model", "preset:iris-tiny", "--output", "/proc/check"],
    ["train", "--preset", "iris-tiny", "--steps", "1", "--out", "/proc/run"],
    ["score", "{tmp}/a.nii.gz", "{tmp}/a.nii.gz", "--csv", "/proc/s.csv"],
], ids=["bench json in /proc", "bench json under a file", "evaluate", "demo", "embed", "check-model", "train",
        "score"])
def test_every_command_checks_where_it_writes_before_any_work(capsys, tmp_path, argv):
    """``bench --json`` into a missing or unwritable place lost the figures after the whole benchmark (a
    FileNotFoundError traceback); each command now refuses its output place first, in one line."""
    (tmp_path / "notes.txt").write_text("mine")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(tmp_path / "a.nii.gz"))
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert ("cannot write in /proc" in err) or ("notes.txt is a file" in err) or ("a file, not a folder" in err), err
    assert "Traceback" not in err and "|" not in out  # no figures, no table: nothing ran


def test_bench_json_of_the_users_is_kept(capsys, tmp_path):
    (tmp_path / "bench.json").write_text('{"mine": 1}')
    code, _, err = run(capsys, "bench", "--model", "preset:iris-tiny", "--window", "32", "--classes", "1",
                       "--json", tmp_path / "bench.json")
    assert code == 2 and "--json" in err and "--overwrite" in err
    assert (tmp_path / "bench.json").read_text() == '{"mine": 1}'


# -- item 3: a refusal comes before the heavy imports ----------------------------------------------------------------


def refusal(*argv: str, cwd: Path) -> tuple[int, str, set[str]]:
    """The CLI in a fresh process with ``-X importtime``: (exit code, the error lines, the modules imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "iris_core.commands.cli", *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)
    lines = proc.stderr.splitlines()
    modules = {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:") and "|" in ln}
    return proc.returncode, "\n".join(ln for ln in lines if not ln.startswith("import time:")), modules


def test_refusals_come_before_torch_is_imported(phantom_files, named_reference, tmp_path):
    """A missing file, a bad option, an output that is not ours, a misspelt segment name, a score of a missing
    file: each refused without importing torch or MONAI (seconds of imports came first: a refusal took 4-8 s).
    The time itself is scripts/refusal_time.py's to measure."""
    (tmp_path / "mine.nii.gz").write_bytes(b"the user's")
    base = ["segment", "--target", phantom_files["tgt"], "--reference", phantom_files["ref"]]
    cases = {
        "missing target": (["segment", "--target", tmp_path / "nope.nii.gz", "--reference", phantom_files["ref"],
                            phantom_files["ref_lab"], "--output", tmp_path / "s.nii.gz"], "file not found"),
        "bad option": ([*base, phantom_files["ref_lab"], "--window", "8,8", "--output", tmp_path / "s.nii.gz"],
                       "--window '8,8'"),
        "existing output": ([*base, phantom_files["ref_lab"], "--output", tmp_path / "mine.nii.gz"],
                            "exists and is not a result of iris-segment"),
        "segment name": ([*base, named_reference, "--classes", "bal", "--output", tmp_path / "s.nii.gz"],
                         "their segments: 'ball', 'box'"),
        "score": (["score", tmp_path / "nope.nii.gz", phantom_files["tgt_lab"]], "file not found"),
    }
    for name, (argv, words) in cases.items():
        code, err, modules = refusal(*argv, cwd=tmp_path)
        assert code == 2 and words in err and err.startswith("error: "), (name, err)
        assert not {m for m in modules if m.split(".")[0] in ("torch", "monai")}, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.nii.gz"]


# -- item 2: classes by segment name, names kept ---------------------------------------------------------------------


def test_classes_by_segment_name_and_names_kept(capsys, phantom_files, named_reference, tiny_model_file, tmp_path):
    """``--classes ball`` on a Slicer .seg.nrrd reference (it was 'not a label value or NAME=VALUE'); ``--classes
    2`` is named after its segment (it came out as label_2); a typo lists the segment names."""
    def classes(*wanted):
        out = tmp_path / f"{'_'.join(wanted)}.nii.gz"
        code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                           phantom_files["tgt"], "--reference", phantom_files["ref"], named_reference, "--output", out,
                           "--classes", ",".join(wanted))
        assert code == 0, err
        return [(c["name"], c["value"]) for c in json.loads(out.with_suffix("").with_suffix(".json").read_text())
                ["classes"]]

    assert classes("ball") == [("ball", 1)]
    assert classes("2") == [("box", 2)]
    assert classes("BOX", "ball") == [("box", 2), ("ball", 1)]  # Slicer compares segment names ignoring case
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--target", phantom_files["tgt"], "--reference",
                       phantom_files["ref"], named_reference, "--output", tmp_path / "x.nii.gz", "--classes", "bal")
    assert code == 2 and "no segment of the references is named 'bal'; their segments: 'ball', 'box'" in err
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--target", phantom_files["tgt"], "--reference",
                       phantom_files["ref"], phantom_files["ref_lab"], "--output", tmp_path / "x.nii.gz",
                       "--classes", "ball")
    assert code == 2 and "the reference label maps name no segments" in err


def test_classes_by_name_from_a_dicom_seg_reference(capsys, phantom_files, tmp_path):
    """A DICOM SEG reference names its classes by its segment labels: ``--classes`` takes them (ignoring case), a
    value keeps its segment's name, and a misspelt one is refused before any work listing the labels."""
    from conftest import write_dicom_series
    from iris_core.api import load_references, parse_classes, resolve_classes
    from iris_core.io.dicom_seg import build_dicom_seg, segment_names
    from iris_core.io.imaging import read_image

    series = write_dicom_series(sitk.ReadImage(str(phantom_files["ref"])), tmp_path / "series")
    image = read_image(series)
    labels = sitk.Resample(sitk.ReadImage(str(phantom_files["ref_lab"])), image, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    build_dicom_seg(labels, [ClassSpec("ball", 1), ClassSpec("box", 2)], series, {"name": "test"}).save_as(
        tmp_path / "ref_seg.dcm")
    assert segment_names(tmp_path / "ref_seg.dcm") == {1: "ball", 2: "box"}
    refs = load_references([(str(series), str(tmp_path / "ref_seg.dcm"))])
    assert resolve_classes(refs, parse_classes("BOX,1")) == [ClassSpec("box", 2), ClassSpec("ball", 1)]
    code, _, err = run(capsys, "segment", "--target", phantom_files["tgt"], "--reference", series,
                       tmp_path / "ref_seg.dcm", "--classes", "bal", "--output", tmp_path / "s.nii.gz")
    assert code == 2 and "their segments: 'ball', 'box'" in err


def test_evaluate_names_classes_after_the_segments_and_matches_the_truth_by_name(capsys, phantom_files, tmp_path):
    """A cohort CSV of Slicer segmentations: the classes are 'ball' and 'box' in results.csv, summary.md and the
    overlays' legends (they were label_1, label_2), and a truth that numbers the segments the other way round is
    matched by name: identity onto a copy of the reference image scores 1.0 (by value it would score 0)."""
    ref_lab = sitk.ReadImage(str(phantom_files["ref_lab"]))
    ref = slicer_seg(tmp_path / "ref.seg.nrrd", ref_lab, [("ball", 1), ("box", 2)])
    arr = sitk.GetArrayFromImage(ref_lab)
    swapped = sitk.GetImageFromArray(np.where(arr == 1, 2, np.where(arr == 2, 1, 0)).astype(np.uint8))
    swapped.CopyInformation(ref_lab)
    truth = slicer_seg(tmp_path / "copy.seg.nrrd", swapped, [("box", 1), ("ball", 2)])
    shutil.copy(phantom_files["ref"], tmp_path / "copy.nii.gz")
    (tmp_path / "pairs.csv").write_text("target_image,target_labels,reference_image,reference_labels\n"
                                        f"copy.nii.gz,{truth.name},{phantom_files['ref']},{ref}\n")
    code, out, err = run(capsys, "evaluate", "--dataset", tmp_path / "pairs.csv", "--method", "identity", "--out",
                         tmp_path / "eval")
    assert code == 0, err
    import csv

    rows = list(csv.DictReader((tmp_path / "eval" / "results.csv").open()))
    assert {(r["class_name"], r["class"], float(r["dice"])) for r in rows} == {("ball", "1", 1.0), ("box", "2", 1.0)}
    assert "| ball | identity |" in out and "| box | identity |" in out
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 1


# -- item 5: score an existing result --------------------------------------------------------------------------------


def test_score_a_result_against_its_truth(capsys, phantom_files, tmp_path):
    """``score RESULT TRUTH``: Dice, HD95 and ASSD per class as evaluate computes them (segment_metrics), classes
    matched by segment name when both files name them (values swapped here), CSV, JSON and Markdown written, and
    the three replaced by a second run (ours) but not a file of the user's."""
    from iris_core.metrics import segment_metrics

    truth_img = sitk.ReadImage(str(phantom_files["tgt_lab"]))
    t = sitk.GetArrayFromImage(truth_img)
    p = np.roll(t, 2, axis=2)  # the result: the truth shifted by two voxels
    result_img = sitk.GetImageFromArray(np.where(p == 1, 2, np.where(p == 2, 1, 0)).astype(np.uint8))
    result_img.CopyInformation(truth_img)
    result = slicer_seg(tmp_path / "result.seg.nrrd", result_img, [("box", 1), ("ball", 2)])
    truth = slicer_seg(tmp_path / "truth.seg.nrrd", truth_img, [("ball", 1), ("box", 2)])
    outs = {"--csv": tmp_path / "s.csv", "--json": tmp_path / "s.json", "--markdown": tmp_path / "s.md"}
    argv = ["score", result, truth, *[a for kv in outs.items() for a in kv]]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    rows = json.loads(outs["--json"].read_text())["rows"]
    spacing = truth_img.GetSpacing()[::-1]
    for row, value in zip(rows, (1, 2)):
        want = segment_metrics(p == value, t == value, spacing)
        assert row["class"] == value and row["class_name"] == ("ball", "box")[value - 1]
        assert row["result_class"] == 3 - value
        assert all(abs(row[k] - want[k]) < 1e-4 for k in ("dice", "hd95_mm", "assd_mm")), (row, want)
    assert 0.5 < rows[0]["dice"] < 1
    assert "| result.seg.nrrd | truth.seg.nrrd | ball |" in out
    assert outs["--csv"].read_text().startswith("result,truth,class,class_name")
    assert outs["--markdown"].read_text().splitlines()[1] == "# Scores"
    assert run(capsys, *argv)[0] == 0  # its own files: replaced
    (tmp_path / "mine.csv").write_text("a,b\n1,2\n")
    code, _, err = run(capsys, "score", result, truth, "--csv", tmp_path / "mine.csv")
    assert code == 2 and "--overwrite" in err and (tmp_path / "mine.csv").read_text() == "a,b\n1,2\n"
    code, _, err = run(capsys, "score", result, truth, "--classes", "bal")
    assert code == 2 and "has no segment named 'bal'; its segments: 'ball', 'box'" in err


def test_score_folders_of_a_cohort(capsys, phantom_files, tmp_path):
    """Two folders, paired by name as segment names a cohort's outputs (case_seg.nii.gz with case.nii.gz), plain
    label maps matched by value; a mean per class; a result without a truth is refused before any work."""
    results, truths = tmp_path / "results", tmp_path / "truths"
    results.mkdir()
    truths.mkdir()
    for case in ("a", "b"):
        shutil.copy(phantom_files["tgt_lab"], results / f"{case}_seg.nii.gz")
        shutil.copy(phantom_files["tgt_lab"], truths / f"{case}.nii.gz")
    (results / "a_seg.json").write_text("{}")  # a sidecar: not a volume to score
    code, out, err = run(capsys, "score", results, truths, "--classes", "1")
    assert code == 0, err
    assert "| a_seg.nii.gz | a.nii.gz | label_1 | 1.0000 |" in out and "| label_1 | 2 | 1.0000 |" in out
    shutil.copy(phantom_files["tgt_lab"], results / "c_seg.nii.gz")
    code, _, err = run(capsys, "score", results, truths)
    assert code == 2 and "results without a truth of the same name" in err and "c_seg.nii.gz" in err


# -- item 7 ----------------------------------------------------------------------------------------------------------


def test_an_rgba_picture_is_refused_as_2d_at_once(capsys, phantom_files, tiny_model_file, tmp_path):
    """An RGBA PNG target was refused for its 4 components, and only once converted to grey as 2-D."""
    rgba = sitk.Compose([sitk.Image([32, 24], sitk.sitkUInt8)] * 4)
    sitk.WriteImage(rgba, str(tmp_path / "photo.png"))
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--target", tmp_path / "photo.png",
                       "--reference", phantom_files["ref"], phantom_files["ref_lab"], "--output", tmp_path / "s.nii.gz")
    assert code == 2 and f"target image {tmp_path / 'photo.png'}: is 2-D (size (32, 24), 4 components" in err, err


def test_a_library_preview_is_titled_library(capsys, phantom_files, tiny_model_file, tmp_path):
    """The preview of a run from a task library said 'one-shot' (the --strategy default); its title (also in the
    PNG's metadata) now says what ran, as the sidecar does."""
    from PIL import Image

    lib = tmp_path / "task.safetensors"
    assert run(capsys, *segment_argv(phantom_files, tiny_model_file, tmp_path / "a.nii.gz", "--save-library",
                                     lib))[0] == 0
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--target",
                       phantom_files["tgt"], "--library", lib, "--output", tmp_path / "b.nii.gz", "--preview",
                       tmp_path / "b.png")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["strategy"] == "library"
    assert Image.open(tmp_path / "b.png").text["Title"] == f"{Path(phantom_files['tgt']).name}: library, tiny"


def test_library_header_and_records_say_what_is_ours(tmp_path):
    """The predicates of the one output check: a task library by its header, a record by its ``written_by`` (or the
    shape of an older sidecar), never a file of the user's."""
    from iris_core.hub.library import is_library_file
    from iris_core.io.outputs import read_record

    (tmp_path / "old.json").write_text(json.dumps({"model": {"name": "x"}, "classes": [], "timings_s": {}}))
    (tmp_path / "user.json").write_text(json.dumps({"model": "mine", "classes": []}))
    (tmp_path / "user.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert read_record(tmp_path / "old.json") is not None and read_record(tmp_path / "user.json") is None
    assert not is_library_file(tmp_path / "user.safetensors") and not is_library_file(tmp_path / "missing")
