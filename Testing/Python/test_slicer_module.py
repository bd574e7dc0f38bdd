"""Checks on the Slicer-side files that run here on every commit: widget names exist in the .ui,
the grammar of the minimum Slicer's Python, portable calls only, the package boundaries, the
extension's metadata. Slicer 5.10 (the minimum) ships Python 3.12.10; this venv runs 3.11, so
Slicer-side code is parsed with the 3.11 grammar (valid on both)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIN_SLICER = "5.10"
GRAMMAR = (3, 11)  # runs on Slicer 5.10's Python 3.12 and on this venv's 3.11
SLICER_SIDE = [ROOT / "IrisSegment.py", *sorted((ROOT / "IrisSegmentLib").glob("*.py")),
               *sorted((ROOT / "iris_core").rglob("*.py")), ROOT / "Testing" / "Python" / "IrisSegmentModuleTest.py"]
# modules removed from Python 3.12 (PEP 594/632) and POSIX-only calls (absent on Windows)
REMOVED = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}
NOT_PORTABLE = {"resource", "fcntl", "termios", "pwd", "grp"}
NOT_PORTABLE_CALLS = {("os", "killpg"), ("os", "sysconf"), ("os", "setsid"), ("os", "getpgid"), ("signal", "SIGKILL"),
                      ("os", "fork")}
KNOWN_EXCEPTIONS: set[Path] = set()  # none: every Slicer-side file must be portable


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("path", SLICER_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_slicer_side_files_parse_with_the_minimum_slicer_grammar(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=GRAMMAR)
    assert not (_imports(tree) & REMOVED), f"{path}: imports modules removed in Python 3.12"


@pytest.mark.parametrize("path", [p for p in SLICER_SIDE if p not in KNOWN_EXCEPTIONS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_portable_calls_only(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = sorted(_imports(tree) & NOT_PORTABLE)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and (node.value.id, node.attr) in NOT_PORTABLE_CALLS:
            bad.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not bad, f"{path}: not available on every platform: {bad}"


def test_package_boundaries():
    for path in (ROOT / "iris_core").rglob("*.py"):
        assert not (_imports(ast.parse(path.read_text())) & {"slicer", "qt", "vtk", "ctk"}), path
    for path in (ROOT / "IrisSegmentLib").glob("*.py"):
        assert not (_imports(ast.parse(path.read_text())) & {"qt", "ctk"}), path


def test_every_widget_name_the_module_uses_is_in_the_ui():
    names = {w.get("name") for w in ET.parse(ROOT / "Resources" / "UI" / "IrisSegment.ui").iter("widget")}
    tree = ast.parse((ROOT / "IrisSegment.py").read_text())
    used = set()
    aliases = {"u"}  # ``u = self.ui`` in the widget's methods
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            v = node.value
            if isinstance(v, ast.Attribute) and v.attr == "ui" and isinstance(v.value, ast.Name) and v.value.id == "self":
                used.add(node.attr)
            elif isinstance(v, ast.Name) and v.id in aliases:
                used.add(node.attr)
    assert used, "no self.ui.NAME found: the check itself is broken"
    assert not used - names, f"used by IrisSegment.py but absent from the .ui: {sorted(used - names)}"


def test_every_choice_the_widget_offers_is_an_option_the_engine_accepts():
    """The combo boxes' (label, value) lists in IrisSegment.py (read from its source: it imports slicer)
    against SegmentOptions' own validation, so a renamed option cannot leave a dead menu entry."""
    from iris_core.device import DEVICES
    from iris_core.errors import ConfigError
    from iris_core.hermes_vocab import HERMES_MODALITIES, resolve_modality
    from iris_core.options import PRECISIONS, SegmentOptions

    lists = {}
    for node in ast.parse((ROOT / "IrisSegment.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            lists[node.targets[0].id] = [value for _, value in ast.literal_eval(node.value)]
    assert lists["PRECISIONS"][0] == SegmentOptions().precision, "the first entry is the default"
    assert sorted(lists["PRECISIONS"]) == sorted(PRECISIONS)
    for key, field in (("STRATEGIES", "strategy"), ("PRECISIONS", "precision")):
        for value in lists[key]:
            assert getattr(SegmentOptions.from_dict({field: value}), field) == value
    assert set(lists["DEVICES"]) <= set(DEVICES)
    assert {resolve_modality(m)[0] for m in lists["MODALITIES"]} == set(HERMES_MODALITIES)
    with pytest.raises(ConfigError, match="precision"):
        SegmentOptions.from_dict({"precision": "float16"})


def test_sample_data_registration_passes_lists():
    """SampleDataSource.__init__ calls len() on uris/fileNames/nodeNames (SampleData.py, Slicer 5.6+)."""
    src = (ROOT / "IrisSegment.py").read_text()
    assert not re.search(r"(uris|fileNames|nodeNames)\s*=\s*None", src)
    assert "sample_data_source()" in src


def test_dependencies_and_metadata():
    from IrisSegmentLib.dependencies import requirement_lines, requirement_name

    assert "psutil" in {requirement_name(ln) for ln in requirement_lines()}
    assert "psutil" in (ROOT / "pyproject.toml").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    for f in (ROOT / "CMakeLists.txt", ROOT / "IrisSegment.py"):
        assert not re.search(r"https://github\.com/['\"/]", f.read_text()), f"{f}: placeholder link"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for script in re.findall(r"slicer_add_python_unittest\(SCRIPT ([^)\s]+)", cmake):
        assert script.startswith("${CMAKE_CURRENT_SOURCE_DIR}/"), script
        tree = ast.parse((ROOT / script.split("/", 1)[1]).read_text())
        assert any(isinstance(n, ast.ClassDef) and any(getattr(b, "attr", "") == "TestCase" for b in n.bases)
                   for n in ast.walk(tree)), f"{script}: no unittest.TestCase"
    assert f"Slicer {MIN_SLICER}" in (ROOT / "README.md").read_text()


def test_memory_figures_are_portable():
    import psutil
    import torch

    from iris_core.device import available_memory, peak_rss_mb

    avail = available_memory(torch.device("cpu"))
    assert 0 < avail <= psutil.virtual_memory().total
    assert peak_rss_mb() >= psutil.Process().memory_info().rss / 2**20 * 0.99
