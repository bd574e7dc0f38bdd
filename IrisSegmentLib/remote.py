"""A Segment run on an iris-segment server (``iris-segment serve``) instead of a local worker process: the same
interface as ``runner.WorkerProcess`` (``poll``, ``cancel``, ``done``, ``result``, ``error``), so the Job, the
widget and ``logic.segment`` run it unchanged. Standard library and iris_core's torch-free client only: a
Slicer without torch segments through a GPU server."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

from iris_core.service.client import Client, ServerError

from .runner import WorkerError, WorkerEvent


class RemoteProcess:
    """The job file's run, uploaded to ``url`` with ``token``, polled in a thread; its result is written where
    the local worker would write it (the work folder), so the logic imports it the same way."""

    def __init__(self, job_file: Path, url: str = "", token: str = "", connect=None):
        """``connect``: instead of ``url`` and ``token``, a function returning them, called in this run's
        thread (the warm worker starts there on the first run, without blocking the GUI)."""
        self.job_file = Path(job_file)
        self.client = Client(url, token)
        self._connect = connect
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
        try:
            job = json.loads(self.job_file.read_text())
            inputs, options = job["inputs"], job.get("options") or {}
            if inputs.get("library") or inputs.get("structures"):
                raise WorkerError("task libraries and known structures run on this computer; choose 'this "
                                  "computer' to run them")
            layered = bool(inputs.get("output_layers"))
            if self._connect is not None:
                self._events.put(WorkerEvent("progress", {"stage": "Starting the warm worker", "done": 0,
                                                          "total": 0}))
                self.client = Client(*self._connect())
            self.client.info()
            job_id = self.client.submit(inputs["target"], [tuple(r) for r in inputs["references"]],
                                        model=inputs.get("model") or "default", options=options,
                                        classes=inputs.get("classes"), output=".seg.nrrd" if layered else ".nrrd")

            def progress(stage: str, done: int, total: int) -> None:
                self._events.put(WorkerEvent("progress", {"stage": stage, "done": done, "total": total}))

            status = self.client.wait(job_id, progress, cancel=self._cancel.is_set)
            if status["status"] == "cancelled":
                self.cancelled = True
                return
            if status["status"] != "done":
                raise WorkerError(status.get("error") or f"the server's job ended {status['status']}", "",
                                  tuple(status.get("inputs") or ()))
            out = Path(inputs["output"])
            if layered:  # one label map per group of classes that do not overlap, as the local worker writes
                import SimpleITK as sitk

                seg = out.with_name("result.seg.nrrd")
                _, _, sidecar = self.client.fetch(job_id, seg)
                image = sitk.ReadImage(str(seg))
                layers = ([sitk.VectorIndexSelectionCast(image, k) for k in range(image.GetNumberOfComponentsPerPixel())]
                          if image.GetNumberOfComponentsPerPixel() > 1 else [image])
                for k, layer in enumerate(layers):
                    sitk.WriteImage(layer, inputs["output_layers"].format(k))
                sitk.WriteImage(layers[0], str(out))
            else:
                _, _, sidecar = self.client.fetch(job_id, out)
            self.result = {"sidecar": sidecar}
        except ServerError as exc:
            self.error = WorkerError(str(exc))
        except WorkerError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001  (reported, never raised in the GUI's timer)
            self.error = WorkerError(f"the server run failed: {type(exc).__name__}: {exc}")
        finally:
            self._finished = True

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
