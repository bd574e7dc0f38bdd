"""The Slicer module's model choice without Qt: choices, consent, and the download in the real worker
process against a local hub-like server (no internet)."""

from __future__ import annotations

import pytest
from test_hub import HubServer

from IrisSegmentLib.models import (
    consent_text,
    download_in_worker,
    model_choices,
    model_spec,
    needs_download,
)
from IrisSegmentLib.runner import WorkerCancelled, WorkerError


def test_choices_default_mass_base_file_and_consent(tmp_path, monkeypatch):
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    choices = model_choices()
    assert [c.key for c in choices] == ["default", "mass-base", "file"]
    assert choices[1].label == "MASS base (download, about 480 MB)"
    text = consent_text("mass-base")
    assert "484 MB" in text and "MIT" in text and "huggingface.co/StanfordAIMI/MASS" in text
    assert not needs_download("default") and not needs_download("file")
    assert model_spec("mass-base") == "mass-base" and model_spec("file", "/m.pth") == "/m.pth"
    with pytest.raises(ValueError):
        model_spec("file")


def test_download_fails_clearly_offline_and_cancels(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WorkerError, match="by hand"):
        download_in_worker("mass-base", workdir=tmp_path)
    with pytest.raises(WorkerCancelled):
        download_in_worker("mass-base", cancel=lambda: True, workdir=tmp_path)


@pytest.mark.slow
def test_download_in_the_worker_with_progress(tmp_path, monkeypatch, mass_rule_checkpoint):
    server = HubServer({"/StanfordAIMI/MASS/resolve/main/mass_base.pth": mass_rule_checkpoint})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    seen = []
    try:
        path = download_in_worker("mass-base", progress=lambda s, d, t: seen.append((s, d, t)), workdir=tmp_path)
    finally:
        server.close()
    assert path.stat().st_size == mass_rule_checkpoint.stat().st_size and (tmp_path / "hf") in path.parents
    assert seen and seen[-1][1] == seen[-1][2] == path.stat().st_size
    assert all(s == "Downloading mass-base" for s, _, _ in seen)
