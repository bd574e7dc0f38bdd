"""scripts/export_model.py (issue [11]): a run's EMA model becomes a model file that carries its inference
choices (memory sample, label threshold), and every segmentation records the choices it ran with."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from iris_core.api import resolve_model
from iris_core.commands.cli import main

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "Testing" / "Data" / "models" / "fraction-readout-iris-small-step1500.safetensors"


def export(*argv):
    """The script's own main, as `python scripts/export_model.py ARGV` runs it."""
    runpy.run_path(str(ROOT / "scripts" / "export_model.py"))["main"]([str(a) for a in argv])


def test_exported_model_carries_its_choices_into_every_segmentation(tmp_path, phantom_files, capsys):
    out = tmp_path / "exported.safetensors"
    export(FIXTURE, out, "--memory", 8192, "--threshold", 0.4, "--chosen-by", "a test")
    src, got = resolve_model(str(FIXTURE)), resolve_model(str(out))
    assert src.model.config.memory_tokens != 8192 and src.preprocessing.threshold != 0.4
    assert got.model.config.memory_tokens == 8192 and got.preprocessing.threshold == pytest.approx(0.4)
    assert got.info["inference_choices"]["chosen_by"] == "a test"
    assert got.info["inference_choices"]["trained_with_memory_tokens"] == src.model.config.memory_tokens
    # the weights are the EMA's (float16 in the file)
    a, b = src.model.state_dict(), got.model.state_dict()
    assert a.keys() == b.keys() and all((a[k].float() - b[k].float()).abs().max() < 1e-2 for k in a)
    for model, threshold, memory in ((out, 0.4, 8192), (FIXTURE, src.preprocessing.threshold,
                                                          src.model.config.memory_tokens)):
        seg = tmp_path / f"seg-{memory}.nii.gz"
        code = main(["segment", "--model", str(model), "--device", "cpu", "--quiet", "--target",
                     str(phantom_files["tgt"]), "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]),
                     "--output", str(seg)])
        assert code == 0, capsys.readouterr().err
        side = json.loads(seg.with_name(seg.name.replace(".nii.gz", ".json")).read_text())
        assert side["threshold"] == pytest.approx(threshold) and side["memory_samples"] == memory


def test_export_refuses_a_threshold_outside_0_1(tmp_path):
    with pytest.raises(SystemExit, match="--threshold must be in"):
        export(FIXTURE, tmp_path / "x.safetensors", "--memory", 4096, "--threshold", 1.5)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_variant_keeps_the_choices_and_changes_only_the_policy_named(tmp_path):
    """The model card's ablation variants (issue [20]): --keep-choices keeps memory sample and threshold, --align
    and --prior-weight change those policy fields alone; a prior without an alignment is refused as the file is
    made, not when it runs."""
    base = tmp_path / "base.safetensors"
    export(FIXTURE, base, "--memory", 8192, "--threshold", 0.4, "--align", "affine", "--prior-weight", 7)
    src = resolve_model(str(base))
    assert src.preprocessing.align == "affine" and src.preprocessing.prior_weight == 7
    for options, align, weight in ((["--align", "identity", "--prior-weight", 0], "identity", 0.0),
                                   (["--prior-weight", 0], "affine", 0.0)):
        out = tmp_path / f"{align}-{weight}.safetensors"
        export(base, out, "--keep-choices", *options)
        got = resolve_model(str(out))
        assert got.model.config.memory_tokens == 8192 and got.preprocessing.threshold == pytest.approx(0.4)
        assert (got.preprocessing.align, got.preprocessing.prior_weight) == (align, weight)
        rest = {k: v for k, v in got.preprocessing.to_dict().items() if k not in ("align", "prior_weight")}
        assert rest == {k: v for k, v in src.preprocessing.to_dict().items() if k not in ("align", "prior_weight")}
    from iris_core.errors import ConfigError

    with pytest.raises(ConfigError, match="prior_weight"):
        export(base, tmp_path / "bad.safetensors", "--keep-choices", "--align", "none")
    assert not (tmp_path / "bad.safetensors").exists()
