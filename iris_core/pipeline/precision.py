"""``--precision``: bfloat16 on a CPU only where it keeps the labels and is faster.

float32 is the reference path (the MASS authors' ``inference.py`` runs float32 on a CPU). bfloat16
convolutions run about twice as fast on CPUs with native bfloat16 arithmetic (AVX512-BF16, AMX;
measured 354-407 against 168-192 GFLOP/s on an AMD EPYC with AVX512-BF16) and about 37 times slower
where oneDNN has to emulate it (measured on an AVX2 EPYC: the default model's demo target 205 s
against 5.5 s). Whether the labels survive depends on the network: the trained default model keeps
99.95 % of a target's labels, while the compat fixtures' untrained weight-rule network, whose classes
are near-ties everywhere, changes 8 %.

So ``auto`` decides per task, on the first window of the first target it segments:

* a CPU without native bfloat16 (oneDNN's own test): float32, nothing else is run;
* otherwise that window is run in both precisions; bfloat16 is used for every later window of the
  task (this target and any further ones) only when, on that window, the labels decided from the two
  (the policy's threshold, the most probable class) agree in at least 99.9 % of its voxels and 99 %
  of its labelled ones, the mean absolute probability difference is at most 1e-3 (the MASS fixture's
  tolerance), and bfloat16 was at least 1.25x faster. The window itself keeps its float32 result.

``bfloat16`` forces it (no check; slow without native support), ``float32`` (the default) never uses
it. GPUs are not concerned: they keep their own mixed precision (autocast), as before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from iris_core.options import PRECISIONS

log = logging.getLogger(__name__)

#: what the check window must show for ``auto`` to use bfloat16
MIN_AGREEMENT = 0.999  # same label in this share of the window's voxels
MIN_LABELLED_AGREEMENT = 0.99  # ... and of the voxels labelled in either precision
MAX_MEAN_DIFFERENCE = 1e-3  # mean absolute probability difference
MIN_SPEEDUP = 1.25  # float32 seconds / bfloat16 seconds


def native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (its own test; False where unknown)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_autocast() -> contextlib.AbstractContextManager:
    """Convolutions and linears in bfloat16, normalisations and reductions in float32 (torch's CPU
    autocast lists)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def in_bfloat16(fn: Callable) -> Callable:
    """``fn`` run under :func:`cpu_bf16_autocast`, its outputs (a tensor or a list of them) back in float32."""

    def run(*args):
        with cpu_bf16_autocast():
            out = fn(*args)
        return out.float() if isinstance(out, torch.Tensor) else [o.float() for o in out]

    return run


def window_labels(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Labels 1..K of probabilities [B, K, ...]: the most probable class at or above ``threshold``
    (ties to the first), 0 where none is."""
    best, idx = probs.max(dim=1)
    return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx))


@dataclass
class PrecisionCheck:
    """Float32 against bfloat16 on one window, and what ``auto`` decided from it."""

    agreement: float = 1.0
    labelled_agreement: float = 1.0
    mean_difference: float = 0.0
    max_difference: float = 0.0
    seconds_float32: float = 0.0
    seconds_bfloat16: float = 0.0
    chosen: str = "float32"
    reasons: list[str] = field(default_factory=list)  # why bfloat16 was not chosen

    @property
    def speedup(self) -> float:
        return self.seconds_float32 / self.seconds_bfloat16 if self.seconds_bfloat16 > 0 else 0.0

    def decide(self, min_speedup: float = MIN_SPEEDUP) -> str:
        r = []
        if self.agreement < MIN_AGREEMENT:
            r.append(f"same label in {100 * self.agreement:.3f} % of the window's voxels "
                     f"(needs {100 * MIN_AGREEMENT:.1f} %)")
        if self.labelled_agreement < MIN_LABELLED_AGREEMENT:
            r.append(f"same label in {100 * self.labelled_agreement:.2f} % of its labelled voxels "
                     f"(needs {100 * MIN_LABELLED_AGREEMENT:.0f} %)")
        if self.mean_difference > MAX_MEAN_DIFFERENCE:
            r.append(f"mean probability difference {self.mean_difference:.2g} (at most {MAX_MEAN_DIFFERENCE:g})")
        if self.speedup < min_speedup:
            r.append(f"bfloat16 {self.speedup:.2f}x as fast as float32 (needs {min_speedup:g}x)")
        self.reasons = r
        self.chosen = "float32" if r else "bfloat16"
        return self.chosen

    def summary(self) -> str:
        if self.seconds_bfloat16 == 0:  # decided without running a check
            return self.chosen + (": " + "; ".join(self.reasons) if self.reasons else "")
        s = (f"{self.chosen} (check on the first window: same label in {100 * self.agreement:.3f} % of voxels, "
             f"{100 * self.labelled_agreement:.2f} % of labelled ones, mean probability difference "
             f"{self.mean_difference:.1e}, bfloat16 {self.speedup:.2f}x as fast)")
        return s + (": " + "; ".join(self.reasons) if self.reasons else "")

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionCheck:
        return cls(**{k: v for k, v in d.items() if k != "speedup"})

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()} | {
            "speedup": round(self.speedup, 3)}


def compare(logits32: torch.Tensor, logits16: torch.Tensor, threshold: float) -> PrecisionCheck:
    """Label and probability agreement of two windows' logits [B, K, ...] (sigmoid probabilities)."""
    p32, p16 = torch.sigmoid(logits32.float()), torch.sigmoid(logits16.float())
    l32, l16 = window_labels(p32, threshold), window_labels(p16, threshold)
    same = l32 == l16
    labelled = (l32 > 0) | (l16 > 0)
    diff = (p32 - p16).abs()
    return PrecisionCheck(
        agreement=float(same.float().mean()),
        labelled_agreement=float(same[labelled].float().mean()) if bool(labelled.any()) else 1.0,
        mean_difference=float(diff.mean()), max_difference=float(diff.max()))


def _ready(fn: Callable, x: torch.Tensor) -> None:
    """Load or build a compiled network for ``x``'s shape before it is timed (a compile is not a speed)."""
    ready = getattr(fn, "ready", None)
    if ready is not None:
        ready(x)


class PrecisionChooser:
    """Runs a task's windows in the precision ``mode`` asks for; ``auto`` decides on its first window
    (see the module's note). One chooser per task: its decision holds for every later target."""

    def __init__(self, mode: str, float32: Callable[[torch.Tensor], torch.Tensor],
                 bfloat16: Callable[[torch.Tensor], torch.Tensor], threshold: float,
                 min_speedup: float = MIN_SPEEDUP, native: bool | None = None):
        if mode not in PRECISIONS:
            raise ValueError(f"unknown precision {mode!r}")
        self.float32, self.bfloat16, self.threshold, self.min_speedup = float32, bfloat16, threshold, min_speedup
        self.check: PrecisionCheck | None = None
        self.chosen: str | None = None if mode == "auto" else mode
        if mode == "auto" and not (native_bf16() if native is None else native):
            self.chosen = "float32"
            self.check = PrecisionCheck(reasons=["this CPU has no native bfloat16 arithmetic"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen == "bfloat16":
            return self.bfloat16(x).float()
        if self.chosen == "float32":
            return self.float32(x)
        _ready(self.float32, x)
        t0 = time.perf_counter()
        out = self.float32(x)
        t32 = time.perf_counter() - t0
        _ready(self.bfloat16, x)
        t0 = time.perf_counter()
        out16 = self.bfloat16(x)
        t16 = time.perf_counter() - t0
        check = compare(out, out16, self.threshold)
        check.seconds_float32, check.seconds_bfloat16 = t32, t16
        self.chosen = check.decide(self.min_speedup)
        self.check = check
        log.info("precision: %s", check.summary())
        return out

    def report(self) -> dict:
        """What ran: the precision and, for ``auto``, the check behind it."""
        out: dict = {"precision": self.chosen or "undecided"}
        if self.check is not None:
            out["check"] = self.check.to_dict()
        return out


class TaskPrecisions:
    """The precision an engine's windows run in, per task: ``float32`` runs the network as given; otherwise one
    :class:`PrecisionChooser` per task and class chunk (``key``), so an 'auto' decision made on the first target's
    first window holds for every further target of the task (``owner``: the task's object; a new one decides
    again)."""

    def __init__(self, mode: str, threshold: float):
        self.mode, self.threshold = mode, threshold
        self._choosers: dict[object, tuple[object, PrecisionChooser]] = {}

    def choose(self, key: object, owner: object, float32: Callable[[torch.Tensor], torch.Tensor],
               bfloat16: Callable[[], Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function a task's windows go through: ``float32``, or the task's chooser between it and
        ``bfloat16()`` (built only here, where bfloat16 may run)."""
        if self.mode == "float32":
            return float32
        half = bfloat16()
        entry = self._choosers.get(key)
        if entry is None or entry[0] is not owner:
            entry = self._choosers[key] = (owner, PrecisionChooser(self.mode, float32, half, self.threshold))
        chooser = entry[1]
        chooser.float32, chooser.bfloat16 = float32, half  # this call's tokens, the task's decision
        return chooser

    def report(self) -> dict:
        """The precision the windows ran in, and for 'auto' the check behind it (per task)."""
        reports = [c.report() for _, c in self._choosers.values()]
        if not reports:
            report = {"precision": self.mode}
        else:
            report = reports[0] if len(reports) == 1 else {"precision": self.mode, "tasks": reports}
        return report | {"summary": describe(report)}  # one line for the CLI and Slicer's Log


def describe(report: dict) -> str:
    """One line of an engine's ``precision_report`` (per task when there are several)."""
    tasks = report.get("tasks") or [report]
    parts = [PrecisionCheck.from_dict(t["check"]).summary() if t.get("check") else t.get("precision", "float32")
             for t in tasks]
    return parts[0] if len(parts) == 1 else "; ".join(f"task {i + 1}: {p}" for i, p in enumerate(parts))
