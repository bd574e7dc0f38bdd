"""One background job of the module, start to end, without Qt: a Segment run or a model download.

A ``Job`` owns its worker process and, for a Segment run, its work folder (which holds exported
patient images). Whatever happens - success, failure, Cancel, any exception in the caller (a progress
callback that raises, Ctrl+C), the module closing or the application quitting - ``close()`` kills the
worker's process tree and removes the folder; it and ``finish()`` are safe to call twice. The widget
polls a Job from its timer and shows what ``poll`` and ``finish`` return; ``logic.segment`` runs the
same object to completion (tests, the Python console). One lifecycle, two callers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .runner import WorkerCancelled, WorkerError, WorkerEvent, WorkerProcess, deliver
from .scene import SceneError


@dataclass
class Outcome:
    """How a finished job ended, in words for the user: ``status`` is 'done', 'failed' or 'cancelled';
    ``node`` the imported segmentation (a Segment run that succeeded), ``path`` the downloaded file (a
    download), ``error`` the failure in the scene's words, ``stage`` the one line for the status label and
    ``log`` the lines for the Log."""

    status: str
    stage: str
    node: object = None
    path: Path | None = None
    error: Exception | None = None
    log: list[str] = field(default_factory=list)
    #: what the user must see before trusting the result (shown in a dialog, not only in the Log)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "done"


class Job:
    """A started worker with what it needs to be finished and cleaned up (see the module docstring).
    Segment runs come from ``SegmentationLogic.start_segment``, downloads from ``start_download``."""

    def __init__(self, process: WorkerProcess, logic=None, run=None, download: str | None = None,
                 folder: Path | None = None):
        self.process = process
        self.logic = logic
        self.run = run  # a PreparedRun (Segment) or None (download)
        self.download = download  # the model key of a download job
        self.folder = folder if folder is not None else (run.workdir if run is not None else None)
        self.outcome: Outcome | None = None
        self.closed = False

    @property
    def kind(self) -> str:
        return "download" if self.download else "segment"

    @property
    def done(self) -> bool:
        return self.process.done

    def words(self, text: str) -> str:
        """A worker's text with the work files named as the nodes they came from."""
        return self.run.in_scene_words(text) if self.run is not None else text

    def poll(self) -> list[WorkerEvent]:
        """New events since the last call, progress stages and log lines in the scene's words (never the
        work files' names)."""
        out = []
        for e in self.process.poll():
            if e.kind == "progress":
                e = WorkerEvent("progress", dict(e.data, stage=self.words(e.data["stage"])))
            elif e.kind == "log":
                e = WorkerEvent("log", {"line": self.words(e.data["line"])})
            out.append(e)
        return out

    def cancel(self) -> None:
        if not self.process.done:
            self.process.cancel()

    def finish(self) -> Outcome:
        """Once ``done``: import the result (Segment) or report the file (download), then ``close``. Never
        raises for what the user can cause; the same Outcome on a second call."""
        if self.outcome is not None:
            return self.outcome
        if not self.process.done:
            raise RuntimeError("the job has not finished: poll it until done (or cancel it) first")
        proc = self.process
        try:
            if proc.cancelled:
                self.outcome = Outcome("cancelled", "Cancelled; the scene is unchanged." if self.kind == "segment"
                                       else f"Download of {self.download} cancelled; the next download resumes it.",
                                       error=WorkerCancelled("cancelled by the user"))
            elif proc.error is not None:
                error = self.run.explain(proc.error) if self.run is not None else proc.error
                what = "Segmentation" if self.kind == "segment" else "Download"
                self.outcome = Outcome("failed", f"{what} failed" + ("; the scene is unchanged." if self.kind ==
                                                                      "segment" else "."),
                                       error=error, log=[error.details] if error.details else [])
            elif self.kind == "download":
                path = Path(proc.result["sidecar"]["path"])
                licence = proc.result["sidecar"].get("licence", "")
                self.outcome = Outcome("done", f"Downloaded {self.download}; ready to Segment.", path=path,
                                       log=[f"{self.download}: {path} (licence {licence})"])
            else:
                self.outcome = self._import(proc.result["sidecar"])
        finally:
            self.close()
        return self.outcome

    def _import(self, sidecar: dict) -> Outcome:
        try:
            node = self.logic.finish(self.run, sidecar)
        except SceneError as exc:
            return Outcome("failed", "The result was not imported; the scene is unchanged.", error=exc)
        secs = sidecar.get("timings_s", {}).get("total", 0.0)
        warned = self.run.warnings
        stage = f"Done in {secs:.1f} s: {node.GetName()}" + (
            f" ({len(warned)} warning{'s' if len(warned) > 1 else ''}: check the result)" if warned else "")
        return Outcome("done", stage, node=node, log=[*warned, *result_summary(sidecar)], warnings=list(warned))

    def close(self) -> None:
        """Kill the worker (and everything it started) and remove the work folder. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.process.done:
                self.process.cancel()
                self.process.wait()
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)


def result_summary(sidecar: dict) -> list[str]:
    """What the Log shows after a run (from the worker's sidecar): the time, model and device, the classes
    of which no voxel was found, and the precision the windows ran in when it was not the default
    (``--precision auto``'s check and why)."""
    model = (sidecar.get("model") or {}).get("name", "?")
    n = len(sidecar.get("classes", []))
    lines = [f"segmented {n} class{'' if n == 1 else 'es'} with {model} on {sidecar.get('device', '?')} in "
             f"{sidecar.get('timings_s', {}).get('total', 0.0):.1f} s"]
    missing = [c.get("name", "?") for c in sidecar.get("classes", []) if c.get("voxels") == 0]
    if missing:
        lines.append(f"not found in the target (no voxel): {', '.join(missing)}")
    prec = sidecar.get("precision") or {}
    if (sidecar.get("options") or {}).get("precision", "float32") != "float32" and prec.get("summary"):
        lines.append("precision: " + prec["summary"])
    return lines


def run_to_end(job: Job, progress: Callable[[str, int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None, log_line: Callable[[str], None] | None = None,
               interval: float = 0.1) -> Outcome:
    """Drive a job to its outcome (blocking): events to the callbacks, ``cancel()`` polled. Whatever
    happens, including an exception raised by a callback or an interrupt, the job is closed."""
    try:
        while True:
            deliver(job.poll(), progress, log_line)
            if job.done:
                return job.finish()
            if cancel and cancel():
                job.cancel()
            time.sleep(interval)
    finally:
        job.close()


def raise_for(outcome: Outcome):
    """The outcome's node (Segment) or path (download); its error raised when it did not succeed."""
    if outcome.ok:
        return outcome.node if outcome.node is not None else outcome.path
    raise outcome.error if outcome.error is not None else WorkerError(outcome.stage)
