"""Which Python packages the module needs and which are missing (no imports, no installs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from iris_core.resources import RESOURCES

REQUIREMENTS = RESOURCES / "requirements.txt"
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


def torch_line(path: Path = REQUIREMENTS) -> str:
    """The requirements file's torch line (e.g. 'torch~=2.5')."""
    return next(ln for ln in requirement_lines(path) if requirement_name(ln) == "torch")


def torch_requirement(path: Path = REQUIREMENTS) -> str:
    """The torch version requirement as the PyTorch extension's installTorch(torchVersionRequirement=...)
    takes it, a pip specifier without the name: 'torch~=2.5' -> '>=2.5' (light-the-torch picks the build for
    the machine's CUDA; an upper bound would refuse the newest builds other extensions use)."""
    spec = torch_line(path)[len("torch"):].strip()
    return ">=" + spec[2:].strip() if spec.startswith("~=") else spec


def torch_problem(path: Path = REQUIREMENTS) -> str | None:
    """Why the installed torch cannot serve IrisSegment (None when it can, or when none is installed). A torch
    another extension installed is never replaced behind its back: the user is told instead."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return None
    need = torch_requirement(path)
    if SpecifierSet(need).contains(installed.split("+")[0], prereleases=True):
        return None
    return (f"PyTorch {installed} is installed in Slicer's Python, and IrisSegment needs torch{need}. It was "
            "installed by another extension or the PyTorch extension, so IrisSegment leaves it as it is: update it "
            "in the PyTorch Utils module (or uninstall it there and press Segment again), then restart Slicer.")


def platform_problem(system: str | None = None, machine: str | None = None) -> str | None:
    """A platform PyTorch no longer publishes builds for: Intel Macs (x86_64 macOS wheels stop at torch 2.2.2;
    IrisSegment needs 2.5 or later). None elsewhere."""
    import platform

    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Darwin" and machine in ("x86_64", "amd64", "i386"):
        return ("PyTorch publishes no builds for Intel Macs after version 2.2.2, and IrisSegment needs "
                f"torch{torch_requirement()}: it cannot run its model on this Mac. Use an Apple Silicon Mac, a Windows "
                "or Linux computer, or segment on a server (README: 'Inference as a service').")
    return None


class InstallGuard:
    """One package installation at a time: Slicer's pip_install processes GUI events while pip runs
    (slicer.util.logProcessOutput calls processEvents per line of output, Slicer 5.10), so a second click could
    start a second installation. ``busy`` is module-wide (every widget and button shares it)."""

    busy = False

    def __init__(self, changed=None):
        self.changed = changed  # called after ``busy`` changes (the widget refreshes its buttons)

    def __enter__(self):
        if InstallGuard.busy:
            raise RuntimeError("an installation of IrisSegment's packages is already running; wait for it to end")
        InstallGuard.busy = True
        if self.changed:
            self.changed()
        return self

    def __exit__(self, *exc) -> None:
        InstallGuard.busy = False
        if self.changed:
            self.changed()
