"""Click-to-result on the shipped sample pair (Colin27 -> ICBM 2009a moved, brain), the Slicer logic on a real
slicer-core scene: the segmentation in-process (the floor), a local worker process per click (cold), the warm
local worker (first and second click), and jobs per minute through a server with 1, 2 and 4 concurrent
clients, with the server's peak memory. Prints a Markdown table (issue [14]).

    .venv/bin/python studies/bench_service.py [--model default] [--repeats 3]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the benchmark's server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_pair() -> tuple[Path, list[tuple[Path, Path]]]:
    from iris_core.resources import SAMPLE_DATA

    return SAMPLE_DATA / "ICBM2009a-moved.nrrd", [(SAMPLE_DATA / "Colin27.nrrd", SAMPLE_DATA / "Colin27.seg.nrrd")]


def spread(name: str, seconds: list[float]) -> tuple[str, float, float, float]:
    return name, statistics.median(seconds), min(seconds), max(seconds)


def in_process(model: str, repeats: int) -> tuple[str, float, float, float]:
    """The floor: ``api.segment`` on the sample pair in this process, after a warm-up run."""
    from iris_core.api import resolve_model, segment

    target, refs = sample_pair()
    loaded = resolve_model(model)
    segment(str(target), [tuple(map(str, r)) for r in refs], model=loaded, device="cpu")  # warm-up
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        segment(str(target), [tuple(map(str, r)) for r in refs], model=loaded, device="cpu")
        t.append(time.perf_counter() - t0)
    return spread("in-process segmentation (the floor)", t)


def clicks(model: str, repeats: int) -> list[tuple[str, float, float, float]]:
    """Segment clicks through the Slicer logic on a slicer-core scene: a new worker per click, then the warm one."""
    import slicer  # noqa: F401

    from iris_core.options import SegmentOptions
    from IrisSegmentLib import testing
    from IrisSegmentLib.logic import ReferenceSpec, SegmentationLogic, SegmentRequest
    from IrisSegmentLib.standalone import init_scene

    scene = init_scene()
    nodes = testing.load_sample_pair(scene)
    req = SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                         model=model, options=SegmentOptions(device="cpu"))

    def click(logic) -> float:
        t0 = time.perf_counter()
        node = logic.segment(req)
        dt = time.perf_counter() - t0
        scene.RemoveNode(node)
        return dt

    rows = [spread("Segment click, a new worker process each (cold)",
                   [click(SegmentationLogic(scene)) for _ in range(repeats)])]
    warm_logic = SegmentationLogic(scene, warm=True)
    try:
        first = click(warm_logic)
        later = [click(warm_logic) for _ in range(repeats)]
    finally:
        warm_logic.close()
    return [*rows, spread("Segment click, warm worker: first (starts it)", [first]),
            spread("Segment click, warm worker: later", later)]


def through_a_server(model: str, jobs_each: int = 2) -> tuple[list[tuple[int, int, float, float]], int]:
    """Jobs per minute through one server with 1, 2 and 4 clients at once: (clients, jobs, seconds, jobs per
    minute) rows, and the server's peak memory (its process tree, bytes)."""
    import psutil

    from iris_core.service.client import Client, ServerError

    target, refs = sample_pair()
    folder = Path(tempfile.mkdtemp(prefix="iris-bench-"))
    token = secrets.token_hex(16)
    (folder / "tokens").write_text(token + "\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "iris_core.commands.cli", "serve", "--port", str(port),
                             "--token-file", str(folder / "tokens"), "--models", model, "--device", "cpu",
                             "--max-jobs", "16"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    throughput, peak, stop = [], [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                p = psutil.Process(proc.pid)
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    def one_client():
        c = Client(url, token)
        for _ in range(jobs_each):
            job = c.submit(target, refs, model=model, options={"device": "cpu"})
            c.wait(job)
            c.forget(job)

    try:
        while True:
            try:
                Client(url, token, timeout=5).info()
                break
            except ServerError:
                time.sleep(0.3)
        threading.Thread(target=sample, daemon=True).start()
        for clients in (1, 2, 4):
            t0 = time.perf_counter()
            threads = [threading.Thread(target=one_client) for _ in range(clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            dt = time.perf_counter() - t0
            throughput.append((clients, clients * jobs_each, dt, 60 * clients * jobs_each / dt))
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    return throughput, peak[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    rows = [in_process(args.model, args.repeats), *clicks(args.model, args.repeats)]
    floor = rows[0][1]
    throughput, peak = through_a_server(args.model)
    print(f"# Click to result, sample pair, model {args.model}, median of {args.repeats} (min-max), this machine\n")
    print("| path | seconds | min | max | x floor |")
    print("|---|---|---|---|---|")
    for name, med, lo, hi in rows:
        print(f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} | {med / floor:.2f} |")
    print("\n| clients at once | jobs | seconds | jobs per minute |")
    print("|---|---|---|---|")
    for clients, jobs, dt, per_min in throughput:
        print(f"| {clients} | {jobs} | {dt:.1f} | {per_min:.1f} |")
    print(f"\nserver peak memory (its process tree): {peak / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
