"""Tests that run inside a full 3D Slicer without torch (registered in CMakeLists.txt with
slicer_add_python_unittest, which imports this file by name and runs its TestCases): the shipped
sample pair loads, the scene bridge keeps geometry, a request is checked and exported, and the
module's widget builds and follows its parameter node; with torch installed, a whole Segment run. The module's
self-test (IrisSegment.py's IrisSegmentTest) runs these."""

import json
import os
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class IrisSegmentModuleTest(unittest.TestCase):
    def setUp(self):
        import slicer

        slicer.mrmlScene.Clear()

    def test_sample_pair_and_export(self):
        import slicer

        from IrisSegmentLib import parameters, testing
        from IrisSegmentLib.logic import IrisSegmentLogic

        nodes = testing.load_sample_pair(slicer.mrmlScene)
        self.assertEqual(nodes["reference_seg"].GetSegmentation().GetNthSegment(0).GetName(), "brain")
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegmentTest")
        parameters.set_defaults(node)
        node.SetNodeReferenceID("Target", nodes["target"].GetID())
        parameters.add_reference(slicer.mrmlScene, node, nodes["reference"], nodes["reference_seg"])
        logic = IrisSegmentLogic(slicer.mrmlScene)
        run = logic.prepare(parameters.request_from_parameters(slicer.mrmlScene, node))
        try:
            job = json.loads(open(str(run.job_file)).read())
            self.assertEqual([c["name"] for c in job["inputs"]["classes"]], ["brain"])
        finally:
            logic.cleanup(run)

    def test_first_choices_of_the_sample_pair(self):
        """What Sample Data loads (its reader sets no reference image geometry node reference): the target is the
        volume loaded last, the reference row is Colin27 with its segmentation (issue [12] item 8)."""
        import slicer

        from IrisSegmentLib import parameters, testing

        nodes = testing.load_sample_pair(slicer.mrmlScene)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegmentTest")
        parameters.set_defaults(node)
        parameters.fill_first_choices(slicer.mrmlScene, node)
        self.assertIs(node.GetNodeReference("Target"), nodes["target"])
        rows = parameters.reference_rows(node)
        self.assertEqual(len(rows), 1)
        self.assertIs(rows[0]["volume"], nodes["reference"])
        self.assertIs(rows[0]["segmentation"], nodes["reference_seg"])

    def test_widget_builds_and_follows_its_parameter_node(self):
        import slicer

        if not hasattr(slicer.modules, "irissegment"):
            self.skipTest("the module is not loaded in this Slicer")
        from IrisSegmentLib import parameters, testing

        nodes = testing.load_sample_pair(slicer.mrmlScene)
        slicer.util.selectModule("IrisSegment")
        widget = slicer.modules.IrisSegmentWidget
        node = widget.logic.getParameterNode()
        self.assertIs(node.GetNodeReference("Target"), nodes["target"])
        self.assertEqual(widget.ui.referencesTable.rowCount, 1)
        node.SetParameter("Strategy", "ensemble")
        self.assertEqual(widget.ui.strategyComboBox.currentData, "ensemble")
        widget.ui.strategyComboBox.setCurrentIndex(widget.ui.strategyComboBox.findData("one-shot"))
        self.assertEqual(node.GetParameter("Strategy"), "one-shot")
        self.assertEqual(parameters.reference_rows(node)[0]["segmentation"], nodes["reference_seg"])

    def test_segment_the_sample_pair(self):
        """A whole Segment run through the worker (needs torch in Slicer's Python: the module installs it)."""
        import importlib.util
        import logging
        import tempfile

        import slicer

        if importlib.util.find_spec("torch") is None:
            self.skipTest("torch is not installed in this Slicer (the module installs it on the first Segment)")
        from iris_core.hub.checkpoint import preset_model, save_checkpoint
        from iris_core.options import SegmentOptions
        from IrisSegmentLib import testing
        from IrisSegmentLib.logic import IrisSegmentLogic, ReferenceSpec, SegmentRequest
        from IrisSegmentLib.runner import python_executable

        folder = tempfile.mkdtemp(prefix="iris-selftest-")
        nodes = testing.load_sample_pair(slicer.mrmlScene)
        tiny = preset_model("iris-tiny")
        model = save_checkpoint(os.path.join(folder, "tiny.safetensors"), tiny.model, tiny.preprocessing)
        logic = IrisSegmentLogic(slicer.mrmlScene, python=python_executable())
        result = logic.segment(SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                                              model=str(model), options=SegmentOptions(device="cpu")))
        testing.check_result(result, nodes["target"], nodes["reference_seg"])
        rows = logic.compare(result, nodes["manual"], nodes["target"])
        self.assertEqual(rows[0]["segment"], "brain")
        logging.info("IrisSegment self-test: Dice %.3f", rows[0]["dice"])


def runTest():
    suite = unittest.TestLoader().loadTestsFromTestCase(IrisSegmentModuleTest)
    return unittest.TextTestRunner(verbosity=2).run(suite).wasSuccessful()
