"""One loader for our files and foreign ones; bad files get clear errors naming the file."""

from __future__ import annotations

import pytest
import torch

from iris_core.errors import CheckpointError
from iris_core.hub.checkpoint import load_checkpoint, preset_model, save_checkpoint
from iris_core.models import build_preset


def test_own_format_round_trip(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model.model, tiny_model.preprocessing,
                           ["brain"], {"name": "x"})
    loaded = load_checkpoint(path)
    assert loaded.arch == "iris" and loaded.config == tiny_model.config
    assert loaded.class_names == ["brain"] and loaded.preprocessing == tiny_model.preprocessing
    for k, v in tiny_model.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])


@pytest.mark.parametrize("wrapper", ["model_state_dict", "ema_state_dict", None])
def test_foreign_iris_layouts_load(tmp_path, tiny_model, wrapper):
    sd = {f"module.{k}": v for k, v in tiny_model.model.state_dict().items()}
    path = tmp_path / "foreign.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "optimizer": {}}, path)
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_model.config


def test_hermes_preset_round_trip(tmp_path):
    m = preset_model("hermes-tiny")
    torch.save({"model_state_dict": m.model.state_dict()}, tmp_path / "h.pth")
    assert load_checkpoint(tmp_path / "h.pth").config == m.config


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_code_carrying_file_is_refused_by_name(tmp_path, tiny_model, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": tiny_model.model.state_dict(), "hook": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: refused.*print.*--trust-checkpoint"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_truncated_and_garbage_files(tmp_path, tiny_model_file):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_model_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.safetensors: unreadable or truncated"):
        load_checkpoint(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="junk.pth: not a model file") as err:
        load_checkpoint(junk)
    assert "trust" not in str(err.value)  # never advise unsafe loading for a file that is no pickle at all
    text = tmp_path / "notes.pth"  # a text file under a checkpoint's name
    text.write_text("# my model\nweights: see the lab wiki\n")
    with pytest.raises(CheckpointError, match=r"notes.pth: not a model file \(neither safetensors nor a PyTorch "
                                              r"checkpoint: Unsupported operand 35\)$"):
        load_checkpoint(text, allow_unsafe=True)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth")


def test_wrong_shapes_and_foreign_keys(tmp_path, tiny_model):
    sd = dict(tiny_model.model.state_dict())
    sd["out.norm.weight"] = torch.ones(7)
    torch.save({"model_state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth: .*shape mismatch.*out.norm.weight"):
        load_checkpoint(tmp_path / "bad.pth")
    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="resnet.pth: not an Iris/MASS or Hermes"):
        load_checkpoint(tmp_path / "resnet.pth")
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "opt.pth")
    with pytest.raises(CheckpointError, match="opt.pth: no model weights found"):
        load_checkpoint(tmp_path / "opt.pth")


def test_code_carrying_file_loads_only_when_trusted(tmp_path, tiny_model, capsys, caplog):
    """The full-unpickling path runs only with allow_unsafe=True, says so, and loads the same weights;
    without it the same file is refused before any of its code runs (above)."""
    path = tmp_path / "trusted.pth"
    torch.save({"model_state_dict": tiny_model.model.state_dict(), "hook": Evil()}, path)
    loaded = load_checkpoint(path, allow_unsafe=True)
    assert "must never run" in capsys.readouterr().out  # the file's code did run: that is what trusting means
    assert "full unpickling" in caplog.text
    for k, v in tiny_model.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_preset_param_counts():
    assert sum(p.numel() for p in build_preset("hermes-r").parameters()) == 60884998
