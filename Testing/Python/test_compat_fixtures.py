"""The published networks under the fixtures' weight rule reproduce the authors' outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import COMPAT, weight_rule
from iris_core.hub.checkpoint import load_checkpoint
from iris_core.models import build_preset


def test_mass_base_layout_and_parameter_count():
    ref = json.loads((COMPAT / "iris_mass_state_dict.json").read_text())
    model = build_preset("mass-base")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["parameters"]


@pytest.mark.slow
def test_mass_checkpoint_reproduces_fixture(tmp_path):
    """Save the rule's weights as a MASS training checkpoint (DDP prefix) and load it through the
    public loader: embeddings and logits match the fixture within 1e-3."""
    ref = json.loads((COMPAT / "iris_mass_state_dict.json").read_text())["state_dict"]
    sd = {f"module.{k}": v for k, v in weight_rule(ref).items()}
    path = tmp_path / "mass_base.pth"
    torch.save({"model_state_dict": sd, "epoch": 3}, path)
    loaded = load_checkpoint(path)
    assert loaded.arch == "iris" and loaded.config.channels == (32, 64, 128, 256, 512)
    z = np.load(COMPAT / "iris_mass_fixture.npz")
    with torch.inference_mode():
        emb = loaded.model.encode_task(torch.from_numpy(z["reference"]), torch.from_numpy(z["reference_mask"]))
        for i, e in enumerate(emb):
            assert float((e - torch.from_numpy(z[f"prior_{i}"])).abs().max()) < 1e-3
        logits = loaded.model.segment(torch.from_numpy(z["target"]), emb)
    assert float((logits - torch.from_numpy(z["logits"])).abs().max()) < 1e-3


@pytest.mark.slow
def test_hermes_checkpoint_reproduces_fixture(tmp_path):
    ref = json.loads((COMPAT / "hermes_resunet_state_dict.json").read_text())
    sd = weight_rule(ref["state_dict"])
    path = tmp_path / "hermes_r.pth"
    torch.save({"ema_model_state_dict": sd}, path)
    loaded = load_checkpoint(path)
    assert loaded.arch == "hermes"
    assert sum(p.numel() for p in loaded.model.parameters()) == ref["parameters"]
    z = np.load(COMPAT / "hermes_resunet_fixture.npz")
    with torch.inference_mode():
        out, mod = loaded.model(torch.from_numpy(z["image"]), torch.from_numpy(z["task_index"]),
                                torch.from_numpy(z["modality_index"]))
    assert float((out - torch.from_numpy(z["output_0"])).abs().max()) < 1e-3
    assert float((mod - torch.from_numpy(z["output_1"])).abs().max()) < 1e-3
