"""Real ``iris-segment serve`` processes for the service tests (on 127.0.0.1, a free port), and the raw HTTP calls a
hostile client makes (http.client: no proxy, no redirect, exactly the bytes given)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import free_port
from iris_core.service.client import Client, ServerError


def start_server(folder: Path, tokens: list[str], *flags: str, name: str = "server", mode: int = 0o600,
                 timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """A server process with ``tokens`` (written to ``folder/<name>.tokens`` with ``mode``) and ``flags``, waited
    for until it answers; (process, URL)."""
    folder.mkdir(parents=True, exist_ok=True)
    token_file = folder / f"{name}.tokens"
    token_file.write_text("# tokens\n" + "\n".join(tokens) + "\n")
    os.chmod(token_file, mode)
    port = free_port()
    log = folder / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iris_core.commands.cli", "serve", "--port", str(port),
                                 "--token-file", str(token_file), *flags], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            Client(url, tokens[0], timeout=5).info()
            return proc, url
        except ServerError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the server did not start: " + log.read_text()) from None
            time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def call(url: str, method: str = "GET", path: str = "/v1/info", token: str | None = None, body: bytes | None = None,
         headers: dict | None = None, timeout: float = 60) -> tuple[int, dict | bytes]:
    """One raw request: (status, the JSON answer, or the bytes when not JSON)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def multipart(parts: dict[str, tuple[str, bytes] | str]) -> tuple[bytes, dict]:
    """A multipart/form-data body from {name: (filename, bytes)} files and {name: text} fields."""
    boundary = "b0undary7e3f"
    out = b""
    for name, value in parts.items():
        if isinstance(value, str):
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        else:
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n").encode() + value[1] + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_job(url: str, token: str, parts: dict, path: str = "/v1/jobs") -> tuple[int, dict | bytes]:
    body, headers = multipart(parts)
    return call(url, "POST", path, token, body, headers)


def rss_mb(proc: subprocess.Popen) -> float:
    """The server process's resident memory, MB."""
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def wait_job(url: str, token: str, job: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, st = call(url, path=f"/v1/jobs/{job}", token=token)
        assert status == 200, st
        if st["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return st
        time.sleep(0.1)
