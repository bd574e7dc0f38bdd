"""Python API: segment a target from reference (image, label map) files, or from a task library."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError
from iris_core.hub import download as hub
from iris_core.hub.checkpoint import LoadedModel, load_checkpoint, preset_model
from iris_core.hub.download import check_model_spec  # noqa: F401  (part of the API; torch-free there)
from iris_core.hub.hermes_vocab import (
    intensity_for,
    model_vocabulary,
    resolve_modality,
    resolve_structures,
)
from iris_core.io.dicom_seg import is_dicom_seg, read_dicom_seg
from iris_core.io.imaging import (
    label_compactness,
    looks_like_labels,
    read_image,
    read_labels,
)
from iris_core.io.results import class_volumes, write_result
from iris_core.io.segmentations import (
    find_segment,
    read_layered_segmentation,
    slicer_layer_count,
    slicer_segment_names,
    unknown_segment,
)
from iris_core.options import SegmentOptions, class_requests
from iris_core.pipeline.embedding import TaskEmbedding, model_fingerprint
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.task import (
    EmbeddingTask,
    HermesTask,
    ReferenceTask,
    TargetResult,
    Task,
    segment_target,
)
from iris_core.resources import DEFAULT_MODEL
from iris_core.types import ClassSpec, ProgressFn, Reference, SegmentationResult

#: the public API (write_result lives in io.results and is offered here too, beside segment)
__all__ = ["Reference", "ClassSpec", "SegmentationResult", "SegmentOptions", "segment", "write_result",
           "resolve_model", "load_references", "parse_classes", "resolve_classes", "check_model_spec"]

log = logging.getLogger(__name__)


def resolve_model(spec: str | None, allow_unsafe: bool = False, device: str = "cpu") -> LoadedModel:
    """Load a model from a file path, 'default' (the bundled model), a known model's name such as
    'mass-base' (downloaded by ``iris-segment models pull``) or 'preset:NAME' (untrained)."""
    if spec in (None, "", "default"):
        if not DEFAULT_MODEL.is_file():
            raise InputError(f"the bundled default model {DEFAULT_MODEL} is missing; give a model file",
                             inputs=("model",))
        return load_checkpoint(DEFAULT_MODEL, device=device)
    if spec.startswith("preset:"):
        return preset_model(spec.split(":", 1)[1])
    if spec in hub.KNOWN and not Path(spec).exists():  # a known name (mass-base): its downloaded file
        return load_checkpoint(hub.resolve(spec), allow_unsafe=allow_unsafe, device=device)
    return load_checkpoint(spec, allow_unsafe=allow_unsafe, device=device)


def parse_classes(text: str | None, names_only: bool = False) -> list[ClassSpec] | None:
    """'1,3' -> label_1, label_3; 'liver=1,spleen=2' -> named classes; 'brain' -> the class a reference's
    segment of that name holds (value 0 until ``resolve_classes`` finds it); None -> None (all labels). With
    ``names_only`` (a task library, whose classes are found by name) every item is a name; the library gives
    the values."""
    requests = class_requests(text, names_only)
    return None if requests is None else [ClassSpec(name, value) for name, value in requests]


def load_references(pairs: list[tuple[str, str]]) -> list[Reference]:
    """Read (image, label map) pairs, checking each label map lies on its image's grid."""
    refs = []
    for img_path, lab_path in pairs:
        img = read_image(img_path, "reference image")
        if is_dicom_seg(lab_path):  # a DICOM SEG of the image series: its segments, layered where they overlap
            maps, names = read_dicom_seg(lab_path, img_path, img, "reference")
            refs += [Reference(img, m, Path(img_path).name + (f" (layer {k})" if len(maps) > 1 else ""), names)
                     for k, m in enumerate(maps)]
            continue
        if looks_like_labels(img):
            lab = read_image(lab_path, "label map")
            if not looks_like_labels(lab):
                raise InputError(f"reference ({img_path}, {lab_path}): the first file holds few integer values "
                                 f"in compact regions (a label map; {label_compactness(img):.0%} of neighbouring "
                                 f"voxels agree) and the second an intensity image ({label_compactness(lab):.0%}); "
                                 "give the image first, then its label map", inputs=("references",))
            if lab.GetSize() == img.GetSize() and np.array_equal(sitk.GetArrayViewFromImage(img),
                                                                 sitk.GetArrayViewFromImage(lab)):
                raise InputError(f"reference ({img_path}, {lab_path}): the image and the label map hold the same "
                                 "voxels; the first must be the reference's intensity image (CT, MR, PET), the "
                                 "second its label map")
        if slicer_layer_count(lab_path) > 1:  # overlapping segments: one reference per layer, same image
            maps, names = read_layered_segmentation(lab_path, img, f"reference image {img_path}")
            refs += [Reference(img, m, f"{Path(img_path).name} (layer {k})", names) for k, m in enumerate(maps)]
            continue
        refs.append(Reference(img, read_labels(lab_path, img, f"reference image {img_path}"), Path(img_path).name,
                              slicer_segment_names(lab_path)))
    return refs


def hermes_vocabulary(loaded: LoadedModel):
    """The task vocabulary of a Hermes model: from its checkpoint, else the published Hermes-R one."""
    return model_vocabulary(loaded.class_names, loaded.info.get("task_modalities"), loaded.config.task_prior_slots)


def resolve_classes(refs: list[Reference], classes: list[ClassSpec] | None) -> list[ClassSpec]:
    """Requested classes, checked against the references; all non-zero labels when none requested. Classes
    are named after the segments of a Slicer ``.seg.nrrd`` or DICOM SEG reference (a class asked for by value
    too), else ``label_<value>``; a class asked for by name (value 0) takes the value of the segment of that
    name, and a name no reference has is refused listing the names they have."""
    present: set[int] = set()
    for r in refs:
        present |= {int(v) for v in np.unique(sitk.GetArrayViewFromImage(r.labels))}
    present.discard(0)
    names: dict[int, str] = {}
    for r in refs:  # a segmentation file's segment names, the first reference's first
        for v, n in r.label_names.items():
            names.setdefault(v, n)
    if classes is None:
        if not present:
            raise InputError("the reference label maps are empty (no non-zero label)")
        return [ClassSpec(names.get(v, f"label_{v}"), v) for v in sorted(present)]
    classes = [_by_segment_name(c, names, present) if c.value == 0 else
               ClassSpec(names[c.value], c.value) if c.name == f"label_{c.value}" and c.value in names else c
               for c in classes]
    twice = sorted({c.name for c in classes if [d.name.casefold() for d in classes].count(c.name.casefold()) > 1})
    if twice:
        raise InputError(f"classes: {', '.join(twice)} asked for twice (by name and by value?)", inputs=("classes",))
    # as the user spelled them: '3' for a value given alone, 'liver=3' for a named one
    absent = [str(c.value) if c.name in (f"label_{c.value}", names.get(c.value)) else f"{c.name}={c.value}"
              for c in classes if c.value not in present]
    if absent:
        raise InputError(f"requested class{'es' if len(absent) > 1 else ''} {', '.join(absent)} "
                         f"{'are' if len(absent) > 1 else 'is'} absent from every reference label map (labels "
                         f"present: {', '.join(map(str, sorted(present))) or 'none'})", inputs=("classes",))
    return classes


def _by_segment_name(requested: ClassSpec, names: dict[int, str], present: set[int]) -> ClassSpec:
    """The class of the references' segment named ``requested.name``, with the file's spelling of the name;
    refused listing the segment names when none has it."""
    value = find_segment(requested.name, names)
    if value is None:
        raise unknown_segment(requested.name, names, present)
    return ClassSpec(names[value], value)


def hermes_modality(loaded: LoadedModel, options: SegmentOptions, structures: str | None) -> tuple[str, int] | None:
    """The Hermes modality prior (name, slot) a run of this model needs (None: an Iris run); named structures
    are refused for an Iris model, before asking for a modality."""
    if structures is not None and loaded.arch != "hermes":
        raise InputError(f"{loaded.source} is an {loaded.arch} model; named structures need a Hermes model "
                         "(an Iris model segments from references or a task library)",
                         inputs=("structures", "references", "library"))
    if loaded.arch != "hermes" and not structures:
        return None
    if not options.hermes_modality:
        raise InputError("a Hermes model needs the target's modality: CT, PET, T1, T2 or cine",
                         inputs=("hermes_modality",))
    return resolve_modality(options.hermes_modality)


def run_engine(loaded: LoadedModel, options: SegmentOptions, modality: tuple[str, int] | None = None,
               progress: ProgressFn | None = None, cancel=None) -> Engine:
    """The engine of a run: ``options`` as given, except that a Hermes run's (``modality``: its modality prior)
    'auto' intensity policy is its modality's."""
    if modality is not None and options.intensity == "auto":
        options = dataclasses.replace(options, intensity=intensity_for(modality[0]))
    return Engine(loaded, options, progress=progress, cancel=cancel)


def hermes_task(loaded: LoadedModel, structures: str | None, modality: tuple[str, int],
                values: list[int] | None = None) -> HermesTask:
    """Hermes: the named structures of the model's vocabulary (class values ``values``, default 1, 2, ...)."""
    if not structures:
        raise InputError("a Hermes model needs the structures to segment (names from its vocabulary)",
                         inputs=("structures",))
    return HermesTask(resolve_structures(structures, hermes_vocabulary(loaded), modality[0]), modality, values)


def _task(engine: Engine, references: list[tuple[str, str]] | list[Reference] | None, classes: list[ClassSpec] | None,
          library: str | Path | TaskEmbedding | None, structures: str | None, modality: tuple[str, int] | None) -> Task:
    """What a run segments: a Hermes model's named structures (``modality``: a Hermes run's prior), a task library
    (a file, or an embedding computed for an earlier target) or references, encoded here."""
    loaded, options = engine.loaded, engine.options
    if modality is not None:
        engine.require_arch("hermes")
        if references or library:
            raise InputError("a Hermes model segments named structures: give structures, not references",
                             inputs=("structures",))
        return hermes_task(loaded, structures, modality)
    if library is not None:
        if references:
            raise InputError("give either references or a task library, not both")
        if isinstance(library, TaskEmbedding):
            return EmbeddingTask(library, {"embedding": "computed for an earlier target, reused"})
        emb = TaskEmbedding.load(library, model_fingerprint(loaded.model))
        return EmbeddingTask(emb.select([c.name for c in classes]) if classes else emb, {"library": str(library)})
    if not references:
        raise InputError("no reference given: give a reference image with its label map, or a task library",
                         inputs=("references", "library"))
    refs = references if isinstance(references[0], Reference) else load_references(references)
    return ReferenceTask.encode(engine, refs, resolve_classes(refs, classes), options.strategy, options.tune_steps,
                                options.tune_lr)


def segment(
    target: str | Path | sitk.Image,
    references: list[tuple[str, str]] | list[Reference] | None = None,
    classes: list[ClassSpec] | None = None,
    model: LoadedModel | str | None = None,
    library: str | Path | TaskEmbedding | None = None,
    structures: str | None = None,
    options: SegmentOptions | None = None,
    progress: ProgressFn | None = None,
    cancel=None,
    task: Task | None = None,
    **option_overrides,
) -> SegmentationResult:
    """Segment every class of the references (or of a task library) on ``target`` in one pass; with a
    Hermes model, the named ``structures``; or the classes of a ``task`` an earlier result left (its ``task``: the
    references are not encoded again). How to run is ``options`` (a SegmentOptions), with
    keyword overrides of its fields: ``segment(t, refs, strategy="ensemble", device="cpu")``.

    The model's policy decides the pipeline (ours, or the MASS authors' for MASS/Iris checkpoints);
    ``overlap`` and ``postprocess`` left None follow it ('largest' for MASS checkpoints).
    ``save_probabilities`` also returns one float map per class on the target grid;
    ``max_classes_per_forward`` segments the classes in chunks (less memory per window, one pass over
    the windows per chunk)."""
    t_start = time.perf_counter()
    if task is not None and (references or library or structures):
        raise InputError("give either a task or what to segment (references, a task library, structures), not both")
    options = SegmentOptions.from_dict(option_overrides, options)
    loaded = model if isinstance(model, LoadedModel) else resolve_model(model)
    modality = hermes_modality(loaded, options, structures)
    engine = run_engine(loaded, options, modality, progress, cancel)
    target_img = target if isinstance(target, sitk.Image) else read_image(target, "target image")
    target_name = "target" if isinstance(target, sitk.Image) else Path(target).name
    if looks_like_labels(target_img):
        log.warning("target image %s holds few integer values, like a label map; segmenting it anyway "
                    "(was a label map given as --target?)", target_name)
    task = task or _task(engine, references, classes, library, structures, modality)
    out = segment_target(engine, task, target_img, target_name, options.postprocess, options.overlaps,
                         options.save_probabilities)
    found = class_volumes(out.layers if out.layers is not None else out.labels, task.classes)
    warn_classes_not_found(found, target_img, target_name, engine)
    sidecar = _sidecar(engine, task, out, found, target_name, t_start)
    return SegmentationResult(out.labels, task.classes, out.embedding, sidecar, out.probability_maps, out.layers,
                              task.for_further_targets(out.embedding, engine))


def _sidecar(engine: Engine, task: Task, out: TargetResult, found: list[dict], target_name: str,
             t_start: float) -> dict:
    """A run's record beside its label map (``t_start``: when the run began, ``time.perf_counter``)."""
    loaded, policy = engine.loaded, engine.policy
    sidecar = {
        "target": target_name,
        "classes": found,
        "strategy": task.strategy,
        "model": {"name": loaded.name, "source": loaded.source, "arch": loaded.arch},
        "device": str(engine.device),
        "pipeline": policy.name,
        "spacing_mm": list(policy.spacing),
        "threshold": policy.threshold,  # the model file's label threshold (issue [11]: stored per model)
        # issue [20]: how references meet the target (alignment, its aligned-label prior's weight)
        "align": policy.align if engine.uses_positions else "none",
        "prior_weight": policy.prior_weight if engine.uses_positions and policy.registers else 0.0,
        "prior_power": policy.prior_power,
        "prior_labels": policy.prior_labels,
        "memory_samples": getattr(getattr(loaded.model, "config", None), "memory_tokens", 0) or None,
        "window": list(engine.window_for(out.prepared.array.shape)),  # fitted where the policy says (fit_window)
        "overlap": engine.overlap,
        "postprocess": out.postprocess,
        "options": engine.options.to_dict(),
        "precision": engine.precision_report(),
        "timings_s": {k: round(v, 3) for k, v in engine.timer.seconds.items()}
        | {"total": round(time.perf_counter() - t_start, 3)},
        "details": out.details,
    }
    if out.layers is not None:
        sidecar["layers"] = len(out.layers)  # label maps needed to hold the classes' overlaps
    return sidecar


def warn_classes_not_found(found: list[dict], target: sitk.Image, target_name: str, engine: Engine) -> None:
    """A warning naming the classes of which no voxel was found (the run itself succeeded: a structure can
    be absent from a target); when the target is thin along an axis (under a quarter of the model's
    window there, e.g. a slab of a few slices), say so: the 3-D model sees little context in it."""
    missing = [c["name"] for c in found if c["voxels"] == 0]
    if not missing:
        return
    hint = ""
    extent = np.array(target.GetSize()) * np.array(target.GetSpacing())
    window_mm = float(min(engine.window) * min(engine.policy.spacing))
    if extent.min() < window_mm / 4:
        axis = int(extent.argmin())
        hint = (f"; the target is {extent[axis]:.0f} mm ({target.GetSize()[axis]} voxels) thick along its axis "
                f"{axis}, under a quarter of the model's {window_mm:.0f} mm window: a 3-D model sees "
                "little context in so thin a volume")
    log.warning("%d of %d classes not found in %s (no voxel): %s%s", len(missing), len(found), target_name,
                ", ".join(missing), hint)
