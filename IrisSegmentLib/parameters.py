"""The module's parameter node (a vtkMRMLScriptedModuleNode) <-> a SegmentRequest, without Qt.

Parameters: ModelChoice (a ``models.model_choices`` key: 'default', 'mass-base' or 'file'; empty,
as in scenes saved before the choice existed, means 'file' when ModelPath is set, else 'default'),
ModelPath (the file, for 'file'), LibraryPath, Structures, the run options Strategy, Device, TuneSteps,
HermesModality, Intensity, Postprocess, MaxClassesPerForward and Precision (``OPTION_PARAMETERS``: each maps to
one ``SegmentOptions`` field, whose default it takes; probability maps are a file output of the CLI and
API, not of the scene), and References (JSON rows of volume id, segmentation id, segment names as a list; a string is read
as comma-separated, with double quotes around a name that holds a comma); node references Target,
Output (where Segment writes: none means a new node every run) and Result (the last result, for
Compare and for "edit, then reuse").
"""

from __future__ import annotations

import csv
import json

from iris_core.options import SegmentOptions

from .logic import ReferenceSpec, SegmentRequest
from .models import FILE_CHOICE, model_spec
from .scene import SceneError

#: parameter name -> SegmentOptions field
OPTION_PARAMETERS = {"Strategy": "strategy", "Device": "device", "TuneSteps": "tune_steps",
                     "HermesModality": "hermes_modality", "Intensity": "intensity", "Postprocess": "postprocess",
                     "MaxClassesPerForward": "max_classes_per_forward", "Precision": "precision"}
DEFAULTS = {"ModelChoice": "", "ModelPath": "", "LibraryPath": "", "References": "[]", "Structures": ""} | {
    key: "" if (v := getattr(SegmentOptions(), name)) is None else str(v) for key, name in OPTION_PARAMETERS.items()}


def set_defaults(node) -> None:
    """Fill parameters the node does not have yet (the user's choices are kept)."""
    for key, value in DEFAULTS.items():
        if not node.GetParameter(key):
            node.SetParameter(key, value)


def reference_rows(node) -> list[dict]:
    return json.loads(node.GetParameter("References") or "[]")


def parse_segment_names(text: str) -> list[str]:
    """'brain, "lobe, left"' -> ['brain', 'lobe, left'] (the table cell's format)."""
    if not text or not text.strip():
        return []
    fields = next(csv.reader([text], skipinitialspace=True))
    return [f.strip() for f in fields if f.strip()]


def format_segment_names(names: list[str]) -> str:
    """The inverse of ``parse_segment_names``: names holding a comma or a quote are quoted."""
    out = []
    for n in names:
        out.append('"' + n.replace('"', '""') + '"' if ("," in n or '"' in n) else n)
    return ", ".join(out)


def row_segment_names(row: dict) -> list[str]:
    value = row.get("segments") or []
    return list(value) if isinstance(value, list) else parse_segment_names(value)


def model_choice(node) -> str:
    """The model choice key the node holds (see the module docstring for an empty ModelChoice)."""
    return node.GetParameter("ModelChoice") or (FILE_CHOICE if node.GetParameter("ModelPath") else "default")


def model_from_parameters(node) -> str:
    """What the worker job's ``model`` field gets: 'default', a known model's name or the file path.
    Raises ValueError for 'file' without a path."""
    return model_spec(model_choice(node), node.GetParameter("ModelPath") or None)


def options_from_parameters(node) -> SegmentOptions:
    """The run options the parameter node holds (an empty parameter keeps the default)."""
    default = SegmentOptions()
    values = {}
    for key, name in OPTION_PARAMETERS.items():
        text = node.GetParameter(key)
        if text:
            kind = type(getattr(default, name))
            values[name] = kind(text) if kind in (int, float) else text
    return SegmentOptions.from_dict(values)


def request_from_parameters(scene, node) -> SegmentRequest:
    """The SegmentRequest the parameter node describes; segment names resolve to segment ids."""
    refs = []
    for row in reference_rows(node):
        vol = scene.GetNodeByID(row.get("volume") or "")
        seg = scene.GetNodeByID(row.get("segmentation") or "")
        names = row_segment_names(row)
        ids = None
        if seg is not None and names:
            ids = [seg.GetSegmentation().GetSegmentIdBySegmentName(n) or n for n in names]
        refs.append(ReferenceSpec(vol, seg, ids))
    return SegmentRequest(
        target=node.GetNodeReference("Target"), references=refs, model=model_from_parameters(node),
        library=node.GetParameter("LibraryPath") or None, structures=node.GetParameter("Structures") or None,
        options=options_from_parameters(node), output=node.GetNodeReference("Output"))


def can_segment(node) -> bool:
    """Whether Segment has what it needs: a target and references, a task library or structures."""
    return node.GetNodeReference("Target") is not None and (
        bool(reference_rows(node)) or bool(node.GetParameter("LibraryPath")) or bool(node.GetParameter("Structures")))


def record_result(node, result_node) -> None:
    """Remember a finished run's node as the Result (for Compare and reuse) without making it the
    Output: the next Segment then creates a new node instead of replacing this one's segments."""
    node.SetNodeReferenceID("Result", result_node.GetID() if result_node is not None else None)


def add_reference(scene, node, volume, segmentation) -> dict:
    """"Edit, then reuse": append (``volume``, ``segmentation``) (e.g. a target and its corrected
    result) as a new row of the references table, so the next target benefits. Refuses an empty
    segmentation, a repeated name inside it, and a pair that is already a row."""
    if volume is None or segmentation is None:
        raise SceneError("choose the corrected segmentation and its volume (run Segment first)")
    if not scene.IsNodePresent(volume) or not scene.IsNodePresent(segmentation):
        raise SceneError(f"'{segmentation.GetName()}' or '{volume.GetName()}' is no longer in the scene")
    seg = segmentation.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    if not names:
        raise SceneError(f"segmentation '{segmentation.GetName()}' has no segments to reuse")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SceneError(f"segmentation '{segmentation.GetName()}' has several segments named {dup}; rename them")
    rows = reference_rows(node)
    for row in rows:
        if row.get("volume") == volume.GetID() and row.get("segmentation") == segmentation.GetID():
            raise SceneError(f"'{segmentation.GetName()}' on '{volume.GetName()}' is already a reference")
    row = {"volume": volume.GetID(), "segmentation": segmentation.GetID(), "segments": names}
    rows.append(row)
    node.SetParameter("References", json.dumps(rows))
    return row
