"""Tests that run inside a full 3D Slicer without torch (registered in CMakeLists.txt with
slicer_add_python_unittest, which imports this file by name and runs its TestCases): the shipped
sample pair loads, the scene bridge keeps geometry, a request is checked and exported, and the
module's widget builds. The Segment run itself needs torch: IrisSegment.py's self-test."""

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

    def test_widget_builds(self):
        import slicer

        if not hasattr(slicer.modules, "irissegment"):
            self.skipTest("the module is not loaded in this Slicer")
        widget = slicer.modules.irissegment.widgetRepresentation()
        self.assertIsNotNone(widget)


def runTest():
    suite = unittest.TestLoader().loadTestsFromTestCase(IrisSegmentModuleTest)
    return unittest.TextTestRunner(verbosity=2).run(suite).wasSuccessful()
