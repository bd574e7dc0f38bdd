"""Collapse detectors: a model must segment what its REFERENCE shows, not a fixed structure.

The bundled model of the first round returned the brain for any reference and still passed every
brain-mask test. These tests score predictions against the truth of the class the reference showed
AND against the truth of the other classes of the same volume: a model that ignores its reference
predicts the same for every class, so its Dice with the other classes' truth equals its own Dice.
The label-to-image volumes give every structure a random intensity per view, so neither intensity
nor a fixed anatomy can stand in for the reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iris_core.hub.checkpoint import load_checkpoint

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "iris-default.safetensors"


def follow_scores(model: torch.nn.Module, size: int, source: str = "synth:random", episodes: int = 12,
                  seed: int = 4242, same_view: bool = False) -> dict[str, float]:
    """Dice with the shown structure (``val_dice``) and with the other structures (``val_swap``) on
    fresh episodes of 2-3 classes from ``source`` (crops of edge ``size``), every class present."""
    from iris_core.training import TrainConfig
    from iris_core.training.loop import validation_scores, validation_set
    from iris_core.training.sources import _build_sources

    cfg = TrainConfig(sources=(source,), val_episodes=episodes, seed=seed, same_view=same_view)
    sources = _build_sources(cfg, (1.0, 1.0, 1.0))
    torch.manual_seed(seed)
    return validation_scores(model.float().eval(), validation_set(sources, None, cfg, size), "cpu", "iris")


@pytest.mark.slow
def test_a_small_model_trained_briefly_learns_to_follow_its_reference(tmp_path):
    """The trainer, the task sources and the network together: a tiny model trained for 40 steps on
    scenes of several distinct shapes, where the reference shows one of them and the query is the same
    crop, segments the shape its reference shows and not the others, AND better than the same network
    untrained: the memory readout follows a reference before any training (untrained, seeds 0-1: Dice
    0.88-0.89 vs 0.01 with the others), so only the comparison shows that training added skill (a trainer
    whose steps change nothing fails it). Measured on the 2-core machine: 0.955 vs 0.008 after 40 steps
    (0.965 after 80, 0.963 after 120; untrained 0.894)."""
    from iris_core.models import PRESETS, build_model
    from iris_core.training import TrainConfig, train

    cfg = TrainConfig(preset="iris-tiny", sources=("synthetic",), steps=40, batch=2, crop_sizes=(32,),
                      crop_probs=(1.0,), max_classes=3, lr=3e-3, warmup=10, save_every=40, val_episodes=0,
                      ema=0.9, same_view=True, check_model=False)
    train(cfg, tmp_path / "run")
    model = load_checkpoint(tmp_path / "run" / "ema.safetensors").model
    scores = follow_scores(model, 32, source="synthetic", same_view=True)
    assert scores["val_dice"] > 0.5, scores
    assert scores["val_dice"] > scores["val_swap"] + 0.3, scores
    untrained = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        untrained.append(follow_scores(build_model("iris", PRESETS["iris-tiny"].config), 32, source="synthetic",
                                       same_view=True)["val_dice"])
    assert scores["val_dice"] > max(untrained) + 0.03, (scores, untrained)


def test_the_reference_mask_reaches_the_prediction():
    """Untrained network, one target, two different masks on one reference: the kernels, the
    embeddings and the logits must differ (they are identical if the mask path is cut)."""
    from iris_core.models import PRESETS, build_model

    torch.manual_seed(0)
    for name in ("iris-tiny", "iris-small"):
        net = build_model("iris", PRESETS[name].config).eval()
        size = PRESETS[name].window[0]
        ref, tgt = torch.randn(1, 1, size, size, size), torch.randn(1, 1, size, size, size)
        masks = torch.zeros(1, 2, size, size, size)
        masks[0, 0, : size // 2] = 1
        masks[0, 1, size // 2 :, : size // 3] = 1
        with torch.no_grad():
            emb = net.encode_task(ref, masks)
            logits = net.segment(tgt, emb)
        for stage in emb:
            assert not torch.allclose(stage[0, 0], stage[0, 1], atol=1e-4), name
        assert (logits[0, 0] - logits[0, 1]).abs().mean() > 1e-3 * logits.abs().mean(), name


@pytest.mark.slow
def test_the_bundled_default_model_follows_its_reference():
    """The model every user gets by default, on fresh label-to-image episodes (2-3 structures each,
    random intensities per view: only the reference says which structure is meant). It must segment
    the structure its reference shows far better than the others, AND beat the same network
    untrained: the memory readout follows a reference from the first step, so only the second
    assertion shows that training added skill. The first-round model (brain for every task) scored
    Dice 0.151 with the shown structure and 0.164 with the others: it fails the first assertion."""
    from iris_core.models import build_model

    loaded = load_checkpoint(DEFAULT_MODEL)
    scores = follow_scores(loaded.model, 64)
    assert scores["val_dice"] > scores["val_swap"] + 0.2, scores
    torch.manual_seed(0)
    untrained = follow_scores(build_model(loaded.arch, loaded.config), 64)
    assert scores["val_dice"] > untrained["val_dice"] + 0.05, (scores, untrained)
