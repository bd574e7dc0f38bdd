"""The warm local worker: ``iris-segment serve`` started on this computer's loopback on the first Segment, with a
random token of its own (other users of the machine reach its loopback too), and kept alive with its model
loaded, so later Segment clicks pay only the segmentation, not starting Python, importing torch and loading the
model again. Stopped when the module closes (or Slicer quits), or restarted when the model or device changes."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from iris_core.service.client import Client, ServerError

from .runner import WorkerError, kill_tree, popen_options, python_executable, worker_environment

#: seconds a warm worker may take to start (import torch, load the model) before it is given up
START_TIMEOUT = 300


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WarmServer:
    """One loopback server for one (model, device); ``ensure`` starts or reuses it and returns (URL, token)."""

    def __init__(self, python: str | None = None, workdir: str | Path | None = None):
        self.python = python
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.key: tuple[str, str] | None = None
        self.url = self.token = ""
        self.folder: Path | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self, model: str, device: str = "auto") -> tuple[str, str]:
        """(URL, token) of a running server for ``model`` on ``device``: the current one, or a new one (the old
        one stopped) started and waited for until it answers."""
        if self.running and self.key == (model, device):
            return self.url, self.token
        self.stop()
        self.folder = Path(tempfile.mkdtemp(prefix="iris-warm-", dir=self.workdir))
        self.token = secrets.token_hex(24)
        token_file = self.folder / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # readable by this user only
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = worker_environment()
        log = (self.folder / "server.log").open("w")
        try:
            self.proc = subprocess.Popen(
                [self.python or python_executable(), "-u", "-m", "iris_core.commands.cli", "serve", "--host",
                 "127.0.0.1", "--port", str(port), "--token-file", str(token_file), "--models", model, "--device",
                 device, "--max-jobs", "2"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **popen_options())
        except OSError as exc:
            self.stop()
            raise WorkerError(f"cannot start the warm worker with {self.python or python_executable()}: {exc}") from None
        finally:
            log.close()
        self.key = (model, device)
        deadline = time.monotonic() + START_TIMEOUT
        client = Client(self.url, self.token, timeout=5)
        while True:
            try:
                client.info()
                return self.url, self.token
            except ServerError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.folder / "server.log").read_text(errors="replace")[-3000:]
                    self.stop()
                    raise WorkerError("the warm worker did not start (see the details)", tail) from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server (its whole process tree) and remove its token. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc, self.key = None, None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
