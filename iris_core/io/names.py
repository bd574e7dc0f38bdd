"""Output file names and their atomic publication, with the standard library alone (the thin client that
writes a server's result uses it too, without SimpleITK or torch)."""

from __future__ import annotations

import os
from pathlib import Path


def publish(tmp: Path, path: Path) -> Path:
    """Move a finished temporary file onto ``path`` with the permissions of any new file (the umask's;
    some writers create theirs 0600), so every output of a run is equally readable."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return path


# what split_volume_name takes off a file name, longest first (".seg.nrrd" before ".nrrd")
_NAME_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".dcm")


def split_volume_name(name: str) -> tuple[str, str]:
    """``case01.nii.gz`` -> (``case01``, ``.nii.gz``); any case (``CASE01.NII.GZ``: Windows users); a
    name with no image extension (a DICOM folder) -> (name, '')."""
    for ext in _NAME_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def sidecar_path(output: str | Path) -> Path:
    """``seg.nii.gz`` -> ``seg.json`` (``SEG.NII.GZ`` -> ``SEG.json``)."""
    p = Path(output)
    return p.with_name(split_volume_name(p.name)[0] + ".json")
