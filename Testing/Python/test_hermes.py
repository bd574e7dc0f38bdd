"""Hermes: vocabulary, training a tiny model on a labelled dataset, segmenting by name (CLI and
IrisSegmentLib on a real MRML scene), and torchrun's distributed path on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import ROOT, free_port, write_nnunet
from iris_core.commands.cli import main
from iris_core.errors import InputError
from iris_core.hub.checkpoint import load_checkpoint
from iris_core.hub.hermes_vocab import hermes_r_vocabulary, resolve_modality, resolve_structures


def test_vocabulary_names_and_resolution():
    vocab = hermes_r_vocabulary()
    assert len(vocab) == 71 and vocab[9].qualified == "amos_ct/liver" and vocab[70].name == "lesion"
    assert [t.index for t in resolve_structures("liver,spleen", vocab, "CT")] == [0, 4]  # first CT dataset naming it
    assert [t.index for t in resolve_structures("liver", vocab, "T1 MRI")] == [38]  # CHAOS for MR
    assert [t.index for t in resolve_structures("bcv/liver,27", vocab, "CT")] == [24, 27]
    with pytest.raises(InputError, match="unknown structure 'livr'; valid names: .*liver"):
        resolve_structures("livr", vocab, "CT")
    assert resolve_modality("t2") == ("T2 MRI", 3)


def test_slicer_terminology_of_vocabulary_names():
    """The SNOMED codes live on the Slicer side (IrisSegmentLib.terminology), not in iris_core."""
    from IrisSegmentLib.terminology import terminology

    assert "SCT^64033007^Kidney~SCT^7771000^Left" in terminology("left kidney")
    assert "SCT^4147007^Mass" in terminology("kidney tumor") and terminology("grey matter") == ""
    known = [t.name for t in hermes_r_vocabulary() if terminology(t.name)]
    assert len(known) >= 45  # most Hermes-R structures get a Slicer terminology entry
    import iris_core.hub.hermes_vocab as vocab

    assert not hasattr(vocab, "SCT") and not hasattr(vocab, "terminology")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Phantoms whose structures carry organ names (ball = "liver", box = "left kidney"): names with a Slicer
    terminology entry, so the result segments' terminology can be checked on a real scene."""
    return write_nnunet(tmp_path_factory.mktemp("d") / "Dataset002_Hermes", "Phantoms", "h", 2, 20,
                        names=("liver", "left kidney"))


@pytest.fixture(scope="module")
def hermes_model(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("hermes_run")
    cfg = out / "t.toml"
    cfg.write_text(f'[train]\npreset = "hermes-tiny"\nsources = []\ndatasets = ["{dataset}"]\nbatch = 1\n'
                   "crop_sizes = [32]\ncrop_probs = [1.0]\nwarmup = 1\nsave_every = 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(out / "run"), "--steps", "3",
                 "--export", str(out / "hermes.safetensors")]) == 0
    return out / "hermes.safetensors"


@pytest.mark.slow
def test_hermes_trains_and_segments_by_name(hermes_model, dataset, tmp_path, capsys):
    m = load_checkpoint(hermes_model)
    assert m.arch == "hermes" and m.class_names == ["Phantoms/liver", "Phantoms/left kidney"]
    assert m.config.task_prior_slots == 2
    out = tmp_path / "s.nii.gz"
    code = main(["segment", "--model", str(hermes_model), "--structures", "left kidney,liver", "--hermes-modality", "T1",
                 "--target", str(dataset / "imagesTr" / "h_000_0000.nii.gz"), "--output", str(out), "--device", "cpu",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "s.json").read_text())
    assert [c["name"] for c in side["classes"]] == ["left kidney", "liver"] and side["strategy"] == "hermes"
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(dataset / "labelsTr" / "h_000.nii.gz")).GetSize()
    code = main(["segment", "--model", str(hermes_model), "--structures", "spleen", "--hermes-modality", "T1",
                 "--target", str(dataset / "imagesTr" / "h_000_0000.nii.gz"), "--output", str(tmp_path / "x.nii.gz"),
                 "--device", "cpu", "--quiet"])
    assert code != 0 and "valid names: left kidney, liver" in capsys.readouterr().err
    code = main(["segment", "--model", str(hermes_model), "--target", str(dataset / "imagesTr" / "h_000_0000.nii.gz"),
                 "--reference", str(dataset / "imagesTr" / "h_001_0000.nii.gz"), str(dataset / "labelsTr" / "h_001.nii.gz"),
                 "--hermes-modality", "T1", "--output", str(tmp_path / "y.nii.gz"), "--device", "cpu", "--quiet"])
    assert code != 0 and "give structures, not references (--structures)" in capsys.readouterr().err


@pytest.mark.slow
def test_hermes_known_structures_on_mrml_scene(hermes_model, dataset):
    import slicer  # noqa: F401  slicer-core: a test dependency

    from iris_core.options import SegmentOptions
    from IrisSegmentLib import testing
    from IrisSegmentLib.logic import SegmentationLogic, SegmentRequest
    from IrisSegmentLib.standalone import init_scene

    scene = init_scene()
    target = testing.load_volume(dataset / "imagesTr" / "h_000_0000.nii.gz", "phantom")
    before = testing.node_ids(scene)
    node = SegmentationLogic(scene).segment(SegmentRequest(target, [], structures="liver,left kidney",
                                                          model=str(hermes_model),
                                                          options=SegmentOptions(hermes_modality="T1", device="cpu")))
    seg = node.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == ["liver", "left kidney"]
    # README: the result's segments carry the structure's Slicer terminology entry (SNOMED CT type, laterality)
    from IrisSegmentLib.scene import _get_tag

    liver, kidney = (_get_tag(seg.GetNthSegment(i), "TerminologyEntry") for i in range(2))
    assert "SCT^10200004^Liver" in liver and "SCT^64033007^Kidney~SCT^7771000^Left" in kidney, (liver, kidney)
    assert set(testing.node_ids(scene)) > set(before)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(dataset, tmp_path):
    """The distributed path: 2 CPU processes, gloo backend, DDP, rank 0 writes the run."""
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[train]\npreset = "iris-tiny"\nsources = []\ndatasets = ["{dataset}"]\nbatch = 1\n'
                   "crop_sizes = [32]\ncrop_probs = [1.0]\nwarmup = 1\nsave_every = 2\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           "--log-dir", str(tmp_path / "torchrun_logs"),  # else torchelastic_* in the temp folder
                           "-m", "iris_core.commands.cli", "train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                           "--steps", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert np.isfinite([h["loss"] for h in json.loads(state["history"])]).all()


def test_known_structures_listing(hermes_model, tmp_path, tiny_model, phantom_files):
    from iris_core.api import segment
    from iris_core.pipeline.embedding import model_fingerprint
    from IrisSegmentLib.vocabulary import known_structures

    assert known_structures(str(hermes_model)) == ("hermes", ["liver", "left kidney"])
    res = segment(phantom_files["tgt"], [(phantom_files["ref"], phantom_files["ref_lab"])], model=tiny_model,
                  device="cpu")
    lib = res.embedding.save(tmp_path / "lib.safetensors", model_fingerprint(tiny_model.model))
    assert known_structures(None, str(lib)) == ("library", ["label_1", "label_2"])
    assert known_structures("default") == ("iris", [])


@pytest.mark.slow
def test_evaluate_hermes_method(hermes_model, dataset, tmp_path):
    import csv

    from iris_core.commands.evaluate import run_evaluation
    from iris_core.io.datasets import load_nnunet

    run_evaluation(load_nnunet(dataset), ["hermes", "identity"], tmp_path / "e", device="cpu", progress=False,
                   overlays=False, hermes_model=str(hermes_model), hermes_modality="T1")
    rows = list(csv.DictReader((tmp_path / "e" / "results.csv").open()))
    hermes = [r for r in rows if r["method"] == "hermes"]
    assert {r["class_name"] for r in hermes} == {"liver", "left kidney"} and {r["references"] for r in hermes} == {"-"}
    assert len(hermes) == 4 and all(0.0 <= float(r["dice"]) <= 1.0 for r in hermes)


def test_every_terminology_code_is_in_slicers_general_anatomy_list():
    """Each entry's category, type (code and CodeMeaning as Slicer spells it) and laterality modifier exist in
    3D Slicer's own 'General Anatomy' list (codes extracted to Testing/Data/slicer, source named there): a code
    outside it (108369006 Neoplasm, 15926001 Brainstem once) is an unknown type in Slicer's selector."""
    import json
    from pathlib import Path

    from IrisSegmentLib.terminology import SCT, SIDES, terminology

    slicer_list = json.loads((Path(__file__).resolve().parents[1] / "Data" / "slicer" /
                              "general_anatomy_codes.json").read_text())["categories"]
    names = {t.name for t in hermes_r_vocabulary()} | set(SCT) | {f"{s} {n}" for s in SIDES for n in SCT}
    checked = 0
    for name in sorted(names | {"lesion", "liver tumor"}):
        entry = terminology(name)
        if not entry:
            continue
        parts = entry.split("~")
        assert parts[0] == "Segmentation category and type - 3D Slicer General Anatomy list", name
        _, cat_code, cat_meaning = parts[1].split("^")
        _, type_code, type_meaning = parts[2].split("^")
        category = slicer_list[cat_code]
        assert category["meaning"] == cat_meaning, (name, cat_meaning)
        assert type_code in category["types"], (name, type_code, "not a type of", cat_meaning)
        assert category["types"][type_code]["meaning"] == type_meaning, (name, type_meaning)
        modifier = parts[3].split("^")
        if modifier[1]:
            assert modifier[1] in category["types"][type_code]["modifiers"], (name, modifier)
        checked += 1
    assert checked >= 30, checked
    assert terminology("brainstem") == "" and terminology("right optic nerve") == ""
