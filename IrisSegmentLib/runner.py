"""Run the worker in a separate process: progress lines back, Cancel kills it, a crash or an
out-of-memory kill becomes a clear message instead of taking the caller down.

``WorkerProcess`` is non-blocking (``poll()`` from a GUI timer, until ``done``); ``run_worker``
blocks (tests, Python console).

Portability: inside Slicer the worker is started through the ``PythonSlicer`` launcher, which
starts the real Python as its child. Cancel therefore kills the whole process tree with psutil
(as MONAIAuto3DSegLib/process.py does), and the worker announces its own process id so that its
death can be told from the launcher's exit code (the launcher turns a killed child into exit
code 1). On Windows the console window is hidden (as slicer.util.launchConsoleProcess does).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from iris_core.resources import ROOT

from .worker import PREFIX_CANCELLED, PREFIX_DONE, PREFIX_ERROR, PREFIX_PROGRESS, PREFIX_START

REPO_ROOT = ROOT
STDERR_TAIL = 15  # lines of the worker's stderr kept for the error details
SIGKILL = 9  # the number, not signal.SIGKILL: that name does not exist on Windows


class WorkerError(Exception):
    """The worker failed; ``message`` is fit for the user."""

    def __init__(self, message: str, details: str = "", inputs: tuple[str, ...] = ()):
        super().__init__(message)
        self.details = details
        self.inputs = tuple(inputs)  # the library's input names the error concerns (iris_core IrisError.inputs)


class WorkerCancelled(Exception):
    """The user cancelled the run."""


@dataclass
class WorkerEvent:
    kind: str  # "start", "progress", "log", "error", "done", "cancelled"
    data: dict = field(default_factory=dict)
    job: int | None = None  # the job it concerns (the warm worker runs several, one after another)


def python_executable() -> str:
    """The Python to run the worker with: Slicer's launcher inside Slicer, else this interpreter."""
    try:
        import slicer  # noqa: F401

        app = getattr(slicer, "app", None)
        if app is not None:
            import shutil

            names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
            for name in names:
                for cand in (shutil.which(name), os.path.join(app.slicerHome, "bin", name)):
                    if cand and os.path.exists(cand):
                        return cand
    except ImportError:
        pass
    return sys.executable


def popen_options() -> dict:
    """Platform options for the worker's Popen: a hidden console window on Windows (the
    STARTUPINFO of slicer.util.launchConsoleProcess), a new session elsewhere (so a terminal's
    Ctrl+C does not reach the worker)."""
    if os.name == "nt":
        info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]  # Windows only
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
        info.wShowWindow = 0  # SW_HIDE
        return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}  # type: ignore[attr-defined]
    return {"start_new_session": True}


def parse_line(line: str) -> WorkerEvent:
    """One protocol line -> an event. Anything malformed is a log line: parsing never raises."""
    for prefix, kind in ((PREFIX_START, "start"), (PREFIX_PROGRESS, "progress"), (PREFIX_ERROR, "error"),
                         (PREFIX_DONE, "done"), (PREFIX_CANCELLED, "cancelled")):
        if line.startswith(prefix):
            try:
                data = json.loads(line[len(prefix):])
                if not isinstance(data, dict):
                    raise ValueError("not an object")
                job = int(data.pop("job")) if data.get("job") is not None else None
                if kind == "progress":
                    data = {"stage": str(data.get("stage", "")), "done": int(data.get("done", 0)),
                            "total": int(data.get("total", 0))}
                elif kind == "start":
                    data = {"pid": int(data["pid"]), "protocol": int(data.get("protocol") or 1)}
                return WorkerEvent(kind, data, job)
            except (ValueError, TypeError, KeyError):
                return WorkerEvent("log", {"line": f"(unreadable worker message) {line}"})
    return WorkerEvent("log", {"line": line})


def kill_tree(pid: int) -> None:
    """Kill a process and all its descendants (the launcher and the real Python behind it)."""
    import psutil  # imported when used: Slicer does not ship it (Resources/requirements.txt)

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=5)


def worker_environment(env: dict | None = None) -> dict:
    """The environment of a process of ours (worker, warm worker): this one's, with the extension's folder first
    on PYTHONPATH (iris_core and IrisSegmentLib importable) and UTF-8 output; ``env`` on top."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else []))
    environment["PYTHONIOENCODING"] = "utf-8"
    environment.update(env or {})
    return environment


class WorkerProcess:
    """A running worker. Call ``poll()`` regularly; it returns new events and never blocks. Once
    ``done`` is true, exactly one of ``result``, ``error`` or ``cancelled`` is set."""

    def __init__(self, job_file: Path, python: str | None = None, env: dict | None = None):
        environment = worker_environment(env)
        try:
            self.proc = subprocess.Popen(
                [python or python_executable(), "-u", "-m", "IrisSegmentLib.worker", str(job_file)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=environment,
                **popen_options(),
            )
        except OSError as exc:
            raise WorkerError(f"cannot start the segmentation process with {python or python_executable()}: "
                              f"{exc}") from None
        self.job_file = Path(job_file)
        self._events: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self.cancelled = False
        self.result: dict | None = None
        self.error: WorkerError | None = None
        self.worker_pid: int | None = None  # the real Python (behind a launcher, not self.proc)
        self.peak_rss = 0  # bytes, sampled at each poll
        self._finished = False
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, protocol: bool) -> None:
        """Read one pipe to its end. Bytes are decoded with replacement and every line is parsed
        defensively, so this thread never dies and the worker never blocks on a full pipe."""
        for raw in iter(stream.readline, b""):
            try:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if protocol:
                    self._events.put(parse_line(line))
                else:
                    self._stderr.append(line)
                    del self._stderr[:-STDERR_TAIL]
                    self._events.put(WorkerEvent("log", {"line": line}))
            except Exception as exc:  # never let the reader die: the pipe must keep draining
                self._events.put(WorkerEvent("log", {"line": f"(unreadable worker output: {exc})"}))
        stream.close()

    def cancel(self) -> None:
        """Kill the worker and everything it started (the launcher's child included)."""
        import psutil

        self.cancelled = True
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        if self.worker_pid is not None and psutil.pid_exists(self.worker_pid):
            kill_tree(self.worker_pid)

    def wait(self, timeout: float = 15.0) -> bool:
        """Poll until ``done`` (after ``cancel``: the tree is killed, its pipes read); False on timeout."""
        end = time.monotonic() + timeout
        while not self.done and time.monotonic() < end:
            self.poll()
            time.sleep(0.02)
        return self.done

    @property
    def done(self) -> bool:
        """The process has exited, its output is read to the end and its outcome is known."""
        return self._finished

    @property
    def running(self) -> bool:
        return not self._finished

    def _sample_memory(self) -> None:
        import psutil

        pid = self.worker_pid or self.proc.pid
        try:
            self.peak_rss = max(self.peak_rss, psutil.Process(pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass

    def poll(self) -> list[WorkerEvent]:
        """New events since the last call; once the process has ended and its pipes are read to the
        end, sets ``done`` and ``result`` or ``error``."""
        exited = self.proc.poll() is not None
        if exited:  # output still in the pipes is read before the outcome is decided
            for t in self._readers:
                t.join(timeout=5)
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for e in events:
            if e.kind == "start":
                self.worker_pid = e.data["pid"]
            elif e.kind == "done":
                self.result = e.data
            elif e.kind == "error":
                self.error = error_from(e.data)
        if not exited:
            self._sample_memory()
            return events
        if not self._finished and not any(t.is_alive() for t in self._readers):
            self._finished = True
            if self.cancelled:
                self.result = self.error = None
            elif self.result is None and self.error is None:
                self.error = self._unreported_exit(self.proc.returncode)
        return events

    def _unreported_exit(self, code: int) -> WorkerError:
        return unreported_exit(code, self.worker_pid, self.peak_rss, self._stderr)


def error_from(data: dict) -> WorkerError:
    """The WorkerError of an IRIS-ERROR payload."""
    return WorkerError(str(data.get("message", "the worker failed")), str(data.get("traceback", "")),
                       tuple(str(i) for i in data.get("inputs") or ()))


def unreported_exit(code: int, worker_pid: int | None, peak_rss: int, stderr: list[str]) -> WorkerError:
    """The error of a worker that ended without reporting one: it reports every Python error itself, so it was
    killed or crashed. Behind a launcher the exit code is 1 whatever happened, so the real process id the
    worker announced tells whether it ever ran."""
    import psutil

    tail = "\n".join(stderr[-STDERR_TAIL:])
    used = f" (it used {peak_rss / 2**30:.1f} GiB; {psutil.virtual_memory().available / 2**30:.1f} GiB " \
        "are free now)" if peak_rss else ""
    if worker_pid is None:
        return WorkerError(f"the segmentation process could not start (exit code {code}); see the details", tail)
    if code is not None and code < 0 and -code != SIGKILL:
        return WorkerError(f"the segmentation process crashed (signal {-code})", tail)
    return WorkerError("the segmentation process was killed (most likely out of memory)" + used
                       + "; try the CPU, a smaller model or a cropped target", tail)


def deliver(events: list[WorkerEvent], progress: Callable[[str, int, int], None] | None = None,
            log_line: Callable[[str], None] | None = None) -> None:
    """A poll's events to the caller's callbacks: progress (stage, done, total) and log lines."""
    for e in events:
        if e.kind == "progress" and progress:
            progress(e.data["stage"], e.data["done"], e.data["total"])
        elif e.kind == "log" and log_line:
            log_line(e.data["line"])


def run_worker(job_file: Path, progress: Callable[[str, int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None, python: str | None = None,
               log: Callable[[str], None] | None = None, interval: float = 0.1) -> dict:
    """Run the worker to completion; returns the sidecar dict, raises WorkerError/WorkerCancelled."""
    proc = WorkerProcess(job_file, python)
    while True:
        deliver(proc.poll(), progress, log)
        if cancel and not proc.cancelled and not proc.done and cancel():
            proc.cancel()
        if proc.done:
            if proc.cancelled:
                raise WorkerCancelled("cancelled by the user")
            if proc.error is not None:
                raise proc.error
            return proc.result["sidecar"]
        time.sleep(interval)
