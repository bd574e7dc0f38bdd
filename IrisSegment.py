"""IrisSegment: in-context segmentation in 3D Slicer.

Only what needs Qt or the Slicer application lives here: the module description, the widget
(built from Resources/UI/IrisSegment.ui, its state in a parameter node), dependency installation
with the user's consent, and the self-test entry point. Everything else is IrisSegmentLib.
"""

from __future__ import annotations

import json
import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

STRATEGIES = [("One-shot", "one-shot"), ("Context ensemble", "ensemble"), ("Object-level retrieval", "retrieval"),
              ("In-context tuning", "tuning")]
DEVICES = [("Auto (CUDA when present)", "auto"), ("CPU", "cpu"), ("CUDA", "cuda")]
PRECISIONS = [("Float32", "float32"), ("Auto (bfloat16 where checked safe)", "auto"), ("Bfloat16 (unchecked)", "bfloat16")]
MODALITIES = [("CT", "CT"), ("MR T1", "T1"), ("MR T2", "T2"), ("PET", "PET"), ("cine MR", "cine")]


class IrisSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        super().__init__(parent)
        parent.title = "Iris Segment"
        parent.categories = ["Segmentation"]
        parent.contributors = ["IrisSegment developers"]
        parent.helpText = (
            "Show one or more reference volumes that carry a segmentation; Iris segments the same structures "
            "in the target volume, every class in one pass, without fine-tuning. "
            "The README.md in the module's folder describes the controls and the models. "
            "Needs 3D Slicer 5.10 or later."
        )
        parent.acknowledgementText = (
            "Iris: Gao et al., Show and Segment: Universal Medical Image Segmentation via In-Context Learning, "
            "CVPR 2025. Hermes: Gao et al., CVPR 2024. Sample data: Colin27 and ICBM 2009a, Copyright (C) "
            "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University "
            "(Resources/SampleData/NOTICE.md)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped sample pair (Resources/SampleData: Colin27 + brain segmentation as reference, ICBM
    2009a moved off MNI space + its manual brain segmentation as target) in the Sample Data module.
    Every list argument is a list of the same length: SampleDataSource.__init__ calls len() on each
    (Modules/Scripted/SampleData/SampleData.py, Slicer 5.6 to main), so None crashed at start-up."""
    try:
        import SampleData
    except ImportError:
        return
    from IrisSegmentLib.testing import sample_data_source

    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "IrisSegment.png")
    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(thumbnailFileName=icon, **sample_data_source())
    except Exception:  # a sample that cannot register must never break Slicer's start-up
        logging.exception("IrisSegment: could not register the sample data")


def ensureDependencies() -> bool:
    """Install missing or too old packages after asking the user; True when all are satisfied.
    Uses slicer.packaging.pip_ensure where it exists (Slicer 5.12+, Base/Python/slicer/packaging.py:
    it raises RuntimeError when the user declines and CalledProcessError when pip fails), else the
    user's confirmation and slicer.util.pip_install. Never raises."""
    from IrisSegmentLib.dependencies import REQUIREMENTS, missing_packages

    missing = missing_packages()
    if not missing:
        return True
    if any(r.startswith("torch") for r in missing) and _installTorchWithExtension():
        missing = missing_packages()
    if not missing:
        return True
    try:
        import slicer.packaging as packaging  # a submodule: not an attribute of slicer until imported
    except ImportError:
        packaging = None
    try:
        if packaging is not None:
            packaging.pip_ensure(missing, requester="IrisSegment")
        else:
            text = "IrisSegment needs these Python packages:\n\n" + "\n".join(missing) + \
                f"\n\n(from {REQUIREMENTS}). Install them now? This can take several minutes."
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle="IrisSegment: install packages"):
                return False
            slicer.util.pip_install(" ".join(f'"{m}"' for m in missing))
    except Exception as exc:  # declined (RuntimeError) or pip failed (CalledProcessError)
        slicer.util.errorDisplay(f"IrisSegment: the Python packages were not installed ({exc}).",
                                 detailedText="\n".join(missing))
        return False
    still = missing_packages()
    if still:
        slicer.util.errorDisplay("IrisSegment: these packages are still missing or too old; restart Slicer "
                                 "and try again:\n\n" + "\n".join(still))
    return not still


def _installTorchWithExtension() -> bool:
    """Install torch through the PyTorch extension (it picks the right CUDA build), if present."""
    try:
        import PyTorchUtils
    except ImportError:
        return False
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        return logic.installTorch(askConfirmation=True) is not None
    return True


class IrisSegmentLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer logic: the parameter node and the Qt-free IrisSegmentLib logic."""

    def __init__(self):
        super().__init__()
        from IrisSegmentLib.logic import IrisSegmentLogic as CoreLogic
        from IrisSegmentLib.runner import python_executable

        self.core = CoreLogic(slicer.mrmlScene, python=python_executable())

    def setDefaultParameters(self, node):
        from IrisSegmentLib.parameters import set_defaults

        set_defaults(node)

    def requestFromParameters(self, node):
        from IrisSegmentLib.parameters import request_from_parameters

        return request_from_parameters(slicer.mrmlScene, node)


class IrisSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._run = None
        self._process = None
        self._knownKind = "iris"
        self._pullKey = None  # the model being downloaded by self._process (None: a Segment run)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IrisSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for text, value in STRATEGIES:
            self.ui.strategyComboBox.addItem(text, value)
        for text, value in DEVICES:
            self.ui.deviceComboBox.addItem(text, value)
        for text, value in PRECISIONS:
            self.ui.precisionComboBox.addItem(text, value)
        for text, value in MODALITIES:
            self.ui.modalityComboBox.addItem(text, value)
        from IrisSegmentLib.models import model_choices

        for choice in model_choices():  # the bundled default, "MASS base (download, about 480 MB)", a file
            self.ui.modelComboBox.addItem(choice.label, choice.key)
        self.logic = IrisSegmentLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._connectControls()
        self.initializeParameterNode()

    def _connectControls(self):
        u = self.ui
        u.targetSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        u.outputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        u.strategyComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        u.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        u.precisionComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        u.tuneStepsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        u.modelComboBox.connect("currentIndexChanged(int)", self.onModelChoiceChanged)
        u.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        u.libraryPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        u.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        u.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        u.structuresList.connect("itemChanged(QListWidgetItem*)", self.updateParameterNodeFromGUI)
        u.modalityComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        u.referencesTable.connect("cellChanged(int,int)", self.updateParameterNodeFromGUI)
        u.addReferenceButton.connect("clicked(bool)", self.onAddReference)
        u.removeReferenceButton.connect("clicked(bool)", self.onRemoveReference)
        u.segmentButton.connect("clicked(bool)", self.onSegment)
        u.cancelButton.connect("clicked(bool)", self.onCancel)
        u.compareButton.connect("clicked(bool)", self.onCompare)
        u.reuseButton.connect("clicked(bool)", self.onReuseResult)

    def cleanup(self):
        self._timer.stop()
        self.onCancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node <-> GUI ---------------------------------------------------------------
    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        self.logic.setDefaultParameters(node)
        if not node.GetNodeReference("Target"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                node.SetNodeReferenceID("Target", first.GetID())
        self.setParameterNode(node)

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        node = self._parameterNode
        if node is None:
            return
        self._updating = True
        u = self.ui
        u.targetSelector.setCurrentNode(node.GetNodeReference("Target"))
        u.outputSelector.setCurrentNode(node.GetNodeReference("Output"))
        u.strategyComboBox.setCurrentIndex(max(0, u.strategyComboBox.findData(node.GetParameter("Strategy"))))
        u.deviceComboBox.setCurrentIndex(max(0, u.deviceComboBox.findData(node.GetParameter("Device"))))
        u.precisionComboBox.setCurrentIndex(max(0, u.precisionComboBox.findData(node.GetParameter("Precision"))))
        u.tuneStepsSpinBox.value = int(node.GetParameter("TuneSteps"))  # set_defaults filled it
        from IrisSegmentLib.models import FILE_CHOICE
        from IrisSegmentLib.parameters import model_choice

        u.modelComboBox.setCurrentIndex(max(0, u.modelComboBox.findData(model_choice(node))))
        u.modelPathLineEdit.currentPath = node.GetParameter("ModelPath")
        isFile = model_choice(node) == FILE_CHOICE  # the file selector only for "Model file..."
        u.modelPathLabel.setVisible(isFile)
        u.modelPathLineEdit.setVisible(isFile)
        u.modelComboBox.enabled = self._process is None
        u.libraryPathLineEdit.currentPath = node.GetParameter("LibraryPath")
        self._fillReferencesTable(json.loads(node.GetParameter("References") or "[]"))
        from IrisSegmentLib.parameters import can_segment

        u.modalityComboBox.setCurrentIndex(max(0, u.modalityComboBox.findData(node.GetParameter("HermesModality"))))
        u.segmentButton.enabled = self._process is None and can_segment(node)
        u.tuneStepsSpinBox.enabled = node.GetParameter("Strategy") == "tuning"
        self._updating = False

    def updateParameterNodeFromGUI(self, *args):
        node = self._parameterNode
        if node is None or getattr(self, "_updating", False):
            return
        u = self.ui
        wasModified = node.StartModify()
        node.SetNodeReferenceID("Target", u.targetSelector.currentNodeID)
        node.SetNodeReferenceID("Output", u.outputSelector.currentNodeID)
        node.SetParameter("Strategy", u.strategyComboBox.currentData)
        node.SetParameter("Device", u.deviceComboBox.currentData)
        node.SetParameter("Precision", u.precisionComboBox.currentData)
        node.SetParameter("TuneSteps", str(u.tuneStepsSpinBox.value))
        node.SetParameter("ModelChoice", u.modelComboBox.currentData)
        node.SetParameter("ModelPath", u.modelPathLineEdit.currentPath)
        node.SetParameter("LibraryPath", u.libraryPathLineEdit.currentPath)
        node.SetParameter("References", json.dumps(self._referencesFromTable()))
        node.SetParameter("HermesModality", u.modalityComboBox.currentData)
        checked = [u.structuresList.item(i).text() for i in range(u.structuresList.count)
                   if u.structuresList.item(i).checkState() == qt.Qt.Checked]
        # a Hermes model segments the ticked structures; a task library segments all its classes
        node.SetParameter("Structures", ",".join(checked) if self._knownKind == "hermes" else "")
        node.EndModify(wasModified)

    def onModelChanged(self, *args):
        """List what the chosen Hermes model or task library can segment by name."""
        from IrisSegmentLib.models import FILE_CHOICE
        from IrisSegmentLib.vocabulary import ModelFileError, known_structures

        # the file's header only (IrisSegmentLib.vocabulary): no weights loaded, no torch imported;
        # the bundled default and MASS base are Iris models (nothing to read)
        isFile = self.ui.modelComboBox.currentData == FILE_CHOICE
        try:
            kind, names = known_structures((self.ui.modelPathLineEdit.currentPath or None) if isFile else None,
                                           self.ui.libraryPathLineEdit.currentPath or None)
        except ModelFileError as exc:
            self.ui.stageLabel.text = str(exc)
            kind, names = "iris", []
        self._knownKind = kind
        lst = self.ui.structuresList
        lst.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            lst.addItem(item)
        self.ui.knownCollapsibleButton.collapsed = kind == "iris"

    def onModelChoiceChanged(self, *args):
        """A new model choice: store it, and for a model not downloaded yet offer the download."""
        if getattr(self, "_updating", False) or self._parameterNode is None:
            return
        from IrisSegmentLib.models import needs_download

        key, download = None, False
        with slicer.util.tryWithErrorDisplay("Could not change the model."):
            self.updateParameterNodeFromGUI()
            self.onModelChanged()
            key = self.ui.modelComboBox.currentData
            download = needs_download(key)  # a file-existence check: no model is loaded here
        if download:
            self.onDownload(key)

    def onDownload(self, key):
        """Ask first, then download in the worker process (progress bar, Cancel), like a Segment run."""
        from IrisSegmentLib.models import consent_text, start_download
        from IrisSegmentLib.runner import python_executable

        with slicer.util.tryWithErrorDisplay("Could not start the download."):  # no wait cursor: it asks first
            if self._process is not None:
                raise RuntimeError("another job is running: wait for it or press Cancel")
            if not slicer.util.confirmOkCancelDisplay(consent_text(key), windowTitle="IrisSegment: download a model"):
                self.ui.stageLabel.text = "Not downloaded; Segment with this model asks again."
                return
            if not ensureDependencies():  # the worker downloads with huggingface_hub
                return
            self.ui.logTextEdit.clear()
            self._process = start_download(key, python=python_executable())
            self._pullKey = key
            self.ui.stageLabel.text = f"Downloading {key}..."
            self.ui.progressBar.value = 0
            self._setRunning(True)
            self._timer.start()

    def _finishDownload(self, proc):
        key, self._pullKey = self._pullKey, None
        success = False
        try:
            if proc.cancelled:
                self.ui.stageLabel.text = f"Download of {key} cancelled; the next download resumes it."
            elif proc.error is not None:
                self._log(proc.error.details)
                self.ui.stageLabel.text = "Download failed."
                slicer.util.errorDisplay(f"Download failed: {proc.error}", detailedText=proc.error.details)
            else:
                from IrisSegmentLib.models import downloaded_path

                with slicer.util.tryWithErrorDisplay("The download did not report its file."):
                    path = downloaded_path(proc)
                    self._log(f"{key}: {path} (licence {proc.result['sidecar'].get('licence', '')})")
                    self.ui.stageLabel.text = f"Downloaded {key}; ready to Segment."
                    success = True
        finally:
            self._setRunning(False, success)

    # -- references table ---------------------------------------------------------------------
    def _fillReferencesTable(self, rows):
        from IrisSegmentLib.parameters import format_segment_names, row_segment_names

        table = self.ui.referencesTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, (cls, key) in enumerate((("vtkMRMLScalarVolumeNode", "volume"),
                                            ("vtkMRMLSegmentationNode", "segmentation"))):
                combo = table.cellWidget(r, c)
                if combo is None:
                    combo = slicer.qMRMLNodeComboBox()
                    combo.nodeTypes = [cls]
                    combo.addEnabled = combo.removeEnabled = False
                    combo.noneEnabled = True
                    combo.setMRMLScene(slicer.mrmlScene)
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
                    table.setCellWidget(r, c, combo)
                combo.setCurrentNodeID(row.get(key) or "")
            item = table.item(r, 2) or qt.QTableWidgetItem()
            item.setText(format_segment_names(row_segment_names(row)))
            table.setItem(r, 2, item)

    def _referencesFromTable(self):
        from IrisSegmentLib.parameters import parse_segment_names

        table = self.ui.referencesTable
        rows = []
        for r in range(table.rowCount):
            vol, seg = table.cellWidget(r, 0), table.cellWidget(r, 1)
            item = table.item(r, 2)
            rows.append({"volume": vol.currentNodeID if vol else "", "segmentation": seg.currentNodeID if seg else "",
                         "segments": parse_segment_names(item.text() if item else "")})
        return rows

    def onAddReference(self):
        rows = self._referencesFromTable()
        seg = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        vol = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) if seg else None
        rows.append({"volume": vol.GetID() if vol else "", "segmentation": seg.GetID() if seg else "",
                     "segments": []})
        self._parameterNode.SetParameter("References", json.dumps(rows))

    def onReuseResult(self):
        """Edit, then reuse: the target and its (corrected) result become a new reference row."""
        from IrisSegmentLib.parameters import add_reference

        with slicer.util.tryWithErrorDisplay("Could not add the result as a reference.", waitCursor=True):
            node = self._parameterNode
            add_reference(slicer.mrmlScene, node, node.GetNodeReference("Target"), node.GetNodeReference("Result"))

    def onRemoveReference(self):
        rows = self._referencesFromTable()
        selected = sorted({i.row() for i in self.ui.referencesTable.selectedIndexes()}, reverse=True)
        for r in selected or [len(rows) - 1]:
            if 0 <= r < len(rows):
                rows.pop(r)
        self.ui.referencesTable.setRowCount(0)
        self._parameterNode.SetParameter("References", json.dumps(rows))

    # -- run ----------------------------------------------------------------------------------
    def onSegment(self):
        from IrisSegmentLib.models import needs_download
        from IrisSegmentLib.parameters import model_choice

        with slicer.util.tryWithErrorDisplay("Could not check the model."):
            key = model_choice(self._parameterNode)
            if needs_download(key):  # never download without asking: offer it, then Segment again
                self.onDownload(key)
                return
        if not ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            self._run = self.logic.core.prepare(self.logic.requestFromParameters(self._parameterNode))
            self.ui.logTextEdit.clear()
            self._log(f"strategy {self._run.strategy}; work folder {self._run.workdir}")
            try:
                self._process = self.logic.core.start(self._run)
            except Exception:
                self.logic.core.cleanup(self._run)
                self._run = None
                raise
            self.ui.progressBar.value = 0
            self._setRunning(True)
            self._timer.start()

    def onPoll(self):
        proc = self._process
        if proc is None:
            self._timer.stop()
            return
        for e in proc.poll():
            if e.kind == "progress":
                self.ui.stageLabel.text = e.data["stage"]
                self.ui.progressBar.maximum = max(1, e.data["total"])
                self.ui.progressBar.value = min(e.data["done"], self.ui.progressBar.maximum)
            elif e.kind == "log":  # the work files named as their nodes (a download has no run)
                self._log(self._run.in_scene_words(e.data["line"]) if self._run is not None else e.data["line"])
        if not proc.done:  # the outcome is known only once all output is read (no dropped DONE line)
            return
        self._timer.stop()
        self._process = None
        if self._pullKey is not None:
            self._finishDownload(proc)
            return
        run, self._run = self._run, None
        success = False
        try:
            if proc.cancelled:
                self.logic.core.cleanup(run)
                self.ui.stageLabel.text = "Cancelled; the scene is unchanged."
            elif proc.error is not None:
                self.logic.core.cleanup(run)
                error = run.explain(proc.error)
                self._log(error.details)
                self.ui.stageLabel.text = "Failed; the scene is unchanged."
                slicer.util.errorDisplay(f"Segmentation failed: {error}", detailedText=error.details)
            else:
                with slicer.util.tryWithErrorDisplay("The result could not be imported."):
                    node = self.logic.core.finish(run, proc.result["sidecar"])
                    secs = proc.result["sidecar"].get("timings_s", {}).get("total", 0.0)
                    from IrisSegmentLib.logic import result_summary

                    for line in result_summary(proc.result["sidecar"]):
                        self._log(line)
                    self.ui.stageLabel.text = f"Done in {secs:.1f} s: {node.GetName()}"
                    # the Output selector stays as the user set it: the next run makes a new node
                    from IrisSegmentLib.parameters import record_result

                    record_result(self._parameterNode, node)
                    success = True
        finally:
            self._setRunning(False, success)

    def onCancel(self):
        if self._process is not None:
            self._process.cancel()

    def _setRunning(self, running, success=False):
        self.ui.segmentButton.enabled = not running
        self.ui.cancelButton.enabled = running
        if not running:  # 100 % only after a success; a failure or cancel resets the bar
            self.ui.progressBar.value = self.ui.progressBar.maximum if success else 0
        self.updateGUIFromParameterNode()

    def _log(self, line):
        if line:
            self.ui.logTextEdit.appendPlainText(line)

    # -- compare ------------------------------------------------------------------------------
    def onCompare(self):
        if not ensureDependencies():  # the metrics need monai
            return
        with slicer.util.tryWithErrorDisplay("Compare failed.", waitCursor=True):
            result = self._parameterNode.GetNodeReference("Result") or self.ui.outputSelector.currentNode()
            table = self.logic.core.compare_to_table(result, self.ui.manualSelector.currentNode(),
                                                     self.ui.targetSelector.currentNode())
            self.ui.compareTableView.setMRMLTableNode(table)


class IrisSegmentTest(ScriptedLoadableModuleTest):
    """Self-test inside a full Slicer: the same scenario as Testing/Python/test_slicer_logic.py."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_real_sample_pair()

    def test_segment_real_sample_pair(self):
        """Needs torch and monai in Slicer's Python (the module installs them on first Segment)."""
        import tempfile

        from iris_core.checkpoint import preset_model, save_checkpoint
        from iris_core.options import SegmentOptions
        from IrisSegmentLib import testing
        from IrisSegmentLib.logic import IrisSegmentLogic as CoreLogic
        from IrisSegmentLib.logic import ReferenceSpec, SegmentRequest
        from IrisSegmentLib.runner import python_executable

        self.delayDisplay("Loading the shipped sample pair")
        folder = tempfile.mkdtemp(prefix="iris-selftest-")
        nodes = testing.load_sample_pair(slicer.mrmlScene)
        tiny = preset_model("iris-tiny")
        model = save_checkpoint(os.path.join(folder, "tiny.safetensors"), tiny.model, tiny.preprocessing)
        logic = CoreLogic(slicer.mrmlScene, python=python_executable())
        self.delayDisplay("Segmenting")
        result = logic.segment(SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"],
                               nodes["reference_seg"])], model=str(model), options=SegmentOptions(device="cpu")))
        testing.check_result(result, nodes["target"], nodes["reference_seg"])
        rows = logic.compare(result, nodes["manual"], nodes["target"])
        self.assertEqual(rows[0]["segment"], "brain")
        logging.info("IrisSegment self-test: Dice %.3f", rows[0]["dice"])
        self.delayDisplay("Test passed")
