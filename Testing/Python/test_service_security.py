"""``iris-segment serve`` against a hostile client (issue [19]): every attack of the issue against one real server
process on 127.0.0.1 (two MB uploads, 300,000 voxels an image, two jobs a token, three in all), each refused with a
4xx naming the problem, the server healthy and its memory flat afterwards, and no file of a job left in its work
folder, SIGTERM included (the last test)."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import socket
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from serving import call, multipart, post_job, rss_mb, start_server, stop_server, wait_job

from conftest import wait_for
from iris_core.commands.cli import main
from iris_core.service.client import Client, ServerError

MAX_VOXELS = 300_000
ROUTES = [("GET", "/v1/info"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{id}"), ("POST", "/v1/jobs/{id}/targets"),
          ("POST", "/v1/jobs/{id}/cancel"), ("GET", "/v1/jobs/{id}/sidecar"), ("GET", "/v1/jobs/{id}/labels"),
          ("DELETE", "/v1/jobs/{id}")]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_file, phantom_files):
    """One server for the module, and files an attacker would use: a task library outside ``--libraries``, the
    target's voxels as a raw file outside the uploads."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "libs").mkdir()
    (folder / "outside").mkdir()
    secret = folder / "outside" / "secret.safetensors"
    assert main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--quiet", "--reference",
                 str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--target", str(phantom_files["tgt"]),
                 "--output", str(folder / "lib_seg.nii.gz"), "--save-library", str(secret)]) == 0
    target = sitk.ReadImage(str(phantom_files["tgt"]))
    (folder / "outside" / "target.raw").write_bytes(sitk.GetArrayFromImage(target).astype("<f4").tobytes())
    labels = sitk.ReadImage(str(phantom_files["ref_lab"]))
    (folder / "outside" / "labels.raw").write_bytes(sitk.GetArrayFromImage(labels).astype("u1").tobytes())
    tokens = [secrets.token_hex(16) for _ in range(3)]
    work = folder / "work"
    proc, url = start_server(folder, tokens, "--models", str(tiny_model_file), "--device", "cpu", "--threads", "1",
                             "--max-jobs", "3", "--max-jobs-per-token", "2", "--max-upload-mb", "2", "--max-voxels",
                             str(MAX_VOXELS), "--workdir", str(work), "--libraries", str(folder / "libs"))
    yield {"url": url, "tokens": tokens, "proc": proc, "model": str(tiny_model_file), "folder": folder, "work": work,
           "secret": secret, "target": target, "labels": labels, "files": phantom_files}
    stop_server(proc)


def _parts(h: dict, request: dict | None = None, **files: tuple[str, bytes]) -> dict:
    """A job's parts: the phantom target and reference, each replaceable, and the request."""
    f = h["files"]
    parts = {"request": json.dumps({"model": h["model"], **(request or {})}),
             "target": ("t.nii.gz", f["tgt"].read_bytes()),
             "reference_image_0": ("r.nii.gz", f["ref"].read_bytes()),
             "reference_labels_0": ("l.nii.gz", f["ref_lab"].read_bytes())}
    return {**parts, **files}


def _job_folders(h: dict) -> list[Path]:
    return [p for root in h["work"].glob("iris-serve-*") for p in root.iterdir() if p.is_dir()]


def _submit(h: dict, token: int = 0, request: dict | None = None, **files) -> str:
    status, answer = post_job(h["url"], h["tokens"][token], _parts(h, request, **files))
    assert status == 202, answer
    return answer["job"]


LONG = {"options": {"strategy": "tuning", "tune_steps": 1000}}  # minutes on the tiny model: cancelled by the tests


def test_every_route_is_in_the_token_tests():
    """ROUTES is every route the server's application has: a route added later is in the token test below, not
    left out of it. (The application is built as ``serve`` builds it; no route touches the service until called.)"""
    from fastapi.routing import APIRoute

    from iris_core.service.server import create_app

    def flat(routes):  # FastAPI 0.165 keeps an included router as one entry holding its original router
        for r in routes:
            yield from flat(r.original_router.routes) if hasattr(r, "original_router") else [r]

    routes = {(method, r.path.replace("{job_id}", "{id}")) for r in flat(create_app(None).routes)
              if isinstance(r, APIRoute) for method in r.methods}
    assert routes == set(ROUTES), routes ^ set(ROUTES)


def test_every_route_needs_a_token_and_hides_the_jobs_of_other_tokens(hostile):
    """Each route of ROUTES (every route: the test above) with no token, a wrong one or one in the URL: 401; with
    another token, a job of this one is exactly an id that does not exist (404, the same words), and that token's
    DELETE and cancel leave it as it was."""
    h = hostile
    job = _submit(h)
    assert wait_job(h["url"], h["tokens"][0], job)["status"] == "done"
    good = h["tokens"][0]
    for method, route in ROUTES:
        path = route.format(id=job)
        for header in ({}, {"Authorization": "Bearer " + "0" * 32}, {"Authorization": "Bearer short"},
                       {"Authorization": "Bearer " + "x" * 8000}, {"Authorization": f"Basic {good}"},
                       {"Authorization": f"bearer{good}"}):
            assert call(h["url"], method, path, headers=header)[0] == 401, (method, route, header)
        for query in (f"?token={good}", f"?access_token={good}"):  # a token in the URL is no token
            assert call(h["url"], method, path + query)[0] == 401, (method, route, query)
    unknown = "0" * 32
    for method, route in ROUTES[2:]:  # another token's job is exactly an unknown job
        mine = call(h["url"], method, route.format(id=job), h["tokens"][1])
        none = call(h["url"], method, route.format(id=unknown), h["tokens"][1])
        assert mine[0] == none[0] == 404, (method, route, mine, none)
        assert mine[1]["detail"].replace(job, unknown) == none[1]["detail"]
    assert call(h["url"], path=f"/v1/jobs/{job}", token=good)[1]["status"] == "done"  # the other's DELETE did nothing
    assert call(h["url"], "DELETE", f"/v1/jobs/{job}", good)[0] == 200


def test_no_request_field_names_a_file_of_the_server(hostile):
    """A task library by path (``reuse``, the key the job runner trusted, or ``library``) is refused before
    anything runs, with the same answer for a file that exists and one that does not."""
    h = hostile
    answers = []
    for path in (str(h["secret"]), str(h["folder"] / "outside" / "missing.safetensors"), "/etc/shadow"):
        status, answer = post_job(h["url"], h["tokens"][0], _parts(h, {"reuse": path}))
        assert status == 400 and "reuse: Extra inputs are not permitted" in answer["detail"], answer
        answers.append(answer["detail"].split(" (got ")[0])
        status, answer = post_job(h["url"], h["tokens"][0], _parts(h, {"library": path}))
        assert status == 400 and "is not offered here (offered: none)" in answer["detail"], answer
        answers.append(answer["detail"].replace(path, "PATH"))
    assert len(set(answers[::2])) == 1 and len(set(answers[1::2])) == 1  # no oracle of which files exist
    status, answer = post_job(h["url"], h["tokens"][0], _parts(h, {"library": "../outside/secret"}))
    assert status == 400 and "is not offered here" in answer["detail"]
    status, answer = post_job(h["url"], h["tokens"][0], {**_parts(h), "request": json.dumps({"model": "../tiny"})})
    assert status == 400 and "is not served here" in answer["detail"]
    assert not _job_folders(h)


def _nrrd(header: str, data: bytes = b"") -> bytes:
    return f"NRRD0004\n{header}\n\n".encode() + data


def _detached(h: dict) -> dict[str, tuple[str, dict]]:
    """Uploads whose header names a file of the server for its voxels: (what the part is, the parts)."""
    size = " ".join(str(s) for s in h["target"].GetSize())
    lab = " ".join(str(s) for s in h["labels"].GetSize())
    raw = h["folder"] / "outside" / "target.raw"
    # from a job's folder (work/iris-serve-*/<job>/) to outside/ beside work/
    relative = "../../../outside/target.raw"
    nrrd = "type: float\ndimension: 3\nsizes: {}\nencoding: raw\nendian: little\n{}: {}"
    mha = (f"ObjectType = Image\nNDims = 3\nDimSize = {size}\nElementType = MET_FLOAT\nBinaryData = True\n"
           f"BinaryDataByteOrderMSB = False\nElementDataFile = {raw}\n")
    hdr = bytearray(352)
    hdr[0:4] = (348).to_bytes(4, "little")
    hdr[40:56] = np.array([3, *h["target"].GetSize(), 1, 1, 1, 1], "<i2").tobytes()
    hdr[70:74] = np.array([16, 32], "<i2").tobytes()
    hdr[108:112] = np.array([0], "<f4").tobytes()
    hdr[344:348] = b"ni1\0"
    return {
        "nrrd, absolute": ("target", {"target": ("t.nrrd", _nrrd(nrrd.format(size, "data file", raw)))}),
        "nrrd, ../": ("target", {"target": ("t.nrrd", _nrrd(nrrd.format(size, "data file", relative)))}),
        "nrrd, datafile": ("target", {"target": ("t.nrrd", _nrrd(nrrd.format(size, "datafile", raw)))}),
        "nrrd, /dev/zero": ("target", {"target": ("t.nrrd", _nrrd(nrrd.format("1600 1600 1600", "data file",
                                                                                "/dev/zero")))}),
        "mha": ("target", {"target": ("t.mha", mha.encode())}),
        "nifti pair": ("target", {"target": ("t.nii", bytes(hdr))}),
        ".seg.nrrd label part": ("reference_labels_0", {"reference_labels_0": ("l.seg.nrrd", _nrrd(
            f"type: uint8\ndimension: 3\nsizes: {lab}\nencoding: raw\ndata file: "
            f"{h['folder'] / 'outside' / 'labels.raw'}"))}),
    }


@pytest.mark.parametrize("attack", ["nrrd, absolute", "nrrd, ../", "nrrd, datafile", "nrrd, /dev/zero", "mha",
                                    "nifti pair", ".seg.nrrd label part"])
def test_a_header_naming_another_file_is_refused_before_it_is_read(hostile, attack):
    h = hostile
    part, files = _detached(h)[attack]
    status, answer = post_job(h["url"], h["tokens"][0], _parts(h, **files))
    assert status == 400, answer
    assert answer["detail"].startswith(f"{part}: refused: ") and ("names another file" in answer["detail"]
                                                                 or "separate .img" in answer["detail"]), answer
    assert str(h["work"]) not in answer["detail"]
    assert not _job_folders(h)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, 9)


def _bombs(h: dict) -> dict[str, tuple[dict, str]]:
    """Uploads that declare more than they hold, or far more voxels than allowed: (parts, the refusal)."""
    small = " ".join(str(s) for s in h["target"].GetSize())
    voxels = int(np.prod(h["target"].GetSize()))
    zeros = np.zeros(voxels, "<f4").tobytes()
    nii = bytearray(352)
    nii[0:4] = (348).to_bytes(4, "little")
    nii[40:56] = np.array([3, 1000, 1000, 1000, 1, 1, 1, 1], "<i2").tobytes()
    nii[70:74] = np.array([2, 8], "<i2").tobytes()
    nii[76:92] = np.array([1, 1, 1, 1], "<f4").tobytes()
    nii[108:112] = np.array([352], "<f4").tobytes()
    nii[344:348] = b"n+1\0"
    limit = f"over this server's limit of {MAX_VOXELS:,} per image"
    return {
        "gzip nrrd 1600^3": ({"target": ("t.nrrd", _nrrd("type: uint8\ndimension: 3\nsizes: 1600 1600 1600\n"
                                                         "encoding: gzip", _gz(b"\0" * 1000)))}, limit),
        "nifti.gz 1000^3": ({"target": ("t.nii.gz", _gz(bytes(nii) + b"\0" * 100_000))}, limit),
        "layers 5 x 100^3": ({"reference_labels_0": ("l.seg.nrrd", _nrrd(
            "type: uint8\ndimension: 4\nsizes: 5 100 100 100\nkinds: list domain domain domain\nencoding: gzip",
            _gz(b"\0" * 5_000_000)))}, limit),
        "raw nrrd, half its voxels": ({"target": ("t.nrrd", _nrrd(f"type: float\ndimension: 3\nsizes: {small}\n"
                                                                  "encoding: raw\nendian: little",
                                                                  zeros[: len(zeros) // 2]))},
                                      "fewer voxel bytes than its header declares"),
        "gzip nrrd, ten times its voxels": ({"target": ("t.nrrd", _nrrd(f"type: float\ndimension: 3\nsizes: {small}\n"
                                                                        "encoding: gzip\nendian: little",
                                                                        _gz(zeros * 10)))},
                                            "more voxel bytes than its header declares"),
        "mha, compressed, too short": ({"target": ("t.mha", (
            f"ObjectType = Image\nNDims = 3\nDimSize = {small}\nElementType = MET_FLOAT\nBinaryData = True\n"
            "CompressedData = True\nElementDataFile = LOCAL\n").encode() + zlib.compress(zeros[:1000]))},
            "fewer voxel bytes than its header declares"),
        "nrrd, ascii voxels": ({"target": ("t.nrrd", _nrrd(f"type: float\ndimension: 3\nsizes: {small}\n"
                                                           "encoding: ascii", b"0 " * voxels))}, "save it as raw or gzip"),
    }


def test_bombs_are_refused_from_the_header_and_the_memory_stays_flat(hostile):
    """Each refused with a 400 naming the part and the problem; the server's memory grows by less than 100 MB in
    all (a 1600^3 bomb once took 4.4 GB), and the server answers afterwards."""
    h = hostile
    before = rss_mb(h["proc"])
    for name, (files, refusal) in _bombs(h).items():
        status, answer = post_job(h["url"], h["tokens"][0], _parts(h, **files))
        assert status == 400 and refusal in answer["detail"], (name, answer)
        part = next(iter(files))
        assert answer["detail"].startswith(f"{part}: "), (name, answer)
    grown = rss_mb(h["proc"]) - before
    assert grown < 100, f"the server grew by {grown:.0f} MB"
    assert call(h["url"], token=h["tokens"][0])[0] == 200 and not _job_folders(h)


def test_a_chunked_upload_is_cut_at_the_limit(hostile):
    """No Content-Length: the server counts the bytes as they come and answers 413 at 2 MB; the client cannot
    push the 64 MB it tries (the server stops reading), no file stays, the memory stays flat."""
    h = hostile
    before = rss_mb(h["proc"])
    port = int(h["url"].rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {h['tokens'][0]}\r\n"
            "Content-Type: multipart/form-data; boundary=b0undary\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b'--b0undary\r\nContent-Disposition: form-data; name="target"; filename="t.nii.gz"\r\n\r\n'
    sent, answer = 0, b""
    chunk = b"\0" * 2**18
    try:
        sock.sendall(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        sock.setblocking(True)
        while sent < 64 * 2**20:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            sock.settimeout(0.001)
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except (TimeoutError, BlockingIOError):
                pass
            finally:
                sock.settimeout(30)
    except OSError:  # the server closed the connection after its answer
        pass
    try:
        sock.settimeout(10)
        while b"}" not in answer and (more := sock.recv(65536)):  # up to the end of the JSON body
            answer += more
    except OSError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over the server's limit of 2 MB" in answer
    assert sent < 32 * 2**20, f"the server read {sent / 2**20:.0f} MB of a chunked upload over its 2 MB limit"
    assert rss_mb(h["proc"]) - before < 100
    wait_for(lambda: not _job_folders(h), 30, "the refused upload's folder removed")
    assert call(h["url"], token=h["tokens"][0])[0] == 200


BAD_REQUESTS = {
    "tune steps": ({"options": {"tune_steps": 1_000_000_000}}, "options.tune_steps: Input should be less than or "
                                                                "equal to 1000"),
    "window": ({"options": {"window": [1_000_000_000, 64, 64]}}, "options.window.0: Input should be less than or "
                                                                 "equal to 256"),
    "overlap": ({"options": {"overlap": 0.99}}, "options.overlap: Input should be less than or equal to 0.75"),
    "options a list": ({"options": [1, 2]}, "options: Input should be an object"),
    "classes a number": ({"classes": 5}, "classes: a text such as 'liver=1,spleen=2' or a list of {name, value}"),
    "classes of the wrong type": ({"classes": [{"name": 1, "value": "x"}]}, "classes.0.name: Input should be a "
                                                                           "valid string"),
    "a class value 0": ({"classes": "0"}, "classes: label 0 is background"),
    "output a path": ({"output": "../../x.nii.gz"}, "output: Input should be '.nii.gz', '.nrrd' or '.seg.nrrd'"),
    "unknown option": ({"options": {"cmd": "rm -rf /"}}, "options.cmd: Extra inputs are not permitted"),
    "probability maps": ({"options": {"save_probabilities": True}}, "options.save_probabilities: Input should be "
                                                                   "False"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_request_out_of_bounds_is_400_naming_the_field(hostile, case):
    h = hostile
    request, message = BAD_REQUESTS[case]
    status, answer = post_job(h["url"], h["tokens"][0], _parts(h, request))
    assert status == 400 and message in answer["detail"], answer


def test_malformed_requests_are_400_not_500(hostile):
    h = hostile
    for text, message in (("[" * 10_000 + "]" * 10_000, "request: Invalid JSON: recursion limit exceeded"),
                          ('{"model": "' + "a" * 200_000 + '"}', "upload: Part exceeded maximum size of 64KB"),
                          ("not json", "request: Invalid JSON")):
        status, answer = post_job(h["url"], h["tokens"][0], {**_parts(h), "request": text})
        assert status == 400 and message in answer["detail"], answer
    status, answer = post_job(h["url"], h["tokens"][0], {**_parts(h), "reference_image_1": ("x.nii.gz", b"")})
    assert status == 400 and "reference 1: give both" in answer["detail"]
    status, answer = call(h["url"], "POST", "/v1/jobs", h["tokens"][0], b"{}", {"Content-Type": "application/json"})
    assert status == 400 and "multipart/form-data" in answer["detail"]
    assert not _job_folders(h)


def test_quotas_per_token_and_a_busy_answer_that_tells_nothing_of_others(hostile):
    """Two jobs a token: the third is 429 in the token's own words; three in all: a fourth token's job is 429
    "busy" with no count of the others' jobs. Cancelled, they leave nothing."""
    h = hostile
    url, tokens = h["url"], h["tokens"]
    jobs = [(0, _submit(h, 0, LONG)), (0, _submit(h, 0, LONG))]
    status, answer = post_job(url, tokens[0], _parts(h, LONG))
    assert status == 429 and answer["detail"].startswith("your token has 2 jobs queued or running"), answer
    jobs.append((1, _submit(h, 1, LONG)))
    body, headers = multipart(_parts(h, LONG))
    status, answer = call(url, "POST", "/v1/jobs", tokens[2], body, headers)
    assert status == 429 and answer["detail"] == "the server is busy; try again in a minute", answer
    assert not any(ch.isdigit() for ch in answer["detail"])
    for k, job in jobs:
        assert call(url, "POST", f"/v1/jobs/{job}/cancel", tokens[k])[0] == 200
    assert [wait_job(url, tokens[k], job)["status"] for k, job in jobs] == ["cancelled"] * 3
    assert not _job_folders(h)


def test_results_go_when_fetched_errors_and_sidecars_name_no_server_path(hostile, tmp_path):
    """Uploads are deleted when the job ends, the label map once fetched (a second fetch: 410), the rest on
    DELETE, and a job deleted while it runs leaves nothing; neither an error nor a sidecar names a server path."""
    h = hostile
    url, token = h["url"], h["tokens"][0]
    job = _submit(h, request={"classes": "ball=1,box=2"})
    assert wait_job(url, token, job)["status"] == "done"
    assert [p.name for p in _job_folders(h)[0].iterdir()] == ["result.nii.gz"]  # the uploads are gone
    status, data = call(url, path=f"/v1/jobs/{job}/labels", token=token)
    assert status == 200 and sitk.GetArrayFromImage(_read(tmp_path / "r.nii.gz", data)).max() == 2
    deadline = time.monotonic() + 5
    while _job_folders(h) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _job_folders(h)
    assert call(url, path=f"/v1/jobs/{job}/labels", token=token)[0] == 410
    status, side = call(url, path=f"/v1/jobs/{job}/sidecar", token=token)
    assert status == 200 and [c["name"] for c in side["classes"]] == ["ball", "box"]
    text = json.dumps(side)
    assert str(h["work"]) not in text and not _absolute_paths(side), _absolute_paths(side)
    assert call(url, "DELETE", f"/v1/jobs/{job}", token)[0] == 200
    assert call(url, path=f"/v1/jobs/{job}", token=token)[0] == 404
    # an error inside the job names the part, not the server's file
    wrong = h["files"]["tgt_lab"].read_bytes()  # labels on another grid than the reference image
    job = _submit(h, reference_labels_0=("l.nii.gz", wrong))
    st = wait_job(url, token, job)
    assert st["status"] == "failed" and "reference_labels_0.nii.gz: not on the grid" in st["error"], st
    assert str(h["work"]) not in st["error"] and "/" not in st["error"].split(":")[0], st["error"]
    # deleted while it runs: the run stops and nothing of it stays
    job = _submit(h, request=LONG)
    deadline = time.monotonic() + 60
    while call(url, path=f"/v1/jobs/{job}", token=token)[1]["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert call(url, "DELETE", f"/v1/jobs/{job}", token)[0] == 200
    after = _submit(h)  # the one worker takes it once the deleted job has stopped
    assert wait_job(url, token, after)["status"] == "done"
    call(url, "DELETE", f"/v1/jobs/{after}", token)
    assert not _job_folders(h)


def _read(path: Path, data: bytes) -> sitk.Image:
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


def _absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    return [value] if isinstance(value, str) and (os.path.isabs(value) or os.sep + "tmp" in value) else []


def test_docs_routes_are_off_and_the_client_checks_its_request_before_uploading(hostile):
    h = hostile
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert call(h["url"], path=path)[0] == 404, path
    client = Client(h["url"], h["tokens"][0])
    info = client.info()
    assert info["limits"]["max_voxels"] == MAX_VOXELS and "request_schema" in info
    with pytest.raises(ServerError, match=r"does not accept option tune_steps=5000: it takes an integer from 0 to "
                                          r"1000") as err:
        client.submit(h["files"]["tgt"], [(h["files"]["ref"], h["files"]["ref_lab"])], model=h["model"],
                      options={"tune_steps": 5000})
    assert err.value.status == 0  # refused here: nothing was uploaded


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is TerminateProcess on Windows: the next start sweeps instead")
def test_sigterm_leaves_no_file_of_any_job(hostile):
    """Last: a result nobody fetched, a running job and a queued one, then SIGTERM: the work folder is empty."""
    h = hostile
    done = _submit(h, 1)
    assert wait_job(h["url"], h["tokens"][1], done)["status"] == "done"
    _submit(h, 0, LONG)
    _submit(h, 1, LONG)
    assert len(_job_folders(h)) == 3
    h["proc"].send_signal(signal.SIGTERM)
    h["proc"].wait(timeout=60)
    assert list(h["work"].iterdir()) == []
