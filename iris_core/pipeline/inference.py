"""The engine: a loaded model on one device with one set of run options; it prepares images on the model grid,
encodes references once and predicts any number of targets. Its parts are objects chosen once from the model's
policy and the options: the reference crops, the network functions (compiled or not), the window runner, the
precision per task and the way back to the target grid. ``pipeline.task.segment_target`` takes a target through
them."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch

from iris_core.errors import CancelledError, InputError
from iris_core.hub.checkpoint import LoadedModel
from iris_core.options import SegmentOptions
from iris_core.pipeline.aot import Networks
from iris_core.pipeline.crops import ReferenceCrops
from iris_core.pipeline.device import autocast, available_memory, check_memory, select_device, set_threads
from iris_core.pipeline.embedding import TaskEmbedding, is_memory, memory_groups
from iris_core.pipeline.precision import TaskPrecisions, in_bfloat16
from iris_core.pipeline.preprocess import PreparedImage, prepare_image
from iris_core.pipeline.to_target import BackToTarget
from iris_core.pipeline.windows import window_runner
from iris_core.types import ClassSpec, ProgressFn, Reference, StageFn, Timer


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class Engine:
    """Runs a loaded model: ``encode`` references once, ``predict`` any number of targets."""

    def __init__(self, loaded: LoadedModel, options: SegmentOptions | None = None, progress: ProgressFn | None = None,
                 cancel: Callable[[], bool] | None = None, on_stage: StageFn | None = None, amp: bool = True,
                 skip_empty: bool = True):
        """``options``: how to run (device, threads, window, overlap, sw_batch, compile, intensity, precision and
        classes per forward pass are read here, once); ``progress`` hears each step, ``cancel`` is asked before
        each, ``on_stage`` hears each stage's seconds as it ends."""
        self.options = options = options or SegmentOptions()
        set_threads(options.threads)
        self.loaded, self.model, self.policy = loaded, loaded.model, loaded.preprocessing
        self.device = select_device(options.device)
        self.model.to(self.device).eval()
        self.window = tuple(options.window or self.policy.window)
        self.divisor = loaded.config.divisor  # the network's sizes must be multiples of this
        if any(w % self.divisor for w in self.window):
            raise InputError(f"window {self.window}: every edge must be a multiple of {self.divisor}")
        # None: the model's policy (MASS: the authors' overlap)
        self.overlap = self.policy.overlap if options.overlap is None else options.overlap
        if not 0 <= self.overlap < 1:
            raise InputError(f"overlap {self.overlap} must be in [0, 1)")
        self.sw_batch = options.sw_batch if options.sw_batch > 0 else self._auto_batch()
        self.amp = amp
        self.progress = progress or _no_progress
        self.cancel = cancel or (lambda: False)
        self.timer = Timer(on_stage=on_stage)
        # a window the user gave is used as given, and --compile keeps one (a compiled package per input shape);
        # else the policy may fit one window to a small target
        self.fit_window = 0 if options.window or options.compile else self.policy.fit_window
        if self.fit_window % self.divisor:
            raise InputError(f"{loaded.source}: the policy's fit_window {self.fit_window} is not a multiple of "
                             f"{self.divisor}")
        self.windows = window_runner(self.policy, self.window, self.overlap, self.device, amp, self.progress,
                                     self.check_cancel, self.sw_batch, skip_empty, self.fit_window)
        self.back_to_target = BackToTarget(self.policy, self.timer)
        self.crops = ReferenceCrops(self.policy, self.window, self.divisor, self._largest_reference(),
                                    options.intensity, self.uses_positions, self.device)
        self.networks = Networks(self.model, self.device, options.compile, self.progress) if loaded.arch == "iris" \
            else None
        # --precision: on a CPU, bfloat16 windows (forced, or 'auto': per task where a check on its first
        # window shows the labels kept and a speed-up); GPUs keep their autocast (``amp``)
        self.precisions = TaskPrecisions(options.precision if self.device.type == "cpu" else "float32",
                                         self.policy.threshold)

    def _auto_batch(self) -> int:
        """Windows per forward pass from free memory: several on a GPU (throughput), one on a CPU
        (batching does not speed up CPU kernels and multiplies peak memory)."""
        if self.device.type == "cpu":
            return 1
        return int(max(1, min(8, available_memory(self.device) // 2 // max(self._window_bytes(), 1))))

    def _largest_reference(self) -> int:
        """The largest reference edge (voxels) the network encodes: its task encoders' positional encoding, stored
        at ``pos_embed_size`` on the context path, covers that many voxels times ``context_downsample``."""
        cfg = self.model.config
        return int(getattr(cfg, "pos_embed_size", 0) * getattr(cfg, "context_downsample", 1)) or max(self.window)

    @property
    def uses_positions(self) -> bool:
        """Whether references are aligned to each target and the readout weighs positions (a model with a
        position-aware memory readout whose policy aligns; issue [20])."""
        return (self.loaded.arch == "iris" and self.policy.aligns
                and bool(getattr(self.model.config, "memory_positions", False)))

    def require_arch(self, arch: str) -> None:
        """Refuse a model of the wrong kind for the requested operation, naming what to do instead."""
        if self.loaded.arch == arch:
            return
        if arch == "iris":
            raise InputError(f"{self.loaded.source} is a {self.loaded.arch} model; segmenting from references "
                             "needs an Iris model (a Hermes model segments named structures: use --structures)")
        raise InputError(f"{self.loaded.source} is an {self.loaded.arch} model; --structures needs a Hermes model "
                         "(an Iris model segments from references: use --reference or --library)")

    def check_cancel(self) -> None:
        if self.cancel():
            raise CancelledError("cancelled")

    def prepare(self, image: sitk.Image, name: str, target: bool = True) -> PreparedImage:
        """Normalise and resample an image onto its model grid (a reference: ``target=False``)."""
        self.check_cancel()
        t0 = time.perf_counter()
        prep = prepare_image(image, name, self.policy, self.options.intensity, multiple=self.divisor, target=target)
        self.timer.add("prepare", t0)
        return prep

    # -- encoding --------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, ref: Reference, classes: list[ClassSpec], prep: PreparedImage | None = None) -> TaskEmbedding:
        """Task embedding of ``classes`` on one reference (one encoder pass when they fit one window)."""
        self.require_arch("iris")
        self.check_cancel()
        prep = prep or self.prepare(ref.image, ref.name, target=False)
        t0 = time.perf_counter()
        masks = self.crops.masks(ref, prep, classes)
        parts = []
        groups = self.crops.groups(masks)
        for gi, group in enumerate(groups):
            self.progress(f"Encoding reference {ref.name}", gi, len(groups))
            tokens = self.encode_crop(*self.crops.crop(prep, masks[group]))
            parts.append(TaskEmbedding([t[0].float().cpu() for t in tokens],
                                       [classes[i].name for i in group], [classes[i].value for i in group]))
        emb = TaskEmbedding.concat(parts).select([c.name for c in classes])
        self.timer.add("encode", t0)
        return emb

    def encode_crop(self, image: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
        """The task embedding tokens of masks [1, K, ...] on an image crop [1, 1, ...] already on the model grid
        (the encoder this engine runs: compiled where asked, under the device's autocast)."""
        with torch.inference_mode(), autocast(self.device, self.amp):
            return self.networks.encode(image, masks)

    def compiled_packages(self) -> dict[str, list[str]]:
        """Which compiled networks (--compile on a CPU) this engine built and which it loaded from the cache."""
        return self.networks.packages() if self.networks is not None else {"built": [], "loaded": []}

    def precision_report(self) -> dict:
        """The precision the windows ran in, and for 'auto' the check behind it (per task)."""
        return self.precisions.report()

    # -- prediction ------------------------------------------------------------------------
    def predict(self, prep: PreparedImage, emb: TaskEmbedding, tokens: list[torch.Tensor] | None = None
                ) -> np.ndarray:
        """Per-class probabilities [K, z, y, x] of an Iris embedding on the target's model grid."""
        self.require_arch("iris")
        tokens = tokens if tokens is not None else emb.batched(self.device)
        positions = self.uses_positions and emb.has_positions()
        chunks = self._class_chunks(emb)
        if len(chunks) == 1:
            return self._sliding(prep, len(emb), self._iris_logits(emb, 0, tokens), positions)
        # a pass over the windows per chunk of classes: classes whose memory rows differ (other reference
        # crops), or fewer classes per forward pass (less memory per window)
        probs = np.empty((len(emb), *prep.array.shape), np.float32)
        for chunk in chunks:
            part = [t[:, chunk] for t in tokens]
            probs[chunk] = self._sliding(prep, len(chunk), self._iris_logits(emb, chunk[0], part), positions)
        return probs

    def _iris_logits(self, emb: TaskEmbedding, start: int, tokens: list[torch.Tensor]):
        return self.precisions.choose(("iris", id(emb), start), emb, _Bound(self.networks.segment, tokens),
                                      lambda: _Bound(self.networks.segment_bfloat16(), tokens))

    def _class_chunks(self, emb: TaskEmbedding) -> list[list[int]]:
        """The classes of an embedding in the groups one forward pass takes: those sharing their memory rows
        (the readout attends once per call), at most ``max_classes_per_forward`` each."""
        memory = next((t for t in emb.tokens if is_memory(t)), None)
        if memory is None:
            groups = [list(range(len(emb)))]
        else:
            c = self.model.config.memory_dim
            groups = memory_groups(memory, slice(c, c + self.model.memory_values))
        step = self.options.max_classes_per_forward or len(emb)
        return [g[a : a + step] for g in groups for a in range(0, len(g), step)]

    def predict_tasks(self, prep: PreparedImage, task_idx: list[int], modality_idx: int) -> np.ndarray:
        """Per-task probabilities [T, z, y, x] of a Hermes model for global task indices and a modality."""
        self.require_arch("hermes")
        t = torch.tensor([task_idx], device=self.device)
        m = torch.tensor([[modality_idx]], device=self.device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return self.model(x, t.expand(x.shape[0], -1), m.expand(x.shape[0], -1))[0]

        key = ("hermes", tuple(task_idx), modality_idx)
        return self._sliding(prep, len(task_idx), self.precisions.choose(key, self.model, fn, lambda: in_bfloat16(fn)))

    def _sliding(self, prep: PreparedImage, k: int, logits_fn, positions: bool = False) -> np.ndarray:
        """The window runner over the target (with ``positions``: each voxel's position in mm beside the image,
        channels 1-3), after a memory check; sigmoid probabilities [K, z, y, x] on the CPU."""
        self.check_cancel()
        check_memory(self._estimate_bytes(prep.array.shape, k), self.device, f"segmenting {prep.name}")
        t0 = time.perf_counter()
        x = torch.from_numpy(prep.array)[None, None]
        if positions:
            x = torch.cat([x, torch.from_numpy(prep.positions())[None]], 1)
        probs = self.windows(x, k, logits_fn, prep.name, prep.intensity.background)
        self.timer.add("segment", t0)
        return probs

    def _window_bytes(self, window: tuple[int, ...] | None = None) -> int:
        """Rough activation memory of one window (the engine's, or ``window``): ~24 float32 maps of the first
        stage's channels."""
        return int(np.prod(window or self.window)) * self.model.config.channels[0] * 4 * 24

    def window_for(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The window the runner uses over a model grid of ``shape`` (the policy's fit_window, where it applies)."""
        return self.windows.roi(shape)

    def _estimate_bytes(self, shape: tuple[int, ...], k: int) -> int:
        """Volume-sized arrays (input, K probabilities, blending weights) plus the windows in flight."""
        return int(np.prod(shape)) * 4 * (2 * k + 3) + self._window_bytes(self.window_for(shape)) * self.sw_batch


class _Bound:
    """``method(x, tokens)`` as a function of the window alone; ``ready`` passes a compiled method's
    load-or-build through (the precision check times the network, not its compile)."""

    def __init__(self, method, tokens: list[torch.Tensor]):
        self.method, self.tokens = method, tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method(x, self.tokens)

    def ready(self, x: torch.Tensor) -> None:
        ready = getattr(self.method, "ready", None)
        if ready is not None:
            ready(x, self.tokens)
