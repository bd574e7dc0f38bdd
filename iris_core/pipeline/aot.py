"""``--compile`` on a CPU: the network ahead-of-time compiled (AOTInductor) and cached on disk, so the
compile is paid once per machine, model and input shape, and every later process loads the compiled
library in about a second.

Why not plain ``torch.compile``: its fastest CPU form freezes the weights (constant folding, oneDNN
weight prepacking, fused convolutions), and inductor does not cache frozen graphs across processes
(``fxgraph_cache_bypass``): every process paid 40-55 s of code generation again for the MASS network.
An AOTInductor package (``torch.export`` + inductor with freezing) is a shared library holding the
frozen weights, built once and loaded by later processes.

Security: a package is native code. This module loads packages only from its own cache directory, and
only under the name it computes from a hash of the weights, the method, the input shapes, torch's
version and the CPU; it writes them there itself (atomically). Never put a package from elsewhere in
that directory: treat it like the interpreter's own files. ``IRIS_SEGMENT_COMPILED`` moves it (default
``~/.cache/iris-segment/compiled``).

Disk: a package is about as large as the weights (MASS-base: 300-340 MB per method). Inductor's build
files (as large again) live in a temporary folder removed after the build. The cache keeps at most
``IRIS_SEGMENT_COMPILED_MAX_MB`` (default 4096) of packages: after each build the least recently used
ones (a load touches its package) are removed.

A network that cannot be exported or compiled (no C++ compiler, an unsupported operation) runs
uncompiled, with a warning that says why; results are the same either way (float rounding).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import locale
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from iris_core.errors import ConfigError
from iris_core.pipeline.precision import in_bfloat16
from iris_core.types import ProgressFn

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the package's contents change meaning


def cache_dir() -> Path:
    """Where compiled packages live: ``IRIS_SEGMENT_COMPILED`` or ``~/.cache/iris-segment/compiled``."""
    return Path(os.environ.get("IRIS_SEGMENT_COMPILED") or Path.home() / ".cache" / "iris-segment" / "compiled")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes): a package built for other
    weights is never loaded. About a second for MASS-base's 480 MB, once per process."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def code_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the source files of the network's package (``iris_core/models``): a package compiled
    from older network code is never loaded after an update."""

    h = hashlib.sha256()
    folder = Path(inspect.getsourcefile(type(model))).parent
    for f in sorted(folder.glob("*.py")):
        h.update(f.name.encode() + b"|" + f.read_bytes())
    return h.hexdigest()


class _Method(nn.Module):
    """``model.<method>`` with flat tensor arguments (``torch.export`` takes a module)."""

    def __init__(self, model: nn.Module, method: str, list_arg: bool, bfloat16: bool = False):
        super().__init__()
        self.model = model
        self.method = method
        self.list_arg = list_arg
        self.bfloat16 = bfloat16

    def forward(self, x: torch.Tensor, *rest: torch.Tensor):
        fn = getattr(self.model, self.method)
        if self.bfloat16:  # exported as an autocast region: bfloat16 kernels in the package

            fn = in_bfloat16(fn)
        return fn(x, list(rest)) if self.list_arg else fn(x, *rest)


class CompiledMethod:
    """A callable standing in for ``model.<method>(x, arg)`` (``arg`` a tensor, or a list of tensors
    with ``list_arg``): on a call with new shapes it loads the cached package for them, or builds it
    (export, inductor with frozen weights) and caches it; an export or compile failure falls back
    to the model's own method for good, with a warning. ``precision="bfloat16"``: the method under
    CPU bfloat16 autocast (float32 outputs), a package of its own."""

    def __init__(self, model: nn.Module, method: str, list_arg: bool = False, directory: Path | None = None,
                 progress: ProgressFn | None = None, precision: str = "float32"):
        if precision not in ("float32", "bfloat16"):
            raise ConfigError(f"compiled precision {precision!r}: float32 or bfloat16")
        self.model = model
        self.method = method
        self.list_arg = list_arg
        self.precision = precision
        self.directory = Path(directory) if directory else cache_dir()
        self.progress = progress
        self._fingerprint: str | None = None
        self._runners: dict[tuple, Callable] = {}
        self.fallback: str | None = None  # why it runs uncompiled
        self.built: list[Path] = []  # packages this object compiled (the rest were loaded)
        self.loaded: list[Path] = []
        self.budget = cache_budget_bytes()  # a bad IRIS_SEGMENT_COMPILED_MAX_MB fails here, before any work

    def _flat(self, x: torch.Tensor, arg) -> tuple[torch.Tensor, ...]:
        return (x, *arg) if self.list_arg else (x, arg)

    def key(self, args: Sequence[torch.Tensor]) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        what = {
            "format": FORMAT, "torch": torch.__version__, "python": sys.version_info[:2], "os": sys.platform,
            "machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "model": type(self.model).__name__, "method": self.method, "weights": self._fingerprint,
            "code": code_fingerprint(self.model),
            "args": [(tuple(a.shape), str(a.dtype), a.device.type) for a in args],
        }
        if self.precision != "float32":  # float32 keys as before: existing caches stay valid
            what["precision"] = self.precision
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, args: Sequence[torch.Tensor]) -> Path:
        tag = "" if self.precision == "float32" else f"{self.precision}-"
        return self.directory / f"{self.method}-{tag}{self.key(args)}.pt2"

    def _uncompiled(self, x: torch.Tensor, arg):
        fn = getattr(self.model, self.method)
        if self.precision == "bfloat16":

            fn = in_bfloat16(fn)
        return fn(x, arg)

    def _runner(self, args: tuple[torch.Tensor, ...]) -> Callable | None:
        """The compiled runner for these shapes (loaded or built on first use); None: run uncompiled."""
        if self.fallback is not None:
            return None
        sig = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        runner = self._runners.get(sig)
        if runner is None:
            try:
                with _utf8_text_files():  # inductor's own text files, for the load or the build
                    runner = self._runners[sig] = self._load_or_build(args)
            except Exception as exc:  # noqa: BLE001 - any export/compile failure: run uncompiled, say why
                self.fallback = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                log.warning("--compile: %s could not be compiled (%s); running it uncompiled", self.method,
                            self.fallback)
                return None
        return runner

    def ready(self, x: torch.Tensor, arg) -> None:
        """Load or build the package for these shapes now, without running it (timing a call after
        this measures the network, not the compile)."""
        self._runner(tuple(a.contiguous() for a in self._flat(x, arg)))

    def __call__(self, x: torch.Tensor, arg):
        args = tuple(a.contiguous() for a in self._flat(x, arg))
        runner = self._runner(args)
        return self._uncompiled(x, arg) if runner is None else runner(*args)

    def _load_or_build(self, args: tuple[torch.Tensor, ...]) -> Callable:
        path = self.path(args)
        if path.is_file():
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                self.loaded.append(path)
                _touch(path)  # most recently used: the last to be pruned
                return runner
            except Exception as exc:  # noqa: BLE001 - a truncated or stale package: build it again
                log.warning("compiled package %s could not be loaded (%s); compiling it again", path, exc)
        self._build(args, path)
        runner = torch._inductor.aoti_load_package(str(path))
        prune_cache(path.parent, keep=path, budget=self.budget)
        return runner

    def _build(self, args: tuple[torch.Tensor, ...], path: Path) -> None:
        import torch._inductor.config as inductor_config

        path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_partials(path.parent)
        if self.progress:
            self.progress(f"Compiling the network ({self.method}; once per machine and input size)", 0, 1)
        log.info("compiling %s for %s into %s", self.method, [tuple(a.shape) for a in args], path)
        t0 = time.perf_counter()
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        try:
            # freezing is applied only with gradients off (inductor's inference compiler)
            # export wants ordinary tensors: the engine calls under inference mode
            # torch's own export/compile warnings (attributes set during tracing, deprecations) mean
            # nothing to a user: silenced for the build only
            # inductor's own build files (generated C++, objects, a copy of the weights: about as large
            # as the package) go to a temporary folder beside the packages, removed after the build;
            # the package holds all a later process needs
            with torch.inference_mode(False), torch.no_grad(), inductor_config.patch(freezing=True), \
                    warnings.catch_warnings(), _build_files_in(path.parent):
                warnings.simplefilter("ignore")
                plain = tuple(a.clone() for a in args)
                module = _Method(self.model, self.method, self.list_arg, bfloat16=self.precision == "bfloat16")
                exported = torch.export.export(module, plain)
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
            os.replace(partial, path)  # atomic: another process never sees half a package
        finally:
            partial.unlink(missing_ok=True)
        self.built.append(path)
        log.info("compiled %s in %.0f s", self.method, time.perf_counter() - t0)
        if self.progress:
            self.progress(f"Compiling the network ({self.method})", 1, 1)

    @staticmethod
    def _remove_stale_partials(directory: Path, age_s: float = 86400.0) -> None:
        """Half-written packages and build folders of a process that was killed more than a day ago."""
        now = time.time()
        for p in [*directory.glob("*.partial.pt2"), *directory.glob(f"{BUILD_PREFIX}*")]:
            try:
                if now - p.stat().st_mtime > age_s:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


BUILD_PREFIX = "build-"


@contextlib.contextmanager
def _utf8_text_files() -> Iterator[None]:
    """Inductor reads its own templates with the locale's encoding (``open()`` without one, torch 2.13
    ``_inductor/utils.py`` ``load_template``), and they hold UTF-8: where a library of the same process
    has set ``LC_CTYPE`` to "C" (ASCII), importing inductor fails. For a build or a load, ``LC_CTYPE``
    is a UTF-8 locale when one exists, then what it was. (Windows' text files follow its ANSI code page, not
    ``setlocale``: there such a failure stays a compile failure, and the network runs uncompiled.)"""
    if sys.platform == "win32" or locale.getpreferredencoding(False).replace("-", "").lower() == "utf8":
        yield
        return
    before = locale.setlocale(locale.LC_CTYPE, None)
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8", "UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            break
        except locale.Error:
            continue
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


@contextlib.contextmanager
def _build_files_in(directory: Path) -> Iterator[None]:
    """Inductor's cache folder pointed at a new temporary folder in ``directory`` for the duration,
    then removed: inductor's own ``fresh_cache`` (``fresh_inductor_cache``, its older name; a torch with
    neither cannot package a network either, and the caller runs uncompiled), which also clears its
    in-memory caches. Our ``build-`` folder around it lets a later build remove what a killed one left."""
    from torch._inductor import utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    build = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=directory))
    try:
        with fresh(dir=str(build)):
            yield
    finally:
        shutil.rmtree(build, ignore_errors=True)  # Windows: a file still open stays until the next build


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still works; it is just not reordered
        pass


def cache_budget_bytes() -> int:
    """Most bytes of packages the cache keeps: ``IRIS_SEGMENT_COMPILED_MAX_MB`` (default 4096, about six
    MASS-base models; 0: no limit)."""
    raw = os.environ.get("IRIS_SEGMENT_COMPILED_MAX_MB", "4096")
    try:
        mb = float(raw)
    except ValueError:
        raise ConfigError(f"IRIS_SEGMENT_COMPILED_MAX_MB={raw!r} is not a number of megabytes") from None
    return int(mb * 2**20) if mb > 0 else 0


def prune_cache(directory: Path, keep: Path | None = None, budget: int | None = None) -> list[Path]:
    """Remove the least recently used packages (file times: a load touches its package) until the
    packages in ``directory`` total at most ``budget`` bytes; ``keep`` (the package just built or
    loaded) is never removed. Returns what was removed."""
    budget = cache_budget_bytes() if budget is None else budget
    if budget <= 0:
        return []
    packages = []
    for p in directory.glob("*.pt2"):
        if p.name.endswith(".partial.pt2"):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        packages.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in packages)
    removed = []
    for _, size, p in sorted(packages, key=lambda t: t[0]):  # oldest first
        if total <= budget:
            break
        if p == keep:
            continue
        try:
            p.unlink()
        except OSError:  # in use (Windows) or read-only: left for a later prune
            continue
        total -= size
        removed.append(p)
        log.info("removed the least recently used compiled package %s (cache over %d MB)", p.name, budget >> 20)
    return removed


def compile_segment(model: nn.Module) -> Callable:
    """``model.segment`` compiled by inductor with frozen weights (constant folding, prepacked
    convolutions); same outputs within float rounding. Used on GPUs; on a CPU the engine uses the
    ahead-of-time compiled, disk-cached form (:class:`CompiledMethod`), whose compile is paid once per machine."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "iris-segment" / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    inductor_config.fx_graph_cache = True
    return torch.compile(model.segment, dynamic=False)


class Networks:
    """The network functions an Iris engine runs reference crops and windows through: the model's own; with
    ``compile`` on a CPU, compiled ahead of time and cached on disk (about a minute per method and input size,
    once per machine; later runs load it in a second; a memory model's encoder stays as it is: its memory
    sample is data-dependent, not exportable); with ``compile`` on a GPU, ``torch.compile`` (once per process).
    The windows' bfloat16 form is built on first use (a CPU without native bfloat16 never needs it)."""

    def __init__(self, model: nn.Module, device: torch.device, compile: bool, progress: ProgressFn):
        self.model, self.progress = model, progress
        self.encode, self.segment = model.encode_task, model.segment
        self._bfloat16: Callable | None = None
        if compile and device.type == "cpu":
            self.segment = CompiledMethod(model, "segment", list_arg=True, progress=progress)
            if not model.config.memory_tokens:
                self.encode = CompiledMethod(model, "encode_task", progress=progress)
        elif compile:
            self.segment = compile_segment(model)

    def segment_bfloat16(self) -> Callable:
        """``segment`` in bfloat16: a bfloat16 package of its own when compiled on a CPU, else under autocast."""
        if self._bfloat16 is None:
            if isinstance(self.segment, CompiledMethod):
                self._bfloat16 = CompiledMethod(self.model, "segment", list_arg=True, progress=self.progress,
                                                precision="bfloat16")
            else:
                self._bfloat16 = in_bfloat16(self.model.segment)
        return self._bfloat16

    def packages(self) -> dict[str, list[str]]:
        """Which compiled networks (``compile`` on a CPU) were built in this process and which were loaded."""
        out: dict[str, list[str]] = {"built": [], "loaded": []}
        for fn in (self.encode, self.segment, self._bfloat16):
            for kind in out:
                out[kind] += [p.name for p in getattr(fn, kind, [])]
        return out
