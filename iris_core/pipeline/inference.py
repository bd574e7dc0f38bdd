"""Inference engine: prepare images, encode references once, segment targets by sliding window."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from iris_core.errors import CancelledError, InputError
from iris_core.hub.checkpoint import LoadedModel
from iris_core.io.resample import crop_padded, labels_to_masks, nearest_masks
from iris_core.options import SegmentOptions
from iris_core.pipeline.aot import CompiledMethod
from iris_core.pipeline.device import autocast, available_memory, check_memory, select_device, set_threads
from iris_core.pipeline.embedding import TaskEmbedding, is_memory, memory_groups
from iris_core.pipeline.precision import PrecisionChooser, describe, in_bfloat16
from iris_core.pipeline.preprocess import PreparedImage, prepare_image, reorient, volume_intensity_map
from iris_core.pipeline.sliding import sliding_window
from iris_core.pipeline.to_target import BackToTarget

log = logging.getLogger(__name__)

#: progress protocol shared by CLI, worker and GUI: (stage text, done, total)
ProgressFn = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class Reference:
    """A reference volume with its label map (on the same grid)."""

    image: sitk.Image
    labels: sitk.Image
    name: str
    label_names: dict[int, str] = field(default_factory=dict)  # from the file (a Slicer .seg.nrrd's segments)


@dataclass
class ClassSpec:
    """A class to segment: display name and its label value in the references."""

    name: str
    value: int


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0


def _windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    n = 1
    for s, r in zip(shape, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        n *= int(np.ceil((s - r) / step)) + 1
    return n


def compile_segment(model):
    """``model.segment`` compiled by inductor with frozen weights (constant folding, prepacked
    convolutions); same outputs within float rounding. Used on GPUs; on a CPU the engine uses the
    ahead-of-time compiled, disk-cached form (:mod:`.aot`), whose compile is paid once per machine."""

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "iris-segment" / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    inductor_config.fx_graph_cache = True
    return torch.compile(model.segment, dynamic=False)


class Engine(BackToTarget):
    """Runs a loaded Iris model: ``encode`` references once, ``predict`` any number of targets."""

    def __init__(
        self,
        loaded: LoadedModel,
        options: SegmentOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: Callable[[], bool] | None = None,
        amp: bool = True,
        skip_empty: bool = True,
        **overrides,
    ):
        """``options`` (device, threads, window, overlap, sw_batch, compile, intensity are read here),
        with keyword ``overrides`` of its fields (``Engine(loaded, device="cpu")``)."""
        self.options = options = SegmentOptions.from_dict(overrides, options)
        set_threads(options.threads)
        self.loaded = loaded
        self.model = loaded.model
        self.device = select_device(options.device)
        self.model.to(self.device).eval()
        self.policy = loaded.preprocessing
        self.window = tuple(options.window or self.policy.window)
        self.divisor = loaded.config.divisor  # the network's sizes must be multiples of this
        if any(w % self.divisor for w in self.window):
            raise InputError(f"window {self.window}: every edge must be a multiple of {self.divisor}")
        # None: the model's policy (MASS: the authors' overlap)
        self.overlap = self.policy.overlap if options.overlap is None else options.overlap
        if not 0 <= self.overlap < 1:
            raise InputError(f"overlap {self.overlap} must be in [0, 1)")
        self.max_classes_per_forward = options.max_classes_per_forward
        self.sw_batch = options.sw_batch if options.sw_batch > 0 else self._auto_batch()
        self.amp = amp
        self.intensity = options.intensity
        self.progress = progress or _no_progress
        self.cancel = cancel or (lambda: False)
        self.skip_empty = skip_empty and self.policy.skip_empty
        self.skipped_windows = 0
        # --compile: on a CPU the network compiled ahead of time and cached on disk (about a minute
        # per method and input size, once per machine; later runs load it in a second), on a GPU
        # torch.compile (once per process); the uncompiled model otherwise
        # the network functions windows and reference crops go through (public: a probe may replace them):
        self.segment_network = self.encode_network = None
        if loaded.arch == "iris":
            self.segment_network, self.encode_network = self.model.segment, self.model.encode_task
            if options.compile and self.device.type == "cpu":

                self.segment_network = CompiledMethod(self.model, "segment", list_arg=True, progress=self._report)
                if not self.model.config.memory_tokens:  # the memory sample is data-dependent: not exportable
                    self.encode_network = CompiledMethod(self.model, "encode_task", progress=self._report)
            elif options.compile:
                self.segment_network = compile_segment(self.model)
        # --precision: on a CPU, bfloat16 windows (forced, or 'auto': per task where a check on its first
        # window shows the labels kept and a speed-up); GPUs keep their autocast (``amp``)
        self.precision = options.precision if self.device.type == "cpu" else "float32"
        self._segment_bf16 = None  # built on first use: a CPU without native bfloat16 never needs it
        self._choosers: dict[object, tuple[object, PrecisionChooser]] = {}
        self.timer = Timer()

    def _report(self, stage: str, done: int, total: int) -> None:
        self.progress(stage, done, total)  # late-bound: callers may replace ``progress`` after init

    def _auto_batch(self) -> int:
        """Windows per forward pass from free memory: several on a GPU (throughput), one on a CPU
        (batching does not speed up CPU kernels and multiplies peak memory)."""
        if self.device.type == "cpu":
            return 1

        return int(max(1, min(8, available_memory(self.device) // 2 // max(self._window_bytes(), 1))))

    def require_arch(self, arch: str) -> None:
        """Refuse a model of the wrong kind for the requested operation, naming what to do instead."""
        if self.loaded.arch == arch:
            return
        if arch == "iris":
            raise InputError(f"{self.loaded.source} is a {self.loaded.arch} model; segmenting from references "
                             "needs an Iris model (a Hermes model segments named structures: use --structures)")
        raise InputError(f"{self.loaded.source} is an {self.loaded.arch} model; --structures needs a Hermes model "
                         "(an Iris model segments from references: use --reference or --library)")

    # -- preparation -----------------------------------------------------------------------
    def prepare(self, image: sitk.Image, name: str, target: bool = True) -> PreparedImage:
        """Normalise and resample an image onto its model grid (a reference: ``target=False``)."""
        self.check_cancel()
        t0 = time.perf_counter()
        prep = prepare_image(image, name, self.policy, self.intensity, multiple=self.divisor, target=target)
        self.timer.add("prepare", t0)
        return prep

    def check_cancel(self) -> None:
        if self.cancel():
            raise CancelledError("cancelled")

    @property
    def largest_reference(self) -> int:
        """The largest reference edge (voxels) the network encodes: its task encoders' positional encoding, stored
        at ``pos_embed_size`` on the context path, covers that many voxels times ``context_downsample``."""
        cfg = self.model.config
        return int(getattr(cfg, "pos_embed_size", 0) * getattr(cfg, "context_downsample", 1)) or max(self.window)

    def _crop_box(self, masks: np.ndarray) -> tuple[slice, ...]:
        """The reference box (z, y, x) around the masks' union: a window-sized box centred on it ('union'), or
        ('volume') the whole volume where the network takes it (padded evenly to a multiple of 16), else as
        much of it as the network takes, centred on the union and kept inside the volume."""
        zyx = np.argwhere(masks.any(axis=0))
        lo, hi = zyx.min(0), zyx.max(0) + 1
        if self.policy.reference_crop == "volume":
            shape = np.array(masks.shape[1:])
            d = self.divisor
            size = np.minimum(np.maximum(-(-shape // d) * d, self.window), self.largest_reference // d * d)
            centre = (lo + hi) // 2
            start = np.where(size >= shape, -((size - shape) // 2), np.clip(centre - size // 2, 0, shape - size))
            if np.any(hi - lo > size):
                log.warning("reference structure extent %s exceeds the largest reference %s: it is encoded partly",
                            hi - lo, size)
            return tuple(slice(int(s), int(s + w)) for s, w in zip(start, size))
        win = np.array(self.window)
        extent = hi - lo
        if np.any(extent > win):
            log.warning("reference structure extent %s exceeds the window %s: it is encoded partly", extent, win)
        centre = (lo + hi) // 2
        start = centre - win // 2
        return tuple(slice(int(s), int(s + w)) for s, w in zip(start, win))

    @staticmethod
    def _crop(arr: np.ndarray, box: tuple[slice, ...], fill: float) -> np.ndarray:
        return crop_padded(arr, [s.start for s in box], [s.stop - s.start for s in box], fill)

    @property
    def uses_positions(self) -> bool:
        """Whether references are aligned to each target and the readout weighs positions (a model with a
        position-aware memory readout whose policy aligns; issue [20])."""
        return (self.loaded.arch == "iris" and self.policy.align != "none"
                and bool(getattr(self.model.config, "memory_positions", False)))

    def reference_crop(self, prep: PreparedImage, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [1,1,w,w,w] and masks [1,K,w,w,w] tensors of the window around the structures (image and
        voxel positions [1,4,w,w,w] where the model weighs positions)."""
        box = self._crop_box(masks)
        img = self._crop(prep.array, box, prep.intensity.background)[None]
        if self.uses_positions:
            img = np.concatenate([img, prep.positions([b.start for b in box], img.shape[1:])])
        m = np.stack([self._crop(mk, box, 0) for mk in masks])
        return (torch.from_numpy(img)[None].to(self.device),
                torch.from_numpy(m.astype(np.float32))[None].to(self.device))

    def label_crop(self, prep: PreparedImage, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The 'per-label' reference crop: a window centred on the label's bounding box (centre
        rounded half to even, as Python's round), zero-padded outside the volume, the image crop
        z-scored on its own."""
        if prep.raw is None:
            raise InputError(f"{prep.name}: prepared as a target; per-label reference crops need the "
                             "reference prepared with target=False")
        zyx = np.argwhere(masks.any(axis=0))
        centre = np.array([int(round((int(lo) + int(hi)) / 2.0)) for lo, hi in zip(zyx.min(0), zyx.max(0))])
        win = np.array(self.window)
        box = tuple(slice(int(s), int(s + w)) for s, w in zip(centre - win // 2, win))
        raw = self._crop(prep.raw, box, 0.0)
        img = volume_intensity_map(raw, self.intensity, self.policy).apply(raw)
        m = np.stack([self._crop(mk, box, 0) for mk in masks])
        return (torch.from_numpy(img)[None, None].to(self.device),
                torch.from_numpy(m.astype(np.float32))[None].to(self.device))

    # -- encoding --------------------------------------------------------------------------
    def reference_masks(self, ref: Reference, prep: PreparedImage, classes: list[ClassSpec]) -> np.ndarray:
        """Binary masks of ``classes`` on the reference's model grid; empty classes are an error."""
        values = [c.value for c in classes]
        if self.policy.reference_masks == "nearest":
            masks = nearest_masks(reorient(ref.labels, self.policy.orientation), prep.grid, values)
        else:
            masks = labels_to_masks(ref.labels, prep.grid, values)
        for c, m in zip(classes, masks):
            if not m.any():
                raise InputError(
                    f"reference {ref.name}: class '{c.name}' (label {c.value}) vanishes at the model spacing "
                    f"{self.policy.spacing} mm; it is too small for this model"
                )
        return masks

    @torch.inference_mode()
    def encode(self, ref: Reference, classes: list[ClassSpec], prep: PreparedImage | None = None) -> TaskEmbedding:
        """Task embedding of ``classes`` on one reference (one encoder pass when they fit one window)."""
        self.require_arch("iris")
        self.check_cancel()
        prep = prep or self.prepare(ref.image, ref.name, target=False)
        t0 = time.perf_counter()
        masks = self.reference_masks(ref, prep, classes)
        parts = []
        per_label = self.policy.reference_crop == "per-label"
        groups = [[i] for i in range(len(masks))] if per_label else self._group_classes(masks)
        for gi, group in enumerate(groups):
            self.progress(f"Encoding reference {ref.name}", gi, len(groups))
            crop = self.label_crop if per_label else self.reference_crop
            img, m = crop(prep, masks[group])
            tokens = self.encode_crop(img, m)
            parts.append(TaskEmbedding([t[0].float().cpu() for t in tokens],
                                       [classes[i].name for i in group], [classes[i].value for i in group]))
        emb = TaskEmbedding.concat(parts).select([c.name for c in classes])
        self.timer.add("encode", t0)
        return emb

    def encode_crop(self, image: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
        """The task embedding tokens of masks [1, K, ...] on an image crop [1, 1, ...] already on the model grid
        (the encoder this engine runs: compiled where asked, under the device's autocast)."""
        with torch.inference_mode(), autocast(self.device, self.amp):
            return self.encode_network(image, masks)

    def compiled_packages(self) -> dict[str, list[str]]:
        """Which compiled networks (--compile on a CPU) this engine built and which it loaded from the cache."""
        out: dict[str, list[str]] = {"built": [], "loaded": []}
        for fn in (self.encode_network, self.segment_network, self._segment_bf16):
            for kind in out:
                out[kind] += [p.name for p in getattr(fn, kind, [])]
        return out

    def _group_classes(self, masks: np.ndarray) -> list[list[int]]:
        """Classes whose union fits one window are encoded together; the rest one by one."""
        zyx = np.argwhere(masks.any(axis=0))
        if np.all(zyx.max(0) - zyx.min(0) + 1 <= np.array(self.window)):
            return [list(range(len(masks)))]
        return [[i] for i in range(len(masks))]

    # -- prediction ------------------------------------------------------------------------
    def _window_bytes(self) -> int:
        """Rough activation memory of one window: ~24 float32 maps of the first stage's channels."""
        return int(np.prod(self.window)) * self.model.config.channels[0] * 4 * 24

    def _estimate_bytes(self, shape: tuple[int, ...], k: int) -> int:
        """Volume-sized arrays (input, K probabilities, blending weights) plus the windows in flight."""
        return int(np.prod(shape)) * 4 * (2 * k + 3) + self._window_bytes() * self.sw_batch

    # -- precision -------------------------------------------------------------------------
    def _bf16_segment(self):
        if self._segment_bf16 is None:

            if isinstance(self.segment_network, CompiledMethod):  # --compile on a CPU: a bfloat16 package of its own
                self._segment_bf16 = CompiledMethod(self.model, "segment", list_arg=True, progress=self._report,
                                                    precision="bfloat16")
            else:
                self._segment_bf16 = in_bfloat16(self.model.segment)
        return self._segment_bf16

    def _chooser(self, key: object, owner: object, float32, bfloat16) -> PrecisionChooser:
        """The task's precision chooser (one per task and class chunk: an 'auto' decision made on the
        first target's first window holds for every further target of the task)."""
        entry = self._choosers.get(key)
        if entry is None or entry[0] is not owner:
            entry = self._choosers[key] = (owner, PrecisionChooser(self.precision, float32, bfloat16,
                                                                   self.policy.threshold))
        chooser = entry[1]
        chooser.float32, chooser.bfloat16 = float32, bfloat16  # this call's tokens, the task's decision
        return chooser

    def precision_report(self) -> dict:
        """The precision the windows ran in, and for 'auto' the check behind it (per task)."""
        reports = [c.report() for _, c in self._choosers.values()]
        if not reports:
            report = {"precision": self.precision}
        else:
            report = reports[0] if len(reports) == 1 else {"precision": self.precision, "tasks": reports}
        return report | {"summary": describe(report)}  # one line for the CLI and Slicer's Log

    def _iris_logits(self, emb: TaskEmbedding, start: int, tokens: list[torch.Tensor]):
        float32 = _Bound(self.segment_network, tokens)
        if self.precision == "float32":
            return float32
        return self._chooser(("iris", id(emb), start), emb, float32, _Bound(self._bf16_segment(), tokens))

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

    def _class_chunks(self, emb: TaskEmbedding) -> list[list[int]]:
        """The classes of an embedding in the groups one forward pass takes: those sharing their memory rows
        (the readout attends once per call), at most ``max_classes_per_forward`` each."""
        memory = next((t for t in emb.tokens if is_memory(t)), None)
        if memory is None:
            groups = [list(range(len(emb)))]
        else:
            c = self.model.config.memory_dim
            groups = memory_groups(memory, slice(c, c + self.model.memory_values))
        step = self.max_classes_per_forward or len(emb)
        return [g[a : a + step] for g in groups for a in range(0, len(g), step)]

    def predict_tasks(self, prep: PreparedImage, task_idx: list[int], modality_idx: int) -> np.ndarray:
        """Per-task probabilities [T, z, y, x] of a Hermes model for global task indices and a modality."""
        self.require_arch("hermes")
        t = torch.tensor([task_idx], device=self.device)
        m = torch.tensor([[modality_idx]], device=self.device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return self.model(x, t.expand(x.shape[0], -1), m.expand(x.shape[0], -1))[0]

        if self.precision != "float32":
            key = ("hermes", tuple(task_idx), modality_idx)
            return self._sliding(prep, len(task_idx), self._chooser(key, self.model, fn, in_bfloat16(fn)))
        return self._sliding(prep, len(task_idx), fn)

    def _sliding(self, prep: PreparedImage, k: int, logits_fn, positions: bool = False) -> np.ndarray:
        """MONAI sliding-window inference of ``logits_fn`` (windows -> [B, K, ...] logits) with
        Gaussian blending, progress, cancel and a memory check; sigmoid probabilities on the CPU. With
        ``positions`` the windows carry each voxel's position (mm) beside the image (channels 1-3)."""
        self.check_cancel()
        check_memory(self._estimate_bytes(prep.array.shape, k), self.device, f"segmenting {prep.name}")
        t0 = time.perf_counter()
        x = torch.from_numpy(prep.array)[None, None]
        if positions:
            x = torch.cat([x, torch.from_numpy(prep.positions())[None]], 1)
        if self.policy.blending == "mass":
            probs = self._sliding_mass(x, prep.name, k, logits_fn)
            self.timer.add("segment", t0)
            return probs
        total = _windows(x.shape[2:], self.window, self.overlap)
        done = [0]

        background = prep.intensity.background + 1e-3

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            self.check_cancel()
            out = torch.zeros((batch.shape[0], k, *batch.shape[2:]), device=self.device)
            # windows holding nothing but background (air, padding) cannot contain a structure
            keep = (batch[:, 0].flatten(1).amax(1) > background) if self.skip_empty else torch.ones(len(batch), dtype=bool)
            self.skipped_windows += int((~keep).sum())
            if keep.any():
                with autocast(self.device, self.amp):
                    logits = logits_fn(batch[keep.cpu()].to(self.device))
                out[keep.to(self.device)] = torch.sigmoid(logits.float())
            done[0] += batch.shape[0]
            self.progress(f"Segmenting {prep.name}", min(done[0], total), total)
            return out

        with torch.inference_mode():
            probs = sliding_window_inference(
                x, self.window, self.sw_batch, predictor, overlap=self.overlap, mode="gaussian",
                padding_mode="constant", cval=prep.intensity.background, sw_device=self.device, device="cpu",
            )
        self.timer.add("segment", t0)
        return probs[0].numpy()

    def _sliding_mass(self, x: torch.Tensor, name: str, k: int, logits_fn) -> np.ndarray:
        """The 'mass' blending: zero padding at the far end, every window, the authors' Gaussian."""

        def probs_fn(patch: torch.Tensor) -> torch.Tensor:
            self.check_cancel()
            with autocast(self.device, self.amp):
                return torch.sigmoid(logits_fn(patch.to(self.device)).float())

        def on_window(done: int, total: int) -> None:
            self.progress(f"Segmenting {name}", done, total)

        with torch.inference_mode():
            return sliding_window(x, self.window, self.overlap, k, probs_fn, on_window)[0].numpy()


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
