"""A client of ``iris-segment serve`` with the standard library alone (urllib, json): no torch, monai or scipy,
so a Slicer without torch, or any thin machine, segments through a server. Used by ``iris-segment segment
--server URL``."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from iris_core.io.names import publish, sidecar_path

PROTOCOL = 1


class ServerError(Exception):
    """The server refused or failed a call; the message is the server's answer, fit for the user."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def read_token(path: str | Path) -> str:
    """The first token of a token file (one per line; '#' comments)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ServerError(f"token file {path}: no token")


class Client:
    """Calls to one server with one token."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {self.token}"})
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail", "")
            except ValueError:
                detail = ""
            raise ServerError(f"server {self.url}: {detail or exc.reason} (HTTP {exc.code})", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise ServerError(f"server {self.url}: cannot be reached ({why})") from None

    def _json(self, method: str, path: str, **kw) -> dict:
        return json.loads(self._call(method, path, **kw))

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
        return info

    def submit(self, target: str | Path, references: list[tuple[str, str]], model: str = "default",
               options: dict | None = None, classes: str | list | None = None, output: str = ".nii.gz",
               library: str | None = None, keep_task: bool = False) -> str:
        """Upload a job; its id. ``library``: the name of a task library the server offers (instead of
        references); ``keep_task``: the server keeps the task embedding for ``submit_target``."""
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []

        def add(name: str, data: bytes, filename: str | None = None) -> None:
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
            head += f'; filename="{filename}"\r\nContent-Type: application/octet-stream' if filename else ""
            parts.append(head.encode() + b"\r\n\r\n" + data + b"\r\n")

        add("request", json.dumps({"model": model, "options": options or {}, "classes": classes, "output": output,
                                   "library": library, "keep_task": keep_task}).encode())
        add("target", Path(target).read_bytes(), Path(target).name)
        for i, (img, lab) in enumerate(references):
            add(f"reference_image_{i}", Path(img).read_bytes(), Path(img).name)
            add(f"reference_labels_{i}", Path(lab).read_bytes(), Path(lab).name)
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        # refused here, in words, rather than by a connection the server closes in the middle of the upload
        limit = self._limits().get("max_upload_mb")
        if limit and len(body) > limit * 2**20:
            raise ServerError(f"server {self.url}: upload of {len(body) / 2**20:.1f} MB is over the server's limit "
                              f"of {limit:.0f} MB (HTTP 413 before sending)", 413)
        return self._json("POST", "/v1/jobs", body=body, content_type=f"multipart/form-data; boundary={boundary}")[
            "job"]

    def submit_target(self, job: str, target: str | Path) -> str:
        """A further target for a finished ``keep_task`` job: segmented with its task, not encoding the
        references again; the new job's id."""
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="target"; filename="{Path(target).name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode() + Path(target).read_bytes() + \
            f"\r\n--{boundary}--\r\n".encode()
        return self._json("POST", f"/v1/jobs/{job}/targets", body=body,
                          content_type=f"multipart/form-data; boundary={boundary}")["job"]

    def status(self, job: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job}")

    def cancel(self, job: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job}/cancel")

    def wait(self, job: str, progress: Callable[[str, int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None, interval: float = 0.2) -> dict:
        """Poll until the job ends; progress as the local worker reports it; ``cancel()`` true cancels it."""
        while True:
            st = self.status(job)
            if progress is not None and st.get("stage"):
                progress(st["stage"], st.get("done", 0), st.get("total", 0))
            if st["status"] in ("done", "failed", "cancelled"):
                return st
            if cancel is not None and cancel():
                self.cancel(job)
            time.sleep(interval)

    def fetch(self, job: str, output: str | Path, forget: bool = True) -> tuple[Path, Path, dict]:
        """Write the job's label map to ``output`` and its sidecar beside it (``seg.nii.gz`` -> ``seg.json``),
        each through a temporary moved into place; then (``forget``) the server forgets the job."""
        output = Path(output)
        labels = self._call("GET", f"/v1/jobs/{job}/labels")
        sidecar = self._json("GET", f"/v1/jobs/{job}/sidecar")
        side = sidecar_path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        written = []
        for dest, data in ((output, labels), (side, json.dumps(sidecar, indent=2).encode())):
            tmp = dest.with_name(f".{dest.name}.partial")
            tmp.write_bytes(data)
            written.append((tmp, dest))
        for tmp, dest in written:
            publish(tmp, dest)
        if forget:
            self._call("DELETE", f"/v1/jobs/{job}")
        return output, side, sidecar

    def forget(self, job: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job}")
