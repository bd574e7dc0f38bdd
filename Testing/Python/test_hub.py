"""Known models and `models pull`: the real huggingface_hub download code against a local server on
127.0.0.1 that answers the way the hub does (HF_ENDPOINT); nothing here touches the internet."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from iris_core.errors import CheckpointError
from iris_core.hub import download as hub
from iris_core.hub.checkpoint import load_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    """Serves ``files`` ({'/repo/resolve/main/name': path}) with the hub's headers: X-Repo-Commit,
    an ETag and the size on HEAD, the bytes on GET; counts GETs."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.gets = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _head(self) -> Path | None:
                path = server.files.get(self.path.split("?")[0])
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(path.read_bytes()).hexdigest() + '"')
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                return path

            def do_HEAD(self):  # noqa: N802
                self._head()

            def do_GET(self):  # noqa: N802
                path = self._head()
                if path is not None:
                    server.gets += 1
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            self.wfile.write(chunk)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny_pth(tmp_path, tiny_model) -> Path:
    """A small Iris network saved in the MASS authors' training format."""
    path = tmp_path / "tiny_iris.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in tiny_model.model.state_dict().items()},
                "epoch": 0}, path)
    return path


def _entry(tiny_model, **layout) -> hub.KnownModel:
    return hub.KnownModel("tiny-test", "a tiny Iris network", "MIT", "local test server", 1,
                          repo_id="test/TINY", filename="tiny_iris.pth",
                          layout=layout or {"channels": tuple(tiny_model.config.channels)})


def test_pull_downloads_into_the_hub_cache_once_verifies_and_resolves(tmp_path, tiny_pth, tiny_model, monkeypatch):
    server = HubServer({"/test/TINY/resolve/main/tiny_iris.pth": tiny_pth})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    known = {"tiny-test": _entry(tiny_model)}
    cache = tmp_path / "hf"
    try:
        assert hub.cached_path("tiny-test", known, cache_dir=cache) is None
        path = hub.pull("tiny-test", known, progress=True, cache_dir=cache)
        assert cache in path.parents and path.read_bytes() == tiny_pth.read_bytes()
        assert hub.cached_path("tiny-test", known, cache_dir=cache) == path
        assert load_checkpoint(path).preprocessing.name == "mass"
        assert hub.pull("tiny-test", known, progress=False, cache_dir=cache) == path
        assert server.gets == 1  # the second pull found it in the cache
    finally:
        server.close()


def test_pull_refuses_a_file_of_another_layout(tmp_path, tiny_pth, tiny_model, monkeypatch):
    server = HubServer({"/test/TINY/resolve/main/tiny_iris.pth": tiny_pth})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    known = {"tiny-test": _entry(tiny_model, channels=(32, 64, 128, 256, 512))}
    try:
        with pytest.raises(CheckpointError, match="channels .* expected"):
            hub.pull("tiny-test", known, progress=False, cache_dir=tmp_path / "hf")
    finally:
        server.close()


def test_offline_pull_and_missing_model_say_where_to_put_a_hand_download(tmp_path, monkeypatch, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")  # a hub that cannot be reached
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "manual"))
    with pytest.raises(CheckpointError) as err:
        hub.pull("mass-base", progress=False, cache_dir=tmp_path / "hf")
    msg = str(err.value)
    assert "by hand" in msg and str(tmp_path / "manual" / "mass_base.pth") in msg
    assert f"http://127.0.0.1:{closed_port}/StanfordAIMI/MASS/resolve/main/mass_base.pth" in msg
    with pytest.raises(CheckpointError, match="models pull mass-base"):
        hub.resolve("mass-base")
    # a copy put there by hand is found
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "mass_base.pth").write_bytes(b"x")
    assert hub.resolve("mass-base") == tmp_path / "manual" / "mass_base.pth"


@pytest.mark.slow
def test_cli_models_pull_mass_base_then_model_mass_base(tmp_path, mass_rule_checkpoint):
    """The whole user path in fresh processes: list, pull (progress bar, licence), list again, use."""
    server = HubServer({"/StanfordAIMI/MASS/resolve/main/mass_base.pth": mass_rule_checkpoint})
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"),
               IRIS_SEGMENT_MODELS=str(tmp_path / "manual"), PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "iris_core.commands.cli", *args], env=env, capture_output=True,
                              text=True, timeout=600)

    try:
        before = json.loads(run("models", "--json").stdout)
        mass = next(r for r in before if r["name"] == "mass-base")
        assert mass["local"] is None and mass["licence"].startswith("MIT") and mass["get"]
        pulled = run("models", "pull", "mass-base")
        assert pulled.returncode == 0, pulled.stderr
        assert "licence: MIT" in pulled.stdout and "MIT" in pulled.stderr
        after = json.loads(run("models", "--json").stdout)
        local = Path(next(r for r in after if r["name"] == "mass-base")["local"])
        assert (tmp_path / "hf") in local.parents and local.stat().st_size == mass_rule_checkpoint.stat().st_size
        info = run("info", "--model", "mass-base")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["preprocessing"]["name"] == "mass"
    finally:
        server.close()
