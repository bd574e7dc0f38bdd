"""README claims that had no test (issue [16]): each is run as a user would and checked for what the README
says it does."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from iris_core.commands.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def base(phantom_files, tiny_model_file):
    return ["segment", "--model", tiny_model_file, "--device", "cpu", "--quiet",
            "--reference", phantom_files["ref"], phantom_files["ref_lab"]]


def test_strategy_tuning_and_intensity_options_reach_the_run(capsys, base, phantom_files, tmp_path):
    """--strategy tuning --tune-steps --tune-lr --intensity through the CLI: the run used them (the sidecar
    records the options and the tuning's own losses, one per step)."""
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt"], "--strategy", "tuning", "--tune-steps", "3",
                       "--tune-lr", "0.05", "--intensity", "MR", "--output", out)
    assert code == 0, err
    side = json.loads((tmp_path / "seg.json").read_text())
    assert side["strategy"] == "tuning" and side["options"]["tune_steps"] == 3
    assert side["options"]["tune_lr"] == 0.05 and side["options"]["intensity"] == "MR"
    details = side["details"]  # the tuning itself ran with them: its steps, rate and its loss going down
    assert details["tune_steps"] == 3 and details["tune_lr"] == 0.05
    assert details["tune_loss_last"] < details["tune_loss_first"], details


def test_a_failed_write_keeps_the_earlier_result(capsys, base, phantom_files, tmp_path):
    """A run that cannot write leaves the earlier result under the same name as it was, and no partial file."""
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt"], "--output", out)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # a folder where the second run's probability map of class 1 must go: the write fails after the label map
    (tmp_path / "seg_prob_label_1.nii.gz").mkdir()
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt"], "--output", out, "--save-probabilities")
    assert code != 0 and err.startswith("error: cannot write the result"), err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # the earlier label map and sidecar, byte for byte; nothing hidden left behind


@pytest.mark.parametrize("ext,magic", [(".svg", b"<?xml"), (".pdf", b"%PDF"), (".jpg", b"\xff\xd8\xff")])
def test_preview_in_other_formats(capsys, base, phantom_files, tmp_path, ext, magic):
    code, _, err = run(capsys, *base, "--target", phantom_files["tgt"], "--output", tmp_path / "s.nii.gz",
                       "--preview", tmp_path / f"p{ext}")
    assert code == 0, err
    assert (tmp_path / f"p{ext}").read_bytes().startswith(magic)


def test_progress_bar_on_a_terminal_quiet_in_a_pipe(caplog):
    """TerminalProgress draws a bar on a terminal (tqdm on stderr) and only logs the stage changes in a
    pipe; the CLI chooses by whether stderr is a terminal."""
    from iris_core.commands.terminal import TerminalProgress

    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        bar = TerminalProgress(True)
        for done in range(5):
            bar("segmenting", done + 1, 5)
        bar.close()
        with caplog.at_level(logging.INFO, logger="iris_core"):
            quiet = TerminalProgress(False)
            for done in range(5):
                quiet("segmenting", done + 1, 5)
            quiet("writing", 1, 1)
    finally:
        sys.stderr = old
    text = err.getvalue()
    assert "segmenting" in text and "5/5" in text  # the bar, drawn once, on stderr only
    assert [r.getMessage() for r in caplog.records] == ["segmenting", "writing"]


def test_cli_in_a_pipe_draws_no_bar(phantom_files, tiny_model_file, tmp_path):
    out = subprocess.run([sys.executable, "-m", "iris_core.commands.cli", "segment", "--model", str(tiny_model_file),
                          "--device", "cpu", "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]),
                          "--target", str(phantom_files["tgt"]), "--output", str(tmp_path / "s.nii.gz")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "it/s" not in out.stderr and "step/s" not in out.stderr


def test_pet_is_told_apart_by_the_mass_rule():
    """The MASS pipeline's auto intensity rule (its authors' inference.py): CT where air is below -200 and bone
    above 300, PET where values are non-negative and reach above 5 (SUV), else MR; our own rule tells CT
    from the rest (MR and PET share their percentile clipping)."""
    from iris_core.pipeline.preprocess import guess_modality, guess_modality_mass

    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, (32, 32, 32)).clip(-1024, 2000)
    ct[:4] = -1000
    pet = rng.gamma(1.5, 1.0, (32, 32, 32)) * 4  # SUVs
    mr = rng.normal(0, 1, (32, 32, 32))  # a normalised MR
    assert (guess_modality_mass(ct), guess_modality_mass(pet), guess_modality_mass(mr)) == ("CT", "PET", "MR")
    assert (guess_modality(ct), guess_modality(pet), guess_modality(mr)) == ("CT", "MR", "MR")


def test_several_targets_with_retrieval_retrieve_per_target(capsys, phantom_files, tiny_model_file, tmp_path):
    """With --strategy retrieval the task is not reused across targets: each target's sidecar has its own
    retrieval (encoded per target)."""
    import shutil

    targets = []
    for i in range(2):
        shutil.copy(phantom_files["tgt"], tmp_path / f"t{i}.nii.gz")
        targets.append(tmp_path / f"t{i}.nii.gz")
    code, _, err = run(capsys, "segment", "--model", tiny_model_file, "--device", "cpu", "--quiet", "--strategy",
                       "retrieval", "--reference", phantom_files["ref"], phantom_files["ref_lab"], "--reference",
                       phantom_files["tgt"], phantom_files["tgt_lab"], "--target", *targets, "--output",
                       tmp_path / "out")
    assert code == 0, err
    for i in range(2):
        side = json.loads((tmp_path / "out" / f"t{i}_seg.json").read_text())
        assert side["strategy"] == "retrieval" and set(side["details"]["retrieved"]) == {"label_1", "label_2"}
        assert side["timings_s"].get("encode", 0) > 0, side["timings_s"]


def test_check_model_output_writes_its_report(tmp_path, capsys, tiny_model_file):
    """check-model --output writes check.json, check.md and check.png (and the copy test's copy.*)."""
    code = main(["check-model", str(tiny_model_file), "--output", str(tmp_path), "--device", "cpu"])
    capsys.readouterr()
    assert code in (0, 1)
    md = (tmp_path / "check.md").read_text()
    assert md.startswith("#") and "| " in md
    assert json.loads((tmp_path / "check.json").read_text())["names"]
    assert (tmp_path / "check.png").stat().st_size > 10_000 and (tmp_path / "copy.md").is_file()


def test_presets_lists_every_preset(capsys):
    from iris_core.models import PRESETS

    code, out, _ = run(capsys, "presets")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == list(PRESETS)
