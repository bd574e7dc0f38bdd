"""Segment and Compare on an MRML scene, without Qt.

A run exports the target and the chosen reference segments (full geometry) to a private work
folder, runs the worker process, and only when it succeeded imports the result into a NEW
segmentation node (or the output node the user chose explicitly). A failed or cancelled run
leaves the scene exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import reason
from iris_core.io.colours import colour_rgb
from iris_core.io.segmentations import disjoint_groups
from iris_core.options import SegmentOptions, strategy_for

from .jobs import Job, raise_for, run_to_end
from .runner import WorkerError, WorkerProcess
from .scene import (
    SceneError,
    SegmentInfo,
    add_labels_as_segmentation,
    check_output,
    checked_image,
    describe,
    nodes_removed_after,
    segment_masks,
    volume_to_image,
    world_matrix,
)

log = logging.getLogger(__name__)

#: the library's input names (iris_core IrisError.inputs) as the module's controls
SLICER_INPUTS = {"references": "the References table", "library": "Task library", "structures": "Known structures",
                 "hermes_modality": "the modality of Known structures", "classes": "the Segments column",
                 "model": "Model", "target": "Target volume", "output": "Output"}
#: below this share of a reference segment inside its volume, the user is told (the rest is cut off)
KEPT_WARNING = 0.95


@dataclass
class ReferenceSpec:
    """A reference: a volume, a segmentation on it, and which segments (None: all)."""

    volume: object
    segmentation: object
    segment_ids: list[str] | None = None


@dataclass
class SegmentRequest:
    """What to segment (scene nodes, model, library or structures) and how (``options``)."""

    target: object
    references: list[ReferenceSpec] = field(default_factory=list)
    model: str = "default"
    library: str | None = None
    structures: str | None = None  # Hermes / known structures: names from the model's vocabulary
    options: SegmentOptions = field(default_factory=SegmentOptions)
    output: object = None  # an existing segmentation node, or None for a new one
    server: object = None  # a remote.Server to run on instead of this computer (None: here)


@dataclass
class PreparedRun:
    """A run whose files are exported and whose worker can be started."""

    workdir: Path
    job_file: Path
    output_file: Path
    infos: list[SegmentInfo]
    request: SegmentRequest
    strategy: str
    # work file -> the node it came from, as messages name it ("target volume 'CT'")
    sources: dict[str, str] = field(default_factory=dict)
    # what the user should know before the result is trusted (a reference segment cut by its volume)
    warnings: list[str] = field(default_factory=list)

    def in_scene_words(self, text: str) -> str:
        """``text`` (a worker's message or log line) with the work files named as the nodes they came
        from: whole paths, and the bare file names iris_core's messages use ("target.nrrd: ...",
        "Encoding reference ref0.nrrd")."""
        role = r"(?:(?:target|reference) image |label map |the result )?"  # iris_core's word for it: ours says more
        for path, what in sorted(self.sources.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(role + re.escape(path), lambda _, what=what: what, text)
        for path, what in self.sources.items():
            bare = re.compile(role + r"(?<![\w./\\-])" + re.escape(Path(path).name) + r"(?![\w.])")
            text = bare.sub(lambda _, what=what: what, text)
        return text

    def explain(self, error: WorkerError) -> WorkerError:
        """The worker's error in the scene's words (``in_scene_words``), naming the module's controls it concerns."""
        text = self.in_scene_words(str(error))
        controls = [SLICER_INPUTS[i] for i in error.inputs if i in SLICER_INPUTS]
        if controls:
            text += f" (see {' or '.join(controls)})"
        return WorkerError(text, self.in_scene_words(error.details), error.inputs)


scene_unchanged = nodes_removed_after  # reading arrays must not change the user's scene


class SegmentationLogic:
    """Segment and Compare on an MRML scene, without Qt: the module's logic (IrisSegment.py's IrisSegmentLogic is
    this class plus Slicer's parameter-node helpers), usable alone from the Python console and the tests."""

    def __init__(self, scene=None, python: str | None = None, workdir: str | Path | None = None,
                 server=None, warm: bool = False, idle: float | None = None):
        """``server``: a ``remote.Server`` (or a (URL, token) pair) to run every Segment on instead of this
        computer, unless a request names its own (``SegmentRequest.server``); ``None``: here. ``warm``: here,
        through the warm local worker (``warm.LocalWorker``: started on the first run, kept with its model
        loaded, spoken to over its pipes; ``idle``: its idle seconds) rather than a new worker process per
        run."""
        from .remote import Server

        self.server = Server(*server) if isinstance(server, tuple) else server
        self.warm = None
        if warm:
            from .warm import LocalWorker

            self.warm = LocalWorker(python, idle)
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.python = python
        self.workdir_root = Path(workdir) if workdir else None

    # -- export -------------------------------------------------------------------------------
    def check(self, req: SegmentRequest) -> None:
        """Refuse, before anything is exported, what would fail later or touch the user's nodes."""
        if req.target is None:
            raise SceneError("choose a target volume")
        for node, role in [(req.target, "target volume"), (req.output, "output segmentation")]:
            if node is not None and not self.scene.IsNodePresent(node):
                raise SceneError(f"{describe(node, role)} is no longer in the scene")
        if not req.references and not req.library and not req.structures:
            raise SceneError("add at least one reference (volume + segmentation), choose a task library, or "
                             "pick known structures of a Hermes model")
        from iris_core.hub import download as hub
        # on a server, the server says which models it serves (and a known model is never downloaded here)
        if (req.server or self.server) is None and not hub.names_a_model(req.model):
            raise SceneError(f"model file {req.model} not found; choose another file or the bundled default")
        if req.output is not None:
            for i, ref in enumerate(req.references):
                if ref.segmentation is req.output:
                    raise SceneError(f"the output segmentation '{req.output.GetName()}' is reference {i + 1}'s "
                                     "segmentation: its segments would be replaced; choose another output or "
                                     "'Create new segmentation'")
            check_output(req.output)
            if not np.allclose(world_matrix(req.output), world_matrix(req.target), atol=1e-6):
                raise SceneError(f"the output segmentation '{req.output.GetName()}' is under a different transform "
                                 f"from the target volume '{req.target.GetName()}': the result would be shifted; "
                                 "put both under the same transform or choose 'Create new segmentation'")

    def prepare(self, req: SegmentRequest) -> PreparedRun:
        """Check the request and export its arrays with geometry; nothing in the scene changes."""
        self.check(req)
        target_img = checked_image(req.target, "target volume")
        try:
            work = Path(tempfile.mkdtemp(prefix="iris-", dir=self.workdir_root))
        except OSError as exc:
            raise SceneError(f"cannot create a work folder in {self.workdir_root or tempfile.gettempdir()}: "
                             f"{exc.strerror or exc}; free disk space or choose another temporary folder") from None
        sources: dict[str, str] = {}

        def write(img: sitk.Image, path: Path, what: str, compress: bool = False) -> str:
            try:
                sitk.WriteImage(img, str(path), compress)
            except (RuntimeError, OSError) as exc:
                raise SceneError(f"cannot write {what} to the temporary folder {work.parent} ({reason(exc)}); free disk space "
                                 "or choose another temporary folder") from None
            sources[str(path)] = what
            return str(path)

        # the result is written here too: a failure to write it is named as what it is, in its folder
        # (iris_core says "the result <path>": the whole phrase is replaced, never "the result the result ...")
        sources[str(work / "result.nrrd")] = f"the result in the temporary folder {work.parent}"
        warnings: list[str] = []
        try:
            target_path = write(target_img, work / "target.nrrd", describe(req.target, "target volume"))
            job: dict = {"target": target_path, "output": str(work / "result.nrrd"), "model": req.model}
            infos: list[SegmentInfo] = []
            options = req.options
            if req.structures:
                job["structures"] = req.structures
            elif req.library:
                job["library"] = req.library
            else:
                infos, refs, per_reference = self._export_references(req, work, write, warnings)
                job["references"] = refs
                job["classes"] = [{"name": s.name, "value": s.value} for s in infos]
                strategy = strategy_for(options.strategy, per_reference)  # as the library decides
                if strategy != options.strategy:
                    options = dataclasses.replace(options, strategy=strategy)
                    log.info("several references share a segment name: using the context ensemble")
                if len(refs) > len({image for image, _ in refs}):  # a reference's segments overlap
                    # so may the result's: each class decided on its own, one label map per group
                    options = dataclasses.replace(options, overlaps=True)
                    job["output_layers"] = str(work / "result_layer{}.nrrd")
                    log.info("the reference segments overlap: each class is segmented on its own, so the "
                             "result's segments may overlap too")
            job_file = work / "job.json"
            try:
                job_file.write_text(json.dumps({"inputs": job, "options": options.to_dict()}, indent=2))
            except OSError as exc:
                raise SceneError(f"cannot write the job file to the temporary folder {work.parent} ({exc.strerror or exc}); "
                                 "free disk space or choose another temporary folder") from None
            for line in warnings:
                log.warning("%s", line)
            return PreparedRun(work, job_file, work / "result.nrrd", infos, req, options.strategy, sources, warnings)
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def _export_references(self, req: SegmentRequest, work: Path, write, warnings: list[str]
                           ) -> tuple[list[SegmentInfo], list, list[list[str]]]:
        """Write each reference image once and its segments as label maps: one label map per group
        of non-overlapping segments, so a segment inside another stays whole (the same image is
        listed once per group). Returns the classes, the (image, labels) pairs and each reference's
        segment names (for ``strategy_for``). Segment names are one class whatever their case
        ('Left' and 'left'): Slicer's segment lookup by name ignores case, so two such classes could not
        both be imported. A segment partly outside its volume adds a line to ``warnings``."""
        by_name: dict[str, SegmentInfo] = {}  # by the case-folded name
        per_reference: list[list[str]] = []
        refs = []
        for i, ref in enumerate(req.references):
            if ref.volume is None or ref.segmentation is None:
                raise SceneError(f"reference {i + 1}: choose both a volume and a segmentation")
            for node, role in [(ref.volume, f"reference {i + 1} volume"),
                               (ref.segmentation, f"reference {i + 1} segmentation")]:
                if not self.scene.IsNodePresent(node):
                    raise SceneError(f"{describe(node, role)} is no longer in the scene")
            role = f"reference {i + 1} volume"
            image = checked_image(ref.volume, role)
            with scene_unchanged(self.scene):
                masks, seg_infos, kept = segment_masks(ref.segmentation, ref.segment_ids, ref.volume)
            for info, share in zip(seg_infos, kept):
                if share < KEPT_WARNING:
                    warnings.append(f"{describe(ref.segmentation, f'reference {i + 1} segmentation')}: segment "
                                    f"'{info.name}' lies partly outside {describe(ref.volume, role)}; only the "
                                    f"{share:.0%} inside it is used as the reference")
            for info in seg_infos:
                key = info.name.casefold()
                if key not in by_name:
                    by_name[key] = SegmentInfo(info.segment_id, info.name, info.color, info.terminology,
                                               len(by_name) + 1)
            per_reference.append([info.name for info in seg_infos])
            img_path = write(image, work / f"ref{i}.nrrd", describe(ref.volume, role))
            for g, group in enumerate(disjoint_groups(masks)):
                labels = np.zeros(masks[0].shape, np.uint16)
                for k in group:
                    labels[masks[k]] = by_name[seg_infos[k].name.casefold()].value
                out = sitk.GetImageFromArray(labels)
                out.CopyInformation(image)
                seg_what = describe(ref.segmentation, f"reference {i + 1} segmentation")
                refs.append([img_path, write(out, work / f"ref{i}_labels{g}.nrrd", seg_what, True)])
        return list(by_name.values()), refs, per_reference

    # -- run ----------------------------------------------------------------------------------
    def start(self, run: PreparedRun) -> WorkerProcess:
        """Start the worker of a prepared run without waiting (see ``start_segment`` for the whole job): a local
        process, or the run on the server chosen (the same interface)."""
        from .remote import RemoteProcess

        server = run.request.server or self.server
        if server is not None:
            return RemoteProcess(run.job_file, server)
        if self.warm is not None:
            return self.warm.submit(run.job_file, run.workdir)
        return WorkerProcess(run.job_file, self.python)

    def close(self) -> None:
        """Stop the warm worker, if one runs (the module closing, Slicer quitting): it removes its work folders
        and exits. Idempotent."""
        if self.warm is not None:
            self.warm.close()

    def start_segment(self, req: SegmentRequest) -> Job:
        """Export the request and start its worker: a Job to poll (GUI timer) or run to its end. Nothing is
        left behind if starting fails: the work folder is removed."""
        run = self.prepare(req)
        try:
            return Job(self.start(run), self, run)
        except BaseException:
            self.cleanup(run)
            raise

    def start_download(self, key: str) -> Job:
        """Start downloading a known model in the worker (progress, Cancel; a later download resumes)."""
        from .models import start_download

        proc = start_download(key, python=self.python, workdir=self.workdir_root)
        return Job(proc, self, download=key, folder=Path(proc.job_file).parent)

    def finish(self, run: PreparedRun, sidecar: dict):
        """Import a finished run's result into the scene; returns the segmentation node. Raises
        SceneError (and imports nothing) when the target or the output left the scene meanwhile, or when
        the result files are gone from the work folder. The work folder is removed in any case."""
        try:
            req = run.request
            for node, role in [(req.target, "target volume"), (req.output, "output segmentation")]:
                if node is not None and not self.scene.IsNodePresent(node):
                    raise SceneError(f"{describe(node, role)} was removed from the scene while segmenting; "
                                     "the result was not imported")
            if req.output is not None and not np.allclose(world_matrix(req.output), world_matrix(req.target),
                                                          atol=1e-6):
                raise SceneError(f"the output segmentation '{req.output.GetName()}' was moved under a different "
                                 "transform from the target while segmenting; the result was not imported")
            layers = sorted(run.workdir.glob("result_layer*.nrrd"), key=lambda p: int(p.stem[len("result_layer"):]))
            if not layers and not run.output_file.is_file():
                raise SceneError(f"the result is gone from the work folder {run.workdir} (removed by another "
                                 "program, or the temporary folder was cleaned); nothing was imported: run "
                                 "Segment again")
            # overlapping classes come as one label map per group of classes that do not overlap
            try:
                labels = [sitk.ReadImage(str(p)) for p in layers] or sitk.ReadImage(str(run.output_file))
            except RuntimeError as exc:
                raise SceneError(f"the result in the work folder {run.workdir} cannot be read ({reason(exc)}); "
                                 "nothing was imported: run Segment again") from None
            infos = run.infos
            if not infos:  # task library / known structures: names from the sidecar, terminology by name
                from .terminology import terminology

                infos = [SegmentInfo("", c["name"], colour_rgb(i), terminology(c["name"]),
                                     int(c["value"])) for i, c in enumerate(sidecar["classes"])]
            node = add_labels_as_segmentation(self.scene, labels, infos, req.target, req.output)
            # the target by its node's name: the worker knew only the work file (target.nrrd, deleted now)
            node.SetAttribute("IrisSegment.Sidecar", json.dumps(dict(sidecar, target=req.target.GetName())))
            return node
        finally:
            self.cleanup(run)

    def cleanup(self, run: PreparedRun) -> None:
        shutil.rmtree(run.workdir, ignore_errors=True)

    def segment(self, req: SegmentRequest, progress: Callable[[str, int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None, log_line: Callable[[str], None] | None = None):
        """Blocking Segment: export, run the worker, import (the widget's Job, run to its end). Raises
        SceneError, WorkerError or WorkerCancelled, leaving the scene as it was; whatever ends the call (an
        exception in a callback, an interrupt), the worker is killed and the work folder removed."""
        job = self.start_segment(req)
        outcome = run_to_end(job, progress, cancel, log_line)
        if log_line:
            for line in outcome.log if outcome.ok else []:
                log_line(line)
        return raise_for(outcome)

    # -- compare ------------------------------------------------------------------------------
    def compare(self, result_node, manual_node, reference_volume, table_node=None) -> list[dict]:
        """Per segment (matched by name): Dice, HD95, ASSD and volumes of ``result_node`` against
        ``manual_node`` on ``reference_volume``'s grid. Fills ``table_node`` when given."""
        import slicer.util

        from iris_core.metrics import segment_metrics

        spacing = volume_to_image(reference_volume).GetSpacing()[::-1]
        res_seg, man_seg = result_node.GetSegmentation(), manual_node.GetSegmentation()
        rows = []
        for i in range(res_seg.GetNumberOfSegments()):
            sid = res_seg.GetNthSegmentID(i)
            name = res_seg.GetSegment(sid).GetName()
            mid = man_seg.GetSegmentIdBySegmentName(name)
            if not mid:
                continue
            with scene_unchanged(self.scene):
                pred = slicer.util.arrayFromSegmentBinaryLabelmap(result_node, sid, reference_volume)
                truth = slicer.util.arrayFromSegmentBinaryLabelmap(manual_node, mid, reference_volume)
            rows.append({"segment": name} | segment_metrics(pred > 0, truth > 0, spacing))
        if not rows:
            raise SceneError(f"no segment of '{result_node.GetName()}' has a namesake in '{manual_node.GetName()}'")
        if table_node is not None:
            fill_table(table_node, rows)
        return rows

    def compare_to_table(self, result_node, manual_node, reference_volume, name: str | None = None):
        """``compare`` into a NEW table node; on any failure no table is left in the scene."""
        if result_node is None or manual_node is None or reference_volume is None:
            raise SceneError("choose the target, the result and a manual segmentation")
        table = self.scene.AddNewNodeByClass(
            "vtkMRMLTableNode", name or f"{result_node.GetName()} vs {manual_node.GetName()}")
        try:
            self.compare(result_node, manual_node, reference_volume, table)
        except Exception:
            self.scene.RemoveNode(table)
            raise
        return table


def module_settings() -> dict:
    """How the module configures its logic (IrisSegment.py's IrisSegmentLogic): the worker through Slicer's Python
    launcher (``runner.python_executable``), kept warm between clicks."""
    from .runner import python_executable

    return {"python": python_executable(), "warm": True}


def module_logic(scene=None) -> SegmentationLogic:
    """The logic as the module's widget builds it (``module_settings``), on ``scene`` (Slicer's by default), without
    Slicer's parameter-node helpers: the tests of the Slicer-like environment build it here, so they run what a
    clinician's click runs."""
    return SegmentationLogic(scene, **module_settings())


def fill_table(table_node, rows: list[dict]) -> None:
    """Write metric rows into a vtkMRMLTableNode (one column per metric)."""
    import vtk

    table = table_node.GetTable()
    table.Initialize()
    cols = list(rows[0])
    for c in cols:
        arr = vtk.vtkStringArray() if c == "segment" else vtk.vtkDoubleArray()
        arr.SetName(c)
        table.AddColumn(arr)
    table.SetNumberOfRows(len(rows))
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            v = row[col]
            table.SetValue(r, c, vtk.vtkVariant(v if isinstance(v, str) else float(v)))
    table_node.Modified()
