"""``iris-segment serve``: the segmentation as a service (FastAPI + uvicorn), for thin clients (the CLI with
``--server``, Slicer without torch) and a GPU server shared by several users.

Protocol (version 1; every call needs ``Authorization: Bearer TOKEN``, a token of the server's token file):

* ``GET /v1/info``: server version, protocol, the models and task libraries it offers, its limits and the JSON
  schema of the request it accepts (the handshake: a client checks its request against it before uploading).
* ``POST /v1/jobs``: multipart form: ``target`` and ``reference_image_<i>`` / ``reference_labels_<i>`` files
  (NIfTI, NRRD, .seg.nrrd, MHA), ``request`` (JSON, schema.JobRequest: ``model``, ``options``, ``classes``,
  ``output``, ``library``, ``keep_task``) -> 202 ``{"job": id}``; 429 when the token's or the server's jobs are
  at their limit.
* ``GET /v1/jobs/{id}``: status (queued, running, done, failed, cancelled), stage and progress, error.
* ``POST /v1/jobs/{id}/targets``: a further target (multipart ``target``) for a finished job submitted with
  ``keep_task``: segmented with that job's task embedding, the references not encoded again.
* ``POST /v1/jobs/{id}/cancel``; ``GET /v1/jobs/{id}/labels`` (the label map file, deleted here once sent) and
  ``/sidecar`` (JSON); ``DELETE /v1/jobs/{id}`` forgets the job and removes what it kept.

Security (README: Security): 401 without a valid token on every route, 404 for another token's job; a request
field never names a server path; an upload is counted as it streams in (413 past ``--max-upload-mb`` with or
without a Content-Length) and each image is checked from its header before any voxel is read
(io/untrusted.py); those checks run in a thread, never on the event loop; per-token quotas (jobs.py); the
retention of jobs.py; no docs routes unless ``--docs``. TLS: run behind a reverse proxy."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from iris_core import __version__
from iris_core.errors import InputError, IrisError
from iris_core.io.untrusted import check_untrusted_image
from iris_core.service.jobs import Job, Limits, Refused, Service, release_memory
from iris_core.service.schema import MAX_REFERENCES, MAX_REQUEST_BYTES, parse_request, request_schema
from iris_core.service.wire import UPLOAD_EXTENSIONS, part_file_name

log = logging.getLogger(__name__)

PROTOCOL = 1
PART = re.compile(r"target|reference_(image|labels)_(\d{1,2})")


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file: one per line, blank lines and '#' comments ignored; at least one, each at
    least 16 characters (a guessable token is no protection). A file other users may read is taken with a warning
    (they could use the server with its tokens); Windows' ACLs are not checked."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise IrisError(f"token file {path}: {exc.strerror or exc}") from None
    tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not tokens:
        raise IrisError(f"token file {path}: no token (one per line)")
    short = [i + 1 for i, t in enumerate(tokens) if len(t) < 16]
    if short:
        raise IrisError(f"token file {path}: token(s) {short} shorter than 16 characters")
    if os.name != "nt" and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by other users of this machine (mode %s): they could use the "
                    "server with its tokens; make it yours alone: chmod 600 %s", path, stat.filemode(mode), path)
    return tokens


def _stored_name(filename: str, part: str) -> str:
    stored = part_file_name(part, filename)
    if stored is None:
        raise Refused(400, f"{part}: {Path(filename or '?').name[:100]!r} is not a volume file "
                           f"({', '.join(UPLOAD_EXTENSIONS)})")
    return stored


async def receive(request: Request, service: Service, folder: Path, parts: re.Pattern) -> tuple[str, dict[str, Path]]:
    """The multipart body, streamed: the ``request`` field (text) and each file part written under a name the
    server makes (the part + a known extension: the client's name is never a path). The body is counted as it
    arrives: 413 from a Content-Length over the limit before reading, or as soon as the bytes pass it (a chunked
    upload has none). Each file is spooled by Starlette (1 MiB in memory, then a temporary file) and copied here in
    a thread."""
    limit = service.max_upload
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise Refused(413, f"upload of {int(length) / 2**20:.1f} MB is over the server's limit of "
                           f"{limit / 2**20:g} MB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(400, "a job is a multipart/form-data upload")
    received = 0

    async def body():
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Refused(413, f"upload over the server's limit of {limit / 2**20:g} MB (stopped reading at "
                                   f"{received / 2**20:.1f} MB)")
            yield chunk

    parser = MultiPartParser(request.headers, body(), max_files=1 + 2 * MAX_REFERENCES, max_fields=1,
                             max_part_size=MAX_REQUEST_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise Refused(400, f"upload: {exc.message}") from None
    try:
        text, stored = "", {}
        for part, value in form.multi_items():
            if isinstance(value, str):
                if part != "request":
                    raise Refused(400, f"{part[:64]}: not a part of a job (target, reference_image_<i>, "
                                       "reference_labels_<i>, request)")
                text = value
                continue
            if not parts.fullmatch(part):
                raise Refused(400, f"{part[:64]}: not a part of a job (target, reference_image_<i>, "
                                   "reference_labels_<i>, request)")
            if part in stored:
                raise Refused(400, f"{part}: given twice")
            path = folder / _stored_name(value.filename, part)
            await run_in_threadpool(_copy, value.file, path)
            stored[part] = path
        return text, stored
    finally:
        await form.close()


def _copy(src, dest: Path) -> None:
    src.seek(0)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 2**20)


def check_images(stored: dict[str, Path], max_voxels: int) -> None:
    """Each uploaded image checked from its header (io/untrusted.py), in a thread: 400 naming the part."""
    try:
        for part, path in stored.items():
            check_untrusted_image(path, part, max_voxels, labels=part.startswith("reference_labels"))
    except InputError as exc:
        raise Refused(400, str(exc)) from None
    finally:
        release_memory()


def create_app(service: Service, docs: bool = False) -> FastAPI:
    """The FastAPI application of ``service``; ``docs``: also /docs, /redoc and /openapi.json (without a token,
    loading scripts from a CDN), off unless asked for."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # uvicorn's shutdown on SIGTERM / SIGINT runs this before the process ends

    app = FastAPI(title="iris-segment", version=__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.add_exception_handler(Refused, _refused)
    app.include_router(_submit_routes(service))
    app.include_router(_job_routes(service))
    return app


async def _refused(request: Request, exc: Refused) -> JSONResponse:
    """A refusal as its status and a JSON ``detail``; 401 says how to authenticate, 429 when to retry."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": str(exc)}, exc.status, headers=headers)


def _owner(service: Service, request: Request) -> str:
    """The caller's token digest; 401 without a valid token (in the header only, never the query)."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    found = service.owner(token)
    if found is None:
        raise Refused(401, "no valid token: send 'Authorization: Bearer TOKEN' with a token of the server's "
                           "token file")
    return found


@asynccontextmanager
async def _new_job_folder(service: Service, owner: str):
    """A new job's id and folder, once ``owner`` is admitted (before any upload is read); the folder and what it
    holds are removed when the request fails or is cancelled on the way."""
    service.admit(owner)
    job_id = uuid.uuid4().hex
    folder = service.root / job_id
    folder.mkdir()
    try:
        yield job_id, folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _references(stored: dict[str, Path]) -> list[tuple[Path, Path]]:
    """The uploaded (image, labels) pairs in their order; refused when a pair lacks a half or the numbering has a
    gap (every part but the target must be a reference's)."""
    refs = []
    for i in range(MAX_REFERENCES):
        img, lab = stored.get(f"reference_image_{i}"), stored.get(f"reference_labels_{i}")
        if img is None and lab is None:
            break
        if img is None or lab is None:
            raise Refused(400, f"reference {i}: give both reference_image_{i} and reference_labels_{i}")
        refs.append((img, lab))
    if len(refs) * 2 + 1 != len(stored):
        raise Refused(400, f"references: number them from 0 without gaps, at most {MAX_REFERENCES}")
    return refs


def _submit_routes(service: Service) -> APIRouter:
    """The handshake and the routes that submit work: a job, a further target of a kept task."""
    router = APIRouter()

    @router.get("/v1/info")
    def info(request: Request) -> dict:
        _owner(service, request)
        return {"server": "iris-segment", "version": __version__, "protocol": PROTOCOL, "models": service.models,
                "device": service.device, "workers": service.devices, "max_upload_mb": service.limits.max_upload_mb,
                "max_jobs": service.limits.max_jobs, "limits": service.limits.public(),
                "libraries": sorted(service.offered_libraries()), "request_schema": request_schema()}

    @router.post("/v1/jobs", status_code=202)
    async def create(request: Request) -> dict:
        me = _owner(service, request)
        async with _new_job_folder(service, me) as (job_id, folder):
            text, stored = await receive(request, service, folder, PART)
            try:
                req = parse_request(text)
            except ValueError as exc:
                raise Refused(400, str(exc)) from None
            service.check_model(req.model)
            if "target" not in stored:
                raise Refused(400, "target: missing")
            refs = _references(stored)
            library = service.library(req.library) if req.library else None
            if not refs and library is None:
                raise Refused(400, "no reference: give reference_image_0 and reference_labels_0, or name a task "
                                   "library the server offers")
            classes = service.parse_classes(req)
            await run_in_threadpool(check_images, stored, service.limits.max_voxels)
            service.submit(Job(job_id, me, folder, req, stored["target"], refs, library, classes))
        return {"job": job_id}

    @router.post("/v1/jobs/{job_id}/targets", status_code=202)
    async def further_target(job_id: str, request: Request) -> dict:
        """A further target for a finished job kept with ``keep_task``: segmented with its task embedding (the
        references are not encoded again); a new job of the same token."""
        me = _owner(service, request)
        first = service.job(job_id, me)
        if first.embedding is None:
            raise Refused(409, f"job {job_id} keeps no task (submit it with keep_task, and let it finish)")
        async with _new_job_folder(service, me) as (new_id, folder):
            _, stored = await receive(request, service, folder, re.compile("target"))
            if "target" not in stored:
                raise Refused(400, "target: missing")
            await run_in_threadpool(check_images, stored, service.limits.max_voxels)
            req = first.request.model_copy(update={"keep_task": False})
            first.touched = time.monotonic()  # kept while it is used
            service.submit(Job(new_id, me, folder, req, stored["target"], task=first.embedding, parent=first))
        return {"job": new_id}

    return router


def _job_routes(service: Service) -> APIRouter:
    """The routes of a submitted job: its status, cancel, its results, forgetting it (another token's job: 404)."""
    router = APIRouter()

    @router.get("/v1/jobs/{job_id}")
    def status(job_id: str, request: Request) -> dict:
        return service.job(job_id, _owner(service, request)).public()

    @router.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, request: Request) -> dict:
        job = service.job(job_id, _owner(service, request))
        job.cancel.set()
        with service.lock:
            if job.status == "queued":
                job.status = "cancelled"
                job.touched = time.monotonic()
        if job.status == "cancelled":
            service.remove(job)
        return job.public()

    @router.get("/v1/jobs/{job_id}/sidecar")
    def sidecar(job_id: str, request: Request) -> JSONResponse:
        job = service.job(job_id, _owner(service, request))
        if job.status != "done" or job.sidecar is None:
            raise Refused(409, f"job {job.id} is {job.status}, no result to fetch")
        return JSONResponse(job.sidecar)

    @router.get("/v1/jobs/{job_id}/labels")
    def labels(job_id: str, request: Request) -> FileResponse:
        job = service.job(job_id, _owner(service, request))
        if job.status != "done":
            raise Refused(409, f"job {job.id} is {job.status}, no result to fetch")
        if job.fetched or job.output is None or not job.output.is_file():
            raise Refused(410, f"job {job.id}: its label map was fetched and is no longer kept here")
        return FileResponse(job.output, media_type="application/octet-stream", filename=job.output.name,
                            background=BackgroundTask(service.fetched, job))

    @router.delete("/v1/jobs/{job_id}")
    def delete(job_id: str, request: Request) -> dict:
        service.forget(service.job(job_id, _owner(service, request)))
        return {"job": job_id, "status": "removed"}

    return router


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once its socket is bound (port 0: the port the system gave)."""

    def __init__(self, config: uvicorn.Config, tokens: int):
        super().__init__(config)
        self.tokens = tokens

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log.info("listening on http://%s:%d (%d token%s accepted); ready for jobs, Ctrl-C stops it", shown, port,
                     self.tokens, "" if self.tokens == 1 else "s")


def serve(host: str, port: int, token_file: str, models: list[str], limits: Limits, device: str = "auto",
          threads: int | None = None, libraries: str | None = None, workdir: str | None = None,
          docs: bool = False) -> None:
    """Run the server until interrupted (SIGTERM, SIGINT / Ctrl-C: every job's files are deleted on the way
    out), logging (``iris_core.service.server``, INFO) the models it loaded, the libraries it offers, where it
    listens and that it is ready. A non-loopback host is allowed only with a token file (always required here),
    and says that TLS belongs to a reverse proxy."""
    tokens = read_tokens(token_file)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach it needs a token; put TLS in front (a reverse proxy, "
                    "README: Inference as a service)", host)
    service = Service(tokens, models, limits, device, threads, workdir=workdir, libraries=libraries)
    try:
        for name in models:  # loaded once per worker, kept warm
            for dev in service.devices:
                log.info("loading model %s for the worker on %s", name, dev)
                loaded = service.model(name, dev)
                log.info("model %s: %s (%s, %s)", name, loaded.name, loaded.arch, loaded.source)
        release_memory()
        offered = sorted(service.offered_libraries())
        if service.libraries is not None:
            log.info("task libraries offered from %s: %s", service.libraries, ", ".join(offered) or "none")
        log.info("jobs' files in %s (deleted when each job ends and when the server stops)", service.root)
        server = _Server(uvicorn.Config(create_app(service, docs), host=host, port=port, log_level="warning",
                                        timeout_graceful_shutdown=5), len(tokens))
        try:
            server.run()
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully and raises the signal again
            pass
        except SystemExit:  # uvicorn's way out when it cannot bind (it logged why)
            server.started = False
        if not server.started:
            raise IrisError(f"serve: cannot listen on {host}:{port} (address in use by another server? the reason is "
                            "logged above); choose another --port or --host")
    finally:
        service.close()
    log.info("stopped; every job's files were deleted")
