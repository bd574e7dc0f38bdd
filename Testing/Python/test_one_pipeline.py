"""Issue [22]: one function segments a target. ``pipeline.task.segment_target`` is the one place where a target
goes from its image to its labels (prepare -> the task's strategy and windows -> back to the target grid); the
API, the CLI, the server, evaluate and the benchmarks call it, and none of them sets an engine's attributes.
Read from the source (AST), so a second assembly fails here the day it is written."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the product: the package, the Slicer side and the scripts (the tests may call one stage to test it)
PRODUCT = [*(ROOT / "iris_core").rglob("*.py"), *(ROOT / "IrisSegmentLib").glob("*.py"), ROOT / "IrisSegment.py",
           *(ROOT / "scripts").glob("*.py")]
SOURCES = [*PRODUCT, *(ROOT / "Testing" / "Python").glob("*.py")]
#: the stage that turns a target's probabilities into what a run writes (pipeline/to_target.py: BackToTarget)
LABELS = {"labels", "to_target", "to_target_layers", "probability_maps"}
#: the stages that make a target's probabilities: the windows and the strategies that call them
PREDICT = {"predict", "predict_tasks", "run_strategy", "one_shot", "ensemble", "retrieval", "tune"}


def _functions(path: Path):
    """(qualified name, node) of every function in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def _stage_calls(fn) -> set[str]:
    """The stages a function calls, nested functions included: a labels stage on anything, a strategy function by
    its name, ``predict`` on an engine (an evaluator's own ``predict`` is not the engine's)."""
    out = set()
    for n in ast.walk(fn):
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        if isinstance(f, ast.Name) and f.id in PREDICT:
            out.add(f.id)
        elif isinstance(f, ast.Attribute) and (f.attr in LABELS or f.attr in PREDICT and _engine_like(f.value)):
            out.add(f.attr)
    return out


def assemblies(sources=PRODUCT, root: Path = ROOT) -> dict[str, list[str]]:
    """Functions that take a target to labels (call a labels stage), and functions outside the pipeline that make
    probabilities (call a predict stage), by file."""
    found: dict[str, list[str]] = {}
    for path in sources:
        if not path.is_file():
            continue
        where = path.relative_to(root).as_posix()
        for name, fn in _functions(path):
            calls = _stage_calls(fn)
            if where == "iris_core/pipeline/to_target.py":  # the labels stage itself
                continue
            labels = calls & LABELS
            predicts = calls & PREDICT
            if labels or (predicts and not where.startswith("iris_core/pipeline/")):
                found.setdefault(where, []).append(f"{name} ({', '.join(sorted(labels | predicts))})")
    return found


def test_segment_target_is_the_one_assembly_of_the_stages():
    """Only segment_target calls the labels stage; only the pipeline's own strategies and tasks make a target's
    probabilities. (The tests may call one stage on its own to test it.)"""
    assert assemblies() == {"iris_core/pipeline/task.py": ["segment_target (labels, probability_maps)"]}


def test_the_check_sees_a_second_assembly(tmp_path):
    """What the check would say of the evaluation's old hand-built pipeline (prepare, run_strategy, labels)."""
    old = tmp_path / "old_evaluate.py"
    old.write_text("def run_iris(eng, prep, encoded, classes):\n"
                   "    tprep = eng.prepare(prep, 't')\n"
                   "    result = run_strategy(eng, tprep, encoded, classes)\n"
                   "    return eng.labels(result.probabilities, tprep, [1])\n")
    (tmp_path / "iris_core").mkdir()
    probe = tmp_path / "iris_core" / "probe.py"
    probe.write_text("def bench(eng, prep, emb):\n    return eng.predict(prep, emb)\n")
    assert assemblies([old, probe], tmp_path) == {"old_evaluate.py": ["run_iris (labels, run_strategy)"],
                                                  "iris_core/probe.py": ["bench (predict)"]}


def _engine_like(node: ast.AST) -> bool:
    """``engine``, ``eng``, ``self.engine``, ``self._engine``, ``ev.engine()``: an expression naming an engine."""
    text = ast.unparse(node).split(".")[-1].split("(")[0].lstrip("_")
    return text in ("engine", "eng") or text.endswith("_engine")


def engine_attribute_sets(sources=SOURCES, root: Path = ROOT) -> list[str]:
    """``<engine>.<attribute> = ...`` outside the engine's own module."""
    out = []
    for path in sources:
        where = path.relative_to(root).as_posix()
        if not path.is_file() or where == "iris_core/pipeline/inference.py":
            continue
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(
                n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and _engine_like(t.value):
                    out.append(f"{where}:{n.lineno} {ast.unparse(t)}")
    return out


def test_no_caller_sets_an_engines_attributes(tmp_path):
    """An engine is set up once from its options (progress, cancel and the stage hook are constructor arguments):
    ``engine.progress = ...`` or ``engine.segment_network = ...`` anywhere else fails here."""
    assert engine_attribute_sets() == []
    probe = tmp_path / "probe.py"
    probe.write_text("def f(engine, self):\n    engine.progress = print\n    self._engine.policy = None\n"
                     "    self.progress = print\n")
    assert engine_attribute_sets([probe], tmp_path) == ["probe.py:2 engine.progress", "probe.py:3 self._engine.policy"]
