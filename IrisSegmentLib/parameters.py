"""The module's parameter node (a vtkMRMLScriptedModuleNode) <-> a SegmentRequest, without Qt.

Parameters: ModelChoice (a ``models.model_choices`` key: 'default', 'mass-base' or 'file'; empty,
as in scenes saved before the choice existed, means 'file' when ModelPath is set, else 'default'),
ModelPath (the file, for 'file'), LibraryPath, Structures, the run options Strategy, Device, TuneSteps,
HermesModality, Intensity, Postprocess, MaxClassesPerForward and Precision (``OPTION_PARAMETERS``: each maps to
one ``SegmentOptions`` field, whose default it takes; probability maps are a file output of the CLI and
API, not of the scene); node references Target, Output (where Segment writes: none means a new node every
run) and Result (the last result, for Compare and for "edit, then reuse").

The references table is stored as MRML node references, one role per row and column (ReferenceVolume0,
ReferenceSegmentation0, ReferenceVolume1, ...; ReferenceCount rows; ReferenceSegments<i> the row's segment
names as a JSON list): when a saved scene is imported into a non-empty one, vtkMRMLScene renames clashing
node IDs and remaps node references, but never the IDs written inside a parameter string, so rows kept as
IDs in JSON (the 'References' parameter of earlier versions, still read once and converted) pointed at
other nodes.

Why by hand and not with Slicer's ``parameterNodeWrapper`` (issue [22]): the wrapper imports Qt when it is
imported (Base/Python/slicer/parameterNodeWrapper at v5.10.0: ``import qt`` at the top of serializers.py, whose
``ObservedQColor(qt.QColor)`` is defined at import, and of wrapper.py; guiConnectors.py imports ctk and qt;
``__init__.py`` imports them all), and slicer-core, where this package is tested and where the warm worker runs,
ships neither Qt nor the wrapper (its ``slicer`` package holds ``util`` and the MRML classes only). Declared here,
it would break "IrisSegmentLib never imports qt" and every scene test; declared in the widget, the defaults would
be written twice and tested nowhere. So the plain parameters are one table (``DEFAULTS``, ``OPTION_PARAMETERS``:
their defaults are ``SegmentOptions``'), read and written as the wrapper's serializers store them (strings, node
references by role), and the references table uses the scheme of the wrapper's ListSerializer (a node reference
per element, and a count).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from iris_core.options import SegmentOptions

from .logic import ReferenceSpec, SegmentRequest
from .models import FILE_CHOICE, model_spec
from .scene import SceneError, scalar_volumes, volume_of_segmentation

#: parameter name -> SegmentOptions field
OPTION_PARAMETERS = {"Strategy": "strategy", "Device": "device", "TuneSteps": "tune_steps",
                     "HermesModality": "hermes_modality", "Intensity": "intensity", "Postprocess": "postprocess",
                     "MaxClassesPerForward": "max_classes_per_forward", "Precision": "precision"}
DEFAULTS = {"ModelChoice": "", "ModelPath": "", "LibraryPath": "", "ReferenceCount": "0", "Structures": "",
            "ServerURL": "", "ServerTokenFile": "", "ServerCABundle": ""} | {
    key: "" if (v := getattr(SegmentOptions(), name)) is None else str(v) for key, name in OPTION_PARAMETERS.items()}


VOLUME_ROLE, SEGMENTATION_ROLE, SEGMENTS_PARAMETER = "ReferenceVolume{}", "ReferenceSegmentation{}", "ReferenceSegments{}"


def set_defaults(node) -> None:
    """Fill parameters the node does not have yet (the user's choices are kept); a references table saved
    by an earlier version (node IDs in the 'References' JSON) becomes node references."""
    legacy = node.GetParameter("References")
    if legacy and not node.GetParameter("ReferenceCount"):
        scene = node.GetScene()
        rows = json.loads(legacy or "[]")
        set_reference_rows(node, [{"volume": scene.GetNodeByID(r.get("volume") or "") if scene else None,
                                   "segmentation": scene.GetNodeByID(r.get("segmentation") or "") if scene else None,
                                   "segments": row_segment_names(r)} for r in rows])
        node.UnsetParameter("References")
    for key, value in DEFAULTS.items():
        if not node.GetParameter(key):
            node.SetParameter(key, value)


def reference_rows(node) -> list[dict]:
    """The references table: rows of {'volume': node or None, 'segmentation': node or None, 'segments':
    [names]} (an empty list: every segment)."""
    rows = []
    for i in range(int(node.GetParameter("ReferenceCount") or 0)):
        rows.append({"volume": node.GetNodeReference(VOLUME_ROLE.format(i)),
                     "segmentation": node.GetNodeReference(SEGMENTATION_ROLE.format(i)),
                     "segments": json.loads(node.GetParameter(SEGMENTS_PARAMETER.format(i)) or "[]")})
    return rows


def set_reference_rows(node, rows: list[dict]) -> None:
    """Store the references table (rows as ``reference_rows`` returns them) in one modification."""
    was = node.StartModify()
    try:
        old = int(node.GetParameter("ReferenceCount") or 0)
        for i, row in enumerate(rows):
            for role, key in ((VOLUME_ROLE, "volume"), (SEGMENTATION_ROLE, "segmentation")):
                n = row.get(key)
                node.SetNodeReferenceID(role.format(i), n.GetID() if n is not None else None)
            node.SetParameter(SEGMENTS_PARAMETER.format(i), json.dumps(row_segment_names(row)))
        for i in range(len(rows), old):  # rows removed
            node.RemoveNodeReferenceIDs(VOLUME_ROLE.format(i))
            node.RemoveNodeReferenceIDs(SEGMENTATION_ROLE.format(i))
            node.UnsetParameter(SEGMENTS_PARAMETER.format(i))
        node.SetParameter("ReferenceCount", str(len(rows)))
    finally:
        node.EndModify(was)


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
        vol, seg = row["volume"], row["segmentation"]
        names = row_segment_names(row)
        ids = None
        if seg is not None and names:
            ids = [seg.GetSegmentation().GetSegmentIdBySegmentName(n) or n for n in names]
        refs.append(ReferenceSpec(vol, seg, ids))
    return SegmentRequest(
        target=node.GetNodeReference("Target"), references=refs, model=model_from_parameters(node),
        library=node.GetParameter("LibraryPath") or None, structures=node.GetParameter("Structures") or None,
        options=options_from_parameters(node), output=node.GetNodeReference("Output"), server=server_of(node))


def download_before_segment(node) -> str | None:
    """The known model a Segment on this computer must download first (the user is asked before), or None. A
    run on a server never downloads here, nor needs the local packages for it: the server has its models."""
    from .models import needs_download

    if (node.GetParameter("ServerURL") or "").strip():
        return None
    key = model_choice(node)
    return key if needs_download(key) else None


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
        if row["volume"] is volume and row["segmentation"] is segmentation:
            raise SceneError(f"'{segmentation.GetName()}' on '{volume.GetName()}' is already a reference")
    row = {"volume": volume, "segmentation": segmentation, "segments": names}
    set_reference_rows(node, [*rows, row])
    return row


def reuse_result(scene, node) -> dict:
    """"Edit, then reuse" of the last result: it becomes a reference row paired with the volume it was made
    on (its reference image geometry), not with whatever the Target is now."""
    result = node.GetNodeReference("Result")
    if result is None:
        raise SceneError("no result to reuse yet: run Segment first")
    volume = volume_of_segmentation(scene, result)
    if volume is None:
        raise SceneError(f"the volume '{result.GetName()}' was made on is no longer in the scene")
    return add_reference(scene, node, volume, result)


# -- first choices for a new scene --------------------------------------------------------------------
def default_reference_row(scene, target, rows: list[dict] | None = None) -> dict | None:
    """The next reference row to offer: the first segmentation with segments that is not already a row, whose
    volume is known (``volume_of_segmentation``) and is not the target (a segmentation drawn on the target is
    its manual truth, not a reference)."""
    used = {id(r["segmentation"]) for r in rows or []}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        seg = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if id(seg) in used or seg.GetSegmentation().GetNumberOfSegments() == 0:
            continue
        vol = volume_of_segmentation(scene, seg)
        if vol is not None and vol is not target:
            return {"volume": vol, "segmentation": seg, "segments": []}
    return None


def fill_first_choices(scene, node) -> None:
    """A new parameter node's first choices: the Target is the volume loaded last (what the user just
    opened; Sample Data loads the target of the shipped pair last), never a reference's volume; an empty
    references table gets ``default_reference_row``. Choices already made are kept."""
    rows = reference_rows(node)
    if node.GetNodeReference("Target") is None:
        taken = {id(r["volume"]) for r in rows}
        volumes = [v for v in scalar_volumes(scene) if id(v) not in taken]
        if volumes:
            node.SetNodeReferenceID("Target", volumes[-1].GetID())
    target = node.GetNodeReference("Target")
    if not rows and target is not None:
        row = default_reference_row(scene, target)
        if row is not None:
            set_reference_rows(node, [row])


def add_default_row(scene, node) -> None:
    """'Add reference': a new row, pre-filled with ``default_reference_row`` when there is one (else empty)."""
    rows = reference_rows(node)
    row = default_reference_row(scene, node.GetNodeReference("Target"), rows)
    set_reference_rows(node, [*rows, row or {"volume": None, "segmentation": None, "segments": []}])


def remove_rows(node, selected: set[int]) -> None:
    """'Remove reference': the selected rows, or the last one when none is selected."""
    rows = reference_rows(node)
    selected = selected or {len(rows) - 1}
    set_reference_rows(node, [row for r, row in enumerate(rows) if r not in selected])


def structure_list_key(node) -> tuple[str, str, str]:
    """What the Known structures list is built for: (model choice, model file, task library) as the node holds
    them. The widget rebuilds the list whenever this changes, also when the node changed without an edit in the
    panel (a scene imported), so the list never belongs to another model."""
    return model_choice(node), node.GetParameter("ModelPath") or "", node.GetParameter("LibraryPath") or ""


def known_structure_list(choice: str, model_path: str = "", library_path: str = "") -> tuple[str, list[str], str]:
    """(kind, names, message) of what a model choice (``choice``, with ``model_path`` for a file) or a task
    library segments by name: 'hermes' and its vocabulary, 'library' and its classes, or 'iris' and none
    (references needed); read from the file's header (no weights loaded, no torch imported); ``message`` says
    why a file could not be read."""
    from .models import FILE_CHOICE
    from .vocabulary import ModelFileError, known_structures

    try:
        kind, names = known_structures((model_path or None) if choice == FILE_CHOICE else None, library_path or None)
    except ModelFileError as exc:
        return "iris", [], str(exc)
    return kind, list(names), ""


def server_of(node):
    """The ``remote.Server`` the parameter node says to run on (address, token, CA bundle), None for this computer.
    Refused with a SceneError naming what to fix: a URL that is not http(s), no token file, an unreadable or
    empty one, a CA bundle that is not a file."""
    url = (node.GetParameter("ServerURL") or "").strip()
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise SceneError(f"server {url!r}: give its address as http://host:port or https://host (or leave it empty "
                         "to run on this computer)")
    path = (node.GetParameter("ServerTokenFile") or "").strip()
    if not path:
        raise SceneError(f"server {url}: choose the file holding its token")
    from iris_core.service.client import ServerError, read_token

    from .remote import Server

    try:
        token = read_token(path)
    except (OSError, ServerError) as exc:
        raise SceneError(f"server token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    ca = (node.GetParameter("ServerCABundle") or "").strip() or None
    if ca is not None and not Path(ca).is_file():
        raise SceneError(f"server CA bundle {ca}: no such file; choose the PEM file of the certificate authority "
                         "that signed the server's certificate, or leave it empty")
    return Server(url, token, ca)
