"""Issue [18]: the warm local worker and the Slicer-side findings, each on a real MRML scene (slicer-core) with the
real worker process and small real models; each test failed on the code before the fix (item numbers are the
issue's; [12]: its partly fixed items; battery: its fault battery)."""

from __future__ import annotations

import ast
import logging
import shutil
import time
from pathlib import Path

import psutil
import pytest
import slicer  # noqa: F401  slicer-core, a test dependency: missing, these tests fail rather than vanish

from conftest import wait_for
from iris_core.options import SegmentOptions
from iris_core.service.jobs import OWNER_FILE
from IrisSegmentLib import parameters as p
from IrisSegmentLib import testing
from IrisSegmentLib.jobs import run_to_end
from IrisSegmentLib.logic import ReferenceSpec, SegmentationLogic, SegmentRequest
from IrisSegmentLib.scene import SceneError
from IrisSegmentLib.standalone import init_scene

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A scene with the shipped pair, a tiny model on a coarse grid, and the parameter node's first choices."""
    from iris_core.hub.checkpoint import Preprocessing, save_checkpoint

    model = save_checkpoint(tmp_path_factory.mktemp("fast") / "fast.safetensors", tiny_model.model,
                            Preprocessing(spacing=(6.0, 6.0, 6.0), window=(32, 32, 32)))
    scene = init_scene()
    nodes = testing.load_sample_pair(scene)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    p.set_defaults(node)
    p.fill_first_choices(scene, node)
    return scene, nodes, node, str(model)


def request(nodes, model, **kw):
    return SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])], model=model,
                          options=SegmentOptions(device="cpu", threads=1), **kw)


def gone(pid: int | None, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if pid is None or not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_item3_an_idle_worker_exits_and_the_next_click_starts_another(world):
    """The idle warm worker gives its memory back by exiting; the next Segment starts a new one unasked."""
    scene, nodes, _, model = world
    logic = SegmentationLogic(scene, warm=True, idle=1.0)
    try:
        scene.RemoveNode(logic.segment(request(nodes, model)))
        first = logic.warm.worker_pid
        assert gone(first, 10), "the idle worker did not exit"
        scene.RemoveNode(logic.segment(request(nodes, model)))
        assert logic.warm.worker_pid not in (None, first)
    finally:
        logic.close()


def test_item3_the_worker_gives_freed_memory_back_after_each_run(world):
    """Between clicks the warm worker holds what it keeps (torch, the model), not its peak: the freed memory goes
    back after each run (it is retained during a run, window after window)."""
    scene, nodes, _, _ = world
    logic = SegmentationLogic(scene, warm=True)
    try:
        job = logic.start_segment(request(nodes, "default"))
        outcome = run_to_end(job, interval=0.05)
        scene.RemoveNode(outcome.node)
        peak = job.process.peak_rss
        assert outcome.ok and peak > 0
        # the worker hands its freed memory back once the run has ended: waited for, with a deadline (without the
        # release the idle worker stays at its peak, 838 MB measured, and this fails after 30 s)
        wait_for(lambda: 0 < logic.warm.rss() < peak - 100 * 2**20, 30,
                 f"the idle worker's memory 100 MB under its peak of {peak / 2**20:.0f} MB")
        assert logic.warm.running  # measured on the idle worker, not on one that has exited
    finally:
        logic.close()


def test_item8_a_server_run_asks_for_no_local_download_and_no_local_model(world, tmp_path, monkeypatch, closed_port):
    """'Run on server' with MASS base: no 480 MB local download is offered (nor refused on an Intel Mac: the
    packages are not needed either), and a model only the server has is not refused here."""
    scene, nodes, node, _ = world
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing downloaded here
    monkeypatch.setenv("IRIS_SEGMENT_MODELS", str(tmp_path / "models"))
    node.SetParameter("ModelChoice", "mass-base")
    try:
        assert p.download_before_segment(node) == "mass-base"  # on this computer: asked first
        (tmp_path / "token.txt").write_text("abcdef0123456789abcdef\n")
        node.SetParameter("ServerURL", f"http://127.0.0.1:{closed_port}")  # never reached: nothing is sent
        node.SetParameter("ServerTokenFile", str(tmp_path / "token.txt"))
        assert p.download_before_segment(node) is None
        req = p.request_from_parameters(scene, node)
        assert req.server is not None and req.model == "mass-base"
        logic = SegmentationLogic(scene)
        req.model = "a-model-only-the-server-has"
        logic.cleanup(logic.prepare(req))  # not refused as "model file ... not found"
        req.server = None
        with pytest.raises(SceneError, match="not found"):
            logic.prepare(req)
    finally:
        for key in ("ModelChoice", "ServerURL", "ServerTokenFile"):
            node.SetParameter(key, p.DEFAULTS[key])


def test_item7_a_ca_bundle_for_the_server_is_a_parameter_checked_in_words(world, tmp_path):
    scene, _, node, _ = world
    (tmp_path / "token.txt").write_text("abcdef0123456789abcdef\n")
    node.SetParameter("ServerURL", "https://gpu-host:8765")
    node.SetParameter("ServerTokenFile", str(tmp_path / "token.txt"))
    try:
        assert p.server_of(node).ca_bundle is None  # empty: the certificates Slicer trusts
        node.SetParameter("ServerCABundle", str(tmp_path / "hospital-ca.pem"))
        with pytest.raises(SceneError, match="hospital-ca.pem: no such file"):
            p.server_of(node)
        (tmp_path / "hospital-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
        assert p.server_of(node).ca_bundle == str(tmp_path / "hospital-ca.pem")
        from IrisSegmentLib.choices import PATH_CONTROLS

        assert PATH_CONTROLS["serverCaPathLineEdit"] == "ServerCABundle"
    finally:
        for key in ("ServerURL", "ServerTokenFile", "ServerCABundle"):
            node.SetParameter(key, p.DEFAULTS[key])


def test_item10_a_failed_action_is_logged_as_an_error(caplog):
    from IrisSegmentLib.dialogs import user_action

    with caplog.at_level(logging.DEBUG):
        with user_action("Could not start the segmentation."):
            raise ValueError("the reason")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "Could not start the segmentation." in errors[0].getMessage()
    assert "the reason" in caplog.text


def _with_blocks(tree: ast.AST):
    """(method name, the calls inside each ``with`` whose context shows a wait cursor)."""
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.With):
                continue
            waits = any("WaitCursor" in ast.unparse(i.context_expr) or "wait_cursor=True" in
                        ast.unparse(i.context_expr) for i in node.items)
            if waits:
                calls = {ast.unparse(c.func).split(".")[-1] for b in node.body for c in ast.walk(b)
                         if isinstance(c, ast.Call)}
                yield fn.name, calls


def test_item10_no_wait_cursor_over_a_dialog_or_an_installation():
    """The wait cursor covered the consent dialogs and the minutes-long pip install (onSegment ran
    _ensureDependencies inside user_action(..., wait_cursor=True))."""
    tree = ast.parse((ROOT / "IrisSegment.py").read_text())
    asking = {"_ensureDependencies", "ensure_dependencies", "onDownload", "confirmOkCancelDisplay", "errorDisplay",
              "warningDisplay"}
    blocks = list(_with_blocks(tree))
    assert any(name == "onSegment" for name, _ in blocks)  # the check sees the export's wait cursor
    for name, calls in blocks:
        assert not calls & asking, f"{name}: {sorted(calls & asking)} under a wait cursor"


def test_12_a_chosen_output_takes_the_target_geometry(world):
    """[12]: an Output chosen explicitly kept another volume as its geometry (the Segment Editor and export then
    work on that volume's grid)."""
    scene, nodes, _, model = world
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    out.CreateDefaultDisplayNodes()
    out.SetReferenceImageGeometryParameterFromVolumeNode(nodes["reference"])
    try:
        result = SegmentationLogic(scene).segment(request(nodes, model, output=out))
        assert result is out
        assert out.GetNodeReference(out.GetReferenceImageGeometryReferenceRole()) is nodes["target"]
    finally:
        scene.RemoveNode(out)


def test_12_the_structure_list_follows_the_node_not_only_the_panel(world, tmp_path):
    """[12]: after a scene import changed the model, the Known structures list stayed the old model's (its rebuild
    ran only on a panel edit) and the next edit wrote Structures=''. The list's key is the node's, and the widget
    rebuilds whenever the node's key differs from the one the list was built for."""
    scene, _, node, _ = world
    key = p.structure_list_key(node)
    node.SetParameter("ModelChoice", "file")  # as an imported scene's node sets it, no panel edit
    node.SetParameter("ModelPath", str(tmp_path / "hermes.safetensors"))
    try:
        assert p.structure_list_key(node) == ("file", str(tmp_path / "hermes.safetensors"), "")
        assert p.structure_list_key(node) != key
    finally:
        node.SetParameter("ModelChoice", "")
        node.SetParameter("ModelPath", "")
    tree = ast.parse((ROOT / "IrisSegment.py").read_text())
    update = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "updateGUIFromParameterNode")
    text = ast.unparse(update)
    assert "structure_list_key(node) != self._structuresFor" in text and "_rebuildStructures(" in text


def test_12_a_reference_cut_by_its_volume_is_shown_not_only_logged(world):
    """[12] and the battery: a reference segment mostly outside its volume was reported only in the collapsed Log;
    the outcome now carries it as a warning (the widget shows it in a dialog) and the status line says so."""
    import vtk
    from test_slicer_defects import surface_segmentation

    scene, nodes, _, model = world
    m = vtk.vtkMatrix4x4()
    nodes["reference"].GetIJKToRASMatrix(m)
    dims = nodes["reference"].GetImageData().GetDimensions()
    corner = m.MultiplyPoint([0, dims[1] / 2, dims[2] / 2, 1.0])[:3]
    seg = surface_segmentation(scene, "mostly outside", center=corner, radius=20.0)
    try:
        outcome = run_to_end(SegmentationLogic(scene).start_segment(
            SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], seg)], model=model,
                           options=SegmentOptions(device="cpu", threads=1))))
        assert outcome.ok and len(outcome.warnings) == 1 and "lies partly outside" in outcome.warnings[0]
        assert "1 warning" in outcome.stage
        scene.RemoveNode(outcome.node)
    finally:
        scene.RemoveNode(seg)


def test_battery_the_work_folder_removed_during_the_run_is_named_in_words(world):
    """The battery: the work folder removed 1 s into the run ended in a raw "[Errno 2] No such file or directory:
    .../job.json"."""
    scene, nodes, _, model = world
    logic = SegmentationLogic(scene, warm=True)
    try:
        job = logic.start_segment(request(nodes, model))
        # removed while the worker starts (what "1 s into the run" was): it has not read its job yet, it will find
        # job.json gone
        assert not job.process.answered
        shutil.rmtree(job.folder)
        outcome = run_to_end(job)
        assert outcome.status == "failed", outcome.stage
        text = str(outcome.error)
        assert "Errno" not in text and "run Segment again" in text, text
    finally:
        logic.close()


# -- Run on server: what the Slicer side must clean up (the client itself is issue [19]'s) ------------------------
class Relay:
    """A loopback relay in front of a real server: forwards every call, can fail one status poll (502) and can
    hold the result's download until released; records the paths it saw."""

    def __init__(self, target: str):
        import http.server
        import threading
        import urllib.error
        import urllib.request

        relay = self
        self.target, self.seen, self.fail_status, self.hold = target, [], 0, threading.Event()
        self.hold.set()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                relay.seen.append(f"{self.command} {self.path}")
                if self.command == "GET" and "/v1/jobs/" in self.path and self.path.count("/") == 3 \
                        and relay.fail_status > 0:
                    relay.fail_status -= 1
                    self.send_error(502, "relay: the server did not answer")
                    return
                if self.path.endswith("/labels"):
                    relay.hold.wait(60)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                req = urllib.request.Request(relay.target + self.path, data=body, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with opener.open(req, timeout=60) as resp:
                        status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as exc:
                    status, headers, data = exc.code, exc.headers, exc.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory, world):
    """A server of the full environment (its temporary folder known) with the tiny model, and a relay before it."""
    import os
    import secrets
    import subprocess
    import sys

    from conftest import free_port
    from iris_core.service.client import Client, ServerError
    from IrisSegmentLib.remote import Server

    folder = tmp_path_factory.mktemp("served")
    (folder / "tmp").mkdir()
    token = secrets.token_hex(16)
    (folder / "t.txt").write_text(token)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "iris_core.commands.cli", "serve", "--port", str(port),
                             "--token-file", str(folder / "t.txt"), "--models", world[3], "--device", "cpu"],
                            env=dict(os.environ, TMPDIR=str(folder / "tmp")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            Client(url, token, timeout=5).info()
            break
        except ServerError:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
    relay = Relay(url)
    # the job folders the server keeps (its owner file, issue [19]'s sweep of a crashed server's folder, is not a job)
    yield {"relay": relay, "server": Server(relay.url, token), "jobs": lambda: sorted(
        str(q.relative_to(folder)) for q in (folder / "tmp").glob("iris-serve-*/*") if q.name != OWNER_FILE)}
    relay.server.shutdown()
    proc.terminate()
    proc.wait(timeout=30)


def test_item2_a_remote_run_that_fails_after_its_upload_leaves_nothing_on_the_server(world, served):
    """A remote job whose result is never fetched stayed on the server (patient images in its folder): here a
    status poll fails (the network drops once); the run fails in words, and the job is removed from the server."""
    scene, nodes, _, model = world
    served["relay"].fail_status = 1
    outcome = run_to_end(SegmentationLogic(scene).start_segment(request(nodes, model, server=served["server"])))
    assert outcome.status == "failed" and "502" in str(outcome.error), outcome.error
    # the run's thread sent the DELETE before it ended (run_to_end waited for that); the server removes the job's
    # folder once its run has stopped
    assert any(s.startswith("DELETE /v1/jobs/") for s in served["relay"].seen), served["relay"].seen
    wait_for(lambda: served["jobs"]() == [], 30, "the job's folder removed on the server")


def test_item2_a_run_closed_during_the_final_fetch_leaves_no_work_folder(world, served):
    """close() during the final fetch: the client recreated the removed work folder to write the result (patient
    data) into it. Now whatever the fetch wrote after the run was closed is removed again. (Two guards since issue
    [19]'s client: it creates the folder before the download, never after, and the run removes what a fetch wrote
    after close, RemoteProcess._remove_results; this fails when both are gone, not when one is.)"""
    scene, nodes, _, model = world
    relay = served["relay"]
    relay.hold.clear()
    job = SegmentationLogic(scene).start_segment(request(nodes, model, server=served["server"]))
    try:
        wait_for(lambda: any(s.endswith("/labels") for s in relay.seen), 60, "the final fetch")
        job.process.cancel()  # what Job.close does, and its wait ran out: the folder is removed under the fetch
        shutil.rmtree(job.folder)
    finally:
        relay.hold.set()
    # done: the run's thread has ended, after removing what the fetch wrote (nothing runs after it to wait for)
    assert job.process.wait(30) and job.process.cancelled
    assert not job.folder.exists(), sorted(q.name for q in job.folder.iterdir())
    job.close()
