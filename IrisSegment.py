"""IrisSegment: in-context segmentation in 3D Slicer. Only Qt wiring lives here; every decision is in IrisSegmentLib,
Qt-free and tested on a real MRML scene: the parameter node (parameters.py), the controls (choices.py), a run or
download from start to end (jobs.py), the scene (logic.py, scene.py), the packages (dependencies.py, install.py)."""

from __future__ import annotations

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

from IrisSegmentLib import choices as c
from IrisSegmentLib import parameters as p
from IrisSegmentLib.dependencies import InstallGuard
from IrisSegmentLib.dialogs import user_action
from IrisSegmentLib.install import ensure_dependencies
from IrisSegmentLib.logic import SegmentationLogic, module_settings
from IrisSegmentLib.models import FILE_CHOICE, consent_text, model_choices, needs_download
from IrisSegmentLib.testing import register_sample_data, run_module_tests


class IrisSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        super().__init__(parent)
        parent.title = "IrisSegment"
        parent.categories = ["Segmentation"]
        parent.contributors = ["IrisSegment developers"]
        parent.helpText = ("Segment, in a target volume, the structures that reference volumes' segmentations show, "
                           "in one pass, without fine-tuning (README.md: controls and models). Needs Slicer 5.10+.")
        parent.acknowledgementText = ("Iris: Gao et al., CVPR 2025. Hermes: Gao et al., CVPR 2024. Sample data: Colin27, "
                                      "ICBM 2009a (C) Louis Collins, MNI (Resources/SampleData/NOTICE.md).")
        slicer.app.connect("startupCompleted()", register_sample_data)


class IrisSegmentLogic(SegmentationLogic, ScriptedLoadableModuleLogic):  # Segment/Compare + the parameter node
    def __init__(self):
        SegmentationLogic.__init__(self, slicer.mrmlScene, **module_settings())  # the warm local worker
        ScriptedLoadableModuleLogic.__init__(self)  # its super().__init__() is object's (SegmentationLogic is first)


class IrisSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._node = self._job = None
        self._updating, self._knownKind, self._structuresFor = False, "iris", None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.layout.addWidget(uiWidget := slicer.util.loadUI(self.resourcePath("UI/IrisSegment.ui")))
        self.ui = u = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for name, (table, _) in c.COMBO_CONTROLS.items():
            for text, value in c.choices(table):
                getattr(u, name).addItem(text, value)
        for choice in model_choices():  # the bundled default, "MASS base (download, about 480 MB)", a file
            u.modelComboBox.addItem(choice.label, choice.key)
        self.logic = IrisSegmentLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for name, signal, slot in c.SIGNALS:
            getattr(u, name).connect(signal, getattr(self, slot))
        self.initializeParameterNode()

    def cleanup(self):
        """Also run when Slicer quits: kill the worker, remove its work folder (patient images), stop the warm one."""
        self._closeJob()
        if self.logic is not None:
            self.logic.close()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self._closeJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        p.set_defaults(node)
        p.fill_first_choices(slicer.mrmlScene, node)
        self.setParameterNode(node)  # the Known structures list built there (structure_list_key)

    def setParameterNode(self, node):
        if self._node is not None:
            self.removeObserver(self._node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._node = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        node, u = self._node, self.ui
        if node is None:
            return
        self._updating = True
        try:  # one bad value must not leave _updating set (every later edit would be dropped)
            for name, role in c.NODE_CONTROLS.items():
                getattr(u, name).setCurrentNode(node.GetNodeReference(role))
            for name, (_, key) in {**c.COMBO_CONTROLS, "modelComboBox": (None, "ModelChoice")}.items():
                value = p.model_choice(node) if key == "ModelChoice" else node.GetParameter(key)
                getattr(u, name).setCurrentIndex(max(0, getattr(u, name).findData(value)))
            for name, (key, attr) in c.FIELD_CONTROLS.items():
                setattr(getattr(u, name), attr, node.GetParameter(key))
            u.tuneStepsSpinBox.value = int(node.GetParameter("TuneSteps") or 0)
            if p.structure_list_key(node) != self._structuresFor:  # e.g. a scene imported: the list follows the node
                self._rebuildStructures(p.structure_list_key(node))
            for w in (u.modelPathLabel, u.modelPathLineEdit):  # the file selector only for "Model file..."
                w.setVisible(p.model_choice(node) == FILE_CHOICE)
            self._fillReferencesTable(p.reference_rows(node))
            ticked = set(filter(None, node.GetParameter("Structures").split(",")))
            for i in range(u.structuresList.count):
                item = u.structuresList.item(i)
                item.setCheckState(qt.Qt.Checked if item.text() in ticked else qt.Qt.Unchecked)
            for name, enabled in c.enabled_controls(node, self._job is not None, InstallGuard.busy).items():
                getattr(u, name).enabled = enabled
        finally:
            self._updating = False

    def updateParameterNodeFromGUI(self, *args):
        node, u = self._node, self.ui
        if node is None or self._updating:
            return
        was = node.StartModify()
        try:
            for name, role in c.NODE_CONTROLS.items():
                node.SetNodeReferenceID(role, getattr(u, name).currentNodeID)
            for name, (_, key) in {**c.COMBO_CONTROLS, "modelComboBox": (None, "ModelChoice")}.items():
                node.SetParameter(key, getattr(u, name).currentData)
            for name, (key, attr) in c.FIELD_CONTROLS.items():
                node.SetParameter(key, getattr(getattr(u, name), attr).strip())
            node.SetParameter("TuneSteps", str(u.tuneStepsSpinBox.value))
            p.set_reference_rows(node, self._referencesFromTable())
            ticked = [u.structuresList.item(i).text() for i in range(u.structuresList.count)
                      if u.structuresList.item(i).checkState() == qt.Qt.Checked]
            # a Hermes model segments the ticked structures; a task library segments all its classes
            node.SetParameter("Structures", ",".join(ticked) if self._knownKind == "hermes" else "")
        finally:
            node.EndModify(was)

    def onModelChoiceChanged(self, *args):
        if self._updating or self._node is None:
            return
        self._rebuildStructures()
        self.updateParameterNodeFromGUI()
        if needs_download(self.ui.modelComboBox.currentData):
            self.onDownload(self.ui.modelComboBox.currentData)

    def _rebuildStructures(self, key=None):
        """What the model or library ``key`` (choice, model file, library; the GUI's by default) segments by name,
        ticked as the node holds it (names it still has)."""
        u = self.ui
        key = key or (u.modelComboBox.currentData, u.modelPathLineEdit.currentPath, u.libraryPathLineEdit.currentPath)
        self._structuresFor = key
        self._knownKind, names, message = p.known_structure_list(*key)
        u.stageLabel.text = message or u.stageLabel.text
        ticked = set(self._node.GetParameter("Structures").split(",")) if self._node else set()
        u.structuresList.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if name in ticked else qt.Qt.Unchecked)
            u.structuresList.addItem(item)
        u.knownCollapsibleButton.collapsed = self._knownKind == "iris"

    def _fillReferencesTable(self, rows):
        table = self.ui.referencesTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for col, (cls, key) in enumerate(c.REFERENCE_COLUMNS):
                if table.cellWidget(r, col) is None:
                    combo = slicer.qMRMLNodeComboBox()
                    combo.nodeTypes, combo.addEnabled, combo.removeEnabled, combo.noneEnabled = [cls], False, False, True
                    combo.setMRMLScene(slicer.mrmlScene)
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
                    table.setCellWidget(r, col, combo)
                table.cellWidget(r, col).setCurrentNode(row[key])
            table.setItem(r, 2, qt.QTableWidgetItem(p.format_segment_names(row["segments"])))

    def _referencesFromTable(self):
        table, rows = self.ui.referencesTable, []
        for r in range(table.rowCount):
            vol, seg, item = table.cellWidget(r, 0), table.cellWidget(r, 1), table.item(r, 2)
            rows.append({"volume": vol.currentNode() if vol else None, "segmentation": seg.currentNode() if seg else None,
                         "segments": p.parse_segment_names(item.text() if item else "")})
        return rows

    def onAddReference(self):
        p.add_default_row(slicer.mrmlScene, self._node)

    def onRemoveReference(self):
        p.remove_rows(self._node, {i.row() for i in self.ui.referencesTable.selectedIndexes()})

    def onReuseResult(self):
        """Edit, then reuse: the last result, paired with the volume it was made on, becomes a reference row."""
        with user_action("Could not add the result as a reference."):
            p.reuse_result(slicer.mrmlScene, self._node)

    def onSegment(self):
        if self._job is not None:
            return
        with user_action("Could not start the segmentation."):
            req = p.request_from_parameters(slicer.mrmlScene, self._node)  # refuses bad server fields first
            key = p.download_before_segment(self._node)  # never on a server run: the server has its models
            if key is not None:  # never download without asking: offer it, then Segment again
                return self.onDownload(key)
            if req.server is not None or self._ensureDependencies():  # dialogs, pip: no wait cursor over them
                with slicer.util.WaitCursor():  # only while the volumes are exported
                    job = self.logic.start_segment(req)
                self._startJob(job)

    def onDownload(self, key):
        if self._job is not None:
            pass
        elif not slicer.util.confirmOkCancelDisplay(consent_text(key), windowTitle="IrisSegment: download a model"):
            self.ui.stageLabel.text = "Not downloaded; Segment with this model asks again."
        elif self._ensureDependencies():  # the worker downloads with huggingface_hub
            with user_action("Could not start the download."):
                self._startJob(self.logic.start_download(key))

    def _startJob(self, job):
        self._job, self.ui.progressBar.value, self.ui.stageLabel.text = job, 0, "Starting..."
        self.ui.logTextEdit.clear()
        self.updateGUIFromParameterNode()
        self._timer.start()

    def onPoll(self):
        job, u = self._job, self.ui
        for e in job.poll():  # stages and log lines name the nodes, never the work files
            if e.kind == "progress":
                u.stageLabel.text = e.data["stage"]
                u.progressBar.maximum = max(1, e.data["total"])
                u.progressBar.value = min(e.data["done"], u.progressBar.maximum)
            elif e.kind == "log":
                self._log(e.data["line"])
        if job.done:
            self._timer.stop()
            self._job = None
            u.progressBar.value = 0
            with user_action("The job could not be finished."):
                outcome = job.finish()  # imports the result (Segment); closes the job (worker, work folder)
                for line in outcome.log:
                    self._log(line)
                u.stageLabel.text = outcome.stage
                u.progressBar.value = u.progressBar.maximum if outcome.ok else 0
                if outcome.status == "failed":
                    slicer.util.errorDisplay(f"{outcome.stage}\n\n{outcome.error}", detailedText="\n".join(outcome.log))
                elif outcome.node is not None:  # for Compare and reuse; the next run makes a new node
                    p.record_result(self._node, outcome.node)
                if outcome.warnings:  # e.g. a reference segment cut by its volume: not only in the collapsed Log
                    slicer.util.warningDisplay("\n\n".join(outcome.warnings), windowTitle="IrisSegment: check this")
            self.updateGUIFromParameterNode()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()

    def _closeJob(self):
        self._timer.stop()
        job, self._job = self._job, None
        if job is not None:
            job.close()

    def _ensureDependencies(self):  # buttons disabled while it installs (5.10's pip_install processes events)
        return ensure_dependencies(busy_changed=self.updateGUIFromParameterNode)

    def _log(self, line):
        if line:
            self.ui.logTextEdit.appendPlainText(line)

    def onCompare(self):
        if not self._ensureDependencies():  # the metrics need monai (asked and installed without a wait cursor)
            return
        with user_action("Compare failed.", wait_cursor=True):
            result = self._node.GetNodeReference("Result") or self.ui.outputSelector.currentNode()
            table = self.logic.compare_to_table(result, self.ui.manualSelector.currentNode(),
                                                     self.ui.targetSelector.currentNode())
            self.ui.compareTableView.setMRMLTableNode(table)


class IrisSegmentTest(ScriptedLoadableModuleTest):
    """Self-test inside a full Slicer: the tests of Testing/Python/IrisSegmentModuleTest.py."""

    def runTest(self):
        if not run_module_tests():  # Testing/Python/IrisSegmentModuleTest.py, installed beside the module by CMake
            raise AssertionError("IrisSegment self-test failed (see the log)")
