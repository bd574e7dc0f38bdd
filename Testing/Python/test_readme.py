"""The README's quick starts run as written (issue [17]): the command-line block in a shell, the Python block in
a fresh interpreter, each from a folder holding only the repository's Resources, so what they write is checked
and nothing lands in the checkout. The README cites no file outside the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _quick_start(kind: str) -> list[str]:
    section = README[README.index("## Quick start\n"): README.index("## The two commands\n")]
    return re.findall(rf"```{kind}\n(.*?)```", section, re.S)


def _workspace(tmp_path: Path) -> Path:
    """A folder where the blocks' relative paths resolve: the repository's Resources and .venv, linked."""
    for name in ("Resources", ".venv", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


def _check_brain(path: Path) -> None:
    """A label map on the target's exact grid holding a brain of plausible size (the sample target's manual
    brain is about 1.4 l)."""
    labels = sitk.ReadImage(str(path))
    target = sitk.ReadImage(str(ROOT / "Resources/SampleData/ICBM2009a-moved.nrrd"))
    assert labels.GetSize()[:3] == target.GetSize() and np.allclose(labels.GetOrigin(), target.GetOrigin())
    arr = sitk.GetArrayViewFromImage(labels)
    ml = float((arr > 0).sum()) * float(np.prod(target.GetSpacing())) / 1000
    assert 900 < ml < 2000, ml


def test_cli_quick_start_runs_as_written(tmp_path):
    setup, segment = _quick_start("bash")
    assert setup.strip() == "bash scripts/setup.sh"  # what CI itself has run before the tests
    work = _workspace(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", "-e", "-c", segment], cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_brain(work / "out/quick/brain.seg.nrrd")
    assert (work / "out/quick/brain.png").stat().st_size > 20_000
    side = json.loads((work / "out/quick/brain.json").read_text())
    assert [c["name"] for c in side["classes"]] == ["brain"]


def test_python_quick_start_runs_as_written(tmp_path):
    (block,) = _quick_start("python")
    work = _workspace(tmp_path)
    out = subprocess.run([sys.executable, "-c", block], cwd=work, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    _check_brain(work / "out/quick/brain_api.nii.gz")
    assert out.stdout.startswith("[('brain', ") and (work / "out/quick/brain_api.json").is_file()


MODEL_CARD = ROOT / "Resources" / "Models" / "iris-default.md"


def test_readme_cites_nothing_outside_the_repository():
    """Users have only the repository: no ``../`` path in the README, and every relative link of the README, the
    docs and the model card resolves inside the repository."""
    assert "../" not in README  # no path above the repository
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), MODEL_CARD]:
        for link in re.findall(r"\]\(([^)#]+)\)", doc.read_text(encoding="utf-8")):
            if not link.startswith(("http://", "https://")):
                assert (doc.parent / link).exists(), f"{doc.name}: broken link {link}"
                assert (doc.parent / link).resolve().is_relative_to(ROOT), f"{doc.name}: {link} leaves the repository"


def test_the_model_card_evidence_is_what_git_keeps_of_its_evaluation():
    """Issue [22]: the card's evidence lives under docs/model-card/ and every file the card or the README links
    there is kept by git when scripts/model_card_eval.sh writes it anew (the root .gitignore keeps the summaries
    of that folder only; what Resources/Models may hold: test_layout.py)."""
    linked = [(doc.parent / link).resolve() for doc in (MODEL_CARD, ROOT / "README.md")
              for link in re.findall(r"\]\(([^)#]+)\)", doc.read_text(encoding="utf-8"))]
    evidence = [f for f in linked if f.is_file() and f.is_relative_to(ROOT / "docs" / "model-card")]
    assert len(evidence) >= 10 and any(f.suffix == ".png" for f in evidence), evidence
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *map(str, evidence)], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not ignored, f"the model card links files git would not keep: {ignored}"
    out = subprocess.run(["git", "check-ignore", "--no-index", "docs/model-card/eval/copy/results.csv",
                          "docs/model-card/eval/copy/overlays/x.png"], cwd=ROOT, capture_output=True, text=True)
    assert len(out.stdout.split()) == 2, "per-case evaluation outputs would be committed"
