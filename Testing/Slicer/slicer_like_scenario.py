"""What a clinician's clicks run, in the Slicer-like environment (scripts/slicer_like_env.sh): run with that
environment's Python, the module's folder on PYTHONPATH (as Slicer puts an additional module path on sys.path),
by Testing/Python/test_slicer_like_env.py. Prints one line ``STEP {json}`` per step; never raises (a failed step
is reported and the next one runs).

    python slicer_like_scenario.py bare
    python slicer_like_scenario.py installed CONFIG.json   (CONFIG: tiny models, the server's address and token)

It uses only what that environment holds: the standard library, Slicer's packages (slicer-core standing in for
MRML) and, in ``installed``, what the module installed. No pytest (Slicer ships none).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

#: the module's folder: wherever IrisSegmentLib is imported from (PYTHONPATH, as Slicer's module path)
ROOT = Path(importlib.util.find_spec("IrisSegmentLib").origin).parents[1]


def report(step: str, **data) -> None:
    print("STEP " + json.dumps({"step": step, **data}, default=str), flush=True)


def step(fn):
    """Run one step; its dict (or its failure) is reported."""
    def run(*args):
        t0 = time.perf_counter()
        try:
            data = fn(*args) or {}
            report(fn.__name__, ok=True, seconds=time.perf_counter() - t0, **data)
        except BaseException as exc:  # noqa: BLE001  (reported: the test says which step failed and why)
            report(fn.__name__, ok=False, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}",
                   details=getattr(exc, "details", ""), traceback=traceback.format_exc())
    return run


def module_imports() -> list[str]:
    """The IrisSegmentLib modules IrisSegment.py imports (the widget needs Qt; what it imports must not)."""
    tree = ast.parse((ROOT / "IrisSegment.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("IrisSegmentLib"):
            if node.module == "IrisSegmentLib":
                out |= {f"IrisSegmentLib.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return sorted(out)


def widget_logic(scene):
    """The logic exactly as the widget builds it (IrisSegment.py's IrisSegmentLogic: ``module_logic``'s settings, plus
    Slicer's parameter-node helpers that need the application); on code from before ``module_logic`` existed, as that
    code's widget built it (its Qt-free class was then named IrisSegmentLogic too)."""
    try:
        from IrisSegmentLib.logic import module_logic
    except ImportError:
        from IrisSegmentLib.logic import IrisSegmentLogic
        from IrisSegmentLib.runner import python_executable

        return IrisSegmentLogic(scene, python=python_executable(), warm=True)
    return module_logic(scene)


def scene_with_sample_pair():
    """A scene with the shipped pair loaded, and the module's parameter node with the widget's first choices."""
    from IrisSegmentLib import parameters as p
    from IrisSegmentLib import testing
    from IrisSegmentLib.standalone import init_scene

    scene = init_scene()
    nodes = testing.load_sample_pair(scene)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    p.set_defaults(node)
    p.fill_first_choices(scene, node)
    return scene, nodes, node


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


# -- bare: Slicer as installed, before the module installed anything -------------------------------------------
@step
def bare_module_loads():
    """Everything the widget imports and does before Segment, with only what Slicer ships."""
    for name in ("torch", "psutil", "monai", "safetensors", "huggingface_hub", "fastapi"):
        if importlib.util.find_spec(name) is not None:
            raise AssertionError(f"{name} is importable: this is not a bare Slicer")
    imported = [importlib.import_module(m).__name__ for m in module_imports()]
    from IrisSegmentLib import choices as c
    from IrisSegmentLib import parameters as p
    from IrisSegmentLib.dependencies import missing_packages, requirement_lines
    from IrisSegmentLib.models import model_choices

    scene, nodes, node = scene_with_sample_pair()
    logic = widget_logic(scene)
    lists = {name: c.choices(table) for name, (table, _) in c.COMBO_CONTROLS.items()}
    models = [m.key for m in model_choices()]
    known = p.known_structure_list(p.model_choice(node), "", "")
    enabled = c.enabled_controls(node, False, False)
    req = p.request_from_parameters(scene, node)
    logic.close()
    return {"imported": imported, "missing": missing_packages(), "requirements": requirement_lines(),
            "models": models, "lists": {k: len(v) for k, v in lists.items()}, "known": known[0],
            "segment_enabled": enabled["segmentButton"], "target": req.target.GetName(),
            "references": len(req.references)}


# -- installed: the module's packages installed ----------------------------------------------------------------
class ProxyRecorder:
    """A listening socket named as every proxy of the environment: it counts who connects (no one should)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()
        url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            os.environ[name] = url
        for name in ("no_proxy", "NO_PROXY"):
            os.environ.pop(name, None)

    def _accept(self):
        while True:
            conn, _ = self.sock.accept()
            self.connections += 1
            conn.close()


def network_of(pid: int | None) -> dict:
    """The inet sockets a process (and its children) holds, and whether any listens."""
    import psutil

    if pid is None or not psutil.pid_exists(pid):
        return {"sockets": 0, "listening": 0}
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    conns = [c for p in procs for c in p.net_connections(kind="inet")]
    return {"sockets": len(conns), "listening": sum(c.status == psutil.CONN_LISTEN for c in conns)}


def worker_pid(logic) -> int | None:
    warm = getattr(logic, "warm", None)
    return getattr(warm, "worker_pid", None) or getattr(getattr(warm, "proc", None), "pid", None)


class Clicks:
    """The scene, the parameter node and the widget's logic, shared by the steps (as one Slicer session)."""

    def __init__(self, config: dict):
        self.config = config
        self.proxy = ProxyRecorder()
        self.scene, self.nodes, self.node = scene_with_sample_pair()
        self.logic = widget_logic(self.scene)
        self.floor = None

    def request(self):
        from IrisSegmentLib import parameters as p

        return p.request_from_parameters(self.scene, self.node)

    def click(self) -> dict:
        """Segment as the widget runs it (the Job, polled), the result checked and then removed."""
        from IrisSegmentLib import testing

        stages = []
        t0 = time.perf_counter()
        node = self.logic.segment(self.request(), progress=lambda s, d, n: stages.append(s))
        seconds = time.perf_counter() - t0
        testing.check_result(node, self.nodes["target"], self.nodes["reference_seg"])
        dice = self.logic.compare(node, self.nodes["manual"], self.nodes["target"])[0]["dice"]
        sidecar = json.loads(node.GetAttribute("IrisSegment.Sidecar") or "{}")
        self.scene.RemoveNode(node)
        return {"click_s": seconds, "dice": dice, "model": (sidecar.get("model") or {}).get("name"),
                "segment_s": (sidecar.get("timings_s") or {}).get("total"), "stages": list(dict.fromkeys(stages)),
                "worker": worker_pid(self.logic), "network": network_of(worker_pid(self.logic)),
                "proxy_connections": self.proxy.connections}

    def cancelled_run(self, when: str) -> dict:
        """Start Segment and cancel it ``when`` ('start': at once, the worker not started; 'run': once it
        segments); the time from Cancel to the end, and what the scene and the disk kept."""
        from IrisSegmentLib.jobs import run_to_end

        before = node_ids(self.scene)
        job = self.logic.start_segment(self.request())
        folder = job.folder
        t_cancel: list = [None]
        seen: list[str] = []

        def cancel() -> bool:
            if t_cancel[0] is None and (when == "start" or any(x.startswith("Segmenting") for x in seen)):
                t_cancel[0] = time.perf_counter()
            return t_cancel[0] is not None

        outcome = run_to_end(job, progress=lambda s, d, n: seen.append(s), cancel=cancel, interval=0.02)
        return {"status": outcome.status, "cancel_to_end_s": time.perf_counter() - t_cancel[0] if t_cancel[0] else None,
                "stages": list(dict.fromkeys(seen)), "scene_unchanged": node_ids(self.scene) == before,
                "folder_left": folder is not None and Path(folder).exists()}


@step
def first_click(s: Clicks):
    return s.click()


@step
def second_click(s: Clicks):
    return s.click()


@step
def in_process(s: Clicks):
    """The floor: the same segmentation in this process, the model loaded once (what the warm worker keeps)."""
    from iris_core.api import resolve_model, segment
    from iris_core.resources import SAMPLE_DATA

    model = resolve_model("default")
    args = (str(SAMPLE_DATA / "ICBM2009a-moved.nrrd"), [(str(SAMPLE_DATA / "Colin27.nrrd"),
                                                         str(SAMPLE_DATA / "Colin27.seg.nrrd"))])
    times = []
    for _ in range(int(s.config.get("repeats", 1))):
        t0 = time.perf_counter()
        segment(*args, model=model)
        times.append(time.perf_counter() - t0)
    return {"in_process_s": min(times), "times": times}


@step
def cancel_during_run(s: Clicks):
    return s.cancelled_run("run")


@step
def cancel_during_start(s: Clicks):
    s.logic.close()  # the worker stopped (as after the module closed): the next run starts one
    return s.cancelled_run("start")


@step
def model_change(s: Clicks):
    """Model file A, then B copied over A at the same path: the second run must use B's weights."""
    import shutil

    path = Path(s.config["model_path"])
    shutil.copyfile(s.config["model_a"], path)
    s.node.SetParameter("ModelChoice", "file")
    s.node.SetParameter("ModelPath", str(path))
    first = s.click()
    time.sleep(0.05)  # a new modification time even on coarse file systems
    shutil.copyfile(s.config["model_b"], path)
    second = s.click()
    return {"first_model": first["model"], "second_model": second["model"], "workers": [first["worker"],
                                                                                        second["worker"]]}


@step
def remote_run(s: Clicks):
    """Run on server: a server started from the project's full environment; the same parameter node fields."""
    s.node.SetParameter("ModelChoice", "file")
    s.node.SetParameter("ModelPath", s.config["server_model"])
    s.node.SetParameter("ServerURL", s.config["server_url"])
    s.node.SetParameter("ServerTokenFile", s.config["server_token_file"])
    # the proxies of the environment stay set: the client (issue [19]) must keep the loopback call and its
    # token away from them, which the step's proxy_connections count shows
    try:
        return s.click()
    finally:
        s.node.SetParameter("ServerURL", "")


@step
def closed(s: Clicks):
    """The module closes: the worker exits and no work folder is left in the temporary folder."""
    pid = worker_pid(s.logic)
    s.logic.close()
    import psutil

    time.sleep(0.5)
    alive = pid is not None and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    left = sorted(p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("iris"))
    return {"worker_alive": alive, "left_in_temp": left}


def hold(model: str) -> int:
    """Start Segment with ``model`` and hold the run once the worker segments: prints ``HOLD {"worker": pid,
    "folder": work folder}`` and waits to be killed (the kill -9 and SIGTERM tests)."""
    from IrisSegmentLib import parameters as p

    scene, nodes, node = scene_with_sample_pair()
    node.SetParameter("ModelChoice", "file" if model not in ("default", "") else "default")
    node.SetParameter("ModelPath", "" if model == "default" else model)
    logic = widget_logic(scene)
    job = logic.start_segment(p.request_from_parameters(scene, node))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        events = job.poll()
        if any(e.kind == "progress" and e.data["stage"].startswith(("Encoding", "Segmenting")) for e in events):
            print("HOLD " + json.dumps({"worker": worker_pid(logic), "folder": str(job.folder)}), flush=True)
            time.sleep(600)
        if job.done:
            print("ENDED " + json.dumps({"status": job.finish().status}), flush=True)
            return 1
        time.sleep(0.05)
    return 1


def main(argv: list[str]) -> int:
    if argv[0] == "bare":
        bare_module_loads()
        return 0
    if argv[0] == "hold":
        return hold(argv[1])
    config = json.loads(Path(argv[1]).read_text())
    try:
        s = Clicks(config)
    except BaseException as exc:  # noqa: BLE001
        report("setup", ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return 1
    for name in config.get("steps") or ["first_click", "second_click", "in_process", "cancel_during_run",
                                        "cancel_during_start", "model_change", "remote_run", "closed"]:
        globals()[name](s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
