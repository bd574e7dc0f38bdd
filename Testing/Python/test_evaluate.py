"""Cohort evaluation on an nnU-Net-layout dataset and a CSV of pairs: tables, plots, resume."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import free_port, write_nnunet
from iris_core.commands.evaluate import choose_references, parse_method, run_evaluation
from iris_core.errors import InputError
from iris_core.io.datasets import load_csv, load_dataset, load_nnunet


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    return write_nnunet(tmp_path_factory.mktemp("d") / "Dataset001_Phantom", "Phantom", "ph", 3, 10, 2.0)


def test_nnunet_layout_and_reference_choice(nnunet):
    ds = load_nnunet(nnunet)
    assert [c.name for c in ds.cases] == ["ph_000", "ph_001", "ph_002"]
    assert ds.label_names == {1: "ball", 2: "box"} and ds.modality == "MR"
    a = choose_references(ds, "ph_001", 1, seed=3)
    assert a == choose_references(ds, "ph_001", 1, seed=3) and "ph_001" not in a
    assert len(choose_references(ds, "ph_001", 5, seed=3)) == 2


def test_evaluate_writes_tables_plots_and_resumes(nnunet, tmp_path, tiny_model_file):
    out = tmp_path / "eval"
    summary = run_evaluation(load_dataset(str(nnunet)), ["iris:one-shot", "iris:ensemble:2", "identity"], out,
                             model=str(tiny_model_file), device="cpu", progress=False)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 * 3 * 2  # cases x methods x classes
    assert {r["class_name"] for r in rows} == {"ball", "box"}
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and float(r["volume_true_ml"]) > 0
    # identity between phantoms that differ in radius: a real, imperfect overlap
    ident = [float(r["dice"]) for r in rows if r["method"] == "identity" and r["class_name"] == "ball"]
    assert all(0.5 < d < 1.0 for d in ident)
    text = summary.read_text()
    assert "| ball | iris:one-shot | 3 |" in text and "| box | identity | 3 |" in text
    assert (out / "boxplot.png").stat().st_size > 5000
    assert len(list((out / "overlays").glob("*.png"))) == 9
    before = (out / "results.csv").read_text()
    run_evaluation(load_dataset(str(nnunet)), ["iris:one-shot", "iris:ensemble:2", "identity"], out,
                   model=str(tiny_model_file), device="cpu", progress=False, overlays=False)
    assert (out / "results.csv").read_text() == before  # resumed: nothing redone


def test_evaluate_cli_default_postprocess_is_the_models_policy(nnunet, tmp_path, tiny_model_file):
    """`iris-segment evaluate` without --postprocess: the model's own policy (was: 'unknown
    post-processing None' after every Iris run)."""
    from iris_core.commands.cli import main

    out = tmp_path / "cli"
    assert main(["evaluate", "--dataset", str(nnunet), "--method", "iris:one-shot", "--model",
                 str(tiny_model_file), "--device", "cpu", "--out", str(out), "--no-overlays"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 * 2 and {r["method"] for r in rows} == {"iris:one-shot"}


def test_a_failing_case_is_reported_and_the_cohort_finished(tmp_path, tiny_model_file, capsys):
    """A case Iris cannot segment (a constant image) no longer ends the evaluation: the other runs are
    done, the failed ones are listed in failures.csv and the summary with their error, the exit status is
    1, and a later run with the same --out retries only them (here, the case mended, they succeed)."""
    import shutil

    import SimpleITK as sitk

    from iris_core.commands.cli import main

    data = write_nnunet(tmp_path / "Dataset002_Bad", "Bad", "ph", 3, 10, 2.0)
    image = data / "imagesTr" / "ph_001_0000.nii.gz"
    shutil.copy(image, tmp_path / "good.nii.gz")
    img = sitk.ReadImage(str(image))
    blank = sitk.Image(img.GetSize(), sitk.sitkFloat32) + 3.0
    blank.CopyInformation(img)
    sitk.WriteImage(blank, str(image))
    out = tmp_path / "e"
    # --method repeated adds up; a method named twice runs once
    args = ["evaluate", "--dataset", str(data), "--method", "iris:one-shot", "--method", "identity", "iris",
            "--model", str(tiny_model_file), "--device", "cpu", "--out", str(out), "--no-overlays"]
    assert main(args) == 1
    err = capsys.readouterr().err
    failures = list(csv.DictReader((out / "failures.csv").open(encoding="utf-8")))
    assert failures and {f["method"] for f in failures} == {"iris:one-shot"}
    assert all("no intensity range" in f["error"] for f in failures)
    assert "ph_001" in {f["case"] for f in failures} | {f["references"] for f in failures}
    assert f"{len(failures)} run{'s' if len(failures) > 1 else ''} failed" in err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["case"] for r in rows if r["method"] == "identity"} == {"ph_000", "ph_001", "ph_002"}
    assert len({r["case"] for r in rows if r["method"] == "iris:one-shot"}) == 3 - len(failures)
    assert "## Failed runs" in (out / "summary.md").read_text()
    shutil.copy(tmp_path / "good.nii.gz", image)  # mended: the next run retries the failed runs only
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 * 2 * 2 and not (out / "failures.csv").exists()
    assert "## Failed runs" not in (out / "summary.md").read_text()


def test_csv_pairs(nnunet, tmp_path):
    """A pairs CSV: each target with its named reference; the affine baseline registers the pair better than
    identity. ANTs' plain 'Affine' samples its metric at random, and even single-threaded with a fixed seed it
    differs run to run (one CI run gave 0.586 against identity's 0.661); its reproducible affine
    (antsRegistrationSyNRepro[a]: regular sampling), single-threaded, gives the same Dice to 0.01 every run."""
    import os
    import subprocess
    import sys

    p = tmp_path / "pairs.csv"
    p.write_text("target_image,target_labels,reference_image,reference_labels\n"
                 f"{nnunet}/imagesTr/ph_000_0000.nii.gz,{nnunet}/labelsTr/ph_000.nii.gz,"
                 f"{nnunet}/imagesTr/ph_002_0000.nii.gz,{nnunet}/labelsTr/ph_002.nii.gz\n")
    ds = load_csv(p)
    assert ds.pairs == [("ph_000_0000.nii.gz", "ph_002_0000.nii.gz")]
    dice = []
    for run in range(2):
        out = tmp_path / f"e{run}"
        proc = subprocess.run([sys.executable, "-m", "iris_core.commands.cli", "evaluate", "--dataset", str(p),
                               "--method", "identity", "ants:antsRegistrationSyNRepro[a]", "--out", str(out), "--device", "cpu",
                               "--no-overlays"], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = list(csv.DictReader((out / "results.csv").open()))
        assert {r["references"] for r in rows} == {"ph_002_0000.nii.gz"}
        dice.append({r["method"]: float(r["dice"]) for r in rows if r["class_name"] == "label_1"})
    affine = [d["ants:antsRegistrationSyNRepro[a]"] for d in dice]
    assert dice[0]["identity"] == dice[1]["identity"] and abs(affine[0] - affine[1]) < 0.01, dice
    assert min(affine) > dice[0]["identity"] + 0.1, dice


def test_csv_as_a_spreadsheet_writes_it_same_named_files_in_case_folders(nnunet, tmp_path, capsys):
    """A pairs CSV saved by a spreadsheet (UTF-8 byte-order mark, spaces after commas) whose images share
    one file name in per-case folders (s1/image.nii.gz, s2/image.nii.gz): every target used to become the
    first row's file, which was then also its own reference (cases were keyed by file name), and the
    byte-order mark hid the 'case' column. Now each file is its own case, named by its folder, and the
    overlays are files, not a path into a folder that does not exist."""
    import shutil

    from iris_core.commands.cli import main

    for i, s in enumerate(("s1", "s2", "s3")):
        (tmp_path / s).mkdir()
        shutil.copy(nnunet / "imagesTr" / f"ph_00{i}_0000.nii.gz", tmp_path / s / "image.nii.gz")
        shutil.copy(nnunet / "labelsTr" / f"ph_00{i}.nii.gz", tmp_path / s / "labels.nii.gz")
    p = tmp_path / "pairs.csv"
    p.write_text("target_image, target_labels, reference_image, reference_labels\n"
                 "s1/image.nii.gz, s1/labels.nii.gz, s3/image.nii.gz, s3/labels.nii.gz\n"
                 "s2/image.nii.gz, s2/labels.nii.gz, s3/image.nii.gz, s3/labels.nii.gz\n", encoding="utf-8-sig")
    ds = load_csv(p)
    assert ds.pairs == [("s1/image.nii.gz", "s3/image.nii.gz"), ("s2/image.nii.gz", "s3/image.nii.gz")]
    assert ds.case("s2/image.nii.gz").image == str(tmp_path / "s2" / "image.nii.gz")
    out = tmp_path / "e"
    assert main(["evaluate", "--dataset", str(p), "--method", "identity", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [(r["case"], r["references"]) for r in rows if r["class"] == "1"] == [
        ("s1/image.nii.gz", "s3/image.nii.gz"), ("s2/image.nii.gz", "s3/image.nii.gz")]
    # two different targets, two different scores (the same file twice would give one)
    assert len({r["dice"] for r in rows if r["class"] == "1"}) == 2
    assert sorted(f.name for f in (out / "overlays").iterdir()) == [
        "s1_image.nii.gz__s3_image.nii.gz__identity.png", "s2_image.nii.gz__s3_image.nii.gz__identity.png"]
    # a BOM-prefixed case CSV keeps its case names; duplicates and empty cells are named
    q = tmp_path / "cases.csv"
    q.write_text("case,image,labels\nA,s1/image.nii.gz,s1/labels.nii.gz\nB,s2/image.nii.gz,s2/labels.nii.gz\n",
                 encoding="utf-8-sig")
    assert [c.name for c in load_csv(q).cases] == ["A", "B"]
    q.write_text("case,image,labels\nA,s1/image.nii.gz,s1/labels.nii.gz\nA,s2/image.nii.gz,s2/labels.nii.gz\n")
    with pytest.raises(InputError, match=r"cases.csv: case 'A' is listed twice \(rows 2 and 3\)"):
        load_csv(q)
    q.write_text("case,image,labels\nA,s1/image.nii.gz,s1/labels.nii.gz\nB,,\n")
    with pytest.raises(InputError, match=r"cases.csv: row 3 has no image and no labels"):
        load_csv(q)
    q.write_text("target_image,target_labels,reference_image,reference_labels\n"
                 "s1/image.nii.gz,s1/labels.nii.gz,s3/image.nii.gz,s3/labels.nii.gz\n"
                 "s3/image.nii.gz,s2/labels.nii.gz,s1/image.nii.gz,s1/labels.nii.gz\n")
    with pytest.raises(InputError, match=r"image s3/image.nii.gz is given two label maps \(rows 2 and 3\)"):
        load_csv(q)


def test_csv_with_missing_files_is_refused_before_any_case_runs(nnunet, tmp_path):
    """A cohort CSV naming files that do not exist fails at once, listing them (relative paths read from
    the CSV's folder), not after the cases before the missing one have run."""
    (tmp_path / "imgs").mkdir()
    p = tmp_path / "cohort.csv"
    p.write_text("case,image,labels\n"
                 f"a,{nnunet}/imagesTr/ph_000_0000.nii.gz,{nnunet}/labelsTr/ph_000.nii.gz\n"
                 f"b,{nnunet}/imagesTr/ph_001_0000.nii.gz,{nnunet}/labelsTr/ph_001.nii.gz\n"
                 "c,imgs/c.nii.gz,labels/c.nii.gz\n")
    with pytest.raises(InputError, match=rf"cohort.csv: 2 listed files not found \(relative paths are read from "
                                         rf"{tmp_path}\): {tmp_path}/imgs/c.nii.gz, {tmp_path}/labels/c.nii.gz$"):
        load_csv(p)


def test_bad_specs():
    with pytest.raises(InputError, match="unknown strategy"):
        parse_method("iris:magic")
    with pytest.raises(InputError, match="one-shot segments from one reference; .* iris:ensemble:3"):
        parse_method("iris:one-shot:3")  # used to run the ensemble while labelled one-shot
    with pytest.raises(InputError, match="use iris:STRATEGY"):
        parse_method("nnunet")
    with pytest.raises(InputError, match="unknown ANTs transform 'syn'"):  # caught before a cohort runs
        parse_method("ants:syn")
    assert parse_method("ants:Affine").option == "Affine" and parse_method("ants").option == "SyN"
    with pytest.raises(InputError, match="not one of 'templates'"):
        load_dataset("/nonexistent/x.txt")


def test_embed_writes_library_and_map(nnunet, tmp_path, tiny_model_file):
    from iris_core.commands.embed_map import embed_dataset
    from iris_core.pipeline.embedding import TaskEmbedding

    res = embed_dataset(load_nnunet(nnunet), tmp_path / "emb", model=str(tiny_model_file), device="cpu")
    assert res["classes"] == 6
    lib = TaskEmbedding.load(res["library"])
    assert lib.names[:2] == ["ph_000/ball", "ph_000/box"]
    meta = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert {m["structure"] for m in meta} == {"ball", "box"} and all("x" in m for m in meta)
    assert (tmp_path / "emb" / "map.png").stat().st_size > 5000


def test_fixed_reference_case(nnunet, tmp_path):
    run_evaluation(load_dataset(str(nnunet)), ["identity"], tmp_path / "f", device="cpu", progress=False,
                   overlays=False, fixed_reference="ph_002")
    rows = list(csv.DictReader((tmp_path / "f" / "results.csv").open()))
    assert {r["references"] for r in rows} == {"ph_002"} and {r["case"] for r in rows} == {"ph_000", "ph_001"}


@pytest.mark.slow
def test_torchrun_sharded_evaluation(nnunet, tmp_path):
    """Two processes (gloo): targets sharded by rank, rank 0 merges into one results.csv."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           "--log-dir", str(tmp_path / "torchrun_logs"),  # else torchelastic_* in the temp folder
                           "-m", "iris_core.commands.cli", "evaluate", "--dataset", str(nnunet), "--method", "identity",
                           "--out", str(tmp_path / "e"), "--no-overlays", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted((tmp_path / "e").glob("results.rank*.csv"))
    assert len(shards) == 2
    rows = list(csv.DictReader((tmp_path / "e" / "results.csv").open()))
    assert sorted({r["case"] for r in rows}) == ["ph_000", "ph_001", "ph_002"] and len(rows) == 6
    assert "| ball | identity | 3 |" in (tmp_path / "e" / "summary.md").read_text()


@pytest.mark.parametrize("strategy", ["one-shot", "retrieval"])
def test_evaluation_and_api_share_the_strategy_dispatch(nnunet, tiny_model_file, tmp_path, strategy):
    """The cohort evaluation predicts exactly what ``segment`` predicts for the same pair and strategy."""
    import numpy as np
    import SimpleITK as sitk

    from iris_core.api import segment
    from iris_core.commands.evaluate import Evaluator

    ds = load_dataset(str(nnunet))
    k = 1 if strategy == "one-shot" else 2
    method = parse_method(f"iris:{strategy}:{k}")
    refs = ["ph_001", "ph_002"][:k]
    ev = Evaluator(ds, [method], tmp_path, model=str(tiny_model_file), device="cpu", progress=False)
    got = ev.predict(method, "ph_000", refs)
    api = segment(nnunet / "imagesTr" / "ph_000_0000.nii.gz",
                  [(nnunet / "imagesTr" / f"{r}_0000.nii.gz", nnunet / "labelsTr" / f"{r}.nii.gz") for r in refs],
                  model=str(tiny_model_file), strategy=strategy, device="cpu", intensity="MR")
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(api.labels))


def test_registration_leaves_no_files_in_the_temp_folder(nnunet, tmp_path, monkeypatch):
    """antspyx wrote every registration's transforms (a SyN warp field: tens of MB) under mktemp() names in
    the system temp folder and never removed them: 439 MB had piled up in /tmp from the demo's baseline.
    The transforms now go to the run's own temporary folder, removed with it."""
    import tempfile

    import SimpleITK as sitk

    from iris_core.commands.evaluate import register_labels

    temp = tmp_path / "system_temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    img = sitk.ReadImage(str(nnunet / "imagesTr" / "ph_000_0000.nii.gz"))
    ref = sitk.ReadImage(str(nnunet / "imagesTr" / "ph_002_0000.nii.gz"))
    labels = sitk.ReadImage(str(nnunet / "labelsTr" / "ph_002.nii.gz"))
    out = register_labels(parse_method("ants:SyN"), img, ref, labels)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet / "labelsTr" / "ph_000.nii.gz")))
    warped = sitk.GetArrayFromImage(out)
    assert out.GetSize() == img.GetSize() and ((warped == 1) & (truth == 1)).sum() > 0  # it registered
    assert sorted(p.name for p in temp.iterdir()) == []


def test_built_in_copy_and_sample_pair_cohorts(tmp_path, tiny_model_file):
    """The dev benchmark's cohorts of issue [11]: 'copy' pairs Colin27's ten gyri with the same image (identity
    gives every label back), 'gyri-moved' with a moved copy (identity then cannot), 'sample-pair' is the
    shipped Slicer pair; each runs through evaluate."""
    import numpy as np
    import SimpleITK as sitk

    copy, moved, pair = (load_dataset(n) for n in ("copy", "gyri-moved", "sample-pair"))
    assert copy.pairs == [("colin27-itself", "colin27-gyri")] and len(copy.label_names) == 10
    ti, tl = copy.case("colin27-itself").read()
    ri, rl = copy.case("colin27-gyri").read()
    assert np.array_equal(sitk.GetArrayViewFromImage(ti), sitk.GetArrayViewFromImage(ri))
    assert np.array_equal(sitk.GetArrayViewFromImage(tl), sitk.GetArrayViewFromImage(rl))
    mi, _ = moved.case(moved.pairs[0][0]).read()
    assert mi.GetSpacing() == (1.0, 1.0, 3.0) and moved.label_names == copy.label_names
    assert pair.pairs == [("ICBM2009a-moved", "Colin27")]
    run_evaluation(moved, ["identity"], tmp_path / "moved", tiny_model_file, device="cpu", overlays=False)
    run_evaluation(copy, ["identity"], tmp_path / "copy", tiny_model_file, device="cpu", overlays=False)
    with (tmp_path / "copy" / "results.csv").open() as f:
        assert {float(r["dice"]) for r in csv.DictReader(f)} == {1.0}
    with (tmp_path / "moved" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and np.mean([float(r["dice"]) for r in rows]) < 0.5  # moved 20-40 mm: thin gyri miss
    with pytest.raises(InputError, match="'copy', 'gyri-moved', 'sample-pair'"):
        load_dataset("copies")


@pytest.mark.slow
def test_evaluate_scores_exactly_what_segment_writes_with_the_bundled_model(tmp_path):
    """Issue [13]: segment and evaluate reach labels through one function (segment_target), so a researcher's
    figures are those of the label maps users get: the shipped Slicer pair, the bundled model, every option at
    its default, voxel for voxel (the MASS pipeline's case is in test_mass_pipeline)."""
    import numpy as np
    import SimpleITK as sitk

    from iris_core.api import segment
    from iris_core.commands.evaluate import Evaluator

    ds = load_dataset("sample-pair")
    ev = Evaluator(ds, [], tmp_path, model="default", device="cpu")
    scored = ev.predict(parse_method("iris:one-shot"), "ICBM2009a-moved", ["Colin27"])
    ref = ds.case("Colin27")
    written = segment(ds.case("ICBM2009a-moved").image, [(ref.image, ref.labels)], model="default", device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(scored), sitk.GetArrayFromImage(written.labels))
    assert sitk.GetArrayFromImage(scored).any()
