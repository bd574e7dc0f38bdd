"""``iris-segment serve``: the segmentation as a service (FastAPI + uvicorn), for thin clients (the CLI with
``--server``, Slicer without torch) and a GPU server shared by several users.

Protocol (version 1; every call needs ``Authorization: Bearer TOKEN``, a token of the server's token file):

* ``GET /v1/info``: server version, protocol, the models it may load (the handshake).
* ``POST /v1/jobs``: multipart form: ``target`` and ``reference_image_<i>`` / ``reference_labels_<i>`` files
  (NIfTI, NRRD, .seg.nrrd, MHA), ``request`` (JSON: ``model``, ``options`` (SegmentOptions fields), ``classes``,
  ``output`` ('.nii.gz', '.nrrd' or '.seg.nrrd')) -> 202 ``{"job": id}``; 429 when the queue is full.
* ``GET /v1/jobs/{id}``: status (queued, running, done, failed, cancelled), stage and progress, error.
* ``POST /v1/jobs/{id}/targets``: a further target (multipart ``target``) for a finished job submitted with
  ``keep_task``: segmented with that job's task embedding, the references not encoded again; a request may
  also name a task library the server offers (``library``, ``serve --libraries DIR``) instead of references.
* ``POST /v1/jobs/{id}/cancel``; ``GET /v1/jobs/{id}/labels`` (the label map file) and ``/sidecar`` (JSON);
  ``DELETE /v1/jobs/{id}`` removes what the job kept (also done after the labels are fetched).

Security: no or a wrong token -> 401 and nothing runs; a job is visible to the token that made it only (404
for any other); upload names never become paths (each part is stored under a name the server makes, keeping
only a known extension); an upload over ``--max-upload-mb`` -> 413; an unreadable or non-volume part -> 400
naming it; nothing a client sends is unpickled (images are read by SimpleITK, the request is JSON); the
job's files are deleted once its result is fetched or it fails or is cancelled. TLS: run behind a reverse
proxy (README: Inference as a service)."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from iris_core import __version__
from iris_core.api import resolve_model, segment
from iris_core.errors import CancelledError, IrisError
from iris_core.io.imaging import read_image
from iris_core.io.names import split_volume_name
from iris_core.io.results import write_result
from iris_core.options import SegmentOptions

log = logging.getLogger(__name__)

PROTOCOL = 1
#: the file types an upload may be (its extension is all that is kept of its name)
UPLOAD_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
OUTPUT_EXTENSIONS = (".nii.gz", ".nrrd", ".seg.nrrd")


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file: one per line, blank lines and '#' comments ignored; at least one, each at
    least 16 characters (a guessable token is no protection)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise IrisError(f"token file {path}: {exc.strerror or exc}") from None
    tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not tokens:
        raise IrisError(f"token file {path}: no token (one per line)")
    short = [i + 1 for i, t in enumerate(tokens) if len(t) < 16]
    if short:
        raise IrisError(f"token file {path}: token(s) {short} shorter than 16 characters")
    return tokens


@dataclass
class Job:
    id: str
    owner: str  # the token's digest, never the token
    folder: Path
    request: dict
    status: str = "queued"
    stage: str = ""
    done: int = 0
    total: int = 0
    error: str = ""
    inputs: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    output: Path | None = None
    #: the task embedding of the job's references, kept (in memory) for further targets (``keep_task``)
    embedding: object = None

    def public(self) -> dict:
        return {"job": self.id, "status": self.status, "stage": self.stage, "done": self.done, "total": self.total,
                "error": self.error, "inputs": self.inputs}


class Service:
    """Jobs, a queue and one worker thread (one per device: the CPU here, or a GPU) with models kept loaded."""

    def __init__(self, tokens: list[str], models: list[str], max_jobs: int = 4, max_upload_mb: float = 1024,
                 device: str = "auto", threads: int | None = None, workdir: str | Path | None = None,
                 libraries: str | Path | None = None):
        self.digests = {self._digest(t) for t in tokens}
        self.models, self.max_jobs, self.max_upload = list(models), max_jobs, int(max_upload_mb * 2**20)
        self.device, self.threads = device, threads
        self.libraries = Path(libraries) if libraries else None  # task libraries a request may name
        self.root = Path(tempfile.mkdtemp(prefix="iris-serve-", dir=workdir))
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.devices = worker_devices(device)
        self.loaded: dict = {}  # (model, device) -> LoadedModel: each worker its own copy on its device
        self.workers = [threading.Thread(target=self._work, args=(d,), name=f"iris-serve-{d}", daemon=True)
                        for d in self.devices]
        for w in self.workers:
            w.start()

    @staticmethod
    def _digest(token: str) -> str:
        import hashlib

        return hashlib.sha256(token.encode()).hexdigest()

    def owner(self, request: Request) -> str:
        """The caller's token digest; 401 without a valid token."""
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        digest = self._digest(token) if token else ""
        if not token or not any(hmac.compare_digest(digest, d) for d in self.digests):
            raise HTTPException(401, "no valid token: send 'Authorization: Bearer TOKEN' with a token of the server's "
                                     "token file", headers={"WWW-Authenticate": "Bearer"})
        return digest

    def job(self, job_id: str, owner: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None or job.owner != owner:  # another token's job does not exist for this one
            raise HTTPException(404, f"no job {job_id}")
        return job

    def model(self, name: str, device: str = "cpu"):
        if (name, device) not in self.loaded:
            self.loaded[(name, device)] = resolve_model(name, device="cpu")
        return self.loaded[(name, device)]

    def _work(self, device: str) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            job.status = "running"
            try:
                self._run(job, device)
                job.status = "done"
            except CancelledError:
                job.status = "cancelled"
                self.remove(job)
            except IrisError as exc:
                job.status, job.error, job.inputs = "failed", str(exc), list(getattr(exc, "inputs", ()))
                self.remove(job)
            except Exception as exc:  # noqa: BLE001  (an internal error fails this job, not the server)
                log.exception("job %s failed", job.id)
                job.status, job.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
                self.remove(job)

    def _run(self, job: Job, device: str) -> None:
        req = job.request
        files = req["files"]

        def progress(stage: str, done: int, total: int) -> None:
            job.stage, job.done, job.total = stage, done, total

        options = SegmentOptions.from_dict(req.get("options") or {})
        options = dataclasses.replace(options, device=device, threads=self.threads or options.threads)
        from iris_core.api import parse_classes
        from iris_core.pipeline.inference import ClassSpec

        classes = req.get("classes")  # '1,3' / 'liver=1' as the CLI takes them, or [{"name", "value"}] (Slicer's)
        classes = ([ClassSpec(str(c["name"]), int(c["value"])) for c in classes] if isinstance(classes, list)
                   else parse_classes(classes))
        task = req.get("reuse")  # a further target of an earlier job: its task embedding, not encoded again
        library = task if task is not None else files.get("library")
        result = segment(files["target"], references=None if library is not None else
                         [tuple(p) for p in files["references"]], classes=None if library is not None else classes,
                         library=library, model=self.model(req.get("model", "default"), device),
                         options=options, progress=progress, cancel=job.cancel.is_set)
        job.output = job.folder / f"result{req.get('output', '.nii.gz')}"
        write_result(result, job.output)
        if req.get("keep_task") and result.embedding is not None:
            job.embedding = result.embedding

    def remove(self, job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)

    def library(self, name: str) -> str:
        """The file of a task library the server offers (``--libraries``), by its name alone (no path)."""
        if self.libraries is None:
            raise HTTPException(400, "this server offers no task libraries (serve --libraries DIR)")
        offered = {p.stem: p for p in self.libraries.glob("*.safetensors")}
        if name not in offered:
            raise HTTPException(400, f"library {name!r} is not offered here (offered: {', '.join(sorted(offered)) or 'none'})")
        return str(offered[name])

    def submit(self, job: Job) -> None:
        with self.lock:
            waiting = sum(j.status in ("queued", "running") for j in self.jobs.values())
            if waiting >= self.max_jobs:
                raise HTTPException(429, f"the server is busy: {waiting} jobs queued or running (at most "
                                         f"{self.max_jobs}); try again later", headers={"Retry-After": "10"})
            self.jobs[job.id] = job
        self.queue.put(job)

    def close(self) -> None:
        for _ in self.workers:
            self.queue.put(None)
        shutil.rmtree(self.root, ignore_errors=True)


def worker_devices(device: str) -> list[str]:
    """One worker per GPU ('auto' with several CUDA devices: cuda:0, cuda:1, ...), else one on ``device``."""
    if device == "auto":
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def _extension(filename: str, part: str) -> str:
    name = (filename or "").lower()
    ext = next((e for e in UPLOAD_EXTENSIONS if name.endswith(e)), None)
    if ext is None:
        raise HTTPException(400, f"{part}: {Path(filename or '?').name!r} is not a volume file "
                                 f"({', '.join(UPLOAD_EXTENSIONS)})")
    return ext


def create_app(service: Service) -> FastAPI:
    """The FastAPI application of ``service``."""
    app = FastAPI(title="iris-segment", version=__version__)

    @app.get("/v1/info")
    def info(request: Request) -> dict:
        service.owner(request)
        return {"server": "iris-segment", "version": __version__, "protocol": PROTOCOL, "models": service.models,
                "device": service.device, "workers": service.devices, "max_upload_mb": service.max_upload / 2**20, "max_jobs": service.max_jobs,
                "libraries": sorted(p.stem for p in service.libraries.glob("*.safetensors")) if service.libraries
                else []}

    def refuse_large(request: Request) -> None:
        """413 from the headers, before the body is read."""
        length = int(request.headers.get("content-length") or 0)
        if length > service.max_upload:
            raise HTTPException(413, f"upload of {length / 2**20:.1f} MB is over the server's limit of "
                                     f"{service.max_upload / 2**20:.0f} MB")

    async def store(upload, part: str, folder: Path, used: int) -> tuple[Path, int]:
        """An uploaded part written under a name the server makes (``part`` + a known extension: the client's
        name is never a path); 413 when the parts so far (``used`` bytes before this one) pass the limit."""
        path = folder / f"{part}{_extension(upload.filename, part)}"
        data = await upload.read()
        if used + len(data) > service.max_upload:
            raise HTTPException(413, f"uploads over the server's limit of {service.max_upload / 2**20:.0f} MB")
        path.write_bytes(data)
        return path, used + len(data)

    def readable(path: Path, part: str) -> None:
        """A volume SimpleITK reads, or 400 naming the part (not the server's path)."""
        try:
            read_image(path, part)
        except IrisError as exc:
            raise HTTPException(400, str(exc).replace(f" {path}", "")) from None

    @app.post("/v1/jobs", status_code=202)
    async def create(request: Request) -> dict:
        owner = service.owner(request)
        refuse_large(request)
        job_id = uuid.uuid4().hex
        folder = service.root / job_id
        folder.mkdir()
        try:
            form = await request.form(max_part_size=service.max_upload)
            try:
                req = json.loads(str(form.get("request") or "{}"))
            except ValueError:
                raise HTTPException(400, "request: not JSON") from None
            if not isinstance(req, dict):
                raise HTTPException(400, "request: a JSON object is expected")
            model = req.get("model", "default")
            if model not in service.models:
                raise HTTPException(400, f"model {model!r} is not served here (served: {', '.join(service.models)})")
            if req.get("output", ".nii.gz") not in OUTPUT_EXTENSIONS:
                raise HTTPException(400, f"output {req.get('output')!r}: one of {', '.join(OUTPUT_EXTENSIONS)}")
            try:
                SegmentOptions.from_dict(req.get("options") or {})
            except IrisError as exc:
                raise HTTPException(400, f"options: {exc}") from None
            stored: dict[str, Path] = {}
            total = 0
            for part, upload in form.multi_items():
                if part == "request":
                    continue
                if not re.fullmatch(r"target|reference_(image|labels)_\d{1,3}", part) or not hasattr(upload, "read"):
                    raise HTTPException(400, f"{part}: not a part of a job (target, reference_image_<i>, "
                                             "reference_labels_<i>, request)")
                stored[part], total = await store(upload, part, folder, total)
            if "target" not in stored:
                raise HTTPException(400, "target: missing")
            refs = []
            for i in range(len(stored)):
                img, lab = stored.get(f"reference_image_{i}"), stored.get(f"reference_labels_{i}")
                if img is None and lab is None:
                    break
                if img is None or lab is None:
                    raise HTTPException(400, f"reference {i}: give both reference_image_{i} and reference_labels_{i}")
                refs.append((str(img), str(lab)))
            library = service.library(str(req["library"])) if req.get("library") else None
            if not refs and library is None:
                raise HTTPException(400, "no reference: give reference_image_0 and reference_labels_0, or name a "
                                         "task library the server offers")
            for part, path in stored.items():  # readable volumes, or 400 naming the part
                if not (part.startswith("reference_labels") and path.name.endswith(".seg.nrrd")):
                    readable(path, part)
            req["files"] = {"target": str(stored["target"]), "references": refs, "library": library}
            job = Job(job_id, owner, folder, req)
            service.submit(job)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"job": job_id}

    @app.post("/v1/jobs/{job_id}/targets", status_code=202)
    async def further_target(job_id: str, request: Request) -> dict:
        """A further target for a finished job kept with ``keep_task``: segmented with its task embedding (the
        references are not encoded again); a new job of the same token."""
        owner = service.owner(request)
        refuse_large(request)
        first = service.job(job_id, owner)
        if first.embedding is None:
            raise HTTPException(409, f"job {job_id} keeps no task (submit it with keep_task, and let it finish)")
        new_id = uuid.uuid4().hex
        folder = service.root / new_id
        folder.mkdir()
        try:
            form = await request.form(max_part_size=service.max_upload)
            upload = form.get("target")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPException(400, "target: missing")
            path, _ = await store(upload, "target", folder, 0)
            readable(path, "target")
            req = {k: v for k, v in first.request.items() if k not in ("files", "keep_task")}
            req |= {"files": {"target": str(path), "references": [], "library": None}, "reuse": first.embedding}
            service.submit(Job(new_id, owner, folder, req))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"job": new_id}

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str, request: Request) -> dict:
        return service.job(job_id, service.owner(request)).public()

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, request: Request) -> dict:
        job = service.job(job_id, service.owner(request))
        job.cancel.set()
        if job.status == "queued":
            job.status = "cancelled"
            service.remove(job)
        return job.public()

    @app.get("/v1/jobs/{job_id}/sidecar")
    def sidecar(job_id: str, request: Request) -> JSONResponse:
        job = _finished(service.job(job_id, service.owner(request)))
        side = job.output.with_name(split_volume_name(job.output.name)[0] + ".json")
        return JSONResponse(json.loads(side.read_text()))

    @app.get("/v1/jobs/{job_id}/labels")
    def labels(job_id: str, request: Request) -> FileResponse:
        job = _finished(service.job(job_id, service.owner(request)))
        return FileResponse(job.output, media_type="application/octet-stream", filename=job.output.name)

    @app.delete("/v1/jobs/{job_id}")
    def delete(job_id: str, request: Request) -> dict:
        job = service.job(job_id, service.owner(request))
        job.cancel.set()
        service.remove(job)
        with service.lock:
            service.jobs.pop(job_id, None)
        return {"job": job_id, "status": "removed"}

    def _finished(job: Job) -> Job:
        if job.status != "done" or job.output is None or not job.output.is_file():
            raise HTTPException(409, f"job {job.id} is {job.status}, no result to fetch")
        return job

    return app


def serve(host: str, port: int, token_file: str, models: list[str], max_jobs: int, max_upload_mb: float,
          device: str = "auto", threads: int | None = None, libraries: str | None = None) -> None:
    """Run the server until interrupted. A non-loopback host is allowed only with a token file (always
    required here), and says that TLS belongs to a reverse proxy."""
    import uvicorn

    tokens = read_tokens(token_file)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach it needs a token; put TLS in front (a reverse proxy, "
                    "README: Inference as a service)", host)
    service = Service(tokens, models, max_jobs, max_upload_mb, device, threads, libraries=libraries)
    for name in models:  # loaded once per worker, kept warm
        for device in service.devices:
            service.model(name, device)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()
