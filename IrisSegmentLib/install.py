"""Installing the module's Python packages inside 3D Slicer, with the user's consent (Slicer's Python
utilities; no Qt). The decisions (what is missing, which torch fits, the platform, one install at a time) are
in dependencies.py, which the tests run; this file only calls Slicer, and runs in Slicer only.

Read against Slicer's and the PyTorch extension's source:
- PyTorchUtils.PyTorchUtilsLogic.installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
  torchvisionVersionRequirement) returns the torch module, or None when the user declines; its errors
  (subprocess.CalledProcessError, ImportError) propagate (fepegar/SlicerPyTorch PyTorchUtils.py). Without a
  requirement it accepts any torch, and pip would then put PyPI's torch over the build light-the-torch chose:
  the requirement is passed, as SlicerTotalSegmentator does, and torch is never pip-installed beside it.
- slicer.packaging.pip_ensure (Slicer 5.12+) asks and raises RuntimeError when declined; Slicer 5.10 has only
  slicer.util.pip_install, which processes GUI events while pip runs (logProcessOutput), hence InstallGuard.
"""

from __future__ import annotations

from . import dependencies as deps


def ensure_dependencies(busy_changed=None) -> bool:
    """Install missing or too old packages after asking the user; True when all are satisfied. Never raises:
    every failure is one error dialog. ``busy_changed()`` is called when an installation starts and ends (the
    widget then disables its buttons: InstallGuard.busy)."""
    import slicer

    problem = deps.platform_problem()
    if problem:
        slicer.util.errorDisplay(problem)
        return False
    if not deps.missing_packages():
        return True
    try:
        with deps.InstallGuard(busy_changed):
            if _needs_torch() and _install_torch_with_extension() is False:
                return False
            problem = deps.torch_problem()
            if problem:
                raise RuntimeError(problem)
            missing = deps.missing_packages()
            if _has_pytorch_extension():  # its torch build is never replaced by PyPI's
                missing = [r for r in missing if deps.requirement_name(r) != "torch"]
            if missing:
                _pip_install(missing)
    except Exception as exc:  # declined (RuntimeError), pip failed (CalledProcessError), busy, torch too old
        slicer.util.errorDisplay(f"IrisSegment: the Python packages were not installed.\n\n{exc}")
        return False
    still = deps.missing_packages()
    if still:
        slicer.util.errorDisplay("IrisSegment: these packages are still missing or too old; restart Slicer and "
                                 "try again:\n\n" + "\n".join(still))
    return not still


def _needs_torch() -> bool:
    return any(deps.requirement_name(r) == "torch" for r in deps.missing_packages())


def _has_pytorch_extension() -> bool:
    import importlib.util

    return importlib.util.find_spec("PyTorchUtils") is not None


def _install_torch_with_extension():
    """True: torch installed by the PyTorch extension (it picks the CUDA build); False: the user declined;
    None: the extension is absent."""
    if not _has_pytorch_extension():
        return None
    import PyTorchUtils

    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.torchInstalled():
        return True
    return logic.installTorch(askConfirmation=True, torchVersionRequirement=deps.torch_requirement()) is not None


def _pip_install(missing: list[str]) -> None:
    import slicer

    try:
        import slicer.packaging as packaging  # a submodule: not an attribute of slicer until imported
    except ImportError:
        packaging = None
    if packaging is not None:
        packaging.pip_ensure(missing, requester="IrisSegment")
        return
    text = ("IrisSegment needs these Python packages:\n\n" + "\n".join(missing) +
            f"\n\n(from {deps.REQUIREMENTS}). Install them now? This can take several minutes.")
    if not slicer.util.confirmOkCancelDisplay(text, windowTitle="IrisSegment: install packages"):
        raise RuntimeError("installation declined")
    slicer.util.pip_install(" ".join(f'"{m}"' for m in missing))
