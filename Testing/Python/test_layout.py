"""The house a newcomer reads (issue [13]): the README's Layout section lists every module of the tree and
nothing else; imports run one way between the layers and form no cycle; no file grows past 450 lines
outside models/; the Slicer side and the CLI's --help stay torch-free."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "iris_core"
#: each part of iris_core and its layer: a module may import its own layer and those below, never above. The
#: pipeline's policy is plain data the hub loads with a model (its one module below its package's layer)
LAYERS = {"models": 0, "errors": 0, "options": 0, "resources": 0, "metrics": 0, "types": 0, "pipeline.policy": 0,
          "io": 1, "hub": 1, "sampledata": 1, "pipeline": 2, "api": 3, "training": 4, "service": 4, "commands": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _runtime_imports(f: Path) -> list[str]:
    """iris_core modules imported by ``f`` at run time (``if TYPE_CHECKING:`` blocks are annotations only)."""
    tree = ast.parse(f.read_text(encoding="utf-8"))
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                   for n in ast.walk(b)}
    names = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and id(n) not in typing_only and (n.module or "").startswith("iris_core"):
            names += [f"{n.module}.{a.name}" for a in n.names] + [n.module]
        elif isinstance(n, ast.Import) and id(n) not in typing_only:
            names += [a.name for a in n.names if a.name.startswith("iris_core")]
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    return {m: {r for n in _runtime_imports(f) if (r := resolve(n)) and r != m and r != "iris_core"}
            for m, f in mods.items()}


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout\n"):]
    return section[section.index("```\n") + 4: section.index("```\n", section.index("```\n") + 4)]


def test_readme_layout_lists_every_module_and_no_other():
    block = _layout_block()
    listed = set(re.findall(r"([A-Za-z_]\w*\.(?:py|sh))\b", block))
    listed_dirs = set(re.findall(r"^\s*([A-Za-z_]\w*)/", block, re.M))
    files = [f for f in PACKAGE.rglob("*.py") if f.name != "__init__.py"]
    files += [f for f in (ROOT / "IrisSegmentLib").glob("*.py") if f.name != "__init__.py"]
    files += list((ROOT / "scripts").glob("*.py"))
    missing = sorted(str(f.relative_to(ROOT)) for f in files if f.name not in listed)
    assert not missing, f"README Layout does not list {missing}"
    existing = {f.name for f in files} | {"IrisSegment.py"} | {f.name for f in (ROOT / "scripts").glob("*.sh")}
    assert not listed - existing, f"README Layout lists files that do not exist: {sorted(listed - existing)}"
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= listed_dirs, f"README Layout does not list the packages {sorted(packages - listed_dirs)}"
    scripts = {f.name for f in (ROOT / "scripts").iterdir() if f.suffix in (".sh", ".py")}
    assert scripts <= listed, f"README Layout does not list the scripts {sorted(scripts - listed)}"


def test_imports_run_down_the_layers_without_a_cycle():
    graph = _graph()

    def layer(m: str) -> int:
        parts = m.split(".")[1:]
        return next((LAYERS[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in LAYERS), 0)

    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer(t) > layer(m))
    assert not upward, f"imports up the layers: {upward}"
    # a cycle: a module reachable from itself (depth-first, colours)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle.extend(path[path.index(t):] + [m, t] if t in path else [m, t])
                return True
            if state.get(t) is None and visit(t, path + [m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), f"import cycle: {' -> '.join(cycle)}"


def test_no_file_over_450_lines_outside_models():
    long = {str(f.relative_to(ROOT)): n for f in [*PACKAGE.rglob("*.py"), *(ROOT / "IrisSegmentLib").glob("*.py"),
                                                  ROOT / "IrisSegment.py"]
            if "models" not in f.relative_to(PACKAGE if f.is_relative_to(PACKAGE) else ROOT).parts[:-1]
            and (n := len(f.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, f"files over 450 lines: {long}"


def test_slicer_side_and_cli_help_import_no_torch():
    """The Slicer process (no torch in a thin client) imports IrisSegmentLib's GUI-side modules; the CLI's
    --help and argument errors answer before any heavy import."""
    code = ("import sys, importlib\n"
            "for m in ['IrisSegmentLib.logic', 'IrisSegmentLib.choices', 'IrisSegmentLib.parameters',\n"
            "          'IrisSegmentLib.models', 'IrisSegmentLib.vocabulary', 'IrisSegmentLib.jobs',\n"
            "          'iris_core.commands.cli']:\n"
            "    importlib.import_module(m)\n"
            "from iris_core.commands.cli import build_parser\n"
            "build_parser().format_help()\n"
            "print(sorted(x for x in ('torch', 'monai', 'scipy') if x in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
