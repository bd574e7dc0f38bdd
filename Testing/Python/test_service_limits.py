"""What one token may take of ``iris-segment serve`` and how long the server keeps a job (issue [19]), on real server
processes with short limits: a job stopped at its compute limit, a token over its compute quota refused in its own
words while another token runs, a result nobody fetched expiring, and a server that died leaving a folder the next
start removes (and SIGINT, like SIGTERM, leaving nothing)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time

import pytest
from serving import call, post_job, start_server, stop_server, wait_job


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_model_file):
    """A server where a job may compute 6 s, a token 4.8 s an hour, and a result is kept 3 s."""
    folder = tmp_path_factory.mktemp("limited")
    tokens = [secrets.token_hex(16) for _ in range(2)]
    proc, url = start_server(folder, tokens, "--models", str(tiny_model_file), "--device", "cpu", "--threads", "1",
                             "--max-job-minutes", "0.1", "--token-minutes-per-hour", "0.08", "--keep-minutes",
                             "0.05", "--workdir", str(folder / "work"))
    yield {"url": url, "tokens": tokens, "proc": proc, "model": str(tiny_model_file), "work": folder / "work"}
    stop_server(proc)


def _parts(model: str, files: dict, request: dict | None = None) -> dict:
    return {"request": json.dumps({"model": model, **(request or {})}),
            "target": ("t.nii.gz", files["tgt"].read_bytes()),
            "reference_image_0": ("r.nii.gz", files["ref"].read_bytes()),
            "reference_labels_0": ("l.nii.gz", files["ref_lab"].read_bytes())}


def _folders(work) -> list:
    return [p for root in work.glob("iris-serve-*") for p in root.iterdir() if p.is_dir()]


def test_a_job_is_stopped_at_its_limit_and_a_token_at_its_quota(limited, phantom_files):
    h = limited
    long = {"options": {"strategy": "tuning", "tune_steps": 1000}}  # minutes on the tiny model
    status, answer = post_job(h["url"], h["tokens"][0], _parts(h["model"], phantom_files, long))
    assert status == 202, answer
    start = time.monotonic()
    st = wait_job(h["url"], h["tokens"][0], answer["job"], timeout=120)
    assert st["status"] == "failed" and st["error"].startswith("stopped after 0.1 minutes, this server's limit for "
                                                               "one job"), st
    assert time.monotonic() - start < 60
    status, answer = post_job(h["url"], h["tokens"][0], _parts(h["model"], phantom_files))
    assert status == 429 and answer["detail"].startswith("your token has used its 0.08 minutes of compute of the "
                                                         "last hour; try again in"), answer
    status, answer = post_job(h["url"], h["tokens"][1], _parts(h["model"], phantom_files))  # another token runs
    assert status == 202, answer
    assert wait_job(h["url"], h["tokens"][1], answer["job"])["status"] == "done"
    call(h["url"], "DELETE", f"/v1/jobs/{answer['job']}", h["tokens"][1])


def test_a_result_nobody_fetches_expires(limited, phantom_files):
    h = limited
    status, answer = post_job(h["url"], h["tokens"][1], _parts(h["model"], phantom_files))
    assert status == 202, answer
    job = answer["job"]
    assert wait_job(h["url"], h["tokens"][1], job)["status"] == "done"
    assert len(_folders(h["work"])) == 1
    deadline = time.monotonic() + 30
    while call(h["url"], path=f"/v1/jobs/{job}", token=h["tokens"][1])[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert call(h["url"], path=f"/v1/jobs/{job}", token=h["tokens"][1])[0] == 404
    assert not _folders(h["work"])


def test_a_server_that_died_leaves_a_folder_the_next_start_removes(tmp_path, tiny_model_file, phantom_files):
    """SIGKILL (or a power cut) runs no clean-up: the next server on the same work folder deletes what the dead one
    left, not a folder of another program; then SIGINT (Ctrl-C) stops it leaving nothing."""
    token = secrets.token_hex(16)
    work = tmp_path / "work"
    flags = ("--models", str(tiny_model_file), "--device", "cpu", "--threads", "1", "--workdir", str(work))
    proc, url = start_server(tmp_path, [token], *flags, name="first")
    try:
        status, answer = post_job(url, token, _parts(str(tiny_model_file), phantom_files))
        assert status == 202 and wait_job(url, token, answer["job"])["status"] == "done"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (left,) = work.glob("iris-serve-*")
    assert [p.name for p in _folders(work)[0].iterdir()] == ["result.nii.gz"]
    (work / "iris-serve-foreign").mkdir()  # no owner file: not this server's to delete
    (work / "iris-serve-foreign" / "keep.txt").write_text("x")
    proc, url = start_server(tmp_path, [token], *flags, name="second")
    try:
        assert not left.exists() and (work / "iris-serve-foreign" / "keep.txt").exists()
        assert f"removed {left.name}, left by a server that did not stop" in (tmp_path / "second.log").read_text()
        if os.name != "nt":
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            assert sorted(p.name for p in work.iterdir()) == ["iris-serve-foreign"]
    finally:
        stop_server(proc)
