"""CI only (.github/workflows/slicer-selftest.yml): install Resources/requirements.txt into Slicer's Python, torch
from PyTorch's CPU index (the runners have no GPU), then quit. Run with Slicer --python-script."""

import os
import sys

import slicer

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
requirements = os.path.join(root, "Resources", "requirements.txt")
lines = [ln.split("#", 1)[0].strip() for ln in open(requirements, encoding="utf-8")]
lines = [ln for ln in lines if ln]
torch = [ln for ln in lines if ln.startswith("torch")]
try:
    slicer.util.pip_install(torch + ["--index-url", "https://download.pytorch.org/whl/cpu"])
    slicer.util.pip_install([ln for ln in lines if not ln.startswith("torch")])
except Exception as exc:  # any failure fails the CI step
    print(f"installing the requirements failed: {exc}", file=sys.stderr)
    slicer.util.exit(1)
slicer.util.exit(0)
