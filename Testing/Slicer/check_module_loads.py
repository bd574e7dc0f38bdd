"""CI only (.github/workflows/slicer-selftest.yml): the module must load in this Slicer; a module that failed to
import (Slicer logs the error and goes on without it) fails the job. Run with Slicer --testing
--additional-module-paths REPO --python-script."""

import slicer

ok = hasattr(slicer.modules, "irissegment")
if ok:
    slicer.util.selectModule("IrisSegment")  # builds the widget: its setup and the logic as a clinician gets them
    ok = getattr(slicer.modules, "IrisSegmentWidget", None) is not None
print(f"IrisSegment {'loaded' if ok else 'did NOT load (see the Python errors above)'} in Slicer {slicer.app.applicationVersion}")
slicer.util.exit(0 if ok else 1)
