"""Known models: the bundled default, published checkpoints fetched on consent (``mass-base``), any file.

``iris-segment models`` lists them; ``iris-segment models pull mass-base`` downloads with
huggingface_hub into its standard cache (``HF_HOME``, ``HF_HUB_CACHE``; ``HF_ENDPOINT`` picks the
server), checks that the file loads as the expected layout and prints its licence. ``--model
mass-base`` then resolves to the cached file, or to a copy put by hand in :func:`manual_dir`.
Nothing is ever downloaded without an explicit ``pull``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from iris_core.errors import CancelledError, CheckpointError, InputError
from iris_core.resources import DEFAULT_MODEL


@dataclass(frozen=True)
class KnownModel:
    """A model IrisSegment knows by name: where it comes from, its licence, what its file must hold."""

    name: str
    title: str
    licence: str
    source: str
    size_bytes: int | None = None
    repo_id: str | None = None  # Hugging Face hub repository; None: bundled with IrisSegment
    filename: str | None = None
    revision: str | None = None
    arch: str = "iris"
    #: config fields the file must have (verification after download)
    layout: dict = field(default_factory=dict)

    @property
    def url(self) -> str | None:
        if not self.repo_id:
            return None
        return f"{endpoint()}/{self.repo_id}/resolve/{self.revision or 'main'}/{self.filename}"

    def size_text(self) -> str:
        return f"{self.size_bytes / 1e6:.0f} MB" if self.size_bytes else "?"


MASS_BASE = KnownModel(
    name="mass-base",
    title="MASS base: Iris architecture, MASS self-supervised pretraining (Stanford AIMI)",
    licence="MIT (Copyright (c) Stanford AIMI; https://github.com/Stanford-AIMI/MASS/blob/main/LICENSE)",
    source="https://huggingface.co/StanfordAIMI/MASS",
    size_bytes=483_581_259,
    repo_id="StanfordAIMI/MASS",
    filename="mass_base.pth",
    layout={"channels": (32, 64, 128, 256, 512), "num_prior_stage": 3, "task_prior_slots": 73},
)

KNOWN: dict[str, KnownModel] = {
    "default": KnownModel("default", "IrisSegment default model (bundled)", "Apache-2.0 (IrisSegment)",
                          str(DEFAULT_MODEL), DEFAULT_MODEL.stat().st_size if DEFAULT_MODEL.is_file() else None),
    "mass-base": MASS_BASE,
}


def endpoint() -> str:
    """The hub server: ``HF_ENDPOINT`` when set (a mirror, or a local test server), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def manual_dir() -> Path:
    """Where a hand-downloaded checkpoint is looked for: ``IRIS_SEGMENT_MODELS`` or
    ``~/.cache/iris-segment/models``."""
    return Path(os.environ.get("IRIS_SEGMENT_MODELS") or Path.home() / ".cache" / "iris-segment" / "models")


def _entry(name: str, known: dict[str, KnownModel] | None) -> KnownModel:
    known = KNOWN if known is None else known
    if name not in known:
        raise CheckpointError(f"unknown model {name!r}; known models: {', '.join(known)} (or pass a file path)")
    return known[name]


def _manual_instructions(m: KnownModel) -> str:
    return (f"download {m.url} by hand (about {m.size_text()}) and put it at {manual_dir() / m.filename} "
            f"(or pass --model /path/to/{m.filename})")


def cache_folder() -> Path:
    """The folder ``pull`` downloads into: huggingface_hub's cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub,
    else ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
        return Path(os.environ.get("HF_HUB_CACHE") or Path(home) / "hub")


def cached_path(name: str, known: dict[str, KnownModel] | None = None, cache_dir: Path | None = None
                ) -> Path | None:
    """The local file of a downloadable model (hand-placed copy first, then the hub cache), or None."""
    m = _entry(name, known)
    if not m.repo_id:
        return Path(m.source) if Path(m.source).is_file() else None
    manual = manual_dir() / m.filename
    if manual.is_file():
        return manual
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(m.repo_id, m.filename, revision=m.revision, cache_dir=cache_dir)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def names_a_model(spec: str | None) -> bool:
    """Whether ``spec`` can name a model without loading anything: the bundled one ('default' or empty),
    ``preset:NAME``, a known name (downloaded or not) or an existing file."""
    return (spec in (None, "", "default") or spec.startswith("preset:") or spec in KNOWN
            or Path(spec).is_file())


def check_model_spec(spec: str | None) -> None:
    """Refuse at once a model that is neither the bundled one, a preset, a known name nor an existing
    file (without loading anything, or importing torch)."""
    if not names_a_model(spec):
        raise InputError(f"model {spec}: no such file, and not a known model ({', '.join(KNOWN)}) or "
                         "preset:NAME")


def resolve(name: str, known: dict[str, KnownModel] | None = None) -> Path:
    """The local file of a known model; a clear error saying how to get it when it is absent."""
    m = _entry(name, known)
    path = cached_path(name, known)
    if path is None:
        if not m.repo_id:
            raise CheckpointError(f"the bundled model {m.source} is missing; pass --model FILE")
        raise CheckpointError(f"model {name!r} is not downloaded. Run `iris-segment models pull {name}` "
                              f"(about {m.size_text()}, licence {m.licence.split(' ')[0]}), or {_manual_instructions(m)}")
    return path


def verify(path: Path, m: KnownModel) -> None:
    """The file loads safely (weights only) as the model's architecture and layout."""
    from iris_core.hub.checkpoint import load_checkpoint

    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"the downloaded {m.name} does not load: {exc}") from None
    if loaded.arch != m.arch:
        raise CheckpointError(f"{path}: a {loaded.arch} model, expected {m.arch} for {m.name}")
    for key, want in m.layout.items():
        got = getattr(loaded.config, key)
        if (tuple(got) if isinstance(got, list | tuple) else got) != want:
            raise CheckpointError(f"{path}: {key} is {got}, expected {want} for {m.name} (a different model?)")


def pull(name: str, known: dict[str, KnownModel] | None = None, progress: bool = True,
         tqdm_class: type | None = None, cancel: Callable[[], bool] | None = None,
         cache_dir: Path | None = None) -> Path:
    """Download a known model into the huggingface_hub cache (once; later calls reuse it), verify it
    and return its path. ``tqdm_class`` replaces the progress bar (e.g. to report to a GUI; it may
    raise to cancel). Without network: a CheckpointError saying where to download it by hand."""
    m = _entry(name, known)
    if not m.repo_id:
        return resolve(name, known)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:
        raise CheckpointError("downloading models needs huggingface_hub (pip install huggingface_hub); "
                              f"or {_manual_instructions(m)}") from None
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        _reachable(endpoint())
        path = Path(hf_hub_download(m.repo_id, m.filename, revision=m.revision, endpoint=endpoint(),
                                    tqdm_class=tqdm_class, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - network, HTTP, disk: one message with the way out
        if cancel is not None and cancel():

            raise CancelledError("download cancelled") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not download {name} from {endpoint()} ({type(exc).__name__}: {first[:200]}). "
                              f"Without network, {_manual_instructions(m)}") from None
    verify(path, m)
    return path


def _reachable(url: str, timeout: float = 10.0) -> None:
    """Fail at once (not after the hub client's retries) when the server cannot be reached."""

    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    with socket.create_connection((u.hostname, port), timeout=timeout):
        pass


def describe(known: dict[str, KnownModel] | None = None) -> list[dict]:
    """One row per known model (name, size, licence, source, local file or how to get it), plus 'FILE'."""
    rows = []
    for name, m in (KNOWN if known is None else known).items():
        local = cached_path(name, known)
        rows.append({"name": name, "title": m.title, "size": m.size_text(), "licence": m.licence,
                     "source": m.source, "local": str(local) if local else None,
                     "get": None if local or not m.repo_id else f"iris-segment models pull {name}"})
    rows.append({"name": "FILE", "title": "any MASS/Iris or Hermes checkpoint (.pth) or IrisSegment .safetensors",
                 "size": "-", "licence": "the file's own", "source": "--model /path/to/file", "local": None,
                 "get": None})
    return rows
