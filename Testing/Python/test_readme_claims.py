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


def _segment_command(phantom_files, model, output) -> list[str]:
    return [sys.executable, "-m", "iris_core.commands.cli", "segment", "--model", str(model), "--device", "cpu",
            "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--target",
            str(phantom_files["tgt"]), "--output", str(output)]


def test_cli_in_a_pipe_draws_no_bar(phantom_files, tiny_model_file, tmp_path):
    """In a pipe the CLI says each stage once, as a log line, and what it wrote; no bar."""
    out = subprocess.run(_segment_command(phantom_files, tiny_model_file, tmp_path / "s.nii.gz"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "INFO Encoding reference ref.nii.gz" in lines and "INFO Segmenting tgt.nii.gz" in lines, out.stderr
    assert all(line.startswith(("INFO ", "WARNING ")) for line in lines), out.stderr  # log lines only
    assert "\r" not in out.stderr and "step/s" not in out.stderr
    assert str(tmp_path / "s.nii.gz") in out.stdout and (tmp_path / "s.nii.gz").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is POSIX")
def test_cli_on_a_terminal_draws_a_bar(phantom_files, tiny_model_file, tmp_path):
    """With stderr on a terminal (a pseudo-terminal of 100 columns here) the CLI draws a bar per stage, which
    reaches 100 %, instead of the log lines."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # tqdm sizes the bar by it
    proc = subprocess.Popen(_segment_command(phantom_files, tiny_model_file, tmp_path / "s.nii.gz"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    seen, deadline = b"", time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: every writer of the terminal has closed it
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = seen.decode("utf-8", "replace")
    assert "Segmenting tgt.nii.gz: 100%" in text and "step/s" in text, text[-2000:]
    assert "INFO " not in text
    assert str(tmp_path / "s.nii.gz") in proc.stdout.read().decode() and (tmp_path / "s.nii.gz").is_file()


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
    """check-model --output writes check.json, check.md and check.png (and the copy test's copy.*), and exits 1
    because the untrained tiny model fails both checks (own-truth Dice 0.136 vs 0.015, copy test 0.05 measured):
    the exit code is the reports' verdict, and each Markdown report says what its JSON says."""
    code = main(["check-model", str(tiny_model_file), "--output", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    check = json.loads((tmp_path / "check.json").read_text())
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert check["passed"] is False and copy["passed"] is False and copy["mean_dice"] < 0.3, (check["rule"], copy)
    assert code == 1
    md = (tmp_path / "check.md").read_text()
    assert md.startswith("#") and "**FAILED**" in md and check["names"] and all(n in md for n in check["names"])
    copy_md = (tmp_path / "copy.md").read_text()
    assert "**FAILED**" in copy_md and f"| **mean** | **{copy['mean_dice']:.3f}** |" in copy_md
    assert "**FAILED**" in out and (tmp_path / "check.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "check.png").stat().st_size > 10_000


def test_the_copy_tests_bar_is_the_readmes_and_a_model_below_it_fails():
    """The README's bar (a model that cannot give its reference's labels back, mean Dice < 0.85, fails) is the
    code's, and it is a bar: the bundled weights with a smaller memory sample of the reference (4,096 voxels instead
    of the file's 16,384) and without the aligned-label prior give the labels back worse and fail it: measured 0.785 (per gyrus 0.70-0.84), between
    issue 10's model at 0.612 and the bundled choice at 0.861 (1,024 voxels: 0.627, too close to issue 10's model
    since the readout samples one memory for every class). Above 0.75, so a bar lowered to 0.65 or 0.75 passes that
    model and this fails."""
    import dataclasses
    import re
    from pathlib import Path

    from iris_core.api import resolve_model
    from iris_core.training.checks import COPY_MIN_DICE, copy_test

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"labels back \(mean Dice < ([0-9.]+)\) fails it", readme)
    assert stated is not None and float(stated.group(1)) == COPY_MIN_DICE
    loaded = resolve_model("default")  # a fresh copy: the change stays in this test
    assert loaded.model.config.memory_tokens == 16384
    loaded.model.config = dataclasses.replace(loaded.model.config, memory_tokens=4096)
    # the network alone: the aligned-label prior (issue [20]) gives a copy back by itself (copy test 1.000)
    loaded = dataclasses.replace(loaded, preprocessing=dataclasses.replace(loaded.preprocessing, prior_weight=0.0))
    report = copy_test(loaded, device="cpu")
    assert 0.75 < report.mean_dice < 0.84, report.dice  # a model clearly between the two fixtures
    assert report.passed is False and f"need >= {COPY_MIN_DICE}" in report.rule


def test_the_test_runs_rules_are_the_readmes(request):
    """The README's test run: pytest-timeout is installed from the project's own files (the ``test`` extra) and
    active with the README's per-test limit; the worker count is conftest's ``workers_for`` of the machine's cores
    and TOTAL memory with the README's figures (the free memory no input: one worker on a busy machine made the run
    30 minutes), so the same machine always gets the same count."""
    import re
    import tomllib
    from pathlib import Path

    import psutil

    import conftest

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    extra = [re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in project["project"]["optional-dependencies"]["test"]]
    assert "pytest-timeout" in extra and "filelock" in extra, extra
    limit = re.search(r"Every\s+test has a limit of (\d+) s \(pytest-timeout", readme)
    assert limit is not None and int(limit.group(1)) == project["tool"]["pytest"]["ini_options"]["timeout"]
    assert request.config.pluginmanager.hasplugin("timeout")  # the plugin runs in this very run
    assert float(request.config.getini("timeout")) == int(limit.group(1))
    heavy, other = re.search(r"with (\d+) GiB for the\s+memory-heavy tests .*? and (\d+) GiB for each other worker",
                             readme, re.S).groups()
    assert (int(heavy) * 2**30, int(other) * 2**30) == (conftest.HEAVY_MEMORY, conftest.WORKER_MEMORY)
    gib = 2**30
    # cores and total memory -> workers: this 2-core 24 GB machine, a 7 GB runner, a 16 GB 4-core runner, a big one
    for cores, total, workers in ((2, 23.4 * gib, 2), (2, 7 * gib, 1), (4, 16 * gib, 4), (8, 16 * gib, 4),
                                  (16, 128 * gib, 16), (1, 64 * gib, 1), (4, 2 * gib, 1)):
        assert conftest.workers_for(cores, int(total)) == workers, (cores, total / gib)
    here = psutil.cpu_count(logical=False) or 1, psutil.virtual_memory().total
    assert conftest.pytest_xdist_auto_num_workers(request.config) == conftest.workers_for(*here)


def test_presets_lists_every_preset(capsys):
    from iris_core.models import PRESETS

    code, out, _ = run(capsys, "presets")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == list(PRESETS)
