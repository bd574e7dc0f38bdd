"""The model choice of the Slicer module, without Qt: the choices, what a choice needs before it can
run (a download the user must agree to), and the download itself in the worker process (progress
lines, Cancel kills it; a later download resumes). The GUI process never loads a model: what it
shows comes from iris_core.hub.download's table and a file-existence check."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .runner import WorkerProcess, run_worker

FILE_CHOICE = "file"


@dataclass(frozen=True)
class ModelChoice:
    key: str  # 'default', a known model's name ('mass-base') or 'file'
    label: str
    download_bytes: int | None = None  # size to download before first use; None: nothing to download


def model_choices() -> list[ModelChoice]:
    """The bundled default, "MASS base (download, about 480 MB)" and a file, in that order."""
    from iris_core.hub import download as hub
    out = [ModelChoice("default", "Bundled default model")]
    for name, m in hub.KNOWN.items():
        if m.repo_id:
            mb = round((m.size_bytes or 0) / 1e6, -1)
            out.append(ModelChoice(name, f"{m.title.split(':')[0]} (download, about {mb:.0f} MB)", m.size_bytes))
    out.append(ModelChoice(FILE_CHOICE, "Model file..."))
    return out


def needs_download(key: str) -> bool:
    """True when the choice is a downloadable model with no local copy yet (ask before segmenting)."""
    from iris_core.hub import download as hub
    m = hub.KNOWN.get(key)
    if not (m and m.repo_id):
        return False
    try:
        return hub.cached_path(key) is None
    except ImportError:  # huggingface_hub not installed yet: the download installs it first
        return True


def consent_text(key: str) -> str:
    """What the confirmation dialog says before a download: size, source, licence."""
    from iris_core.hub import download as hub
    m = hub.KNOWN[key]
    return (f"{m.title}\n\nDownload about {m.size_text()} from {m.source}?\nLicence: {m.licence}\n"
            f"It is stored in the Hugging Face cache and reused afterwards.")


def model_spec(key: str, file_path: str | None = None) -> str:
    """What the worker job's ``model`` field takes for a choice."""
    if key == FILE_CHOICE:
        if not file_path:
            raise ValueError("choose a model file")
        return file_path
    return key


def start_download(key: str, python: str | None = None, workdir: str | Path | None = None) -> WorkerProcess:
    """Start downloading a known model in the worker process and return at once (the GUI polls the
    returned ``WorkerProcess`` from a timer, as for a Segment run; ``cancel()`` kills it and a later
    download resumes). Once done, ``downloaded_path`` gives the file."""
    if key not in model_keys_to_download():
        raise ValueError(f"{key!r} is not a model to download")
    folder = Path(tempfile.mkdtemp(prefix="iris-pull-", dir=workdir))
    job = folder / "job.json"
    job.write_text(json.dumps({"action": "pull", "model": key}))
    return WorkerProcess(job, python)


def downloaded_path(proc: WorkerProcess) -> Path:
    """The local file a finished, successful download job reports."""
    return Path(proc.result["sidecar"]["path"])


def model_keys_to_download() -> list[str]:
    return [c.key for c in model_choices() if c.download_bytes is not None]


def download_in_worker(key: str, progress: Callable[[str, int, int], None] | None = None,
                       cancel: Callable[[], bool] | None = None, python: str | None = None,
                       workdir: str | Path | None = None) -> Path:
    """Download and verify a known model in the worker process; returns its local path. Raises the
    runner's WorkerError (message says where to download by hand) or WorkerCancelled."""
    folder = Path(tempfile.mkdtemp(prefix="iris-pull-", dir=workdir))
    job = folder / "job.json"
    job.write_text(json.dumps({"action": "pull", "model": key}))
    result = run_worker(job, progress=progress, cancel=cancel, python=python)
    return Path(result["path"])
