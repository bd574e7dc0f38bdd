"""A Segment run on an iris-segment server (``iris-segment serve``, "Run on server") instead of this computer: the
same interface as ``runner.WorkerProcess`` (``poll``, ``cancel``, ``wait``, ``done``, ``result``, ``error``), so
the Job, the widget and ``logic.segment`` run it unchanged. The HTTP is iris_core's client
(``iris_core.service.client.Client``, standard library only): a Slicer without torch segments through a GPU
server. Runs on this computer never come here (``warm.py``: pipes, no HTTP)."""

from __future__ import annotations

import json
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from iris_core.service.client import Client, ServerError

from .runner import WorkerError, WorkerEvent


@dataclass(frozen=True)
class Server:
    """Where "Run on server" sends the run: the address, the token, and a CA bundle (a PEM file) to trust the
    server's certificate with (a hospital's own CA; None: the system's, or Slicer's, bundle)."""

    url: str
    token: str
    ca_bundle: str | None = None

    def client(self) -> Client:
        """iris_core's client for this server (the CA bundle passed only when one is set)."""
        if self.ca_bundle:
            return Client(self.url, self.token, ca_bundle=self.ca_bundle)  # iris_core.service.client, issue [19]
        return Client(self.url, self.token)


class RemoteProcess:
    """The job file's run, uploaded to the server, polled in a thread; its result is written where the local
    worker would write it (the work folder), so the logic imports it the same way. A job that is cancelled, or
    whose run is closed before its result is fetched, is removed from the server; a result fetched after the run
    was closed is removed again (the work folder holds patient images)."""

    def __init__(self, job_file: Path, server: Server):
        self.job_file = Path(job_file)
        self.server = server
        self.client = server.client()
        self._events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.result: dict | None = None
        self.error: WorkerError | None = None
        self.worker_pid = None
        self.peak_rss = 0
        self._finished = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        job_id = None
        try:
            job = json.loads(self.job_file.read_text())
            inputs, options = job["inputs"], job.get("options") or {}
            if inputs.get("library") or inputs.get("structures"):
                raise WorkerError("task libraries and known structures run on this computer; leave the server "
                                  "address empty to run them")
            layered = bool(inputs.get("output_layers"))
            self._events.put(WorkerEvent("progress", {"stage": f"Sending the volumes to {self.server.url}",
                                                      "done": 0, "total": 0}))
            self.client.info()
            job_id = self.client.submit(inputs["target"], [tuple(r) for r in inputs["references"]],
                                        model=inputs.get("model") or "default", options=options,
                                        classes=inputs.get("classes"), output=".seg.nrrd" if layered else ".nrrd")

            def progress(stage: str, done: int, total: int) -> None:
                self._events.put(WorkerEvent("progress", {"stage": stage, "done": done, "total": total}))

            status = self.client.wait(job_id, progress, cancel=self._cancel.is_set)
            if status["status"] == "cancelled" or self._cancel.is_set():
                self.cancelled = True
                return
            if status["status"] != "done":
                job_id = None  # a failed job keeps nothing on the server
                raise WorkerError(status.get("error") or f"the server's job ended {status['status']}", "",
                                  tuple(status.get("inputs") or ()))
            self.result = {"sidecar": self._fetch(job_id, inputs, layered)}
            job_id = None  # fetched: the server forgot it
        except ServerError as exc:
            self.error = WorkerError(str(exc))
        except WorkerError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001  (reported, never raised in the GUI's timer)
            self.error = WorkerError(f"the server run failed: {type(exc).__name__}: {exc}")
        finally:
            if job_id is not None:  # cancelled, or failed before its result came: the server must not keep it
                try:
                    self.client.forget(job_id)
                except Exception:  # noqa: BLE001  (the server is gone: nothing more to do from here)
                    pass
            if self._cancel.is_set():
                self.cancelled, self.result, self.error = True, None, None
                self._remove_results()
            self._finished = True

    def _fetch(self, job_id: str, inputs: dict, layered: bool) -> dict:
        out = Path(inputs["output"])
        if not layered:
            _, _, sidecar = self.client.fetch(job_id, out)
            return sidecar
        import SimpleITK as sitk  # one label map per group of classes that do not overlap, as the worker writes

        seg = out.with_name("result.seg.nrrd")
        _, _, sidecar = self.client.fetch(job_id, seg)
        image = sitk.ReadImage(str(seg))
        n = image.GetNumberOfComponentsPerPixel()
        layers = [sitk.VectorIndexSelectionCast(image, k) for k in range(n)] if n > 1 else [image]
        for k, layer in enumerate(layers):
            sitk.WriteImage(layer, inputs["output_layers"].format(k))
        sitk.WriteImage(layers[0], str(out))
        return sidecar

    def _remove_results(self) -> None:
        """The run was cancelled or closed: whatever the fetch wrote goes (the client recreates a removed work
        folder to write the result into)."""
        folder = self.job_file.parent
        if not self.job_file.is_file():  # the Job removed the folder already: anything there now is ours
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def done(self) -> bool:
        return self._finished and not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return not self.done

    def poll(self) -> list[WorkerEvent]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float = 15.0) -> bool:
        self._thread.join(timeout)
        return self.done
