"""CI only (.github/workflows/slicer-selftest.yml): run the module's self-tests inside Slicer and exit with their
status. Run with Slicer --testing --additional-module-paths REPO --python-script."""

import os
import sys

import slicer

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(here), "Python"))
import IrisSegmentModuleTest  # noqa: E402

ok = IrisSegmentModuleTest.runTest()
slicer.util.exit(0 if ok else 1)
