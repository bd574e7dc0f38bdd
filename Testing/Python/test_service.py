"""``iris-segment serve`` and its clients (issue [14]): a real server process on 127.0.0.1; the CLI through it
writes what a local run writes; tokens, jobs of other tokens, upload limits, malformed files and cancel."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import free_port
from iris_core.commands.cli import main
from iris_core.service.client import Client, ServerError


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_file):
    """A server process with two tokens, serving the tiny model and the bundled one, at most 2 jobs and 2 MB."""
    folder = tmp_path_factory.mktemp("serve")
    tokens = [secrets.token_hex(16), secrets.token_hex(16)]
    (folder / "tokens.txt").write_text("# tokens\n" + "\n".join(tokens) + "\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "iris_core.commands.cli", "serve", "--port", str(port),
                             "--token-file", str(folder / "tokens.txt"), "--models", str(tiny_model_file), "default",
                             "--max-jobs", "2", "--max-upload-mb", "2", "--device", "cpu", "--threads", "2"],
                            stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            Client(url, tokens[0], timeout=5).info()
            break
        except ServerError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the server did not start: " + (folder / "server.log").read_text()) from None
            time.sleep(0.5)
    (folder / "token0").write_text(tokens[0])
    yield {"url": url, "tokens": tokens, "token_file": folder / "token0", "proc": proc, "model": str(tiny_model_file)}
    proc.terminate()
    proc.wait(timeout=30)


def test_cli_through_the_server_writes_what_a_local_run_writes(server, phantom_files, tmp_path, capsys):
    """The same label map voxel for voxel and the same classes, as a thin client would get them."""
    common = ["segment", "--model", server["model"], "--device", "cpu", "--threads", "2", "--quiet", "--reference",
              str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--target", str(phantom_files["tgt"]),
              "--classes", "ball=1,box=2"]
    assert main([*common, "--output", str(tmp_path / "local.nii.gz")]) == 0
    code = main([*common, "--output", str(tmp_path / "remote.nii.gz"), "--server", server["url"], "--token-file",
                 str(server["token_file"]), "--preview", str(tmp_path / "remote.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"on iris-segment {server['url']}" in out.out
    local = sitk.ReadImage(str(tmp_path / "local.nii.gz"))
    remote = sitk.ReadImage(str(tmp_path / "remote.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(local), sitk.GetArrayFromImage(remote))
    assert local.GetOrigin() == remote.GetOrigin() and local.GetSpacing() == remote.GetSpacing()
    side = json.loads((tmp_path / "remote.json").read_text())
    assert [c["name"] for c in side["classes"]] == ["ball", "box"]
    assert (tmp_path / "remote.png").stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def _raw(url: str, method: str = "GET", token: str | None = None, body: bytes | None = None,
         content_type: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_no_or_a_wrong_token_is_401_and_nothing_runs(server, phantom_files):
    assert _raw(server["url"] + "/v1/info")[0] == 401
    assert _raw(server["url"] + "/v1/info", token="x" * 32)[0] == 401
    with pytest.raises(ServerError, match="no valid token") as err:
        Client(server["url"], "not-the-token-0123456789").submit(phantom_files["tgt"],
                                                                 [(phantom_files["ref"], phantom_files["ref_lab"])])
    assert err.value.status == 401


def test_a_job_is_visible_to_its_own_token_only(server, phantom_files):
    mine, theirs = (Client(server["url"], t) for t in server["tokens"])
    job = mine.submit(phantom_files["tgt"], [(phantom_files["ref"], phantom_files["ref_lab"])], model=server["model"])
    with pytest.raises(ServerError, match=f"no job {job}") as err:
        theirs.status(job)
    assert err.value.status == 404
    with pytest.raises(ServerError):
        theirs.cancel(job)
    assert mine.wait(job)["status"] == "done"


def test_oversized_malformed_and_unknown_uploads_are_refused_naming_the_part(server, phantom_files, tmp_path):
    client = Client(server["url"], server["tokens"][0])
    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(3 * 2**20))
    with pytest.raises(ServerError, match="over the server's limit of 2 MB") as err:
        client.submit(big, [(phantom_files["ref"], phantom_files["ref_lab"])], model=server["model"])
    assert err.value.status == 413
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ServerError, match=r"target: unreadable") as err:
        client.submit(bad, [(phantom_files["ref"], phantom_files["ref_lab"])], model=server["model"])
    assert err.value.status == 400
    text = tmp_path / "passwd.txt"  # not a volume: refused by its type; its name never becomes a path there
    text.write_text("root:x:0:0")
    with pytest.raises(ServerError, match="reference_image_0: 'passwd.txt' is not a volume file") as err:
        client.submit(phantom_files["tgt"], [(text, phantom_files["ref_lab"])], model=server["model"])
    assert err.value.status == 400
    with pytest.raises(ServerError, match="is not served here"):
        client.submit(phantom_files["tgt"], [(phantom_files["ref"], phantom_files["ref_lab"])], model="mass-base")


def test_cancel_mid_run_and_handshake(server, tmp_path):
    """A job on a large target is cancelled while it runs: it ends 'cancelled' and its result is never
    fetchable; the handshake names the protocol."""
    client = Client(server["url"], server["tokens"][0])
    info = client.info()
    assert info["protocol"] == 1 and server["model"] in info["models"]
    from iris_core.resources import SAMPLE_DATA

    job = client.submit(SAMPLE_DATA / "ICBM2009a-moved.nrrd", [(SAMPLE_DATA / "Colin27.nrrd",
                                                                SAMPLE_DATA / "Colin27.seg.nrrd")], model="default",
                        options={"tune_steps": 200, "strategy": "tuning"})
    deadline = time.monotonic() + 120
    while client.status(job)["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.1)
    client.cancel(job)
    st = client.wait(job)
    assert st["status"] == "cancelled", st
    with pytest.raises(ServerError, match="is cancelled, no result") as err:
        client.fetch(job, tmp_path / "x.nii.gz")
    assert err.value.status == 409 and not (tmp_path / "x.nii.gz").exists()
