"""The background worker: ``python -m IrisSegmentLib.worker JOB.json`` runs one job and exits;
``python -m IrisSegmentLib.worker --serve --parent PID`` stays alive and runs the jobs its parent writes on its
standard input, one after another, with the model kept loaded (the warm local worker, ``warm.py``).

It prints one protocol line per event on stdout (``IRIS-START {"pid": ..., "protocol": ...}`` first, then
``IRIS-PROGRESS {...}``, ``IRIS-ERROR {...}``, ``IRIS-DONE {...}``, and in serve mode ``IRIS-CANCELLED {...}``;
in serve mode each event names its ``job``). The process id tells the GUI which process is the real worker when
a launcher (PythonSlicer) stands between them. It never touches the MRML scene: the GUI process imports the
result.

Serve mode (no port, no token, no HTTP: the parent's pipes are the only channel). Commands, one JSON object per
line on stdin: ``{"run": ID, "job": JOB.json, "folder": WORK_FOLDER}`` and ``{"cancel": ID}``. The worker
exits, removing every work folder it was handed (they hold exported patient images), when its standard input
closes (the parent closed it, or died: the system closes a dead process's pipes on every platform), when the
parent process is gone (checked every second with psutil: a launcher between them keeps the pipe open), on
SIGTERM, and when no job came for ``--idle`` seconds (the memory of torch and the model goes back to the system;
the next Segment starts a new worker). After each job the freed memory goes back too (``release_freed_memory``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import traceback
from pathlib import Path

PREFIX_START = "IRIS-START "
PREFIX_PROGRESS = "IRIS-PROGRESS "
PREFIX_ERROR = "IRIS-ERROR "
PREFIX_DONE = "IRIS-DONE "
PREFIX_CANCELLED = "IRIS-CANCELLED "
#: version of the protocol above; the Slicer side refuses a worker that speaks another
PROTOCOL = 2
#: seconds without a job after which a serving worker exits (IRIS_SEGMENT_WORKER_IDLE_S overrides)
IDLE_SECONDS = 600.0

_out_lock = threading.Lock()
#: what to do when the parent's end of stdout is gone (it died): end the process (serve mode: clean up first)
on_parent_gone = [lambda why: os._exit(1)]


def emit(prefix: str, payload: dict) -> None:
    """One protocol line on stdout (from any thread: the lines never interleave). A parent that is gone (its end
    of the pipe closed) ends the worker: nobody reads the result."""
    try:
        with _out_lock:
            sys.stdout.write(prefix + json.dumps(payload) + "\n")
            sys.stdout.flush()
    except (OSError, ValueError):  # BrokenPipeError; ValueError: stdout closed
        on_parent_gone[0]("the parent's end of the pipe is closed")


def error_payload(exc: BaseException) -> dict:
    """The IRIS-ERROR payload of an exception: a user error (an IrisError, or input files gone) without a
    traceback, anything else as an internal error with it."""
    from iris_core.errors import IrisError

    if isinstance(exc, FileNotFoundError):  # the work folder was removed under the worker (a temp cleaner)
        what = Path(exc.filename).name if exc.filename else "a work file"
        exc = IrisError(f"the work file {what} is gone (the temporary folder was cleaned while segmenting); "
                        "nothing was imported: run Segment again")
    kind = "user" if isinstance(exc, IrisError) else "internal"
    return {"kind": kind, "type": type(exc).__name__, "message": str(exc),
            "inputs": list(getattr(exc, "inputs", ())),
            "traceback": "" if kind == "user" else traceback.format_exc()}


def pull_job(job: dict, progress) -> dict:
    """Download a known model (``{"action": "pull", "model": "mass-base"}``) with progress lines."""
    from tqdm import tqdm

    from iris_core.hub import download as hub

    class ProgressBar(tqdm):
        """huggingface_hub's progress bar, reported on the protocol instead of a terminal."""

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = sys.stderr
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            progress(f"Downloading {job['model']}", int(self.n), int(self.total or 0))
            return out

    path = hub.pull(job["model"], tqdm_class=ProgressBar)
    m = hub.KNOWN[job["model"]]
    return {"path": str(path), "licence": m.licence, "source": m.source}


class Models:
    """The model a serving worker keeps loaded, for one (model, file, device) at a time. A model file is known by
    its path, size and modification time: a file replaced at the same path is loaded again (never the old
    weights)."""

    def __init__(self):
        self.key: tuple | None = None
        self.loaded = None

    @staticmethod
    def identity(spec: str | None, device: str) -> tuple:
        from iris_core.hub import download as hub
        from iris_core.resources import DEFAULT_MODEL

        spec = spec or "default"
        if spec == "default":
            path: Path | None = DEFAULT_MODEL
        elif spec.startswith("preset:"):
            path = None
        elif spec in hub.KNOWN and not Path(spec).exists():
            path = hub.cached_path(spec)
        else:
            path = Path(spec)
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None  # resolve_model says what is wrong with it
        return (spec, device, str(path), stat and stat.st_size, stat and stat.st_mtime_ns)

    def get(self, spec: str | None, device: str, progress):
        """The loaded model for ``spec`` on ``device``: kept, or loaded (the previous one dropped first, so two
        models never sit in memory together)."""
        key = self.identity(spec, device)
        if key != self.key:
            self.key, self.loaded = None, None
            release_memory()
            from iris_core.api import resolve_model

            progress("Loading the model", 0, 0)
            self.loaded = resolve_model(spec or "default")
            self.key = key
        return self.loaded


def release_memory() -> None:
    """Hand the memory a finished job freed back to the system (a serving worker stays alive between clicks)."""
    import gc

    gc.collect()
    try:
        from iris_core.pipeline.device import release_freed_memory
    except ImportError:
        return
    release_freed_memory()


def run_job(job: dict, progress=None, cancel=None, models: Models | None = None) -> dict:
    """Execute a job: a segmentation ``{"inputs": {...}, "options": {...}}`` (written by
    ``logic.SegmentationLogic.prepare``; options as ``SegmentOptions.to_dict``), or a model download
    ``{"action": "pull", "model": ...}``; returns the sidecar. ``progress(stage, done, total)`` reports,
    ``cancel()`` true stops the run (iris_core's CancelledError), ``models`` keeps the model loaded."""
    progress = progress or (lambda stage, done, total: emit(PREFIX_PROGRESS, {"stage": stage, "done": done,
                                                                               "total": total}))
    if job.get("action") == "pull":
        return pull_job(job, progress)
    from iris_core.api import segment
    from iris_core.io.results import write_result
    from iris_core.options import SegmentOptions
    from iris_core.types import ClassSpec

    inputs = job.get("inputs") or {}
    if not inputs.get("target") or not inputs.get("output"):
        from iris_core.errors import InputError

        raise InputError("worker job: no target volume or output file in 'inputs' (the job file was written by "
                         "another version of IrisSegment, or is damaged); run Segment again")
    options = SegmentOptions.from_dict(job.get("options"))
    model = inputs.get("model") or "default"
    if models is not None:
        model = models.get(model, options.device, progress)
    classes = [ClassSpec(c["name"], int(c["value"])) for c in inputs["classes"]] if inputs.get("classes") else None
    result = segment(inputs["target"], references=[tuple(r) for r in inputs.get("references", [])] or None,
                     classes=classes, model=model, library=inputs.get("library"),
                     structures=inputs.get("structures"), options=options, progress=progress, cancel=cancel)
    write_result(result, inputs["output"])
    if inputs.get("output_layers") and result.layers:  # classes that overlap: one label map per group
        from iris_core.io.imaging import write_image_atomic

        for k, layer in enumerate(result.layers):
            write_image_atomic(layer, inputs["output_layers"].format(k))
    return result.sidecar


class Server:
    """The serve mode's state: the job queue, the current job's cancel flag, the folders handed over."""

    def __init__(self, parent: int | None, idle: float):
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled: set = set()
        self.current = None  # (job id, threading.Event) of the job running now
        self.folders: set[str] = set()
        self.lock = threading.Lock()
        self.parent, self.idle = parent, idle
        self.models = Models()

    def shutdown(self, why: str) -> None:
        """Remove every work folder handed over, then end the process at once (from any thread: the main thread
        may be deep in a window of the network)."""
        try:
            self.lock.acquire(timeout=1.0)  # held only for a moment by the others; never wait on a stuck one
            for folder in list(self.folders):
                shutil.rmtree(folder, ignore_errors=True)
            sys.stderr.write(f"IrisSegment worker: exiting ({why})\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001  (stderr's reader may be dead too: exit all the same)
            pass
        finally:
            os._exit(0)

    def read_commands(self) -> None:
        """Commands from stdin until it closes; then shut down (the parent closed it or died)."""
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if "run" in cmd:
                with self.lock:
                    self.folders.add(str(cmd.get("folder") or ""))
                    self.folders.discard("")
                self.jobs.put(cmd)
            elif "cancel" in cmd:
                job_id = cmd["cancel"]
                with self.lock:
                    current = self.current
                    if current is not None and current[0] == job_id:
                        current[1].set()
                    else:
                        self.cancelled.add(job_id)
        self.shutdown("the parent closed the pipe")

    def watch_parent(self) -> None:
        """Shut down once the parent process is gone (psutil: portable; the pipe alone is not enough when a
        launcher between them keeps it open)."""
        import time

        try:
            import psutil

            parent = psutil.Process(self.parent)
            born = parent.create_time()
        except Exception:  # noqa: BLE001  (psutil missing, or the parent already gone)
            born = None
        while True:
            time.sleep(1.0)
            try:
                alive = born is not None and psutil.Process(self.parent).create_time() == born
            except Exception:  # noqa: BLE001  (NoSuchProcess, AccessDenied)
                alive = False
            if born is not None and not alive:
                self.shutdown(f"the parent process {self.parent} is gone")

    def serve(self) -> int:
        while True:
            try:
                cmd = self.jobs.get(timeout=self.idle)
            except queue.Empty:
                # nothing runs: the folders handed over belong to finished jobs the parent still imports
                sys.stderr.write(f"IrisSegment worker: idle for {self.idle:.0f} s, exiting\n")
                return 0
            job_id, event = cmd["run"], threading.Event()
            with self.lock:
                if job_id in self.cancelled:
                    self.cancelled.discard(job_id)
                    emit(PREFIX_CANCELLED, {"job": job_id})
                    continue
                self.current = (job_id, event)

            def progress(stage: str, done: int, total: int, job_id=job_id) -> None:
                emit(PREFIX_PROGRESS, {"job": job_id, "stage": stage, "done": done, "total": total})

            try:
                job = json.loads(Path(cmd["job"]).read_text())
                sidecar = run_job(job, progress, event.is_set, self.models)
            except Exception as exc:  # every failure is reported; the worker serves on
                from iris_core.errors import CancelledError

                if isinstance(exc, CancelledError) or event.is_set():
                    emit(PREFIX_CANCELLED, {"job": job_id})
                else:
                    emit(PREFIX_ERROR, {"job": job_id, **error_payload(exc)})
            else:
                emit(PREFIX_DONE, {"job": job_id, "sidecar": sidecar})
            finally:
                with self.lock:
                    self.current = None
                release_memory()


def serve(parent: int | None, idle: float) -> int:
    """The serve mode (see the module docstring)."""
    import signal

    server = Server(parent, idle)
    on_parent_gone[0] = server.shutdown
    if hasattr(signal, "SIGTERM"):  # a POSIX termination request (logout, a process manager)
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown("SIGTERM"))
    threading.Thread(target=server.read_commands, name="iris-worker-commands", daemon=True).start()
    if parent is not None:
        threading.Thread(target=server.watch_parent, name="iris-worker-parent", daemon=True).start()
    try:
        from iris_core.pipeline.device import retain_freed_memory

        retain_freed_memory()  # window after window reuses freed memory; release_memory gives it back per job
        import iris_core.api  # noqa: F401  (torch and the pipeline loaded before the first job arrives)
    except Exception:  # noqa: BLE001  (reported with the first job, which imports it again)
        pass
    return server.serve()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        import argparse

        ap = argparse.ArgumentParser(prog="python -m IrisSegmentLib.worker --serve")
        ap.add_argument("--serve", action="store_true")
        ap.add_argument("--parent", type=int, default=None)
        ap.add_argument("--idle", type=float,
                        default=float(os.environ.get("IRIS_SEGMENT_WORKER_IDLE_S") or IDLE_SECONDS))
        args = ap.parse_args(argv)
        emit(PREFIX_START, {"pid": os.getpid(), "protocol": PROTOCOL})
        return serve(args.parent, args.idle)
    if len(argv) != 1:
        print("usage: python -m IrisSegmentLib.worker JOB.json | --serve [--parent PID] [--idle S]", file=sys.stderr)
        return 2
    emit(PREFIX_START, {"pid": os.getpid(), "protocol": PROTOCOL})
    try:
        from iris_core.pipeline.device import retain_freed_memory

        retain_freed_memory()  # the worker is a process of its own: reuse freed memory window after window
        job = json.loads(Path(argv[0]).read_text())
        sidecar = run_job(job)
    except Exception as exc:  # every failure is reported on the protocol, then a non-zero exit
        emit(PREFIX_ERROR, error_payload(exc))
        return getattr(exc, "exit_code", 1)
    emit(PREFIX_DONE, {"sidecar": sidecar})
    return 0


if __name__ == "__main__":
    sys.exit(main())
