"""The records every layer passes around: a class to segment, a reference, what a run returns, the progress
protocol and the stage timer. Layer 0 (imports nothing of iris_core at run time), so ``io`` can write a
result and the pipeline can make one without either importing the other."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import SimpleITK as sitk

if TYPE_CHECKING:
    from iris_core.pipeline.embedding import TaskEmbedding
    from iris_core.pipeline.task import Task

#: progress protocol shared by CLI, worker and GUI: (stage text, done, total)
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ClassSpec:
    """A class to segment: display name and its label value in the references."""

    name: str
    value: int


@dataclass
class Reference:
    """A reference volume with its label map (on the same grid)."""

    image: sitk.Image
    labels: sitk.Image
    name: str
    label_names: dict[int, str] = field(default_factory=dict)  # from the file (a Slicer .seg.nrrd's segments)


@dataclass
class SegmentationResult:
    """What a segmentation run returns: the label map on the target grid, its classes, the task embedding
    used (None for Hermes), the sidecar's record, and optionally probability maps and overlapping layers."""

    labels: sitk.Image
    classes: list[ClassSpec]
    embedding: TaskEmbedding | None
    sidecar: dict = field(default_factory=dict)
    #: with ``save_probabilities``: one float32 map per class (same order as ``classes``), target grid
    probabilities: list[sitk.Image] | None = None
    #: with ``overlaps``: each class on its own, as label maps (target grid), one per group of classes that do
    #: not overlap; ``labels`` still holds one class per voxel (the most probable)
    layers: list[sitk.Image] | None = None
    #: what a further target of the same model reuses (``segment(target, task=result.task)``): the embedding
    #: where it is the same for every target, else the references as encoded
    task: Task | None = None


#: stage-timer hook: (stage, seconds) each time a stage of the pipeline ends (``bench --pipeline`` listens)
StageFn = Callable[[str, float], None]


@dataclass
class Timer:
    """Seconds per stage of the pipeline ('prepare', 'encode', 'align', 'tune', 'segment', 'resample_back'),
    summed over a run, for the sidecar; ``on_stage`` hears each stage as it ends."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_stage: StageFn | None = None

    def add(self, key: str, t0: float) -> None:
        """Count the seconds since ``t0`` (``time.perf_counter``) to stage ``key``."""
        dt = time.perf_counter() - t0
        self.seconds[key] = self.seconds.get(key, 0.0) + dt
        if self.on_stage is not None:
            self.on_stage(key, dt)
