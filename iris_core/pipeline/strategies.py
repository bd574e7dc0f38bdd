"""Inference strategies of the Iris paper: one-shot, context ensemble, object-level retrieval,
in-context tuning, and segmenting from a saved task library (memory-bank style, no reference)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from iris_core.errors import InputError
from iris_core.options import STRATEGIES, TUNE_LR, TUNE_STEPS
from iris_core.pipeline.align import Alignment, AlignmentError, align_affine
from iris_core.pipeline.embedding import TaskEmbedding, is_memory
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.preprocess import PreparedImage
from iris_core.pipeline.prior import AlignedPrior
from iris_core.types import ClassSpec, Reference

log = logging.getLogger(__name__)



@dataclass
class StrategyResult:
    """A target's probabilities [K, z, y, x] on its model grid, the embedding they came from (None: Hermes) and
    what the strategy reports for the sidecar."""

    probabilities: np.ndarray
    embedding: TaskEmbedding | None
    details: dict = field(default_factory=dict)
    #: the aligned references' labels as a prior on the target grid (the policy's prior_weight; issue [20])
    priors: list[AlignedPrior] = field(default_factory=list)


@dataclass
class EncodedReference:
    """A reference encoded once: its task embedding (the classes it holds) and its prepared image."""

    reference: Reference
    embedding: TaskEmbedding
    prepared: PreparedImage
    #: where the reference was aligned to a target (align_references): the map of its positions into the target's
    alignment: Alignment | None = None

    @property
    def name(self) -> str:
        return self.reference.name


def encode_references(engine: Engine, refs: list[Reference], classes: list[ClassSpec]) -> list[EncodedReference]:
    """Encode each reference once for the classes it holds."""
    out = []
    for ref in refs:
        held = held_classes(ref, classes)
        if not held:
            continue
        prep = engine.prepare(ref.image, ref.name, target=False)
        out.append(EncodedReference(ref, engine.encode(ref, held, prep), prep))
    missing = [c.name for c in classes if not any(c.name in e.embedding.names for e in out)]
    if missing:
        raise InputError(f"classes {missing} are in none of the references")
    return out


def align_references(engine: Engine, target: PreparedImage, encoded: list[EncodedReference]
                     ) -> tuple[list[EncodedReference], dict]:
    """Each reference registered to the target (the policy's 'affine' alignment) and its memory positions
    mapped into the target's space, for a model whose readout weighs positions; a reference whose alignment
    fails keeps unknown positions (read by features alone) and the failure is logged and reported."""
    if not engine.uses_positions:
        return encoded, {}
    out, report = [], {}
    t0 = time.perf_counter()
    for e in encoded:
        engine.check_cancel()
        engine.progress(f"Aligning reference {e.name}", len(out), len(encoded))
        try:
            # not registered ('identity'): positions in each image's own scanner coordinates (the ablation's row)
            al = align_affine(target.source, e.reference.image) if engine.policy.registers else Alignment.identity()
            emb = e.embedding.with_positions(al.apply)
            report[e.name] = al.report()
        except AlignmentError as exc:
            log.warning("reference %s could not be aligned to %s (%s): segmenting it unaligned, by features "
                        "alone", e.name, target.name, exc)
            emb, al = e.embedding.with_positions(None), None
            report[e.name] = {"failed": str(exc)}
        out.append(EncodedReference(e.reference, emb, e.prepared, al))
    engine.timer.add("align", t0)
    return out, {"alignment": report}


def held_classes(ref: Reference, classes: list[ClassSpec]) -> list[ClassSpec]:
    """The classes whose label value occurs in the reference's label map."""
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(ref.labels))}
    return [c for c in classes if c.value in present]


def one_shot(encoded: list[EncodedReference], classes: list[ClassSpec]) -> TaskEmbedding:
    """Per class, the embedding from the first reference that holds it."""
    parts = []
    for c in classes:
        emb = next(e.embedding for e in encoded if c.name in e.embedding.names)
        parts.append(emb.select([c.name]))
    return TaskEmbedding.concat(parts)


def ensemble(encoded: list[EncodedReference], classes: list[ClassSpec]) -> TaskEmbedding:
    """Per class, the mean embedding over every reference holding it."""
    return TaskEmbedding.average([e.embedding for e in encoded]).select([c.name for c in classes])


def retrieval(engine: Engine, target: PreparedImage, encoded: list[EncodedReference], classes: list[ClassSpec]
              ) -> tuple[TaskEmbedding, dict]:
    """Segment with the ensemble, embed the target's own predicted classes, then per class take
    the reference whose embedding is most similar (cosine) to the target's."""
    first = ensemble(encoded, classes)
    probs = engine.predict(target, first)
    chosen: dict[str, str] = {}
    parts = []
    for k, c in enumerate(classes):
        mask = probs[k] >= 0.5
        candidates = [(e.reference, e.embedding) for e in encoded if c.name in e.embedding.names]
        if not mask.any() or len(candidates) == 1:
            r, e = candidates[0]
            chosen[c.name] = r.name
            parts.append(e.select([c.name]))
            continue
        img, m = engine.crops.reference(target, mask[None].astype(np.uint8))
        own = engine.encode_crop(img, m)
        own_vec = torch.cat([t[0, 0].float().cpu().flatten() for t in own if not is_memory(t[0])])
        sims = [float(F.cosine_similarity(own_vec, e.select([c.name]).vectors()[0], dim=0)) for _, e in candidates]
        best = int(np.argmax(sims))
        chosen[c.name] = candidates[best][0].name
        parts.append(candidates[best][1].select([c.name]))
    return TaskEmbedding.concat(parts), {"retrieved": chosen}


def tune(engine: Engine, encoded: list[EncodedReference], classes: list[ClassSpec], steps: int = TUNE_STEPS, lr: float = TUNE_LR
         ) -> tuple[TaskEmbedding, dict]:
    """In-context tuning: the network frozen, only the task embedding is optimised (Adam, Dice + BCE)
    to segment the references themselves; starts from the ensemble embedding."""
    start = ensemble(encoded, classes)
    model = engine.model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    # the task tokens are tuned; a memory sample (reference voxels with their mask values) is data, not an
    # embedding to optimise: it stays as encoded
    tokens = [t.clone().to(engine.device) if is_memory(t) else torch.nn.Parameter(t.clone().to(engine.device))
              for t in start.tokens]
    opt = torch.optim.Adam([t for t in tokens if isinstance(t, torch.nn.Parameter)], lr=lr)
    from monai.losses import DiceLoss  # in-context tuning only: MONAI stays off the inference path

    dice = DiceLoss(sigmoid=True)
    crops = []
    for e in encoded:
        emb = e.embedding
        idx = [start.names.index(n) for n in emb.names]
        masks = engine.crops.masks(e.reference, e.prepared, [ClassSpec(n, v) for n, v in zip(emb.names, emb.values)])
        img, m = engine.crops.reference(e.prepared, masks)
        crops.append((img.clone(), m.clone(), idx))
    losses = []
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(steps):
                engine.check_cancel()
                engine.progress("In-context tuning", step, steps)
                opt.zero_grad()
                total = 0.0
                for img, m, idx in crops:
                    logits = model.segment(img, [t[idx].unsqueeze(0) for t in tokens])
                    loss = dice(logits, m) + F.binary_cross_entropy_with_logits(logits, m)
                    loss.backward()
                    total += loss.item()
                opt.step()
                losses.append(total / len(crops))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    engine.timer.add("tune", t0)
    tuned = TaskEmbedding([t.detach().cpu() for t in tokens], start.names, start.values)
    return tuned, {"tune_steps": steps, "tune_lr": lr, "tune_loss_first": losses[0] if losses else None,
                   "tune_loss_last": losses[-1] if losses else None}


def run_strategy(engine: Engine, target: PreparedImage, encoded: list[EncodedReference], classes: list[ClassSpec],
                 strategy: str = "one-shot", tuned: tuple[TaskEmbedding, dict] | None = None) -> StrategyResult:
    """Segment ``target`` from already-encoded references with the chosen strategy (the one dispatch, called by
    ``pipeline.task.ReferenceTask`` for each target); ``tuned``: the task's in-context tuned embedding and its
    report (:func:`tune`, computed once per task)."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    details: dict = {"references": [e.name for e in encoded]}
    unaligned = encoded  # in-context tuning segments the references themselves, in their own space
    encoded, report = align_references(engine, target, encoded)
    details.update(report)
    if strategy == "one-shot":
        emb = one_shot(encoded, classes)
    elif strategy == "ensemble":
        emb = ensemble(encoded, classes)
    elif strategy == "retrieval":
        emb, extra = retrieval(engine, target, encoded, classes)
        details.update(extra)
    else:
        emb, extra = tuned if tuned is not None else tune(engine, unaligned, classes)
        if engine.uses_positions:  # the memory rows are data, not tuned: the aligned ones read the target
            emb = TaskEmbedding([a if is_memory(a) else t for t, a in zip(emb.tokens, ensemble(encoded, classes).tokens)],
                                emb.names, emb.values)
        details.update(extra)
    probabilities = engine.predict(target, emb)
    used = set(details.get("retrieved", {}).values()) or {e.name for e in encoded}
    return StrategyResult(probabilities, emb, details, aligned_priors(engine, target, [e for e in encoded
                                                                                        if e.name in used]))


def aligned_priors(engine: Engine, target: PreparedImage, encoded: list[EncodedReference]) -> list[AlignedPrior]:
    """The aligned references' labels as priors on the target grid, where the policy weighs them (prior_weight > 0)
    and the reference was registered to the target (not 'identity', not a failed alignment)."""
    if not (engine.policy.prior_weight > 0 and engine.policy.registers and engine.uses_positions):
        return []
    t0 = time.perf_counter()
    out = [AlignedPrior(target.source, e.reference.image, e.reference.labels, e.alignment,
                        nearest=engine.policy.nearest_prior_labels)
           for e in encoded if e.alignment is not None]
    engine.timer.add("prior", t0)
    return out
