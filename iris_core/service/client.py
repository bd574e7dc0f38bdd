"""A client of ``iris-segment serve`` with the standard library alone (http.client, ssl, json): no torch, numpy,
monai or scipy, so a Slicer without torch, or any thin machine, segments through a server. Used by
``iris-segment segment --server URL`` and the Slicer module.

Where the token goes: to the address given and nowhere else. No proxy is used unless one is given (``proxy``;
never for a loopback server), whatever ``http_proxy`` / ``HTTPS_PROXY`` say; a redirect is an error naming where
it pointed, never followed. Each call has a total deadline (``timeout``; uploads and label maps
``transfer_timeout``), however slowly the server answers, and a cap on the answer's size. HTTPS is checked against
the system's certificates (or ``SSL_CERT_FILE``), or only against ``ca_bundle`` when given. Before uploading, the
request is checked against the schema the server publishes (``GET /v1/info``): an option an older server does not
know is left out when at its default, and refused in words otherwise."""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from iris_core.io.names import publish, sidecar_path
from iris_core.io.outputs import stamp
from iris_core.options import SegmentOptions
from iris_core.service.wire import mismatch, multipart, part_file_name, rename_parts, resolve

PROTOCOL = 1
#: a JSON answer (status, sidecar, info) is at most this long
MAX_JSON_BYTES = 16 * 2**20
JOB_ID = re.compile(r"[0-9a-f]{32}")
#: what the client sends when the caller leaves a field alone (left out for a server that does not know it)
REQUEST_DEFAULTS = {"model": "default", "classes": None, "output": ".nii.gz", "library": None, "keep_task": False}


class ServerError(Exception):
    """The server refused or failed a call, or could not be used; the message is fit for the user."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def read_token(path: str | Path) -> str:
    """The first token of a token file (one per line; '#' comments)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ServerError(f"token file {path}: no token")


def is_loopback(host: str) -> bool:
    """True for this computer's own addresses (localhost, 127.0.0.0/8, ::1): never reached through a proxy."""
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Client:
    """Calls to one server with one token. ``timeout``: seconds a call may take in all (connecting, sending,
    waiting, reading); ``transfer_timeout`` the same for an upload or a label map; ``ca_bundle``: a PEM file of the
    certificates to trust for HTTPS instead of the system's; ``proxy``: an ``http://host:port`` proxy to reach the
    server through (a loopback server never is); ``max_result_mb``: the largest label map accepted."""

    def __init__(self, url: str, token: str, timeout: float = 60.0, *, ca_bundle: str | Path | None = None,
                 proxy: str | None = None, transfer_timeout: float = 1800.0, max_result_mb: float = 4096):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.transfer_timeout, self.max_result = transfer_timeout, int(max_result_mb * 2**20)
        parts = urlsplit(self.url)
        # an address that is not one is refused at the first call (a client may be made before its address is known)
        self.valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        self.https, self.host = parts.scheme == "https", parts.hostname or ""
        try:
            self.port = parts.port or (443 if self.https else 80)
        except ValueError:
            self.valid, self.port = False, 0
        self.base = parts.path.rstrip("/")
        #: job -> {name the server stores an upload under: the user's file name}, for the sidecars it writes
        self.uploads: dict[str, dict[str, str]] = {}
        self.proxy = None
        if proxy and not is_loopback(self.host):
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if p.scheme != "http" or not p.hostname:
                raise ServerError(f"proxy {proxy!r}: give it as http://host:port")
            self.proxy = (p.hostname, p.port or 80)
        self.context = None
        if self.https:
            try:
                self.context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
            except (OSError, ssl.SSLError) as exc:
                raise ServerError(f"CA bundle {ca_bundle}: {getattr(exc, 'strerror', None) or exc} (a PEM file of "
                                  "the certificates to trust)") from None

    # -- one call ----------------------------------------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if not self.valid:
            raise ServerError(f"server {self.url!r}: give its address as http://host:port or https://host")
        host, port = self.proxy or (self.host, self.port)
        if self.https:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if self.proxy:
            conn.set_tunnel(self.host, self.port)  # CONNECT: the proxy sees the address, never the token
        return conn

    def _call(self, method: str, path: str, body: list | bytes | None = None, content_type: str | None = None,
              sink: Path | None = None, transfer: bool = False) -> bytes:
        """One request; the answer's body (or, with ``sink``, its length, the body written there). ``body``: bytes,
        or a list of bytes and file paths sent in turn (an upload is never held whole in memory)."""
        seconds = self.transfer_timeout if transfer else self.timeout
        cap = self.max_result if sink is not None else MAX_JSON_BYTES
        conn = self._connection(min(self.timeout, seconds))
        expired = threading.Event()

        opened: list[socket.socket] = []  # the socket (the connection forgets it once an HTTP/1.0 answer comes)

        def expire() -> None:  # the total deadline: a server trickling bytes is cut off
            expired.set()
            for sock in opened or [conn.sock]:
                if sock is None:
                    continue
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        resp = None
        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            resp = self._send(conn, method, path, body, content_type, opened, expired)
            data = self._answer(resp, path, cap, sink)
            if expired.is_set():  # the deadline's shutdown ends the body early: not an answer
                raise OSError("deadline")
            return data
        except ServerError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ServerError(f"server {self.url}: its certificate is not trusted ({exc.verify_message}); give the "
                              "certificate of the authority that signed it (--ca-bundle PEM)") from None
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise ServerError(f"server {self.url}: no complete answer to {path} within {seconds:g} s; gave "
                                  "up") from None
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
            raise ServerError(f"server {self.url}: cannot be reached ({why})") from None
        finally:
            timer.cancel()
            if resp is not None:
                resp.close()
            conn.close()

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str, body: list | bytes | None,
              content_type: str | None, opened: list[socket.socket], expired: threading.Event
              ) -> http.client.HTTPResponse:
        """Send the request (its socket appended to ``opened``: the deadline shuts it) and return the answer. A
        server that answers before the upload ended (413, 429) and closes: its refusal, if it came."""
        pieces = [body] if isinstance(body, bytes) else list(body or [])
        length = sum(len(p) if isinstance(p, bytes) else Path(p).stat().st_size for p in pieces)
        conn.putrequest(method, self.base + path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {self.token}")
        if content_type:
            conn.putheader("Content-Type", content_type)
        if body is not None:
            conn.putheader("Content-Length", str(length))
        conn.endheaders()
        opened.append(conn.sock)
        try:
            for piece in pieces:
                if isinstance(piece, bytes):
                    conn.send(piece)
                else:
                    with open(piece, "rb") as f:
                        while chunk := f.read(2**20):
                            conn.send(chunk)
        except OSError:
            if expired.is_set():
                raise
            with conn.getresponse() as resp:
                raise self._refusal(resp) if resp.status >= 400 else ServerError(
                    f"server {self.url}: closed the connection during the upload", resp.status) from None
        return conn.getresponse()

    def _answer(self, resp: http.client.HTTPResponse, path: str, cap: int, sink: Path | None) -> bytes:
        """The answer's body (``_read``) once it is known to be one: a redirect is not followed (the token goes to
        the address given only), a refusal is raised in the server's words, a body announced over ``cap`` is
        refused before it is read."""
        if 300 <= resp.status < 400:
            raise ServerError(f"server {self.url}: answered {path} with a redirect to "
                              f"{resp.getheader('Location', '?')!r}, not followed (the token goes to the address "
                              "given only): give the address it points to", resp.status)
        if resp.status >= 400:
            raise self._refusal(resp)
        announced = resp.getheader("Content-Length", "")
        if announced.isdigit() and int(announced) > cap:
            raise ServerError(f"server {self.url}: its answer to {path} is {int(announced) / 2**20:.0f} MB, over "
                              f"this client's limit of {cap / 2**20:.0f} MB", resp.status)
        return self._read(resp, path, cap, sink)

    def _read(self, resp: http.client.HTTPResponse, path: str, cap: int, sink: Path | None) -> bytes:
        """The body, read as it comes (``read1``: the deadline's shutdown ends a wait) up to ``cap`` bytes."""
        got, chunks = 0, []
        out = open(sink, "wb") if sink is not None else None
        try:
            while chunk := resp.read1(2**20):
                got += len(chunk)
                if got > cap:
                    raise ServerError(f"server {self.url}: its answer to {path} is over this client's limit of "
                                      f"{cap / 2**20:.0f} MB; stopped reading", resp.status)
                if out is not None:
                    out.write(chunk)
                else:
                    chunks.append(chunk)
        finally:
            if out is not None:
                out.close()
        return b"".join(chunks)

    def _refusal(self, resp: http.client.HTTPResponse) -> ServerError:
        try:
            length = resp.getheader("Content-Length", "")
            text = resp.read(int(length)) if length.isdigit() and int(length) <= 2**16 else resp.read1(2**16)
            detail = json.loads(text).get("detail", "")
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            detail = ""
        if not isinstance(detail, str):
            detail = json.dumps(detail)[:500]
        return ServerError(f"server {self.url}: {detail or resp.reason} (HTTP {resp.status})", resp.status)

    def _json(self, method: str, path: str, **kw) -> dict:
        data = self._call(method, path, **kw)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerError(f"server {self.url}: its answer to {method} {path} is not a JSON object "
                              f"({data[:80]!r}); is this an iris-segment server?")
        return answer

    def _job_id(self, answer: dict, what: str) -> str:
        job = answer.get("job")
        if not isinstance(job, str) or not JOB_ID.fullmatch(job):
            raise ServerError(f"server {self.url}: its answer to {what} names no job ({json.dumps(answer)[:120]}); "
                              "is this an iris-segment server?")
        return job

    # -- the protocol ------------------------------------------------------------------------------------------

    def _limits(self) -> dict:
        if not hasattr(self, "_info"):
            self._info = self.info()
        return self._info

    def info(self) -> dict:
        """The handshake: refuses, in one line, a server this client cannot work with."""
        info = self._json("GET", "/v1/info")
        if info.get("server") != "iris-segment" or info.get("protocol") != PROTOCOL:
            raise ServerError(f"server {self.url} speaks {info.get('server', '?')} protocol "
                              f"{info.get('protocol', '?')}; this client speaks iris-segment protocol {PROTOCOL}: "
                              "update the older of the two")
        self._info = info
        return info

    def check_request(self, request: dict) -> dict:
        """``request`` as the server accepts it, checked against the schema it publishes: a field or option it does
        not know is left out when at its default, refused otherwise ('the server is older'); a value outside what
        it accepts is refused naming the field and what it accepts. A server that publishes no schema gets the
        request as is."""
        schema = self._limits().get("request_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
            return request
        defs, props = schema.get("$defs") or {}, schema["properties"]
        defaults = {**REQUEST_DEFAULTS, "options": {}}
        out: dict = {}
        for key, value in request.items():
            if key not in props:
                if value == defaults.get(key, object()) or value == {}:
                    continue
                raise ServerError(f"server {self.url} is older: it does not accept {key!r}; update the server or "
                                  f"leave {key} at its default")
            if key == "options" and isinstance(value, dict):
                out[key] = self._check_options(value, resolve(props[key], defs), defs)
                continue
            problem = mismatch(value, props[key], defs)
            if problem:
                raise ServerError(f"server {self.url} does not accept {key}={value!r}: it takes {problem}")
            out[key] = value
        return out

    def _check_options(self, options: dict, schema: dict, defs: dict) -> dict:
        known = schema.get("properties") or {}
        defaults = SegmentOptions().to_dict()
        kept = {}
        for name, value in options.items():
            if name not in known:
                if name in defaults and value == defaults[name]:
                    continue
                raise ServerError(f"server {self.url} is older: it does not accept option {name!r}; update the "
                                  f"server or leave {name} at its default ({defaults.get(name)!r})")
            problem = mismatch(value, known[name], defs)
            if problem:
                raise ServerError(f"server {self.url} does not accept option {name}={value!r}: it takes {problem}")
            kept[name] = value
        return kept

    def submit(self, target: str | Path, references: list[tuple[str, str]], model: str = "default",
               options: dict | None = None, classes: str | list | None = None, output: str = ".nii.gz",
               library: str | None = None, keep_task: bool = False) -> str:
        """Upload a job; its id. ``library``: the name of a task library the server offers (instead of
        references); ``keep_task``: the server keeps the task embedding for ``submit_target``. The request is
        checked against the server's schema and size limit before anything is uploaded."""
        request = self.check_request({"model": model, "options": options or {}, "classes": classes,
                                      "output": output, "library": library, "keep_task": keep_task})
        files = [("target", Path(target))]
        for i, (img, lab) in enumerate(references):
            files += [(f"reference_image_{i}", Path(img)), (f"reference_labels_{i}", Path(lab))]
        boundary, body = multipart(files, json.dumps(request).encode())
        job = self._job_id(self._json("POST", "/v1/jobs", body=self._fits(body),
                                      content_type=f"multipart/form-data; boundary={boundary}", transfer=True),
                           "POST /v1/jobs")
        self.uploads[job] = self._names(files)
        return job

    @staticmethod
    def _names(files: list[tuple[str, Path]]) -> dict[str, str]:
        """{the name the server stores each upload under: the user's file name} (wire.part_file_name)."""
        return {stored: path.name for part, path in files if (stored := part_file_name(part, path.name))}

    def user_words(self, job: str, text):
        """The server's words about ``job`` (its sidecar, an error) with the user's file names in place of the
        names the server stored the uploads under (``target.nii.gz``, ``reference_image_0.nrrd``)."""
        return rename_parts(text, self.uploads.get(job, {}))

    def _fits(self, body: list) -> list:
        """``body``, refused here in words when over the server's advertised limit (rather than by a connection
        the server closes in the middle of the upload)."""
        size = sum(len(p) if isinstance(p, bytes) else Path(p).stat().st_size for p in body)
        limit = self._limits().get("max_upload_mb")
        if isinstance(limit, int | float) and size > limit * 2**20:
            raise ServerError(f"server {self.url}: upload of {size / 2**20:.1f} MB is over the server's limit "
                              f"of {limit:g} MB (HTTP 413 before sending)", 413)
        return body

    def submit_target(self, job: str, target: str | Path) -> str:
        """A further target for a finished ``keep_task`` job: segmented with its task, not encoding the
        references again; the new job's id."""
        boundary, body = multipart([("target", Path(target))])
        new = self._job_id(self._json("POST", f"/v1/jobs/{job}/targets", body=self._fits(body),
                                      content_type=f"multipart/form-data; boundary={boundary}", transfer=True),
                           f"POST /v1/jobs/{job}/targets")
        # the references are the first job's; the target is this one
        kept = {k: v for k, v in self.uploads.get(job, {}).items() if not k.startswith("target.")}
        self.uploads[new] = kept | self._names([("target", Path(target))])
        return new

    def status(self, job: str) -> dict:
        st = self._json("GET", f"/v1/jobs/{job}")
        if not isinstance(st.get("status"), str):
            raise ServerError(f"server {self.url}: its status of job {job} has no 'status' ({json.dumps(st)[:120]})")
        return st

    def cancel(self, job: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job}/cancel")

    def wait(self, job: str, progress: Callable[[str, int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None, interval: float = 0.2) -> dict:
        """Poll until the job ends; progress as the local worker reports it; ``cancel()`` true cancels it."""
        while True:
            st = self.status(job)
            if progress is not None and st.get("stage"):
                progress(str(st["stage"]), int(st.get("done") or 0), int(st.get("total") or 0))
            if st["status"] in ("done", "failed", "cancelled"):
                return st
            if cancel is not None and cancel():
                self.cancel(job)
            time.sleep(interval)

    def fetch(self, job: str, output: str | Path, forget: bool = True, record: dict | None = None
              ) -> tuple[Path, Path, dict]:
        """Write the job's label map to ``output`` and its sidecar beside it (``seg.nii.gz`` -> ``seg.json``),
        each through a temporary moved into place (the label map streamed to disk, at most ``max_result_mb``);
        then (``forget``) the server forgets the job. The server deletes its copy of the label map once sent.
        The sidecar names the user's files (not the server's names for the uploads), says this tool wrote it,
        and holds ``record``'s fields too (the preview the caller draws)."""
        output = Path(output)
        side = sidecar_path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp_labels, tmp_side = (d.with_name(f".{d.name}.partial") for d in (output, side))
        try:
            self._call("GET", f"/v1/jobs/{job}/labels", sink=tmp_labels, transfer=True)
            sidecar = stamp(self.user_words(job, self._json("GET", f"/v1/jobs/{job}/sidecar")) | (record or {}))
            tmp_side.write_text(json.dumps(sidecar, indent=2))
            publish(tmp_labels, output)
            publish(tmp_side, side)
        finally:
            tmp_labels.unlink(missing_ok=True)
            tmp_side.unlink(missing_ok=True)
        if forget:
            self.forget(job)
        return output, side, sidecar

    def forget(self, job: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job}")
        self.uploads.pop(job, None)
