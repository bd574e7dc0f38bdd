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
#: Slicer side's Qt-free package sits above all of iris_core (iris_core never imports it). The pipeline's policy
#: is plain data the hub loads with a model: its one module below its package's layer
LAYERS = {"models": 0, "errors": 0, "options": 0, "resources": 0, "metrics": 0, "types": 0, "pipeline.policy": 0,
          "io": 1, "hub": 1, "sampledata": 1, "pipeline": 2, "api": 3, "training": 4, "service": 4, "commands": 5}
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
    parts = module.split(".")[1:]  # the longest listed prefix: 'pipeline.policy' before 'pipeline'
    return next((LAYERS[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in LAYERS), 0)


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


#: top-level folders of the repository that are not the product (issue [22]): the one-issue studies, kept to
#: reproduce figures of the model card and docs/performance.md; the Layout does not name them
NOT_PRODUCT = {"studies": "one-issue studies (linted by ruff, never imported or run by a test)"}


def _kept(*paths: str) -> list[str]:
    """The files git keeps or would add under ``paths`` (tracked, or untracked and not ignored), relative to the
    root; a tracked file deleted from the tree is left out."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted({f for f in out if (ROOT / f).is_file()})


def test_readme_layout_lists_the_product_only():
    """Issue [22]: the Layout names every top-level folder of the product and no other, and no file of the
    studies; the block's top-level entries exist."""
    block = _layout_block()
    top = set(re.findall(r"^([A-Za-z_][\w.-]*)/?", block, re.M))
    kept_dirs = {f.split("/")[0] for f in _kept() if "/" in f and not f.startswith(".")}
    product = kept_dirs - set(NOT_PRODUCT)
    assert product <= top, f"README Layout does not name the top-level folders {sorted(product - top)}"
    assert not top - {p.name for p in ROOT.iterdir()}, f"README Layout names {sorted(top - {p.name for p in ROOT.iterdir()})}"
    for folder in NOT_PRODUCT:
        assert folder in kept_dirs, f"{folder}/ is gone: take it off NOT_PRODUCT"
        assert f"{folder}/" not in block and folder not in top, f"README Layout names {folder}/, which is not the product"
        files = {Path(f).name for f in _kept(folder)}
        listed = set(re.findall(r"([A-Za-z_]\w*\.(?:py|sh))\b", block))
        assert not files & listed, f"README Layout lists files of {folder}/: {sorted(files & listed)}"


def test_nothing_of_the_product_or_the_tests_uses_the_studies():
    """Issue [22]: the studies are linted, never imported or run by the product or the tests (they may lag the
    library; a test that ran one would make it the product again)."""
    studies = {Path(f).stem for f in _kept(*NOT_PRODUCT) if f.endswith((".py", ".sh"))}
    assert studies, "no study found"
    users = [f for f in _kept("iris_core", "IrisSegmentLib", "IrisSegment.py", "scripts", "Testing", "CMakeLists.txt",
                              ".github") if f.endswith((".py", ".sh", ".txt", ".yml", ".toml"))
             and f != "Testing/Python/test_layout.py"]
    # a study by its name, or the folder as a top-level path, an import or a path part ("studies/", ROOT /
    # "studies"); docs/model-card/studies/ (the studies' tables) is not the folder
    names = [rf"\b{re.escape(n)}\b" for n in studies] + [
        rf"(?<![\w/.-]){f}[/\\]|(import|from)\s+{f}\b|[\"']{f}[\"']" for f in NOT_PRODUCT]
    found = sorted(f"{f}: {m.group(0)}" for f in users for name in names
                   if (m := re.search(name, (ROOT / f).read_text(encoding="utf-8"))))
    assert not found, f"the product or the tests name a study: {found}"


def test_resources_models_holds_what_cmake_installs_and_the_training_state():
    """Issue [22]: ``Resources/Models`` holds what CMake installs (the bundled model, its card), the training
    configs and the one committed resume point; evaluation outputs and studies live elsewhere
    (``docs/model-card/``, ``studies/``)."""
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    kept = _kept("Resources/Models")
    installed = [f for f in kept if f in cmake]
    assert {Path(f).suffix for f in installed} >= {".safetensors", ".md"}, installed
    extra = [f for f in kept if f not in cmake and Path(f).suffix != ".toml"
             and f != "Resources/Models/training/iris-default-resume.safetensors"]
    assert not extra, f"Resources/Models holds files CMake does not install: {extra}"


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


#: the most lines a function may have (its def line to its last, docstring included) outside models/
MAX_FUNCTION_LINES = 80
#: functions over the limit, each until the work named beside it shrinks it (a function listed here that is no
#: longer over the limit fails the test: take it off the list)
LONG_FUNCTIONS: dict[str, str] = {}
#: folders whose functions are not measured until the work named beside them lands
LONG_FUNCTION_FOLDERS: dict[str, str] = {}


def _function_lengths(node: ast.AST, prefix: str = ""):
    """(qualified name, lines) of every function under ``node``: methods as ``Class.name``, nested functions as
    ``outer.inner``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child.end_lineno - child.lineno + 1
            yield from _function_lengths(child, prefix + child.name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _function_lengths(child, prefix + child.name + ".")
        else:
            yield from _function_lengths(child, prefix)


def _functions_over(limit: int) -> dict[str, int]:
    """``path::name`` -> lines, for every function over ``limit`` lines in the product's Python outside models/:
    iris_core, IrisSegmentLib, IrisSegment.py and scripts/."""
    files = [*PACKAGE.rglob("*.py"), *SLICER_LIB.glob("*.py"), ROOT / "IrisSegment.py", *(ROOT / "scripts").glob("*.py")]
    out = {}
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith("iris_core/models/") or any(rel.startswith(d + "/") for d in LONG_FUNCTION_FOLDERS):
            continue
        for name, n in _function_lengths(ast.parse(f.read_text(encoding="utf-8"))):
            if n > limit:
                out[f"{rel}::{name}"] = n
    return out


def test_no_function_over_80_lines_outside_models():
    """Issue [22]: a function longer than a screen and a half does several jobs; split it (the listed exceptions
    are being split by the work named beside them)."""
    long = _functions_over(MAX_FUNCTION_LINES)
    new = {k: n for k, n in long.items() if k not in LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines: {new}"
    shrunk = sorted(set(LONG_FUNCTIONS) - set(long))
    assert not shrunk, f"no longer over {MAX_FUNCTION_LINES} lines (or gone): take {shrunk} off LONG_FUNCTIONS"


def test_the_function_length_check_measures_nested_and_class_functions():
    """The check itself: at a limit of 3 lines it finds IrisSegmentLib/jobs.py's methods and functions by name."""
    found = {k.split("::")[1] for k in _functions_over(3) if k.startswith("IrisSegmentLib/jobs.py")}
    assert {"Job.finish", "run_to_end", "result_summary"} <= found, found


def _defined_names(f: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports), read, not run."""
    names = set()
    for n in ast.parse(f.read_text(encoding="utf-8")).body:
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            names |= {t.id for tg in targets for t in ast.walk(tg) if isinstance(t, ast.Name)}
        elif isinstance(n, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return names


def test_the_scripts_import_only_names_the_library_has():
    """No test runs the scripts' whole work (they print figures), so a name the library dropped would break one
    unseen (scripts/attack_service.py imported IrisSegmentLib.warm.free_port, which issue [18] removed): every name a
    script imports from iris_core or IrisSegmentLib, deferred imports included, is defined there."""
    mods = _modules()
    missing = []
    for f in sorted((ROOT / "scripts").glob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and not n.level and n.module and n.module in mods:
                defined = _defined_names(mods[n.module])
                missing += [f"{f.name}: from {n.module} import {a.name}" for a in n.names
                            if a.name not in defined and f"{n.module}.{a.name}" not in mods]
            elif isinstance(n, ast.Import):
                missing += [f"{f.name}: import {a.name}" for a in n.names
                            if a.name.split(".")[0] in ("iris_core", "IrisSegmentLib") and a.name not in mods]
    assert not missing, f"scripts import names the library does not have: {missing}"


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
