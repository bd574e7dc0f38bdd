"""The task-library format's metadata (what a library holds besides its tensors), torch-free: the
Slicer GUI reads a library's class names from the file header with it, without importing torch,
and ``TaskEmbedding.save``/``load`` write and read the same fields through it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from iris_core.errors import CheckpointError

LIBRARY_FORMAT = "iris-segment-library/1"


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
