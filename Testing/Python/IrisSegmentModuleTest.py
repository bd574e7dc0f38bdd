"""Tests that run inside a full 3D Slicer (registered in CMakeLists.txt with slicer_add_python_unittest, which
imports this file by name and runs its TestCases; CMake also installs it beside the module, where the module's
self-test, IrisSegment.py's IrisSegmentTest, finds it): the module is loaded (a module that failed to import
fails), the shipped sample pair loads, a request is checked and exported, the widget builds and follows its
parameter node, and Segment pressed in the widget runs through the warm worker, twice. That last test needs the
module's packages: without torch it is skipped, unless IRIS_SEGMENT_SELFTEST_SEGMENT=1 (the CI workflow installs
them and sets it), where a missing torch fails it."""

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
        from IrisSegmentLib.logic import SegmentationLogic

        nodes = testing.load_sample_pair(slicer.mrmlScene)
        self.assertEqual(nodes["reference_seg"].GetSegmentation().GetNthSegment(0).GetName(), "brain")
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegmentTest")
        parameters.set_defaults(node)
        node.SetNodeReferenceID("Target", nodes["target"].GetID())
        parameters.add_reference(slicer.mrmlScene, node, nodes["reference"], nodes["reference_seg"])
        logic = SegmentationLogic(slicer.mrmlScene)
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

    def test_the_module_is_loaded(self):
        import slicer

        self.assertTrue(hasattr(slicer.modules, "irissegment"), "IrisSegment did not load: see the Python errors")

    def test_widget_builds_and_follows_its_parameter_node(self):
        import slicer

        self.assertTrue(hasattr(slicer.modules, "irissegment"), "IrisSegment did not load: see the Python errors")
        from IrisSegmentLib import parameters, testing
        from IrisSegmentLib.logic import SegmentationLogic

        nodes = testing.load_sample_pair(slicer.mrmlScene)
        slicer.util.selectModule("IrisSegment")
        widget = slicer.modules.IrisSegmentWidget
        # one logic object: Segment/Compare (IrisSegmentLib) and Slicer's parameter node, nothing reached through it
        self.assertIsInstance(widget.logic, SegmentationLogic)
        self.assertIs(widget.logic.scene, slicer.mrmlScene)
        node = widget.logic.getParameterNode()
        self.assertIs(node.GetNodeReference("Target"), nodes["target"])
        self.assertEqual(widget.ui.referencesTable.rowCount, 1)
        node.SetParameter("Strategy", "ensemble")
        self.assertEqual(widget.ui.strategyComboBox.currentData, "ensemble")
        widget.ui.strategyComboBox.setCurrentIndex(widget.ui.strategyComboBox.findData("one-shot"))
        self.assertEqual(node.GetParameter("Strategy"), "one-shot")
        self.assertEqual(parameters.reference_rows(node)[0]["segmentation"], nodes["reference_seg"])

    def test_segment_pressed_in_the_widget(self):
        """Segment as a clinician presses it on the sample pair (first choices, the bundled model): the first click
        starts the warm worker, the second reuses it; both results are on the target with the reference's name."""
        import importlib.util
        import logging
        import time

        import slicer

        if importlib.util.find_spec("torch") is None and os.environ.get("IRIS_SEGMENT_SELFTEST_SEGMENT") != "1":
            self.skipTest("torch is not installed in this Slicer (the module installs it on the first Segment)")
        import psutil

        from IrisSegmentLib import testing

        nodes = testing.load_sample_pair(slicer.mrmlScene)
        slicer.util.selectModule("IrisSegment")
        widget = slicer.modules.IrisSegmentWidget
        widget.initializeParameterNode()
        node = widget.logic.getParameterNode()
        for click in ("first", "second"):
            t0 = time.perf_counter()
            widget.ui.segmentButton.click()
            self.assertIsNotNone(widget._job, f"the {click} Segment did not start: {widget.ui.stageLabel.text}")
            while widget._job is not None and time.perf_counter() - t0 < 600:
                slicer.app.processEvents()
                time.sleep(0.05)
            result = node.GetNodeReference("Result")
            self.assertIsNotNone(result, f"{click} Segment: {widget.ui.stageLabel.text}")
            testing.check_result(result, nodes["target"], nodes["reference_seg"])
            dice = widget.logic.compare(result, nodes["manual"], nodes["target"])[0]["dice"]
            self.assertGreater(dice, 0.5)
            logging.info("IrisSegment self-test: %s Segment %.1f s, Dice %.3f", click, time.perf_counter() - t0, dice)
            slicer.mrmlScene.RemoveNode(result)
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "IrisSegmentLib.worker" in " ".join(p.cmdline()) and "--serve" in p.cmdline()]
        self.assertTrue(workers, "Segment did not run through the warm worker, or it did not stay")


def runTest():
    suite = unittest.TestLoader().loadTestsFromTestCase(IrisSegmentModuleTest)
    return unittest.TextTestRunner(verbosity=2).run(suite).wasSuccessful()
