"""The service's client against servers that misbehave (issue [19]): small real HTTP servers and TCP listeners on
127.0.0.1 stand in for a proxy, a redirecting host, a server that trickles or floods, an older server, and an HTTPS
server with its own certificate authority. The token goes to the address given and nowhere else."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iris_core.service.client import Client, ServerError
from iris_core.service.schema import OptionsRequest, request_schema

TOKEN = "t0ken-of-the-client-0123456789"


class Listener:
    """A TCP listener that records every byte sent to it (a proxy that must see nothing), answering 502."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while self.sock.fileno() >= 0:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    while b"\r\n\r\n" not in self.received and (data := conn.recv(65536)):
                        self.received += data
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def fake_server(routes: dict, https: ssl.SSLContext | None = None):
    """A real HTTP server on 127.0.0.1 answering ``routes`` ({(method, path): handler(request) -> None}); every
    request it receives is recorded (method, path, headers, body)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.append((self.command, self.path, dict(self.headers), body))
            handler = routes.get((self.command, self.path.split("?")[0]))
            if handler is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            handler(self)

        do_GET = do_POST = do_DELETE = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if https is not None:
        server.socket = https.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "https" if https is not None else "http"
    return server, f"{scheme}://127.0.0.1:{server.server_address[1]}", seen


def answer(status: int, payload, headers: dict | None = None):
    def handler(h: BaseHTTPRequestHandler):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return handler


def info(schema: dict | None = None) -> dict:
    return {"server": "iris-segment", "protocol": 1, "version": "x", "models": ["default"], "max_upload_mb": 16,
            "request_schema": schema if schema is not None else request_schema()}


@pytest.fixture
def proxy_env(monkeypatch):
    """Every proxy variable pointing at a listener, nothing exempt."""
    listener = Listener()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{listener.port}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    yield listener
    listener.close()


def test_no_proxy_for_a_loopback_server_whatever_the_environment_says(proxy_env, phantom_files, tmp_path):
    server, url, seen = fake_server({("GET", "/v1/info"): answer(200, info()),
                                     ("POST", "/v1/jobs"): answer(202, {"job": "a" * 32})})
    try:
        for address in (url, url.replace("127.0.0.1", "localhost")):
            client = Client(address, TOKEN, timeout=5)
            assert client.info()["server"] == "iris-segment"
            assert client.submit(phantom_files["tgt"], [(phantom_files["ref"], phantom_files["ref_lab"])]) == "a" * 32
        assert len(seen) == 4 and all(s[2]["Authorization"] == f"Bearer {TOKEN}" for s in seen)
        time.sleep(0.3)
        assert proxy_env.received == b""
    finally:
        server.shutdown()


def test_a_proxy_only_when_asked_and_it_never_sees_the_token(proxy_env):
    """An explicit proxy carries a tunnel (CONNECT host:port) to a remote server: the proxy sees the address only;
    the environment's proxy is never used, and a loopback server is reached directly even with a proxy given."""
    asked = Listener()
    try:
        with pytest.raises(ServerError, match="cannot be reached"):
            Client("http://iris.example:8765", TOKEN, timeout=5, proxy=f"http://127.0.0.1:{asked.port}").info()
        assert asked.received.startswith(b"CONNECT iris.example:8765 HTTP/1.")
        assert TOKEN.encode() not in asked.received and b"Authorization" not in asked.received
        assert proxy_env.received == b""
    finally:
        asked.close()
    server, url, seen = fake_server({("GET", "/v1/info"): answer(200, info())})
    try:
        Client(url, TOKEN, timeout=5, proxy=f"http://127.0.0.1:{proxy_env.port}").info()
        assert len(seen) == 1 and proxy_env.received == b""
    finally:
        server.shutdown()


def test_a_redirect_is_an_error_and_never_followed_with_the_token():
    elsewhere, other_url, other_seen = fake_server({("GET", "/v1/info"): answer(200, info())})
    server, url, seen = fake_server({("GET", "/v1/info"): answer(302, b"", {"Location": other_url + "/v1/info"}),
                                     ("POST", "/v1/jobs/" + "a" * 32 + "/cancel"):
                                         answer(307, b"", {"Location": other_url + "/steal"})})
    try:
        with pytest.raises(ServerError, match=f"redirect to '{other_url}/v1/info', not followed") as err:
            Client(url, TOKEN, timeout=5).info()
        assert err.value.status == 302
        with pytest.raises(ServerError, match="not followed"):
            Client(url, TOKEN, timeout=5).cancel("a" * 32)
        time.sleep(0.3)
        assert len(seen) == 2 and other_seen == []
    finally:
        server.shutdown()
        elsewhere.shutdown()


def test_a_trickling_server_is_given_up_at_the_deadline():
    """A server that sends a byte now and then never lets a per-read timeout fire; the call's total deadline does."""

    def trickle(h: BaseHTTPRequestHandler):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(100):
            try:
                h.wfile.write(b" ")
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.25)

    def slow_headers(h: BaseHTTPRequestHandler):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(100):
            try:
                h.wfile.write(f"X-{i}: y\r\n".encode())
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.25)

    server, url, _ = fake_server({("GET", "/v1/info"): trickle, ("GET", "/v1/jobs/" + "a" * 32): slow_headers})
    try:
        for call in (lambda c: c.info(), lambda c: c.status("a" * 32)):
            start = time.monotonic()
            with pytest.raises(ServerError, match=r"no complete answer to .* within 2 s; gave up"):
                call(Client(url, TOKEN, timeout=2))
            assert time.monotonic() - start < 6
    finally:
        server.shutdown()


def test_answers_are_capped_and_malformed_ones_are_clear_messages(tmp_path):
    big = 64 * 2**20

    def flood(h: BaseHTTPRequestHandler):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"\0" * 2**20
        try:
            for _ in range(big // len(chunk)):
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    job = "a" * 32
    server, url, _ = fake_server({("GET", "/v1/info"): flood, ("GET", f"/v1/jobs/{job}/labels"): flood,
                                  ("GET", f"/v1/jobs/{job}"): answer(200, {"stage": "x"}),
                                  ("POST", "/v1/jobs"): answer(202, {"id": job}),
                                  ("POST", f"/v1/jobs/{job}/targets"): answer(202, {"job": "../../etc"}),
                                  ("POST", f"/v1/jobs/{job}/cancel"): answer(200, b"<html>busy</html>")})
    try:
        client = Client(url, TOKEN, timeout=20, max_result_mb=1)
        with pytest.raises(ServerError, match="over this client's limit of 16 MB; stopped reading"):
            client.info()
        with pytest.raises(ServerError, match="over this client's limit of 1 MB"):
            client.fetch(job, tmp_path / "seg.nii.gz")
        assert list(tmp_path.iterdir()) == []  # nothing half-written
        client._info = info(schema={})
        with pytest.raises(ServerError, match="names no job"):
            client.submit(__file__, [])
        with pytest.raises(ServerError, match="names no job"):
            client.submit_target(job, __file__)
        with pytest.raises(ServerError, match="has no 'status'"):
            client.wait(job)
        with pytest.raises(ServerError, match="is not a JSON object"):
            client.cancel(job)
    finally:
        server.shutdown()


def test_the_handshake_refuses_what_an_older_server_does_not_accept(phantom_files):
    """An older server (its schema without ``overlaps`` and without the 'tuning' strategy): an option it does not
    know is left out at its default and refused otherwise, before any upload."""
    schema = request_schema()
    options = schema["$defs"]["OptionsRequest"]
    del options["properties"]["overlaps"]
    options["properties"]["strategy"]["enum"].remove("tuning")
    server, url, seen = fake_server({("GET", "/v1/info"): answer(200, info(schema)),
                                     ("POST", "/v1/jobs"): answer(202, {"job": "b" * 32})})
    refs = [(phantom_files["ref"], phantom_files["ref_lab"])]
    try:
        client = Client(url, TOKEN, timeout=5)
        with pytest.raises(ServerError, match=rf"server {url} is older: it does not accept option 'overlaps'; update "
                                              "the server or leave overlaps at its default"):
            client.submit(phantom_files["tgt"], refs, options={"overlaps": True})
        with pytest.raises(ServerError, match="does not accept option strategy='tuning': it takes one of "
                                              '"one-shot", "ensemble", "retrieval"'):
            client.submit(phantom_files["tgt"], refs, options={"strategy": "tuning"})
        with pytest.raises(ServerError, match=r"does not accept classes=\[\{'name': 'a', 'value': 0\}\]"):
            client.submit(phantom_files["tgt"], refs, classes=[{"name": "a", "value": 0}])
        assert [s[0] for s in seen] == ["GET"]  # nothing uploaded
        assert client.submit(phantom_files["tgt"], refs, options={"overlaps": False, "strategy": "ensemble"}) == "b" * 32
        body = seen[-1][3]
        request = json.loads(body[body.index(b"{"): body.index(b"\r\n--")])
        assert request["options"] == {"strategy": "ensemble"}
    finally:
        server.shutdown()


def test_the_request_schema_covers_every_run_option():
    """A new run option must be added to the server's schema (with its bound) to be sent."""
    from dataclasses import fields

    from iris_core.options import SegmentOptions

    assert set(OptionsRequest.model_fields) == {f.name for f in fields(SegmentOptions)}
    defaults = SegmentOptions().to_dict()
    assert OptionsRequest().model_dump() == defaults


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_a_ca_bundle_is_trusted_instead_of_ssl_cert_file(tmp_path, monkeypatch):
    """HTTPS with a private authority: refused without it (a clear message), accepted with ``ca_bundle`` even when
    SSL_CERT_FILE names another bundle."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server, url, seen = fake_server({("GET", "/v1/info"): answer(200, info())}, https=context)
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k2"),
                    "-out", str(other), "-days", "2", "-subj", "/CN=other"], check=True, capture_output=True,
                   timeout=60)
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    try:
        with pytest.raises(ServerError, match=r"its certificate is not trusted .*--ca-bundle PEM"):
            Client(url, TOKEN, timeout=5).info()
        assert Client(url, TOKEN, timeout=5, ca_bundle=cert).info()["server"] == "iris-segment"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # without ca_bundle, SSL_CERT_FILE is honoured
        assert Client(url, TOKEN, timeout=5).info()["server"] == "iris-segment"
        with pytest.raises(ServerError, match="CA bundle .*missing.pem"):
            Client(url, TOKEN, ca_bundle=tmp_path / "missing.pem")
    finally:
        server.shutdown()


def test_the_client_imports_neither_torch_nor_numpy():
    code = ("import sys, iris_core.service.client\n"
            "print(sorted(m for m in ('torch', 'numpy', 'monai', 'scipy', 'SimpleITK', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
