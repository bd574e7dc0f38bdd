"""Qt-free logic of the IrisSegment Slicer module: importable with slicer-core alone.

- ``scene``: MRML volumes and segmentations <-> SimpleITK images with full geometry
- ``worker`` / ``runner`` / ``warm``: iris_core in a background process with progress and cancel; the warm one
  kept alive between clicks, spoken to over its pipes; ``remote``: a run on an iris-segment server
- ``logic``: the Segment and Compare operations on a scene, all-or-nothing
"""
