"""The choice lists of the module's combo boxes, from iris_core's own tables (torch-free): a value added to
an iris_core table appears in the module with no edit here; this file only words the labels."""

from __future__ import annotations

from iris_core.hub.hermes_vocab import HERMES_MODALITIES
from iris_core.options import DEVICES, PRECISIONS, STRATEGIES

LABELS = {
    "one-shot": "One-shot", "ensemble": "Context ensemble", "retrieval": "Object-level retrieval",
    "tuning": "In-context tuning",
    "auto": "Auto", "cpu": "CPU", "cuda": "CUDA", "mps": "Apple GPU (MPS)",
    "float32": "Float32", "bfloat16": "Bfloat16 (unchecked)",
    "CT": "CT", "PET": "PET", "T1 MRI": "MR T1", "T2 MRI": "MR T2", "cine MRI": "cine MR",
}
#: labels that differ by list (the same value means something else in another list)
LIST_LABELS = {("devices", "auto"): "Auto (CUDA or Apple GPU when present)",
               ("precisions", "auto"): "Auto (bfloat16 where checked safe)"}
#: the first entry of each list is the default
TABLES = {"strategies": STRATEGIES, "devices": DEVICES, "precisions": PRECISIONS, "modalities": tuple(HERMES_MODALITIES)}


def choices(name: str) -> list[tuple[str, str]]:
    """(label, value) pairs of one list ('strategies', 'devices', 'precisions', 'modalities'), the default
    (SegmentOptions') first."""
    from iris_core.options import SegmentOptions

    values = list(TABLES[name])
    default = {"strategies": SegmentOptions().strategy, "devices": SegmentOptions().device,
               "precisions": SegmentOptions().precision}.get(name)
    if default in values:
        values.remove(default)
        values.insert(0, default)
    return [(LIST_LABELS.get((name, v), LABELS.get(v, v)), v) for v in values]


# -- which control of Resources/UI/IrisSegment.ui stores which parameter (the widget loops over these) --------
#: node selectors -> node reference roles
NODE_CONTROLS = {"targetSelector": "Target", "outputSelector": "Output"}
#: combo boxes -> (choice list, parameter); the model combo's list is models.model_choices
COMBO_CONTROLS = {"strategyComboBox": ("strategies", "Strategy"), "deviceComboBox": ("devices", "Device"),
                  "precisionComboBox": ("precisions", "Precision"), "modalityComboBox": ("modalities", "HermesModality")}
#: path line edits -> parameters
PATH_CONTROLS = {"modelPathLineEdit": "ModelPath", "libraryPathLineEdit": "LibraryPath",
                 "serverTokenPathLineEdit": "ServerTokenFile", "serverCaPathLineEdit": "ServerCABundle"}
#: text fields -> parameters
TEXT_CONTROLS = {"serverUrlLineEdit": "ServerURL"}
#: every path and text field: control -> (parameter, the control's property holding its text)
FIELD_CONTROLS = {**{n: (k, "currentPath") for n, k in PATH_CONTROLS.items()},
                  **{n: (k, "text") for n, k in TEXT_CONTROLS.items()}}
#: the references table's node columns: (node class, row key)
REFERENCE_COLUMNS = (("vtkMRMLScalarVolumeNode", "volume"), ("vtkMRMLSegmentationNode", "segmentation"))
#: controls disabled while a job or an installation runs (a second click would start a second one)
BUSY_CONTROLS = ("modelComboBox", "compareButton", "reuseButton", "addReferenceButton", "removeReferenceButton")


def enabled_controls(node, job_running: bool, installing: bool) -> dict[str, bool]:
    """Which controls are enabled for the parameter node's state."""
    from .parameters import can_segment

    idle = not job_running and not installing
    state = dict.fromkeys(BUSY_CONTROLS, idle)
    state.update(segmentButton=idle and can_segment(node), cancelButton=job_running,
                 tuneStepsSpinBox=node.GetParameter("Strategy") == "tuning")
    return state
#: (control, Qt signal, widget method) connected in setup: edits store the parameter node, buttons act
SIGNALS = [
    *((name, "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI") for name in NODE_CONTROLS),
    *((name, "currentIndexChanged(int)", "updateParameterNodeFromGUI") for name in COMBO_CONTROLS),
    ("tuneStepsSpinBox", "valueChanged(int)", "updateParameterNodeFromGUI"),
    *((name, "editingFinished()", "updateParameterNodeFromGUI") for name in TEXT_CONTROLS),
    ("referencesTable", "cellChanged(int,int)", "updateParameterNodeFromGUI"),
    ("structuresList", "itemChanged(QListWidgetItem*)", "updateParameterNodeFromGUI"),
    ("modelComboBox", "currentIndexChanged(int)", "onModelChoiceChanged"),
    *((name, "currentPathChanged(QString)", "onModelChoiceChanged") for name in PATH_CONTROLS),
    *((f"{b}Button", "clicked(bool)", f"on{b[0].upper()}{b[1:]}")
      for b in ("addReference", "removeReference", "segment", "cancel", "compare")),
    ("reuseButton", "clicked(bool)", "onReuseResult"),
]
