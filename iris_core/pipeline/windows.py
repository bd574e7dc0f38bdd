"""Window runners: a target's sliding windows, placed and blended as the model's policy says, chosen once per
engine as an object (as MONAI composes a splitter and a merger into one inferer): MONAI's
``sliding_window_inference`` layout (written out in :mod:`iris_core.pipeline.sliding`, checked against MONAI's own
function by Testing/Python/test_sliding.py: importing MONAI costs a CLI start about 2 s), or the MASS authors'. Either takes the
volume [1, C, z, y, x] and a function of a batch of windows -> [B, K, ...] logits, and returns the blended
sigmoid probabilities [K, z, y, x] on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from iris_core.pipeline.device import autocast
from iris_core.pipeline.policy import Policy
from iris_core.pipeline.sliding import sliding_window, sliding_window_monai
from iris_core.types import ProgressFn

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def monai_window_count(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many windows MONAI's splitter places over ``shape`` (for the progress total)."""
    n = 1
    for s, r in zip(shape, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        n *= int(np.ceil((s - r) / step)) + 1
    return n


def fitted_window(shape: tuple[int, ...], window: tuple[int, ...], fit: int) -> tuple[int, ...]:
    """The window for a volume of ``shape``: along each axis the volume spans at most ``fit`` voxels, one window
    as long as the volume (never shorter than ``window``: the network's trained size; the model grid's sizes are
    already multiples of the network's divisor); elsewhere ``window``. ``fit`` 0: ``window``."""
    return tuple(max(w, s) if 0 < s <= fit else w for s, w in zip(shape, window))


class WindowRunner:
    """What both layouts share: the window, the overlap, where the network runs, progress and cancel."""

    skipped = 0  # windows not run (MONAI's layout, background only)

    def __init__(self, window: tuple[int, int, int], overlap: float, device: torch.device, amp: bool,
                 progress: ProgressFn, check_cancel: Callable[[], None], fit: int = 0):
        self.window, self.overlap, self.device, self.amp = window, overlap, device, amp
        self.progress, self.check_cancel, self.fit = progress, check_cancel, fit

    def roi(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The window used over a volume of ``shape`` (the policy's fit_window)."""
        return fitted_window(tuple(shape), self.window, self.fit)

    def __call__(self, x: torch.Tensor, k: int, logits_fn: LogitsFn, name: str, background: float) -> np.ndarray:
        """Blended probabilities [K, z, y, x] of ``logits_fn`` over the volume ``x`` (padded with ``background``
        where the layout pads with the image's own floor)."""
        raise NotImplementedError


class MonaiWindows(WindowRunner):
    """MONAI's sliding windows: padding on both sides with the background value, MONAI's Gaussian blending,
    ``sw_batch`` windows per forward pass; with ``skip_empty``, a window holding nothing but background (air,
    padding) is not run (it cannot contain a structure: its output is 0). ``skipped`` counts those."""

    def __init__(self, *args, sw_batch: int = 1, skip_empty: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.sw_batch, self.skip_empty = sw_batch, skip_empty
        self.skipped = 0

    def __call__(self, x: torch.Tensor, k: int, logits_fn: LogitsFn, name: str, background: float) -> np.ndarray:
        roi = self.roi(x.shape[2:])
        total = monai_window_count(x.shape[2:], roi, self.overlap)
        done = [0]

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            self.check_cancel()
            out = torch.zeros((batch.shape[0], k, *batch.shape[2:]), device=self.device)
            floor = background + 1e-3
            keep = (batch[:, 0].flatten(1).amax(1) > floor) if self.skip_empty else torch.ones(len(batch), dtype=bool)
            self.skipped += int((~keep).sum())
            if keep.any():
                with autocast(self.device, self.amp):
                    logits = logits_fn(batch[keep.cpu()].to(self.device))
                out[keep.to(self.device)] = torch.sigmoid(logits.float())
            done[0] += batch.shape[0]
            self.progress(f"Segmenting {name}", min(done[0], total), total)
            return out

        with torch.inference_mode():
            probs = sliding_window_monai(x, roi, self.sw_batch, self.overlap, predictor, cval=background)
        return probs[0].numpy()


class MassWindows(WindowRunner):
    """The MASS authors' layout: zero padding at the far end, every window run one at a time, their Gaussian."""

    def __call__(self, x: torch.Tensor, k: int, logits_fn: LogitsFn, name: str, background: float) -> np.ndarray:
        def probs_fn(patch: torch.Tensor) -> torch.Tensor:
            self.check_cancel()
            with autocast(self.device, self.amp):
                return torch.sigmoid(logits_fn(patch.to(self.device)).float())

        def on_window(done: int, total: int) -> None:
            self.progress(f"Segmenting {name}", done, total)

        with torch.inference_mode():
            return sliding_window(x, self.roi(x.shape[2:]), self.overlap, k, probs_fn, on_window)[0].numpy()


def window_runner(policy: Policy, window: tuple[int, int, int], overlap: float, device: torch.device, amp: bool,
                  progress: ProgressFn, check_cancel: Callable[[], None], sw_batch: int = 1,
                  skip_empty: bool = True, fit: int = 0) -> WindowRunner:
    """The runner of the policy's layout ('mass' or MONAI's), built once per engine; ``fit``: the policy's
    fit_window (0 where the user gave a window)."""
    common = (window, overlap, device, amp, progress, check_cancel, fit)
    if policy.mass_blending:
        return MassWindows(*common)
    return MonaiWindows(*common, sw_batch=sw_batch, skip_empty=skip_empty and policy.skip_empty)
