"""CI only (.github/workflows/slicer-selftest.yml): run the module's self-tests inside Slicer, found the way the
module's own self-test finds them (IrisSegmentLib.testing.run_module_tests), and exit with their status. Run
with Slicer --testing --additional-module-paths REPO --python-script."""

import traceback

import slicer

try:
    from IrisSegmentLib.testing import run_module_tests

    ok = run_module_tests()
except Exception:  # the module's folder not on the path, the test file missing: the job fails, in words
    traceback.print_exc()
    ok = False
slicer.util.exit(0 if ok else 1)
