"""One target segmented. A task says what to segment and is computed once, then reused for any number of targets:
references encoded once with the strategy that turns them into a target's embedding, a task embedding (a task
library, an earlier target's), or a Hermes model's named tasks. ``segment_target`` is the one function that
takes a target through the stages: prepare -> the task (its strategy, the windows) -> back to the target grid.
The API (and through it the CLI, the server and Slicer's worker), ``evaluate`` and the benchmarks call it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from iris_core.io.segmentations import overlapping_class_groups
from iris_core.options import TUNE_LR, TUNE_STEPS, strategy_for
from iris_core.pipeline.embedding import TaskEmbedding
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.preprocess import PreparedImage
from iris_core.pipeline.strategies import (
    EncodedReference,
    StrategyResult,
    encode_references,
    run_strategy,
    tune,
)
from iris_core.types import ClassSpec, Reference

log = logging.getLogger(__name__)


class Task:
    """What to segment: its ``classes`` (names and label values, in order), the ``strategy`` the sidecar
    records, and :meth:`run`, a target's probabilities."""

    classes: list[ClassSpec]
    strategy: str

    def run(self, engine: Engine, target: PreparedImage) -> StrategyResult:
        """Probabilities [K, z, y, x] of the classes on a prepared target, the embedding used and the details."""
        raise NotImplementedError

    def groups(self) -> list[list[int]]:
        """The class values in groups whose classes may overlap each other's (one group: none do)."""
        return [[c.value for c in self.classes]]

    def for_further_targets(self, embedding: TaskEmbedding | None, engine: Engine) -> Task:
        """The task a further target uses once this one has segmented a target with ``embedding``."""
        return self


@dataclass
class ReferenceTask(Task):
    """References encoded once (embeddings and prepared images) and the strategy that makes each target's
    embedding from them: aligned to the target first where the model weighs positions, retrieval picking per
    target; an in-context tuned embedding is computed once."""

    classes: list[ClassSpec]
    strategy: str
    encoded: list[EncodedReference]
    tune_steps: int = TUNE_STEPS
    tune_lr: float = TUNE_LR
    _tuned: tuple[TaskEmbedding, dict] | None = field(default=None, repr=False)

    @classmethod
    def encode(cls, engine: Engine, refs: list[Reference], classes: list[ClassSpec], strategy: str = "one-shot",
               tune_steps: int = TUNE_STEPS, tune_lr: float = TUNE_LR) -> ReferenceTask:
        """Each reference encoded once for the classes it holds; one-shot becomes the context ensemble where
        several references hold a class (``options.strategy_for``)."""
        encoded = encode_references(engine, refs, classes)
        chosen = strategy_for(strategy, [e.embedding.names for e in encoded])
        if chosen != strategy:
            log.info("several references hold the same class: the context ensemble instead of one-shot")
        return cls(classes, chosen, encoded, tune_steps, tune_lr)

    def run(self, engine: Engine, target: PreparedImage) -> StrategyResult:
        if self.strategy == "tuning" and self._tuned is None:  # the references' own space: once for every target
            self._tuned = tune(engine, self.encoded, self.classes, self.tune_steps, self.tune_lr)
        return run_strategy(engine, target, self.encoded, self.classes, self.strategy, self._tuned)

    def groups(self) -> list[list[int]]:
        return overlapping_class_groups([e.reference for e in self.encoded], self.classes)

    def for_further_targets(self, embedding: TaskEmbedding | None, engine: Engine) -> Task:
        """The embedding itself where it is the same for every target (one-shot, ensemble, tuning, references
        not aligned to the target); else this task (retrieval picks references per target, aligned references
        are aligned to each target)."""
        if self.strategy == "retrieval" or engine.uses_positions or embedding is None:
            return self
        return EmbeddingTask(embedding, {"embedding": "computed for an earlier target, reused"})


@dataclass
class EmbeddingTask(Task):
    """A task embedding: a task library's, or one computed for an earlier target; ``details`` say which."""

    embedding: TaskEmbedding
    details: dict = field(default_factory=dict)
    strategy: str = "library"

    @property
    def classes(self) -> list[ClassSpec]:
        return [ClassSpec(n, v) for n, v in zip(self.embedding.names, self.embedding.values)]

    def run(self, engine: Engine, target: PreparedImage) -> StrategyResult:
        return StrategyResult(engine.predict(target, self.embedding), self.embedding, dict(self.details))


@dataclass
class HermesTask(Task):
    """A Hermes model's named tasks (``(index, dataset, name)`` of its vocabulary) for a modality prior
    ``(name, slot)``; the i-th task is class ``values[i]`` (default i + 1)."""

    tasks: list
    modality: tuple[str, int]
    values: list[int] | None = None
    strategy: str = "hermes"

    @property
    def classes(self) -> list[ClassSpec]:
        values = self.values or range(1, len(self.tasks) + 1)
        return [ClassSpec(t.name, v) for t, v in zip(self.tasks, values)]

    def run(self, engine: Engine, target: PreparedImage) -> StrategyResult:
        probs = engine.predict_tasks(target, [t.index for t in self.tasks], self.modality[1])
        details = {"tasks": [{"index": t.index, "dataset": t.dataset, "name": t.name} for t in self.tasks],
                   "modality": self.modality[0]}
        return StrategyResult(probs, None, details)


@dataclass
class TargetResult:
    """One target segmented: its prepared image and probabilities on the model grid, the label map on the target
    grid (``layers``: one per group of classes that may overlap; ``probability_maps``: one per class), the
    embedding used, the strategy's details and the post-processing applied."""

    prepared: PreparedImage
    probabilities: np.ndarray
    labels: sitk.Image
    embedding: TaskEmbedding | None
    details: dict
    postprocess: str
    layers: list[sitk.Image] | None = None
    probability_maps: list[sitk.Image] | None = None


def segment_target(engine: Engine, task: Task, image: sitk.Image, name: str, postprocess: str | None = None,
                   overlaps: bool = False, probability_maps: bool = False) -> TargetResult:
    """Segment one target with a task: prepare it on the model grid, run the task (its strategy, the window
    runner), then decide the labels on the exact target grid where the policy decides, post-processed
    (``postprocess`` None: the policy's). ``overlaps``: also one label map per group of classes that may overlap;
    ``probability_maps``: one float map per class on the target grid. The one assembly of the stages."""
    prep = engine.prepare(image, name)
    run = task.run(engine, prep)
    values = [c.value for c in task.classes]
    how = engine.policy.postprocess_of(postprocess)
    back = engine.back_to_target
    labels = back.labels(run.probabilities, prep, values, how, priors=run.priors)
    layers = None
    if overlaps:
        groups = task.groups()
        layers = [labels] if len(groups) == 1 else back.labels(run.probabilities, prep, values, how, groups,
                                                               priors=run.priors)
    maps = back.probability_maps(run.probabilities, prep, values, run.priors) if probability_maps else None
    return TargetResult(prep, run.probabilities, labels, run.embedding, run.details, how, layers, maps)
