"""The jobs of ``iris-segment serve``: who may queue what (quotas), one worker per device running them, and what is
kept on disk for how long. HTTP is server.py's; this module raises ``Refused`` with the status to answer.

Retention, in one line: a job's uploads are deleted when it ends (done, failed or cancelled), its result when the
client fetches it, and whatever is left (the result, the sidecar and task kept in memory) ``keep_minutes`` after
the job ended; all of it when the server stops (SIGTERM, SIGINT: FastAPI's shutdown), and a server that died without
stopping (SIGKILL, power loss) leaves a folder the next start on the same ``workdir`` deletes."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import hmac
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from iris_core.api import parse_classes, resolve_model, segment
from iris_core.errors import CancelledError, IrisError
from iris_core.io.results import write_result
from iris_core.options import SegmentOptions
from iris_core.service.schema import JobRequest

log = logging.getLogger(__name__)

#: marks a server's work folder with its process (pid and start time), for the sweep of the next start
OWNER_FILE = ".iris-serve-owner"
HOUR = 3600.0


@dataclass(frozen=True)
class Limits:
    """What one server allows: jobs queued or running (in all, per token), an upload's megabytes, an image's
    voxels, a job's minutes of compute, a token's compute minutes in any hour (0: no such quota), and the minutes
    an ended job's result is kept when nobody fetches it."""

    max_jobs: int = 4
    max_jobs_per_token: int = 2
    max_upload_mb: float = 1024
    max_voxels: int = 512 * 512 * 1024
    max_job_minutes: float = 30
    token_minutes_per_hour: float = 60
    keep_minutes: float = 10

    def public(self) -> dict:
        return dataclasses.asdict(self)


class Refused(Exception):
    """A call refused: the HTTP status and the message for the caller (never another token's figures)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class Job:
    id: str
    owner: str  # the token's digest, never the token
    folder: Path
    request: JobRequest
    target: Path
    references: list[tuple[Path, Path]] = field(default_factory=list)
    library: Path | None = None  # a library the server offers, found by name
    classes: list | None = None  # ClassSpec list, parsed at submit
    task: object = None  # the task embedding of an earlier job: a further target
    parent: Job | None = None  # that earlier job, kept while its further targets run
    status: str = "queued"
    stage: str = ""
    done: int = 0
    total: int = 0
    error: str = ""
    inputs: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    #: held while the result is written and while files are removed: a DELETE never races the last write
    lock: threading.Lock = field(default_factory=threading.Lock)
    removed: bool = False
    output: Path | None = None
    sidecar: dict | None = None
    fetched: bool = False
    embedding: object = None  # kept for further targets (keep_task)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    touched: float | None = None  # when it ended, or was last used for a further target

    def public(self) -> dict:
        return {"job": self.id, "status": self.status, "stage": self.stage, "done": self.done, "total": self.total,
                "error": self.error, "inputs": self.inputs, "fetched": self.fetched}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def release_memory() -> None:
    """Give freed memory back to the system after a job: a garbage collection, the CUDA cache (other processes may
    want the GPU), then glibc's malloc_trim (Linux; macOS's and Windows' allocators return large blocks on their
    own)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl)
            pass


def sweep_orphans(parent: Path) -> list[Path]:
    """Delete the work folders under ``parent`` that a server which died without stopping left (its owner file
    names a process that is gone); a folder without an owner file is left alone (another program's, or an older
    server's that may still run)."""
    swept = []
    for folder in parent.glob("iris-serve-*"):
        try:
            pid, started = (folder / OWNER_FILE).read_text().split()
            proc = psutil.Process(int(pid))
            alive = abs(proc.create_time() - float(started)) < 1
        except (OSError, ValueError):
            continue
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:  # another user's process: not ours to judge
            continue
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


class Service:
    """Tokens, jobs, a fair queue and one worker thread per device (the CPU, or each GPU) with models kept loaded;
    a sweeper thread expires what nobody fetched."""

    def __init__(self, tokens: list[str], models: list[str], limits: Limits = Limits(), device: str = "auto",
                 threads: int | None = None, workdir: str | Path | None = None, libraries: str | Path | None = None,
                 devices: list[str] | None = None):
        self.digests = {digest(t) for t in tokens}
        self.models, self.limits = list(models), limits
        self.max_upload = int(limits.max_upload_mb * 2**20)
        self.device, self.threads = device, threads
        self.libraries = Path(libraries) if libraries else None
        parent = Path(workdir) if workdir else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        for folder in sweep_orphans(parent):
            log.warning("removed %s, left by a server that did not stop", folder.name)
        self.root = Path(tempfile.mkdtemp(prefix="iris-serve-", dir=parent))
        me = psutil.Process()
        (self.root / OWNER_FILE).write_text(f"{me.pid} {me.create_time()}")
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Condition()
        self.closing = False
        self.usage: dict[str, list[tuple[float, float]]] = defaultdict(list)  # owner -> (end, seconds) of jobs
        self.devices = devices or worker_devices(device)
        self.loaded: dict = {}
        self.threads_ = [threading.Thread(target=self._work, args=(d,), name=f"iris-serve-{d}", daemon=True)
                         for d in self.devices]
        self.threads_.append(threading.Thread(target=self._sweep, name="iris-serve-sweep", daemon=True))
        for t in self.threads_:
            t.start()

    # -- tokens and jobs -------------------------------------------------------------------------------------------

    def owner(self, token: str) -> str | None:
        """The token's digest if it is one of the server's, else None (compared in constant time)."""
        d = digest(token) if token else ""
        return d if token and any(hmac.compare_digest(d, x) for x in self.digests) else None

    def job(self, job_id: str, owner: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None or job.owner != owner:  # another token's job does not exist for this one
            raise Refused(404, f"no job {job_id[:64]}")
        return job

    def library(self, name: str) -> Path:
        """A task library the server offers (``--libraries``), by its name alone: never a path."""
        offered = self.offered_libraries()
        if self.libraries is None:
            raise Refused(400, "this server offers no task libraries (serve --libraries DIR)")
        if name not in offered:
            raise Refused(400, f"library {name!r} is not offered here (offered: {', '.join(sorted(offered)) or 'none'})")
        return offered[name]

    def offered_libraries(self) -> dict[str, Path]:
        return {p.stem: p for p in self.libraries.glob("*.safetensors")} if self.libraries else {}

    def model(self, name: str, device: str = "cpu"):
        if (name, device) not in self.loaded:
            self.loaded[(name, device)] = resolve_model(name, device="cpu")
        return self.loaded[(name, device)]

    def check_model(self, name: str) -> None:
        if name not in self.models:
            raise Refused(400, f"model {name!r} is not served here (served: {', '.join(self.models)})")

    def parse_classes(self, req: JobRequest) -> list | None:
        from iris_core.types import ClassSpec

        if isinstance(req.classes, list):
            return [ClassSpec(c.name, c.value) for c in req.classes]
        try:
            return parse_classes(req.classes)
        except IrisError as exc:
            raise Refused(400, str(exc)) from None

    # -- quotas ----------------------------------------------------------------------------------------------------

    def _used(self, owner: str, now: float) -> float:
        """Seconds of compute of ``owner``'s jobs in the last hour (running ones so far)."""
        entries = self.usage[owner] = [(t, s) for t, s in self.usage[owner] if now - t < HOUR]
        running = sum(now - j.started for j in self.jobs.values()
                      if j.owner == owner and j.status == "running" and j.started)
        return sum(s for _, s in entries) + running

    def admit(self, owner: str) -> None:
        """Refuse (429) a new job before its upload is read: the token's own jobs or compute over its quota, or
        the server's queue full. The messages give the caller's own figures, never another token's."""
        lim, now = self.limits, time.monotonic()
        with self.lock:
            active = [j for j in self.jobs.values() if j.status in ("queued", "running")]
            mine = sum(j.owner == owner for j in active)
            if mine >= lim.max_jobs_per_token:
                raise Refused(429, f"your token has {mine} jobs queued or running, the most one token may have here; "
                                   "wait for one to end", retry_after=10)
            quota = lim.token_minutes_per_hour * 60
            if quota and self._used(owner, now) >= quota:
                oldest = min((t for t, _ in self.usage[owner]), default=now)
                wait = max(60, int(HOUR - (now - oldest)))
                raise Refused(429, f"your token has used its {lim.token_minutes_per_hour:g} minutes of compute of the "
                                   f"last hour; try again in {wait // 60} minutes", retry_after=wait)
            if len(active) >= lim.max_jobs:
                raise Refused(429, "the server is busy; try again in a minute", retry_after=30)

    def submit(self, job: Job) -> None:
        """Queue ``job`` (429 as ``admit``: the checks again, now that the upload is in)."""
        self.admit(job.owner)
        with self.lock:
            if self.closing:
                raise Refused(503, "the server is stopping")
            self.jobs[job.id] = job
            self.lock.notify_all()

    # -- the workers -----------------------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        """The next job to run: of the queued ones, that of the token with the least compute in the last hour
        (then the oldest), so one token's many jobs do not hold the others back; None when closing."""
        with self.lock:
            while True:
                if self.closing:
                    return None
                queued = [j for j in self.jobs.values() if j.status == "queued" and not j.cancel.is_set()]
                if queued:
                    now = time.monotonic()
                    job = min(queued, key=lambda j: (self._used(j.owner, now), j.submitted))
                    job.status, job.started = "running", now
                    return job
                self.lock.wait()

    def _work(self, device: str) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            limit = self.limits.max_job_minutes * 60
            deadline = job.started + limit if limit else float("inf")
            try:
                self._run(job, device, deadline)
                job.status = "done"
            except CancelledError:
                if time.monotonic() > deadline:
                    job.status = "failed"
                    job.error = (f"stopped after {self.limits.max_job_minutes:g} minutes, this server's limit for one "
                                 "job: ask for less (fewer tuning steps, a smaller image) or run it locally")
                else:
                    job.status = "cancelled"
            except IrisError as exc:
                job.status, job.error, job.inputs = "failed", self.scrub(str(exc), job), list(exc.inputs)
            except Exception as exc:  # noqa: BLE001  (an internal error fails this job, not the server)
                log.exception("job %s failed", job.id)
                job.status, job.error = "failed", self.scrub(f"internal error: {type(exc).__name__}: {exc}", job)
            finally:
                now = time.monotonic()
                with self.lock:
                    self.usage[job.owner].append((now, now - job.started))
                    job.touched = now
                    if job.parent is not None:  # its task stays as long as it is used
                        job.parent.touched = now
                self.remove(job, keep_result=job.status == "done")
                job.task = job.parent = None
                release_memory()

    def _run(self, job: Job, device: str, deadline: float) -> None:
        def progress(stage: str, done: int, total: int) -> None:
            job.stage, job.done, job.total = stage, done, total

        threads = self.threads or min(job.request.options.threads or os.cpu_count() or 1, os.cpu_count() or 1)
        options = SegmentOptions.from_dict(job.request.options.model_dump())
        options = dataclasses.replace(options, device=device, threads=threads, save_probabilities=False)
        # a further target: the earlier job's task embedding; else a library the server offers, or the references
        library = job.task if job.task is not None else str(job.library) if job.library else None
        result = segment(str(job.target), references=None if library is not None else
                         [(str(i), str(lab)) for i, lab in job.references],
                         classes=None if library is not None else job.classes, library=library,
                         model=self.model(job.request.model, device), options=options, progress=progress,
                         cancel=lambda: job.cancel.is_set() or time.monotonic() > deadline)
        with job.lock:
            if job.removed:  # deleted while it ran: nothing is written again
                return
            job.output = job.folder / f"result{job.request.output}"
            write_result(result, job.output)
            side = job.folder / "result.json"
            job.sidecar = self.scrub_tree(json.loads(side.read_text()), job)
            side.unlink()
        if job.request.keep_task and result.embedding is not None:
            job.embedding = result.embedding

    # -- what is kept ----------------------------------------------------------------------------------------------

    def scrub(self, text: str, job: Job) -> str:
        """``text`` without this server's paths: the job's folder, the work folder and the libraries' folder go,
        the part names stay ('target target.nii.gz: ...')."""
        for folder in (job.folder, self.root, self.libraries):
            if folder is not None:
                text = text.replace(str(folder) + os.sep, "").replace(str(folder), "")
        return text

    def scrub_tree(self, value, job: Job):
        """A sidecar without the server's paths: the scrubbed text, and any other absolute path by its name."""
        if isinstance(value, dict):
            return {k: self.scrub_tree(v, job) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub_tree(v, job) for v in value]
        if isinstance(value, str):
            value = self.scrub(value, job)
            return Path(value).name if os.path.isabs(value) else value
        return value

    def remove(self, job: Job, keep_result: bool = False) -> None:
        """Delete the job's files (all but its result with ``keep_result``); the result once gone is never
        written again (``removed``)."""
        with job.lock:
            if keep_result and job.output is not None and job.output.is_file():
                for p in job.folder.iterdir():
                    if p != job.output:
                        p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)
                return
            job.removed = True
            shutil.rmtree(job.folder, ignore_errors=True)

    def fetched(self, job: Job) -> None:
        """The result was sent: its file goes (the sidecar stays in memory until the job is forgotten or expires)."""
        job.fetched = True
        job.touched = time.monotonic()
        self.remove(job)

    def forget(self, job: Job) -> None:
        job.cancel.set()
        self.remove(job)
        with self.lock:
            self.jobs.pop(job.id, None)

    def _sweep(self) -> None:
        """Expire ended jobs nobody came back for within ``keep_minutes``: files, sidecar and task."""
        keep = self.limits.keep_minutes * 60
        while True:
            with self.lock:
                self.lock.wait(timeout=max(0.5, min(30.0, keep / 4)))
                if self.closing:
                    return
                now = time.monotonic()
                old = [j for j in self.jobs.values() if j.touched is not None and now - j.touched > keep
                       and j.status not in ("queued", "running")]
            for job in old:
                self.forget(job)

    def close(self) -> None:
        """Stop the workers and delete every job's files and the work folder (idempotent)."""
        with self.lock:
            self.closing = True
            jobs = list(self.jobs.values())
            self.lock.notify_all()
        for job in jobs:
            job.cancel.set()
            self.remove(job)
        shutil.rmtree(self.root, ignore_errors=True)


def worker_devices(device: str) -> list[str]:
    """One worker per GPU ('auto' with several CUDA devices: cuda:0, cuda:1, ...), else one on ``device``."""
    if device == "auto":
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]
