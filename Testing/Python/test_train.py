"""Training: a tiny model trains for a few steps on real sample data, resumes, and segments."""

from __future__ import annotations

import json

import pytest
import torch

from iris_core.commands.cli import main
from iris_core.hub.checkpoint import load_checkpoint


@pytest.mark.slow
def test_train_resume_and_segment(tmp_path, phantom_files, capsys):
    cfg = tmp_path / "train.toml"
    cfg.write_text('[train]\npreset = "iris-tiny"\nbatch = 1\ncrop_sizes = [32]\ncrop_probs = [1.0]\n'
                   "warmup = 2\nsave_every = 2\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "2"]) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2 and (out / "curve.png").is_file()
    first = json.loads(state["history"])
    assert len(first) == 2 and all(h["loss"] > 0 for h in first)
    assert 0.0 <= first[1]["val_dice"] <= 1.0  # validation Dice at each save (every 2 steps)
    # the reference-sensitivity check and the copy test at each save, with their reports
    h = first[1]
    assert 0.0 <= h["check_own"] <= 1.0 and 0.0 <= h["copy_dice"] <= 1.0 and isinstance(h["copy_passed"], bool)
    assert "check_own" not in first[0] and "val_dice" not in first[0]
    assert json.loads((out / "check.json").read_text()) and (out / "copy.json").is_file()
    # resume: continues from step 2, keeps the history (the checks off from here: shown above, they cost time)
    cfg.write_text(cfg.read_text() + "check_model = false\n")
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "5", "--export",
                 str(tmp_path / "m.safetensors")]) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    hist = json.loads(state["history"])
    assert state["step"] == 5 and [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert hist[:2] == first and "val_dice" in hist[3] and "check_own" not in hist[3]
    model = load_checkpoint(tmp_path / "m.safetensors")
    assert model.info["steps"] == 5 and model.preprocessing.spacing == (4.0, 4.0, 4.0)
    code = main(["segment", "--model", str(tmp_path / "m.safetensors"), "--device", "cpu", "--quiet",
                 "--target", str(phantom_files["tgt"]), "--reference", str(phantom_files["ref"]),
                 str(phantom_files["ref_lab"]), "--output", str(tmp_path / "s.nii.gz")])
    assert code == 0, capsys.readouterr().err


def test_unknown_config_key(tmp_path):
    from iris_core.errors import InputError
    from iris_core.training import load_config

    p = tmp_path / "t.toml"
    p.write_text("[train]\nstepz = 3\n")
    with pytest.raises(InputError, match="unknown keys \\['stepz'\\]"):
        load_config(p)


@pytest.mark.parametrize("source", ["synthetic", "synth:random", "synth:colin27", "colin27", "icbm2009a"])
def test_task_sources_make_valid_episodes(source):
    import numpy as np

    from iris_core.training import TrainConfig
    from iris_core.training.episodes import make_episode
    from iris_core.training.sources import _build_sources

    cfg = TrainConfig(preset="iris-tiny", sources=(source,), max_classes=3)
    src = _build_sources(cfg, (4.0, 4.0, 4.0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        q, qm, r, rm = make_episode(src, cfg, 32, rng)
        assert q.shape == (1, 32, 32, 32) and r.shape == (1, 32, 32, 32)
        assert qm.shape == rm.shape and 1 <= qm.shape[0] <= 3
        assert rm.sum() > 0  # the reference crop is centred on its structures
        assert torch.isfinite(q).all() and not torch.equal(q, r)  # independent views


def test_evaluation_only_data_is_refused():
    """The macaque template is the held-out species check: no config can train on it, by name, as a file or
    inside a dataset, and each refusal is the evaluation-only rule's (not an unknown name's)."""
    from iris_core.errors import InputError
    from iris_core.sampledata import MRICRON_TEMPLATES
    from iris_core.training import TrainConfig
    from iris_core.training.sources import _build_sources

    for source in ("inia19", "synth:inia19", f"unlabelled:{MRICRON_TEMPLATES / 'inia19-t1-brain.nii.gz'}"):
        with pytest.raises(InputError, match=r"is evaluation-only data \('inia19'"):
            _build_sources(TrainConfig(sources=(source,)), (4.0, 4.0, 4.0))
    with pytest.raises(InputError, match="unknown task source 'nonsense'"):  # the other refusal, told apart
        _build_sources(TrainConfig(sources=("nonsense",)), (4.0, 4.0, 4.0))


def test_held_out_parcels_are_never_training_tasks():
    import numpy as np

    from iris_core.training import TrainConfig
    from iris_core.training.sources import _build_sources

    cfg = TrainConfig(sources=("colin27",), holdout=("aal:77", "aal:78"))
    (src,) = _build_sources(cfg, (4.0, 4.0, 4.0))
    regions = src.label_sets["aal"][0]
    thalamus = torch.isin(regions, torch.tensor([77, 78]))
    rng = np.random.default_rng(0)
    for _ in range(200):
        task = src.sample_task(rng)
        if int(task.sum()) and int((task & thalamus).sum()) == int(task.sum()):
            raise AssertionError("a held-out parcel was drawn alone as a training task")
    held = src.held_out()
    assert all(bool((held.sample_task(rng) & ~thalamus).sum() == 0) for _ in range(10))


def test_lamb_with_activation_checkpointing_computes_the_same_gradients(tmp_path):
    """Activation checkpointing recomputes the conv stages in the backward pass: the gradients must be
    those of the plain pass, and a Lamb run with it trains (finite loss, weights move)."""
    import numpy as np

    from iris_core.models import PRESETS, build_model
    from iris_core.training import TrainConfig, train
    from iris_core.training.loop import _set_checkpointing

    torch.manual_seed(0)
    net = build_model("iris", PRESETS["iris-tiny"].config)
    q, r = torch.randn(1, 1, 32, 32, 32), torch.randn(1, 1, 32, 32, 32)
    m = (torch.rand(1, 1, 32, 32, 32) > 0.7).float()
    grads = []
    for enabled in (False, True):
        net.zero_grad()
        _set_checkpointing(net, enabled)
        net(q, r, m).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)

    cfg = TrainConfig(preset="iris-tiny", sources=("synthetic",), steps=3, batch=1, crop_sizes=(32,),
                      crop_probs=(1.0,), warmup=1, save_every=3, optimizer="lamb", checkpointing=True,
                      val_episodes=0, check_model=False)  # the checks at a save: test_train_resume_and_segment
    train(cfg, tmp_path / "lamb")
    state = torch.load(tmp_path / "lamb" / "state.pt", weights_only=True)
    hist = json.loads(state["history"])
    assert state["step"] == 3 and all(np.isfinite(h["loss"]) for h in hist)
    torch.manual_seed(cfg.seed)  # train() builds its model right after seeding: the initial weights
    start = build_model("iris", PRESETS["iris-tiny"].config)
    moved = [not torch.equal(state["model"][k], v) for k, v in start.state_dict().items() if v.is_floating_point()]
    assert sum(moved) > len(moved) // 2


def test_compact_resume_point_continues_a_run(tmp_path):
    """A run's state becomes a small float16 file (weights, step, history; no optimiser) from which a
    new run folder continues at the same step with the same weights."""
    from iris_core.training import TrainConfig, train
    from iris_core.training.loop import write_resume_point

    cfg = TrainConfig(preset="iris-tiny", sources=("synthetic",), steps=2, batch=1, crop_sizes=(32,),
                      crop_probs=(1.0,), warmup=1, save_every=2, val_episodes=0, check_model=False)
    train(cfg, tmp_path / "a")
    point = write_resume_point(tmp_path / "a" / "state.pt", tmp_path / "resume.safetensors")
    first = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert point.stat().st_size < (tmp_path / "a" / "state.pt").stat().st_size / 2
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 3, "save_every": 3, "resume_point": str(point)})
    train(cfg2, tmp_path / "b")
    second = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    hist = json.loads(second["history"])
    assert second["step"] == 3 and [h["step"] for h in hist] == [1, 2, 3]
    assert hist[:2] == json.loads(first["history"])
    # the same weights: the file holds the run's weights (to float16), and the continued run started from them
    from iris_core.hub.checkpoint import read_safetensors

    _, tensors = read_safetensors(point, "resume point")
    for part in ("model", "ema"):
        for k, v in first[part].items():
            assert torch.equal(tensors[f"{part}.{k}"], v.half() if v.is_floating_point() else v), (part, k)

    def distance(a, b):
        return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a if a[k].is_floating_point())

    # one more step moves the EMA by (1 - ema) of the way: far less than from another run's weights
    train(TrainConfig(**{**cfg.__dict__, "seed": 7}), tmp_path / "c")
    other = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    assert distance(second["ema"], first["ema"]) < 0.05 * distance(other["ema"], first["ema"])


def test_training_at_another_spacing_exports_a_model_that_runs_at_it(tmp_path):
    """``spacing`` in a training config overrides the preset's: the task sources are prepared on that
    grid and the exported model carries it, so inference runs there too; nonsense is a ConfigError."""
    from iris_core.errors import ConfigError
    from iris_core.training import TrainConfig, train

    cfg = TrainConfig(preset="iris-tiny", sources=("synthetic",), steps=1, batch=1, crop_sizes=(32,),
                      crop_probs=(1.0,), warmup=1, save_every=1, val_episodes=0, check_model=False,
                      spacing=(3, 3, 3))
    assert cfg.grid()[0] == (3.0, 3.0, 3.0)
    train(cfg, tmp_path / "run", export=tmp_path / "m.safetensors")
    model = load_checkpoint(tmp_path / "m.safetensors")
    assert model.preprocessing.spacing == (3.0, 3.0, 3.0)
    assert model.info["train_config"]["spacing"] == [3, 3, 3]
    assert TrainConfig(preset="iris-tiny").grid()[0] == (4.0, 4.0, 4.0)  # default: the preset's
    for bad in ((2.0, 2.0), (2.0, 0.0, 2.0)):
        with pytest.raises(ConfigError, match="spacing"):
            TrainConfig(preset="iris-tiny", spacing=bad)


def test_the_learning_rate_schedule_restarts_for_a_continued_run():
    """A continued run (lr_restart_at) gets a fresh warm-up and cosine decay over its new steps instead
    of the ~0 learning rate at the end of the first run's schedule; without it, one schedule."""
    from iris_core.errors import ConfigError
    from iris_core.training import TrainConfig
    from iris_core.training.loop import _lr

    first = TrainConfig(preset="iris-tiny", steps=1500, lr=1e-3, warmup=100)
    assert _lr(0, first) == pytest.approx(1e-5) and _lr(99, first) == pytest.approx(1e-3)
    assert _lr(1499, first) < 1e-8 + 1e-3 * 1e-5
    more = TrainConfig(preset="iris-tiny", steps=1650, lr=1e-3, warmup=20, lr_restart_at=1500)
    assert _lr(1499, more) < 1e-6  # the first schedule, ended where it restarts
    assert _lr(1500, more) == pytest.approx(1e-3 / 20) and _lr(1519, more) == pytest.approx(1e-3)
    assert _lr(1585, more) == pytest.approx(0.5e-3, rel=0.05) and _lr(1649, more) < 1e-5
    with pytest.raises(ConfigError, match="lr_restart_at"):
        TrainConfig(preset="iris-tiny", steps=100, lr_restart_at=100)
