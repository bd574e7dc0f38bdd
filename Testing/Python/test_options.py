"""One set of run options: SegmentOptions round trips, its defaults are the CLI's and the parameter
node's, bad values are project errors; config files and presets fail with messages, not tracebacks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT
from iris_core.commands.cli import build_parser, main
from iris_core.commands.segment import segment_options
from iris_core.errors import ConfigError, IrisError
from iris_core.options import SegmentOptions


def test_round_trip_and_overrides():
    opts = SegmentOptions(strategy="tuning", tune_steps=5, window=(64, 64, 32), intensity="CT",
                          hermes_modality="T1")
    data = json.loads(json.dumps(opts.to_dict()))  # through a job file
    assert SegmentOptions.from_dict(data) == opts
    assert SegmentOptions.from_dict({"device": "cpu"}, opts) == SegmentOptions(
        strategy="tuning", tune_steps=5, window=(64, 64, 32), intensity="CT", hermes_modality="T1", device="cpu")


@pytest.mark.parametrize("bad, words", [({"strategy": "two-shot"}, "unknown strategy 'two-shot'"),
                                        ({"tune_steps": "20"}, "tune_steps = '20' is not a int"),
                                        ({"overlap": 1.5}, "overlap 1.5"),
                                        ({"intensity": "T1"}, "unknown intensity policy 'T1'"),
                                        ({"modality": "CT"}, "unknown segment options ['modality']")])
def test_bad_options_are_project_errors(bad, words):
    with pytest.raises(ConfigError) as err:
        SegmentOptions.from_dict(bad)
    assert words in str(err.value)


def test_cli_and_parameter_node_defaults_are_the_options_defaults():
    from IrisSegmentLib.parameters import DEFAULTS, OPTION_PARAMETERS

    args = build_parser().parse_args(["segment", "--target", "t", "--output", "o"])
    assert segment_options(args) == SegmentOptions()
    for key, name in OPTION_PARAMETERS.items():
        default = getattr(SegmentOptions(), name)
        assert DEFAULTS[key] == ("" if default is None else str(default))


def test_issue11_options_are_fields_with_policy_defaults():
    """--save-probabilities, --max-classes-per-forward, --overlap and --postprocess reach the one
    SegmentOptions; overlap and postprocess left out stay None (the model's policy decides)."""
    default = SegmentOptions()
    assert default.overlap is None and default.postprocess is None
    assert default.save_probabilities is False and default.max_classes_per_forward == 0
    parse = build_parser().parse_args
    opts = segment_options(parse(["segment", "--target", "t", "--output", "o", "--save-probabilities",
                                  "--max-classes-per-forward", "2", "--overlap", "0.25", "--postprocess", "none"]))
    assert (opts.save_probabilities, opts.max_classes_per_forward, opts.overlap, opts.postprocess) == (
        True, 2, 0.25, "none")
    assert SegmentOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts  # the worker job
    with pytest.raises(ConfigError, match="max classes per forward -1"):
        SegmentOptions(max_classes_per_forward=-1)


def test_deprecated_modality_maps_to_the_right_option():
    parse = build_parser().parse_args
    assert segment_options(parse(["segment", "--target", "t", "--output", "o", "--modality", "CT"])).intensity == "CT"
    hermes = segment_options(parse(["segment", "--target", "t", "--output", "o", "--structures", "liver",
                                    "--modality", "T1"]))
    assert hermes.hermes_modality == "T1" and hermes.intensity == "auto"


def test_help_does_not_import_torch():
    code = ("import sys; from iris_core.commands.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("toml, words", [('steps = "x"\n', "steps = 'x' is not a int"),
                                         ('preset = "nope"\n', "unknown preset 'nope'"),
                                         ("lr = [1, 2]\n", "lr = (1, 2) is not a float"),
                                         ("foo = 1\n", "unknown keys ['foo']"),
                                         ('optimizer = "sgd"\n', "unknown optimizer 'sgd'"),
                                         ("crop_sizes = [48, 64]\ncrop_probs = [1.0]\n", "one probability per size"),
                                         ("crop_sizes = [40]\ncrop_probs = [1.0]\n", "multiples of 16"),
                                         ("batch = 0\n", "batch must be >= 1")])
def test_train_config_errors_are_messages(capsys, tmp_path, toml, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\n" + toml)
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_preset_in_model_building_is_a_project_error(capsys):
    from iris_core.models import build_model, build_preset

    with pytest.raises(IrisError, match="unknown preset 'nope'"):
        build_preset("nope")
    with pytest.raises(IrisError, match="unknown architecture 'unet'"):
        build_model("unet")


def test_outputs_share_one_permission_mode(capsys, tmp_path, phantom_files, tiny_model_file):
    out = tmp_path / "seg.nii.gz"
    code = main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--quiet", "--target",
                 str(phantom_files["tgt"]), "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]),
                 "--output", str(out), "--save-library", str(tmp_path / "lib.safetensors")])
    assert code == 0, capsys.readouterr().err
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (out, tmp_path / "seg.json", tmp_path / "lib.safetensors")}
    assert len(set(modes.values())) == 1, modes
    mask = os.umask(0)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}


def test_slicer_reads_a_task_library_s_names_with_the_format_s_own_reader_without_torch(tmp_path):
    """One reader of the library format (iris_core.hub.library): TaskEmbedding.load and the Slicer GUI's
    header-only vocabulary both use it; the GUI side never imports torch."""
    import torch

    from iris_core.pipeline.embedding import TaskEmbedding

    path = TaskEmbedding([torch.zeros(2, 3, 4)], ["liver", "left kidney"], [1, 2]).save(tmp_path / "l.safetensors",
                                                                                        "abc")
    assert TaskEmbedding.load(path, "abc").names == ["liver", "left kidney"]
    code = ("import sys; from IrisSegmentLib.vocabulary import known_structures; "
            f"print(known_structures(library={str(path)!r})); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split("\n")[:2] == ["('library', ['liver', 'left kidney'])", "False"], out.stdout + out.stderr
