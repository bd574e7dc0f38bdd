"""IrisSegment's model package: in-context 3D segmentation (Iris, Hermes) for the command line, Python and
3D Slicer. No slicer, qt or vtk import here or below."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iris-segment")
except PackageNotFoundError:  # run from the extension's folder (inside Slicer): not installed by pip
    __version__ = "0.1.0"
