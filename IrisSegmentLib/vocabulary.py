"""What a model or task library can segment by name (for the "Known structures" mode), read from
the file's header only: the GUI must stay responsive when the user picks a 480 MB checkpoint, so
nothing here loads weights or imports torch.

- our ``.safetensors`` models and task libraries: the JSON header's ``__metadata__``
  (architecture, class names) - the first bytes of the file;
- a ``.pth`` zip (torch.save): the key names in its ``data.pkl`` record, scanned as bytes and
  never unpickled; a Hermes state_dict has the published Hermes-R vocabulary.

``model_kind`` is the one entry point; a model offered for download later plugs in by giving its
kind without a file (see ``KNOWN_KINDS``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

# key names that tell a foreign state_dict's architecture (iris_core.hub.checkpoint.infer_architecture)
HERMES_KEY = b"prior_init_fuse_2.task_prior"
IRIS_KEY = b"task_embedding.0.task_query"
# models known by name, without opening a file ("default" is the bundled Iris model)
KNOWN_KINDS = {"": "iris", "default": "iris"}


class ModelFileError(Exception):
    """A model or task library file that cannot be what it claims to be; the message names it."""


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header alone (iris_core's torch-free reader)."""
    from iris_core.errors import CheckpointError
    from iris_core.hub.library import safetensors_metadata as read_metadata

    try:
        return read_metadata(path)
    except CheckpointError as exc:
        raise ModelFileError(str(exc)) from None


def _pth_kind(path: Path) -> str:
    """'hermes', 'iris' or 'unknown' for a torch.save zip, from the key names in data.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                return "unknown"
            record = z.read(names[0])
    except (OSError, zipfile.BadZipFile):
        return "unknown"  # legacy (non-zip) torch files: decided when segmenting
    if HERMES_KEY in record:
        return "hermes"
    return "iris" if IRIS_KEY in record else "unknown"


def _library_names(meta: dict[str, str], path) -> list[str]:
    """A task library's class names, read with the library format's own (torch-free) reader."""
    from iris_core.errors import CheckpointError
    from iris_core.hub.library import LibraryInfo

    try:
        return LibraryInfo.from_metadata(meta, path).names
    except CheckpointError as exc:
        raise ModelFileError(str(exc)) from None


def model_kind(model: str | None) -> tuple[str, dict[str, str]]:
    """(kind, safetensors metadata) of a model choice: 'iris', 'hermes', 'library' (a task library
    given as the model) or 'unknown' (decided by the worker when segmenting)."""
    model = (model or "").strip()
    if model in KNOWN_KINDS:
        return KNOWN_KINDS[model], {}
    if model.startswith("preset:"):
        return ("hermes" if model.startswith("preset:hermes") else "iris"), {}
    path = Path(model)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if path.suffix.lower() == ".safetensors":
        meta = safetensors_metadata(path)
        if "arch" in meta:
            return meta["arch"], meta
        return ("library" if "names" in meta else "unknown"), meta
    return _pth_kind(path), {}


def known_structures(model: str | None = None, library: str | None = None) -> tuple[str, list[str]]:
    """('hermes' | 'library' | 'iris' | 'unknown', names). A task library lists its class names; a
    Hermes model its vocabulary (stored in our checkpoints, the published Hermes-R vocabulary
    otherwise); an Iris model needs references and lists nothing. Raises ModelFileError naming
    the file when it cannot be read."""
    if library:
        return "library", _library_names(safetensors_metadata(library), library)
    kind, meta = model_kind(model)
    if kind == "library":
        return kind, _library_names(meta, model)
    if kind != "hermes":
        return kind, []
    from iris_core.hub.hermes_vocab import model_vocabulary

    try:
        stored = json.loads(meta.get("class_names", "[]"))
        info = json.loads(meta.get("info", "{}"))
        slots = json.loads(meta.get("config", "{}")).get("task_prior_slots")
    except (ValueError, AttributeError):
        raise ModelFileError(f"{model}: unreadable metadata") from None
    vocab = model_vocabulary(stored, info.get("task_modalities"), slots)  # as iris_core.api.hermes_vocabulary
    names = [t.name for t in vocab]
    # a name shared by several datasets is listed qualified, so every entry is one task
    return "hermes", [t.qualified if names.count(t.name) > 1 else t.name for t in vocab]
