"""Which Python packages the module needs and which are missing (no imports, no installs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
# the import name of a requirement whose distribution name differs from it (none of ours today; e.g.
# "scikit-image": "skimage"); every other requirement imports under its own name
IMPORT_NAMES: dict[str, str] = {}
# packages Slicer itself ships and uses: never installed or upgraded by this module
SLICER_OWNED = {"numpy", "simpleitk", "vtk"}


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    """The requirement specifiers of the requirements file (comments and blanks dropped)."""
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in lines:
        name = ln.split("~")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
        if name in SLICER_OWNED:
            raise ValueError(f"{path}: {name} is Slicer's own package and must not be listed")
        if "==" in ln:
            raise ValueError(f"{path}: '{ln}' pins exactly; use a compatible-release specifier (~=)")
    return lines


def requirement_name(line: str) -> str:
    return re.split(r"[\s~=<>!\[;]", line.strip(), maxsplit=1)[0]


def unsatisfied(line: str) -> bool:
    """Whether a requirement line is not met: the package is absent, or its installed version is
    outside the specifier (checked with ``packaging``, which Slicer ships; presence only without
    it). Nothing is imported."""
    name = requirement_name(line)
    if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None:
        return True
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return False
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False  # importable but not pip-installed (e.g. built into the application)
    return not Requirement(line).specifier.contains(installed, prereleases=True)


def missing_packages(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines that are not met (absent, or a version outside the specifier)."""
    return [ln for ln in requirement_lines(path) if unsatisfied(ln)]
