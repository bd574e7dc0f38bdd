"""The Slicer module's model choice without Qt: choices, consent, and the download in the real worker
process against a local hub-like server (no internet)."""

from __future__ import annotations

import pytest
from test_hub import HubServer

from IrisSegmentLib.models import (
    consent_text,
    download_in_worker,
    downloaded_path,
    model_choices,
    model_spec,
    needs_download,
    start_download,
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


def test_download_fails_clearly_offline_and_cancels(tmp_path, monkeypatch, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")  # a hub that cannot be reached
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WorkerError, match="by hand"):
        download_in_worker("mass-base", workdir=tmp_path)
    with pytest.raises(WorkerCancelled):
        download_in_worker("mass-base", cancel=lambda: True, workdir=tmp_path)


def test_start_download_returns_at_once_and_polls_like_a_segment_run(tmp_path, monkeypatch, closed_port):
    """The widget's path: start, poll from a timer (here a loop), Cancel or an error at the end."""

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")  # a hub that cannot be reached
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError):
        start_download("default", workdir=tmp_path)
    proc = start_download("mass-base", workdir=tmp_path)
    # it returned while its worker runs (the GUI thread never waits for it) ...
    assert proc.proc.poll() is None, "start_download returned only once its worker had ended"
    # ... and the outcome is known only through poll(): once the worker has ended, not before a poll
    proc.proc.wait(timeout=120)
    assert not proc.done and proc.error is None
    assert proc.wait(timeout=120), "the failing download's outcome was not known within 120 s of its end"
    assert proc.error is not None and "by hand" in str(proc.error)
    proc = start_download("mass-base", workdir=tmp_path)
    proc.cancel()
    assert proc.wait(timeout=60), "a cancelled download did not end within 60 s"
    assert proc.cancelled and proc.result is None and proc.error is None


def test_model_choice_on_the_parameter_node(tmp_path, monkeypatch):
    """ModelChoice on a real vtkMRMLScriptedModuleNode -> the worker job's model field."""
    import slicer  # noqa: F401  slicer-core: a test dependency

    from IrisSegmentLib.parameters import model_choice, model_from_parameters, set_defaults
    from IrisSegmentLib.standalone import init_scene

    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    scene = init_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    set_defaults(node)
    assert model_choice(node) == "default" and model_from_parameters(node) == "default"
    node.SetParameter("ModelPath", "/m.pth")  # a scene saved before ModelChoice existed: the file
    assert model_choice(node) == "file" and model_from_parameters(node) == "/m.pth"
    node.SetParameter("ModelChoice", "mass-base")
    set_defaults(node)  # keeps the user's choice
    assert model_from_parameters(node) == "mass-base" and needs_download(model_choice(node))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "mass_base.pth").write_bytes(b"x")  # a copy put there by hand
    assert not needs_download(model_choice(node))
    node.SetParameter("ModelChoice", "file")
    node.SetParameter("ModelPath", "")
    with pytest.raises(ValueError, match="model file"):
        model_from_parameters(node)


@pytest.mark.slow
def test_download_in_the_worker_with_progress(tmp_path, monkeypatch, mass_rule_checkpoint):
    server = HubServer({"/StanfordAIMI/MASS/resolve/main/mass_base.pth": mass_rule_checkpoint})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    seen = []
    try:
        path = download_in_worker("mass-base", progress=lambda s, d, t: seen.append((s, d, t)), workdir=tmp_path)
        proc = start_download("mass-base", workdir=tmp_path)  # the widget's path: cached now, verified again
        assert proc.wait(timeout=300), "the cached download did not end within 300 s"
    finally:
        server.close()
    assert proc.error is None and downloaded_path(proc) == path
    assert path.stat().st_size == mass_rule_checkpoint.stat().st_size and (tmp_path / "hf") in path.parents
    assert seen and seen[-1][1] == seen[-1][2] == path.stat().st_size
    assert all(s == "Downloading mass-base" for s, _, _ in seen)
