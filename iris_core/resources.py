"""Where the files that ship beside the package are: the extension's Resources (bundled model, sample data)
and, in a source checkout, the test data. One definition, used by every module that needs them."""

from __future__ import annotations

from pathlib import Path

#: the repository root (the Slicer extension's folder)
ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "Resources"
#: the bundled default model
DEFAULT_MODEL = RESOURCES / "Models" / "iris-default.safetensors"
#: the shipped sample pair (Colin27 and ICBM 2009a moved, with labels)
SAMPLE_DATA = RESOURCES / "SampleData"
#: the MASS authors' pipeline fixture (source checkouts only)
MASS_PIPELINE_FIXTURE = ROOT / "Testing" / "Data" / "compat" / "mass_pipeline"
