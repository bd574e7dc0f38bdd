"""The task-library format's metadata (what a library holds besides its tensors), torch-free: the
Slicer GUI reads a library's class names from the file header with it, without importing torch,
and ``TaskEmbedding.save``/``load`` write and read the same fields through it."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from iris_core.errors import CheckpointError

LIBRARY_FORMAT = "iris-segment-library/1"
# largest safetensors header accepted (the format's own reader refuses above 100 MB)
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class LibraryInfo:
    names: list[str]
    values: list[int]
    model: str = ""  # fingerprint of the model that encoded it
    info: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {"format": LIBRARY_FORMAT, "names": json.dumps(self.names), "values": json.dumps(self.values),
                "model": self.model, "info": json.dumps(self.info)}

    @staticmethod
    def from_metadata(meta: dict[str, str], path) -> LibraryInfo:
        """Read (and check) a library's metadata; CheckpointError naming ``path`` when it is not one."""
        if meta.get("format") != LIBRARY_FORMAT:
            raise CheckpointError(f"task library {path}: not an iris-segment task library")
        try:
            names, values = json.loads(meta["names"]), json.loads(meta.get("values", "[]"))
            info = json.loads(meta.get("info", "{}"))
        except (KeyError, ValueError):
            raise CheckpointError(f"task library {path}: unreadable class names") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"task library {path}: unreadable class names")
        return LibraryInfo(names, values, meta.get("model", ""), info)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header alone (no tensor read, no torch);
    CheckpointError naming ``path`` when it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"version "):
                raise CheckpointError(f"{path}: a git-LFS pointer, not the model itself: fetch it with "
                                      "'git lfs pull'")
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (corrupt or truncated header)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def is_library_file(path: str | Path) -> bool:
    """True for a task library this tool wrote (its header's format says so): a later run may replace it."""
    try:
        return safetensors_metadata(path).get("format") == LIBRARY_FORMAT
    except CheckpointError:
        return False
