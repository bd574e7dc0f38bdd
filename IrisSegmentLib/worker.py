"""The background worker: ``python -m IrisSegmentLib.worker JOB.json``.

Runs iris_core on files described by the job, prints one protocol line per event on stdout
(``IRIS-START {"pid": ...}`` first, then ``IRIS-PROGRESS {...}``, ``IRIS-ERROR {...}``,
``IRIS-DONE {...}``) and exits 0 on success. The process id tells the GUI which process is the
real worker when a launcher (PythonSlicer) stands between them.
It never touches the MRML scene: the GUI process imports the result.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

PREFIX_START = "IRIS-START "
PREFIX_PROGRESS = "IRIS-PROGRESS "
PREFIX_ERROR = "IRIS-ERROR "
PREFIX_DONE = "IRIS-DONE "


def emit(prefix: str, payload: dict) -> None:
    sys.stdout.write(prefix + json.dumps(payload) + "\n")
    sys.stdout.flush()


def pull_job(job: dict) -> dict:
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
            emit(PREFIX_PROGRESS, {"stage": f"Downloading {job['model']}", "done": int(self.n),
                                   "total": int(self.total or 0)})
            return out

    path = hub.pull(job["model"], tqdm_class=ProgressBar)
    m = hub.KNOWN[job["model"]]
    return {"path": str(path), "licence": m.licence, "source": m.source}


def run_job(job: dict) -> dict:
    """Execute a job: a segmentation ``{"inputs": {...}, "options": {...}}`` (written by
    ``logic.IrisSegmentLogic.prepare``; options as ``SegmentOptions.to_dict``), or a model download
    ``{"action": "pull", "model": ...}``; returns the sidecar."""
    if job.get("action") == "pull":
        return pull_job(job)
    from iris_core.api import segment
    from iris_core.io.results import write_result
    from iris_core.options import SegmentOptions
    from iris_core.pipeline.inference import ClassSpec

    def progress(stage: str, done: int, total: int) -> None:
        emit(PREFIX_PROGRESS, {"stage": stage, "done": done, "total": total})

    inputs = job.get("inputs") or {}
    if not inputs.get("target") or not inputs.get("output"):
        from iris_core.errors import InputError

        raise InputError("worker job: no target volume or output file in 'inputs' (the job file was written by "
                         "another version of IrisSegment, or is damaged); run Segment again")
    classes = [ClassSpec(c["name"], int(c["value"])) for c in inputs["classes"]] if inputs.get("classes") else None
    result = segment(inputs["target"], references=[tuple(r) for r in inputs.get("references", [])] or None,
                     classes=classes, model=inputs.get("model") or "default", library=inputs.get("library"),
                     structures=inputs.get("structures"), options=SegmentOptions.from_dict(job.get("options")),
                     progress=progress)
    write_result(result, inputs["output"])
    if inputs.get("output_layers") and result.layers:  # classes that overlap: one label map per group
        from iris_core.io.imaging import write_image_atomic

        for k, layer in enumerate(result.layers):
            write_image_atomic(layer, inputs["output_layers"].format(k))
    return result.sidecar


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m IrisSegmentLib.worker JOB.json", file=sys.stderr)
        return 2
    emit(PREFIX_START, {"pid": os.getpid()})
    try:
        from iris_core.pipeline.device import retain_freed_memory

        retain_freed_memory()  # the worker is a process of its own: reuse freed memory window after window
        job = json.loads(Path(argv[0]).read_text())
        sidecar = run_job(job)
    except Exception as exc:  # every failure is reported on the protocol, then a non-zero exit
        from iris_core.errors import IrisError

        kind = "user" if isinstance(exc, IrisError) else "internal"
        emit(PREFIX_ERROR, {"kind": kind, "type": type(exc).__name__, "message": str(exc),
                            "inputs": list(getattr(exc, "inputs", ())),
                            "traceback": "" if kind == "user" else traceback.format_exc()})
        return getattr(exc, "exit_code", 1)
    emit(PREFIX_DONE, {"sidecar": sidecar})
    return 0


if __name__ == "__main__":
    sys.exit(main())
