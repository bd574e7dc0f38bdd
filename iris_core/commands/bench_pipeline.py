"""``iris-segment bench --pipeline``: one whole target through a model's own pipeline (for a MASS
checkpoint the authors' one), timed per stage (load, prepare, encode, every window, back to the
target grid), then each further target of a cohort with the embedding reused; peak memory (resident
set, sampled with psutil: portable) over the run."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from iris_core.api import load_references, resolve_classes, resolve_model
from iris_core.errors import InputError
from iris_core.io.imaging import read_image
from iris_core.options import SegmentOptions
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.task import ReferenceTask, segment_target
from iris_core.resources import MASS_PIPELINE_FIXTURE

log = logging.getLogger(__name__)

FIXTURE = MASS_PIPELINE_FIXTURE


class PeakMemory:
    """Highest resident set size of this process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def window_gflop(loaded, window: tuple[int, ...], tokens: list) -> float | None:
    """Floating-point operations (GFLOP, a multiply-add counted as two) of one ``segment`` pass over a
    window, counted by ``torch.utils.flop_counter`` on a copy of the network on the meta device (no
    memory, no compute; a memory readout in its one-attention form: the CPU's readout by groups of rows,
    iris.grouped_readout, depends on the mask values); None where an operation has no meta kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            net = type(loaded.model)(loaded.config).eval()
        x = torch.empty(1, 1, *window, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.segment(x, [t.to("meta") for t in tokens])
        return counter.get_total_flops() / 1e9
    except Exception as exc:  # noqa: BLE001 - a figure for the report only, but say why it is missing
        log.warning("the network's work per window was not counted: %s: %s", type(exc).__name__, exc)
        return None


def _fixture_run(target: str | None, references: list[tuple[str, str]] | None, compare: str | None,
                 intensity: str) -> tuple[str, list[tuple[str, str]], str | None, str]:
    """The run's target, references, label map to compare with and intensity policy: the MASS fixture's MR case
    (compared with the authors' own output) when no target is given."""
    if target is None:
        if not (FIXTURE / "mr_target.nii.gz").is_file():
            raise InputError(f"no --target given and the fixture {FIXTURE} is absent")
        target = str(FIXTURE / "mr_target.nii.gz")
        compare = compare or str(FIXTURE / "mr_authors_seg.nii.gz")
        references = [(str(FIXTURE / "mr_reference.nii.gz"), str(FIXTURE / "mr_reference_labels.nii.gz"))]
        intensity = "MR" if intensity == "auto" else intensity
    if not references:
        raise InputError("bench --pipeline needs --reference IMAGE LABELS with --target")
    return target, references, compare, intensity


class StageClock:
    """The benchmark's ears on the pipeline: the engine's stage seconds (its ``on_stage`` hook) and the time of
    each window (its progress hook: a window ends where the next 'Segmenting' step is reported; the first
    window counts from the end of the stage before it, the target's preparation)."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.windows: list[float] = []
        self.last = time.perf_counter()

    def on_stage(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.last = time.perf_counter()

    def progress(self, stage: str, done: int, total: int) -> None:
        if not stage.startswith("Segmenting"):  # e.g. compiling: counted in the window it delays
            return
        now = time.perf_counter()
        if done > 0:
            self.windows.append(now - self.last)
        self.last = now


def pipeline_benchmark(model: str, target: str | None = None, references: list[tuple[str, str]] | None = None,
                       intensity: str = "auto", compile: bool = False, threads: int | None = None,
                       further_targets: int = 1, compare: str | None = None, precision: str = "float32") -> dict:
    """Seconds per stage of segmenting ``target`` from ``references`` end to end (default: the MASS
    fixture's MR case), then of each of ``further_targets`` more targets (the same file again) with
    the references' encoding reused; peak RSS in MB. ``compare``: a label map on the target grid
    (default with the fixture: the authors' own output) whose agreement with the first target's labels
    is reported, so that a speed figure always comes with the labels it produced."""
    target, references, compare, intensity = _fixture_run(target, references, compare, intensity)
    other = read_image(compare, "label map to compare with") if compare else None  # outside the timings
    t_start, cpu_start = time.perf_counter(), time.process_time()
    clock = StageClock()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        loaded = resolve_model(model)
        t_load = time.perf_counter() - t0
        options = SegmentOptions(device="cpu", threads=threads, intensity=intensity, compile=compile,
                                 precision=precision)
        engine = Engine(loaded, options, progress=clock.progress, on_stage=clock.on_stage)
        refs = load_references(references)
        classes = resolve_classes(refs, None)
        img = read_image(target, "target image")
        if other is not None and other.GetSize() != img.GetSize():  # checked before minutes of work
            raise InputError(f"{compare}: {other.GetSize()} voxels, the target has {img.GetSize()}")
        t0 = time.perf_counter()
        task = ReferenceTask.encode(engine, refs, classes)
        t_enc = time.perf_counter() - t0
        clock.stages.clear()
        first = segment_target(engine, task, img, Path(target).name)
        stages, first_windows = dict(clock.stages), list(clock.windows)
        first_total, first_cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
        further = []
        for _ in range(further_targets):
            t0 = time.perf_counter()
            segment_target(engine, task, img, Path(target).name)
            further.append(time.perf_counter() - t0)
    seconds = {"load_model": t_load, "prepare_target": stages.get("prepare", 0.0),
               "prepare_and_encode_references": t_enc, "windows_total": stages.get("segment", 0.0),
               "back_to_target_grid": stages.get("resample_back", 0.0), "first_target_total": first_total}
    return _report(loaded, engine, first, target, classes, seconds, first_windows, first_cpu, further, mem.peak,
                   other, compare)


def _report(loaded, engine: Engine, first, target: str, classes: list, seconds: dict, windows: list[float],
            first_cpu: float, further: list[float], peak: int, other, compare: str | None) -> dict:
    """The figures of :func:`pipeline_benchmark`, with the agreement of the first target's labels with
    ``other`` (a label map on the target grid)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    gflop = window_gflop(loaded, engine.window, first.embedding.batched("cpu")) if loaded.arch == "iris" else None
    agreement = None
    if other is not None:
        same = np.mean(sitk.GetArrayViewFromImage(first.labels) == sitk.GetArrayViewFromImage(other))
        agreement = {"file": str(compare), "same_label_share": float(same)}
    return {
        "model": loaded.name, "pipeline": loaded.preprocessing.name, "target": str(target),
        "classes": len(classes), "threads": torch.get_num_threads(), "compile": engine.options.compile,
        "model_grid": list(first.prepared.array.shape), "window": list(engine.window), "windows": len(windows),
        "seconds": seconds,
        "window_s": {"first": windows[0] if windows else None,
                     "mean_rest": (sum(windows[1:]) / len(windows[1:])) if len(windows) > 1 else None},
        "first_target_cpu_s": first_cpu,
        "further_target_s": further,
        "peak_rss_mb": peak / 2**20,
        "compiled_packages": engine.compiled_packages(),  # --compile on a CPU: which were built or loaded
        "precision": engine.precision_report(),
        "window_gflop": gflop,
        "agreement": agreement,
    }


def format_pipeline(res: dict) -> str:
    """Plain-text report of :func:`pipeline_benchmark`."""
    s = res["seconds"]
    lines = [f"{res['model']} ({res['pipeline']} pipeline), {res['classes']} classes, {res['threads']} threads"
             f"{', compiled' if res['compile'] else ''}; model grid {res['model_grid']}, {res['windows']} windows",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in s.items()]
    w = res["window_s"]
    if w["first"] is not None:
        lines.append(f"| first window (includes compiling or loading the compiled network) | {w['first']:.1f} |")
    if w["mean_rest"] is not None:
        lines.append(f"| each further window | {w['mean_rest']:.1f} |")
        if res.get("window_gflop"):
            lines.append(f"| network work per window: {res['window_gflop']:.0f} GFLOP, i.e. GFLOP/s | "
                         f"{res['window_gflop'] / w['mean_rest']:.0f} |")
    lines.append(f"| first target, CPU time of all threads | {res['first_target_cpu_s']:.1f} |")
    for i, t in enumerate(res["further_target_s"]):
        lines.append(f"| further target {i + 1} (embedding reused) | {t:.1f} |")
    lines.append(f"\npeak resident memory {res['peak_rss_mb']:.0f} MB")
    pk = res.get("compiled_packages") or {}
    if pk.get("built") or pk.get("loaded"):
        lines.append(f"compiled networks: {len(pk['built'])} compiled in this run, {len(pk['loaded'])} loaded from the cache")
    prec = res.get("precision") or {}
    if prec.get("precision", "float32") != "float32" or prec.get("check") or prec.get("tasks"):
        lines.append("windows in " + prec["summary"])
    if res.get("agreement"):
        a = res["agreement"]
        lines.append(f"same label as {Path(a['file']).name} in {100 * a['same_label_share']:.4f} % of the target voxels")
    return "\n".join(lines)
