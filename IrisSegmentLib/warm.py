"""The warm local worker, seen from Slicer: one long-lived worker process (``python -m IrisSegmentLib.worker
--serve``, see worker.py) that runs the module's segmentations one after another with its model kept loaded, so
a later Segment click pays only the segmentation, not starting Python, importing torch and loading the model.

It is spoken to over its own pipes: the job's file and work folder go in on its standard input, progress and
the outcome come back on its standard output. No port, no token, no proxy, no upload limit and no web stack in
Slicer's Python. Started on the first Segment (without waiting: the run shows "Starting" until the worker
reports), it exits when Slicer closes its pipe (the module closing, Slicer quitting or dying), when Slicer's
process is gone, or after an idle time; it removes its work folders on each of these exits.

``WarmRun`` has the interface of ``runner.WorkerProcess`` (``poll``, ``cancel``, ``wait``, ``done``, ``result``,
``error``, ``cancelled``), so the Job, the widget and ``logic.segment`` run it unchanged. Cancel is answered at
once for a job still waiting (the worker starting, or a run before it); a running job stops at the network's
next window; a worker that has not answered a cancel within ``CANCEL_GRACE`` seconds is killed (the next
Segment starts a new one).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

from .runner import (
    STDERR_TAIL,
    WorkerError,
    WorkerEvent,
    error_from,
    kill_tree,
    parse_line,
    popen_options,
    python_executable,
    unreported_exit,
    worker_environment,
)
from .worker import PROTOCOL

#: seconds a worker may take to answer Cancel (it stops between windows) before it is killed
CANCEL_GRACE = 5.0
STARTING = "Starting the worker (PyTorch and the model load once; later runs reuse them)"


class WarmRun:
    """One job of the warm worker (the interface of ``runner.WorkerProcess``)."""

    def __init__(self, worker: LocalWorker, job_id: int, job_file: Path, folder: Path | None):
        self.worker, self.id, self.job_file, self.folder = worker, job_id, Path(job_file), folder
        self._events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.result: dict | None = None
        self.error: WorkerError | None = None
        self.peak_rss = 0
        self.answered = False  # the worker has said something about this job
        self.proc: subprocess.Popen | None = None  # the worker process it was handed to
        self._cancel_at: float | None = None
        self._finished = False

    @property
    def worker_pid(self) -> int | None:
        return self.worker.worker_pid

    @property
    def done(self) -> bool:
        return self._finished

    @property
    def running(self) -> bool:
        return not self._finished

    def put(self, event: WorkerEvent) -> None:
        self._events.put(event)

    def poll(self) -> list[WorkerEvent]:
        """New progress and log events; once the worker answered (or died, or ignored a cancel past the grace
        time) sets ``done`` with ``result``, ``error`` or ``cancelled``."""
        out = []
        while not self._finished:
            try:
                e = self._events.get_nowait()
            except queue.Empty:
                break
            if e.kind in ("progress", "log"):
                out.append(e)
            elif e.kind == "done":
                self._finish(result=e.data)
            elif e.kind == "error":
                self._finish(error=error_from(e.data))
            elif e.kind == "cancelled":
                self._finish(cancelled=True)
            elif e.kind == "exit":  # the worker ended without answering
                if self._cancel_at is not None:
                    self._finish(cancelled=True)
                elif e.data.get("error") is not None:
                    self._finish(error=e.data["error"])
                else:
                    self._finish(error=unreported_exit(e.data.get("code"), self.worker_pid, self.peak_rss,
                                                       self.worker.stderr_tail()))
        if not self._finished:
            if self._cancel_at is not None and time.monotonic() - self._cancel_at > CANCEL_GRACE:
                self.worker.kill()  # it did not stop between windows in time
                self._finish(cancelled=True)
            else:
                self.peak_rss = max(self.peak_rss, self.worker.rss())
        return out

    def _finish(self, result=None, error=None, cancelled=False) -> None:
        self._finished = True
        self.cancelled = cancelled or self._cancel_at is not None  # after Cancel, nothing is imported
        self.result, self.error = (None, None) if self.cancelled else (result, error)
        self.worker.forget(self)

    def cancel(self) -> None:
        """Ask the worker to stop this job (answered at once for a job still waiting)."""
        if self._finished or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        self.worker.send({"cancel": self.id})
        if not self.answered:  # still waiting (the worker starting, or a run before it): it will skip the job
            self._finish(cancelled=True)

    def wait(self, timeout: float = 15.0) -> bool:
        end = time.monotonic() + timeout
        while not self.done and time.monotonic() < end:
            self.poll()
            time.sleep(0.02)
        return self.done


class LocalWorker:
    """The long-lived worker process on this computer (started when a job comes and none runs)."""

    def __init__(self, python: str | None = None, idle: float | None = None, env: dict | None = None):
        """``python``: the interpreter (Slicer's PythonSlicer launcher; default as ``runner.python_executable``);
        ``idle``: seconds without a job before the worker exits (default: the worker's)."""
        self.python, self.idle, self.env = python, idle, env
        self.proc: subprocess.Popen | None = None
        self.worker_pid: int | None = None
        self._runs: dict[int, WarmRun] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._closing = False
        self._stderr: list[str] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def submit(self, job_file: Path, folder: Path | None = None) -> WarmRun:
        """Hand a prepared run's job to the worker (started first when none runs); returns at once."""
        with self._lock:
            self._next += 1
            run = WarmRun(self, self._next, job_file, folder)
            self._runs[run.id] = run
        self._hand(run)
        return run

    def _hand(self, run: WarmRun) -> None:
        with self._start_lock:
            self._closing = False
            if not self.running:
                self._start()
                run.put(WorkerEvent("progress", {"stage": STARTING, "done": 0, "total": 0}))
            run.proc = self.proc
        self.send({"run": run.id, "job": str(run.job_file), "folder": str(run.folder or "")})

    def _start(self) -> None:
        python = self.python or python_executable()
        args = [python, "-u", "-m", "IrisSegmentLib.worker", "--serve", "--parent", str(os.getpid())]
        if self.idle is not None:
            args += ["--idle", str(self.idle)]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=worker_environment(self.env), **popen_options())
        except OSError as exc:
            raise WorkerError(f"cannot start the segmentation process with {python}: {exc}") from None
        self.proc, self.worker_pid, self._stderr = proc, None, []
        threading.Thread(target=self._read_protocol, args=(proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc,), daemon=True).start()

    def send(self, command: dict) -> None:
        """One command on the worker's stdin; a worker that is gone is told by its reader (exit events)."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            return
        try:
            with self._lock:
                proc.stdin.write((json.dumps(command) + "\n").encode())
                proc.stdin.flush()
        except (OSError, ValueError):  # BrokenPipe: it died; ValueError: closed
            pass

    def _active(self) -> WarmRun | None:
        with self._lock:
            return min(self._runs.values(), key=lambda r: r.id, default=None)

    def _read_protocol(self, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stdout.readline, b""):
            try:
                e = parse_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
            except Exception as exc:  # noqa: BLE001  (never let the reader die: the pipe must keep draining)
                e = WorkerEvent("log", {"line": f"(unreadable worker output: {exc})"})
            if e.kind == "start":
                self.worker_pid = e.data["pid"]
                if e.data["protocol"] != PROTOCOL:
                    self._refuse(proc, e.data["protocol"])
                continue
            with self._lock:
                run = self._runs.get(e.job) if e.job is not None else None
            run = run or (self._active() if e.kind == "log" else None)
            if run is not None:
                run.answered = run.answered or e.kind != "log"
                run.put(e)
        proc.stdout.close()
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        with self._lock:
            left = [r for r in self._runs.values() if r.proc is proc]
        for run in left:
            if code == 0 and not run.answered and not self._closing:  # it had just gone idle: hand it again
                self._hand(run)
            else:
                run.put(WorkerEvent("exit", {"code": code}))

    def _refuse(self, proc: subprocess.Popen, protocol: int) -> None:
        error = WorkerError(f"the segmentation process speaks protocol {protocol}, this module {PROTOCOL}: another "
                            "version of IrisSegment is first on Python's path; restart Slicer")
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.put(WorkerEvent("exit", {"error": error}))
        kill_tree(proc.pid)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._stderr.append(line)
            del self._stderr[:-STDERR_TAIL]
            run = self._active()
            if run is not None:
                run.put(WorkerEvent("log", {"line": line}))
        proc.stderr.close()

    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    def forget(self, run: WarmRun) -> None:
        with self._lock:
            self._runs.pop(run.id, None)

    def rss(self) -> int:
        """The worker's resident memory now (bytes; 0 when it is not known)."""
        import psutil

        try:
            return psutil.Process(self.worker_pid).memory_info().rss if self.worker_pid else 0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0

    def kill(self) -> None:
        """Kill the worker's process tree now (a cancel it did not answer); its runs end."""
        proc, pid = self.proc, self.worker_pid
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)
        if pid is not None:
            kill_tree(pid)  # behind a launcher, the real Python

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: its stdin closes, so it removes its work folders and exits; killed if it has not
        within ``timeout`` seconds. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        self._closing = True
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None
