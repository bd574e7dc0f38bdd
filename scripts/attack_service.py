"""The server's memory against a hostile client (issue [19]): ``iris-segment serve`` with the bundled model on the
CPU, its resident memory (RSS, and its peak sampled every 50 ms) idle, after three jobs on the shipped sample pair (Colin27 -> ICBM 2009a moved) and a
minute idle, after a battery of attacks (decompression bombs from 100-byte headers, a header naming /dev/zero, a
300 MB chunked upload against a 20 MB limit, a 19 MB JSON field, out-of-bound requests) and after the battery
again; each attack's status and time; and the files left in the work folder. Prints a Markdown table.

    .venv/bin/python scripts/attack_service.py [--model default] [--idle 60]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _nrrd(header: str, data: bytes = b"") -> bytes:
    return f"NRRD0004\n{header}\n\n".encode() + data


def battery() -> dict[str, dict]:
    """Attack name -> the parts it replaces in a job's upload (none for the raw chunked upload)."""
    nii = bytearray(352)
    nii[0:4] = (348).to_bytes(4, "little")
    nii[40:56] = b"".join(int(v).to_bytes(2, "little") for v in (3, 1000, 1000, 1000, 1, 1, 1, 1))
    nii[70:74] = (2).to_bytes(2, "little") + (8).to_bytes(2, "little")
    nii[344:348] = b"n+1\0"
    nii[108:112] = struct.pack("<f", 352.0)
    return {
        "gzip NRRD declaring 1600^3 (101 bytes)": {"target": ("t.nrrd", _nrrd(
            "type: uint8\ndimension: 3\nsizes: 1600 1600 1600\nencoding: gzip", gzip.compress(b"\0" * 64)))},
        "NIfTI.gz declaring 1000^3": {"target": ("t.nii.gz", gzip.compress(bytes(nii) + b"\0" * 2_000_000))},
        "NRRD 'data file: /dev/zero', 1000^3": {"target": ("t.nrrd", _nrrd(
            "type: uint8\ndimension: 3\nsizes: 1000 1000 1000\nencoding: raw\ndata file: /dev/zero"))},
        "NRRD 'data file: /etc/passwd'": {"target": ("t.nrrd", _nrrd(
            "type: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd"))},
        "19 MB JSON field": {"request": json.dumps({"model": "x" * 19_000_000})},
        "tune_steps 1e9": {"request": json.dumps({"options": {"tune_steps": 10**9}})},
        "nested JSON": {"request": "[" * 100_000 + "]" * 100_000},
        "reuse: a server file": {"request": json.dumps({"reuse": "/etc/shadow"})},
        "300 MB chunked": {},
    }


def multipart(parts: dict) -> tuple[bytes, str]:
    boundary = secrets.token_hex(8)
    out = b""
    for name, value in parts.items():
        if isinstance(value, str):
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        else:
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n\r\n'
                    ).encode() + value[1] + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, token: str, body: bytes, ctype: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/jobs", body=body, headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def chunked(port: int, token: str, total: int) -> tuple[int, int]:
    """A chunked upload of ``total`` bytes; (status, bytes sent before the server answered or closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: multipart/form-data;"
            " boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="target"; filename="t.nii.gz"\r\n\r\n'
    sent, chunk, answer = 0, b"\0" * 2**20, b""
    try:
        sock.sendall(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        while sent < total:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:  # the server has answered: stop sending
                break
        answer = sock.recv(200)
    except OSError:
        pass
    sock.close()
    return (int(answer.split()[1]) if answer.startswith(b"HTTP/") else 0), sent


class MemoryLog:
    """The server's resident memory as table rows: each row its RSS now and the highest RSS sampled (every 50 ms,
    in a thread) since the row before."""

    def __init__(self, proc: subprocess.Popen):
        import psutil

        self.proc, self.server, self.rows, self.peak = proc, psutil.Process(proc.pid), [], 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        while self.proc.poll() is None:
            try:
                self.peak = max(self.peak, self.server.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.05)

    def row(self, stage: str, note: str = "") -> None:
        now = self.server.memory_info().rss / 2**20
        self.rows.append((stage, now, max(self.peak, now), note))
        self.peak = 0.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (IrisSegmentLib.warm's, which this script used, went with issue [18]'s
    pipe worker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, folder: Path) -> tuple[subprocess.Popen | None, int, str]:
    """``iris-segment serve`` on the CPU with a 20 MB upload limit and its work folder in ``folder``, answering:
    (process, port, token); None for the process when it exited (its log in ``folder``/server.log)."""
    from iris_core.service.client import Client, ServerError

    token = secrets.token_hex(16)
    (folder / "tokens").write_text(token + "\n")
    (folder / "tokens").chmod(0o600)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "iris_core.commands.cli", "serve", "--port", str(port),
                             "--token-file", str(folder / "tokens"), "--models", model, "--device", "cpu",
                             "--threads", "1", "--max-jobs", "2", "--max-upload-mb", "20", "--workdir",
                             str(folder / "work")], stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT)
    while True:
        try:
            Client(f"http://127.0.0.1:{port}", token, timeout=5).info()
            return proc, port, token
        except ServerError:
            if proc.poll() is not None:
                return None, port, token
            time.sleep(0.5)


def attack(name: str, parts: dict, port: int, token: str, model: str, target: Path, refs: list) -> str:
    """One attack of the battery, on top of a valid job's upload; the server's answer in words."""
    if name == "300 MB chunked":
        status, sent = chunked(port, token, 300 * 2**20)
        return f"HTTP {status}, {sent / 2**20:.0f} MB sent before the answer"
    parts = {"request": json.dumps({"model": model}), "target": ("t.nrrd", target.read_bytes()),
             "reference_image_0": ("r.nrrd", refs[0][0].read_bytes()),
             "reference_labels_0": ("l.seg.nrrd", refs[0][1].read_bytes()), **parts}
    body, ctype = multipart(parts)
    return f"HTTP {post(port, token, body, ctype)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--idle", type=float, default=60, help="seconds idle after the jobs")
    args = ap.parse_args(argv)

    from iris_core.resources import SAMPLE_DATA
    from iris_core.service.client import Client

    folder = Path(tempfile.mkdtemp(prefix="iris-attack-"))
    work = folder / "work"
    proc, port, token = start_server(args.model, folder)
    if proc is None:
        print((folder / "server.log").read_text())
        return 1
    memory = MemoryLog(proc)
    time.sleep(2)
    memory.row("idle after start")
    target, refs = SAMPLE_DATA / "ICBM2009a-moved.nrrd", [(SAMPLE_DATA / "Colin27.nrrd", SAMPLE_DATA / "Colin27.seg.nrrd")]
    client = Client(f"http://127.0.0.1:{port}", token, timeout=60)
    for i in range(3):
        job = client.submit(target, refs, model=args.model)
        st = client.wait(job)
        assert st["status"] == "done", st
        client.fetch(job, folder / f"seg{i}.nii.gz")
        memory.row(f"after job {i + 1}")
    time.sleep(args.idle)
    memory.row(f"after 3 jobs and {args.idle:g} s idle")
    for round_ in (1, 2):
        for name, parts in battery().items():
            t0 = time.perf_counter()
            what = attack(name, parts, port, token, args.model, target, refs)
            if round_ == 1:
                memory.row(f"attack: {name}", f"{what}, {time.perf_counter() - t0:.2f} s")
        memory.row(f"after the battery, round {round_}")
    ok = client.info()["server"] == "iris-segment"
    left = [str(p.relative_to(work)) for p in work.rglob("*") if p.name != ".iris-serve-owner" and p.is_file()]
    proc.terminate()
    proc.wait(timeout=60)
    after = sorted(p.name for p in work.iterdir()) if work.exists() else []
    print("| stage | server RSS, MB | peak since the row above, MB | answer |\n|---|---|---|---|")
    for stage, mb, high, note in memory.rows:
        print(f"| {stage} | {mb:,.0f} | {high:,.0f} | {note} |")
    print(f"\nserver answers after the battery: {ok}; job files in its work folder: {left or 'none'}; "
          f"after SIGTERM: {after or 'empty'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
