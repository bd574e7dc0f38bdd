"""``iris-segment serve`` and its clients (issue [14]): a real server process on 127.0.0.1; the CLI through it
writes what a local run writes; tokens, jobs of other tokens, upload limits, malformed files and cancel."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from serving import call, start_server, stop_server

from conftest import free_port
from iris_core.commands.cli import main
from iris_core.service.client import Client, ServerError


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_file, phantom_files):
    """A server process with two tokens, serving the tiny model and the bundled one, at most 2 jobs and 16 MB, and
    one task library ('phantom', the tiny model's ball and box)."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "libs").mkdir()
    assert main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--quiet", "--reference",
                 str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--target", str(phantom_files["tgt"]),
                 "--classes", "ball=1,box=2", "--output", str(folder / "lib_seg.nii.gz"), "--save-library",
                 str(folder / "libs" / "phantom.safetensors")]) == 0
    tokens = [secrets.token_hex(16), secrets.token_hex(16)]
    proc, url = start_server(folder, tokens, "--models", str(tiny_model_file), "default", "--max-jobs", "2",
                             "--max-upload-mb", "16", "--device", "cpu", "--threads", "2", "--libraries",
                             str(folder / "libs"))
    (folder / "token0").write_text(tokens[0])
    yield {"url": url, "tokens": tokens, "token_file": folder / "token0", "proc": proc, "model": str(tiny_model_file),
           "library": folder / "libs" / "phantom.safetensors", "log": folder / "server.log"}
    stop_server(proc)


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


def test_serve_says_where_it_listens_what_it_loaded_and_that_it_is_ready(server):
    """Issue [24] item 4: ``serve`` printed nothing, even on a terminal. Its log (stderr) names each model it loaded,
    the libraries it offers, the address it listens on, and that it is ready; never a token."""
    log = server["log"].read_text()
    port = server["url"].rsplit(":", 1)[1]
    assert f"INFO listening on http://127.0.0.1:{port} (2 tokens accepted); ready for jobs" in log, log
    assert f"INFO model {server['model']}: tiny (iris, {server['model']})" in log
    assert "INFO model default: " in log and "task libraries offered from" in log and "phantom" in log
    assert not any(t in log for t in server["tokens"])


def test_a_remote_sidecar_names_the_users_files(server, phantom_files, tmp_path, capsys):
    """Issue [24] item 4: a result segmented through a server recorded the server's names for the uploads
    (``"target": "target.nii.gz"``, ``reference_image_0.nii.gz``); the client puts the user's back, says it wrote
    the sidecar and names the preview it drew, as a local run's sidecar does."""
    code = main(["segment", "--model", server["model"], "--quiet", "--reference", str(phantom_files["ref"]),
                 str(phantom_files["ref_lab"]), "--target", str(phantom_files["tgt"]), "--output",
                 str(tmp_path / "remote.nii.gz"), "--preview", str(tmp_path / "remote.png"), "--server", server["url"],
                 "--token-file", str(server["token_file"])])
    assert code == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "remote.json").read_text())
    assert side["target"] == "tgt.nii.gz" and side["details"]["references"] == ["ref.nii.gz"]
    assert side["written_by"].startswith("iris-segment ") and side["preview"] == "remote.png"
    text = json.dumps(side)
    assert "reference_image_" not in text and "reference_labels_" not in text and "target.nii" not in text


def test_no_or_a_wrong_token_is_401_and_nothing_runs(server, phantom_files):
    assert call(server["url"])[0] == 401
    assert call(server["url"], token="x" * 32)[0] == 401
    with pytest.raises(ServerError, match="no valid token") as err:
        Client(server["url"], "not-the-token-0123456789").submit(phantom_files["tgt"],
                                                                 [(phantom_files["ref"], phantom_files["ref_lab"])])
    assert err.value.status == 401


def test_a_job_is_visible_to_its_own_token_only(server, phantom_files):
    """Through the client: another token's status and cancel of a job are the 404 of an id that does not exist
    (the same words, the id aside), and its cancel does not cancel it."""
    mine, theirs = (Client(server["url"], t) for t in server["tokens"])
    job = mine.submit(phantom_files["tgt"], [(phantom_files["ref"], phantom_files["ref_lab"])], model=server["model"])
    unknown = "0" * 32
    for call_of in (theirs.status, theirs.cancel):
        answers = []
        for job_id in (job, unknown):
            with pytest.raises(ServerError) as err:
                call_of(job_id)
            assert err.value.status == 404, (call_of.__name__, str(err.value))
            answers.append(str(err.value).replace(job_id, "ID"))
        assert answers[0] == answers[1] and "no job ID" in answers[0], (call_of.__name__, answers)
    assert mine.wait(job)["status"] == "done"


def test_oversized_malformed_and_unknown_uploads_are_refused_naming_the_part(server, phantom_files, tmp_path):
    client = Client(server["url"], server["tokens"][0])
    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(17 * 2**20))
    with pytest.raises(ServerError, match="over the server's limit of 16 MB") as err:
        client.submit(big, [(phantom_files["ref"], phantom_files["ref_lab"])], model=server["model"])
    assert err.value.status == 413
    # the server's own check, for a client that sends anyway: the headers announce 17 MB, and the server answers
    # 413 before reading any of the body
    import http.client

    host, port = server["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Authorization", f"Bearer {server['tokens'][0]}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader("Content-Length", str(17 * 2**20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "over the server's limit of 16 MB" in json.loads(resp.read())["detail"]
    conn.close()
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


def _scene_arrays(node, target):
    import slicer

    seg = node.GetSegmentation()
    out = {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        out[seg.GetSegment(sid).GetName()] = np.asarray(
            slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, target)) > 0
    return out


def test_slicer_logic_segments_through_the_server_on_a_real_scene(server):
    """IrisSegmentLib on a slicer-core scene with 'Run on: server': the same segments as a local run; a wrong
    token is one clear error and the scene is unchanged."""
    import slicer  # noqa: F401  slicer-core: a test dependency

    from iris_core.options import SegmentOptions
    from IrisSegmentLib import testing
    from IrisSegmentLib.logic import ReferenceSpec, SegmentationLogic, SegmentRequest
    from IrisSegmentLib.runner import WorkerError
    from IrisSegmentLib.standalone import init_scene

    scene = init_scene()
    nodes = testing.load_sample_pair(scene)
    req = SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                         model=server["model"], options=SegmentOptions(device="cpu", threads=2))
    local = SegmentationLogic(scene).segment(req)
    remote = SegmentationLogic(scene, server=(server["url"], server["tokens"][1])).segment(req)
    a, b = _scene_arrays(local, nodes["target"]), _scene_arrays(remote, nodes["target"])
    assert list(a) == list(b) == ["brain"] and np.array_equal(a["brain"], b["brain"])
    before = testing.node_ids(scene)
    with pytest.raises(WorkerError, match="no valid token"):
        SegmentationLogic(scene, server=(server["url"], "wrong-token-0123456789abcdef")).segment(req)
    assert testing.node_ids(scene) == before


def test_server_killed_mid_run_is_a_clear_message_and_the_scene_is_unchanged(tmp_path, tiny_model_file):
    import slicer  # noqa: F401  slicer-core: a test dependency

    from iris_core.options import SegmentOptions
    from IrisSegmentLib import testing
    from IrisSegmentLib.logic import ReferenceSpec, SegmentationLogic, SegmentRequest
    from IrisSegmentLib.runner import WorkerError
    from IrisSegmentLib.standalone import init_scene

    token = secrets.token_hex(16)
    proc, url = start_server(tmp_path, [token], "--models", "default", "--device", "cpu", "--workdir",
                             str(tmp_path / "work"))
    try:
        scene = init_scene()
        nodes = testing.load_sample_pair(scene)
        before = testing.node_ids(scene)
        req = SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                             options=SegmentOptions(device="cpu", strategy="tuning", tune_steps=500))
        logic = SegmentationLogic(scene, server=(url, token))
        killed = []

        def progress(stage, done, total):
            if not killed:  # the job runs on the server: kill the server now
                proc.kill()
                killed.append(stage)

        with pytest.raises(WorkerError, match=f"server {url}: cannot be reached"):
            logic.segment(req, progress=progress)
        assert killed and testing.node_ids(scene) == before
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_run_on_server_parameters(tmp_path):
    """The module's 'Run on server' fields on a real parameter node: empty runs here; a URL needs http(s) and a
    readable token file, each refused in words."""
    import slicer  # noqa: F401  slicer-core: a test dependency

    from IrisSegmentLib import parameters
    from IrisSegmentLib.remote import Server
    from IrisSegmentLib.scene import SceneError
    from IrisSegmentLib.standalone import init_scene

    scene = init_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    try:
        parameters.set_defaults(node)
        assert parameters.server_of(node) is None
        node.SetParameter("ServerURL", "gpu-host:8765")
        with pytest.raises(SceneError, match="give its address as http://host:port"):
            parameters.server_of(node)
        node.SetParameter("ServerURL", "https://gpu-host:8765")
        with pytest.raises(SceneError, match="choose the file holding its token"):
            parameters.server_of(node)
        node.SetParameter("ServerTokenFile", str(tmp_path / "missing.txt"))
        with pytest.raises(SceneError, match="missing.txt"):
            parameters.server_of(node)
        (tmp_path / "token.txt").write_text("# mine\nabcdef0123456789abcdef\n")
        node.SetParameter("ServerTokenFile", str(tmp_path / "token.txt"))
        assert parameters.server_of(node) == Server("https://gpu-host:8765", "abcdef0123456789abcdef")
    finally:
        scene.RemoveNode(node)


def test_a_rank_share_does_not_depend_on_what_other_ranks_have_written(tmp_path):
    """A rank that starts late sees outputs another rank has just written: its share must still be its own
    (sharding what was left once made a late rank 1 take nothing, and one target of three was never segmented).
    Each rank skips only its own share's finished targets; together the ranks cover every target once."""
    from iris_core.commands.segment import cohort_share
    from iris_core.io.names import sidecar_path

    jobs = [(f"case{i}.nii.gz", tmp_path / f"case{i}_seg.nii.gz", None) for i in range(5)]
    before = [cohort_share(jobs, r, 2, False) for r in (0, 1)]
    assert [[t for t, _, _ in share] for share, _ in before] == [["case0.nii.gz", "case2.nii.gz", "case4.nii.gz"],
                                                                ["case1.nii.gz", "case3.nii.gz"]]
    for i in (0, 2, 3):  # rank 0 has written case0 and case2, rank 1 case3
        jobs[i][1].write_bytes(b"x")
        sidecar_path(jobs[i][1]).write_text("{}")
    (share0, skipped0), (share1, skipped1) = (cohort_share(jobs, r, 2, False) for r in (0, 1))
    assert [t for t, _, _ in share0] == ["case4.nii.gz"] and [t for t, _, _ in skipped0] == ["case0.nii.gz", "case2.nii.gz"]
    assert [t for t, _, _ in share1] == ["case1.nii.gz"] and [t for t, _, _ in skipped1] == ["case3.nii.gz"]
    jobs[1][1].write_bytes(b"x")  # a label map without its sidecar: not finished
    assert cohort_share(jobs, 1, 2, False)[0] == share1
    # one process: nothing skipped unless asked (--skip-existing)
    assert cohort_share(jobs, 0, 1, False) == (jobs, [])
    assert [t for t, _, _ in cohort_share(jobs, 0, 1, True)[0]] == ["case1.nii.gz", "case4.nii.gz"]


def test_cohort_under_torchrun_is_sharded_resumed_and_summarised(phantom_files, tiny_model_file, tmp_path):
    """segment --target cohort/* under torchrun (2 CPU processes, gloo): the targets are shared by the ranks, each
    written as a single run writes it, rank 0 writes one summary; run again, every target is skipped (resume)."""
    import shutil

    from conftest import ROOT

    targets = []
    for i in range(3):
        shutil.copy(phantom_files["tgt"], tmp_path / f"case{i}.nii.gz")
        targets.append(str(tmp_path / f"case{i}.nii.gz"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def torchrun():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", "--log-dir", str(tmp_path / "logs"), "-m",
                               "iris_core.commands.cli", "segment", "--model", str(tiny_model_file), "--device", "cpu",
                               "--quiet", "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]),
                               "--target", *targets, "--output", str(tmp_path / "out")],
                              env=env, capture_output=True, text=True, timeout=600)

    proc = torchrun()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(d["target"] for d in summary["done"]) == targets and {d["rank"] for d in summary["done"]} == {0, 1}
    assert not summary["skipped"] and not summary["failed"]
    assert not list((tmp_path / "out").glob(".summary.rank*"))
    single = tmp_path / "single.nii.gz"
    assert main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--quiet", "--threads", "1",
                 "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--target", targets[2],
                 "--output", str(single)]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(single))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case2_seg.nii.gz"))))
    proc = torchrun()  # resumed: nothing left to do
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["done"] and sorted(s["target"] for s in summary["skipped"]) == targets


def test_two_clients_at_once(server, phantom_files):
    """Two tokens submit at the same time: both jobs run (one after the other on the one worker), each client
    gets its own result, the same label map."""
    import threading

    results, errors = {}, []

    def client(k):
        try:
            c = Client(server["url"], server["tokens"][k])
            job = c.submit(phantom_files["tgt"], [(phantom_files["ref"], phantom_files["ref_lab"])],
                           model=server["model"], options={"threads": 2})
            results[k] = (c.wait(job)["status"], c._call("GET", f"/v1/jobs/{job}/labels"))
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == [0, 1]
    assert results[0][0] == results[1][0] == "done" and results[0][1] == results[1][1]


def test_library_named_on_the_server_and_task_kept_for_further_targets(server, phantom_files, tmp_path, capsys):
    """A task library the server offers, named by the client (no references uploaded), and several targets through
    the server with the task encoded once and reused: the same label maps as the same runs here."""
    import shutil

    base = ["segment", "--model", server["model"], "--device", "cpu", "--threads", "2", "--quiet"]
    remote = ["--server", server["url"], "--token-file", str(server["token_file"])]
    assert main([*base, "--library", str(server["library"]), "--target", str(phantom_files["tgt"]), "--output",
                 str(tmp_path / "lib_local.nii.gz")]) == 0
    assert main([*base, *remote, "--library", "phantom", "--target", str(phantom_files["tgt"]), "--output",
                 str(tmp_path / "lib_remote.nii.gz")]) == 0, capsys.readouterr().err
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"lib_{w}.nii.gz"))) for w in ("local", "remote"))
    assert np.array_equal(a, b) and a.any()
    with pytest.raises(ServerError, match="library '../libs/phantom' is not offered here"):
        Client(server["url"], server["tokens"][0]).submit(phantom_files["tgt"], [], model=server["model"],
                                                          library="../libs/phantom")
    targets = []
    for i in range(2):
        shutil.copy(phantom_files["ref"] if i else phantom_files["tgt"], tmp_path / f"t{i}.nii.gz")
        targets.append(str(tmp_path / f"t{i}.nii.gz"))
    refs = ["--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]), "--classes", "ball=1,box=2"]
    assert main([*base, *refs, "--target", *targets, "--output", str(tmp_path / "local")]) == 0
    assert main([*base, *remote, *refs, "--target", *targets, "--output", str(tmp_path / "remote")]) == 0
    for i in range(2):
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / w / f"t{i}_seg.nii.gz")))
                for w in ("local", "remote"))
        assert np.array_equal(a, b), i
    assert Client(server["url"], server["tokens"][0]).info()["libraries"] == ["phantom"]
