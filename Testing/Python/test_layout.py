"""The house a newcomer reads (issues [13], [22]): the README's Layout section lists every module of the product
and nothing else; imports run one way between the layers and form no cycle, in iris_core and in the Slicer side
(IrisSegmentLib, above it); iris_core never imports slicer, qt, vtk or ctk, IrisSegmentLib never imports qt or ctk;
no file grows past 450 lines and no function past 80 outside models/ (a short, named list of exceptions); the
Slicer side and the CLI's --help stay torch-free."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "iris_core"
SLICER_LIB = ROOT / "IrisSegmentLib"
#: each part of iris_core and its layer: a module may import its own layer and those below, never above; the
#: Slicer side's Qt-free package sits above all of iris_core (iris_core never imports it)
LAYERS = {"models": 0, "errors": 0, "options": 0, "resources": 0, "metrics": 0, "io": 1, "hub": 1, "pipeline": 2,
          "api": 3, "checks": 3, "training": 4, "service": 4, "commands": 5}
SLICER_LAYER = 6
#: what each package may never import, deferred imports and ``if TYPE_CHECKING:`` blocks included
FORBIDDEN = {"iris_core": {"slicer", "qt", "vtk", "ctk"}, "IrisSegmentLib": {"qt", "ctk"}}


def _modules() -> dict[str, Path]:
    """Every module of iris_core and IrisSegmentLib by dotted name."""
    out = {}
    for f in [*PACKAGE.rglob("*.py"), *SLICER_LIB.glob("*.py")]:
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imported_names(f: Path, module: str, runtime_only: bool = True) -> list[str]:
    """Dotted names imported by ``f`` (the module ``module``), relative imports resolved, deferred (function-level)
    imports included; ``if TYPE_CHECKING:`` blocks (annotations only) left out when ``runtime_only``."""
    tree = ast.parse(f.read_text(encoding="utf-8"))
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                   for n in ast.walk(b)} if runtime_only else set()
    package = module if f.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names += [f"{base}.{a.name}" for a in n.names] + [base]
        elif isinstance(n, ast.Import):
            names += [a.name for a in n.names]
    return names


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at run time (iris_core and IrisSegmentLib)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    return {m: {r for n in _imported_names(f, m) if (r := resolve(n)) and r != m and r not in ("iris_core",
                                                                                              "IrisSegmentLib")}
            for m, f in mods.items()}


def _layer(module: str) -> int:
    if module.startswith("IrisSegmentLib"):
        return SLICER_LAYER
    return LAYERS[module.split(".")[1]] if module != "iris_core" else 0


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (a module reachable from itself: depth-first, colours), or []."""
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

    for m in sorted(graph):
        if m not in state and visit(m, []):
            break
    return cycle


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
    assert any(m.startswith("IrisSegmentLib") and graph[m] for m in graph), "the Slicer side is not in the graph"
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if _layer(t) > _layer(m))
    assert not upward, f"imports up the layers: {upward}"
    cycle = _cycle(graph)
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_a_deferred_import():
    """The check itself: a deferred (function-level) relative import back into a module is a cycle, as
    IrisSegmentLib's jobs.py -> logic.py -> jobs.py was before issue [22]."""
    assert _cycle({"IrisSegmentLib.jobs": {"IrisSegmentLib.logic"}, "IrisSegmentLib.logic": {"IrisSegmentLib.jobs"}})
    names = _imported_names(SLICER_LIB / "jobs.py", "IrisSegmentLib.jobs")
    assert "IrisSegmentLib.runner" in names and not any(n.startswith(".") for n in names)


def test_iris_core_never_imports_slicer_and_the_slicer_side_never_imports_qt():
    """iris_core runs without Slicer (CLI, server, training); IrisSegmentLib runs on slicer-core, in tests and in the
    warm worker, where there is no Qt. Every import counts, deferred and annotation-only ones too."""
    bad = sorted(f"{m} imports {n}" for m, f in _modules().items() for n in _imported_names(f, m, runtime_only=False)
                 if n.split(".")[0] in FORBIDDEN[m.split(".")[0]])
    assert not bad, bad


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
