"""CI only (.github/workflows/slicer-selftest.yml): install what the module's installer would install
(IrisSegmentLib.dependencies.missing_packages(): Resources/requirements.txt less what this Slicer satisfies) into
Slicer's Python, torch from PyTorch's CPU index (the runners have no GPU). Run with PythonSlicer, not the Slicer
application: no dialog can open (slicer.packaging's progress and error dialogs, Slicer 5.12+), and a pip failure
is this script's non-zero exit, which fails the job."""

import os
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, root)
from IrisSegmentLib.dependencies import missing_packages, requirement_name  # noqa: E402

missing = missing_packages()
torch = [m for m in missing if requirement_name(m) == "torch"]
rest = [m for m in missing if requirement_name(m) != "torch"]
print(f"installing into {sys.executable}: {missing or 'nothing (all satisfied)'}", flush=True)
if torch:
    subprocess.run([sys.executable, "-m", "pip", "install", *torch, "--index-url",
                    "https://download.pytorch.org/whl/cpu"], check=True)
if rest:
    subprocess.run([sys.executable, "-m", "pip", "install", *rest], check=True)
still = missing_packages()
if still:
    sys.exit(f"still missing after the install: {still}")
