"""Benchmark figures of a model on this machine: reference encoding, per-window time for 1 and
K classes, time per additional target, peak memory. Each configuration runs in a fresh process
so peak memory is its own."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

import torch

from iris_core import sampledata
from iris_core.api import resolve_model
from iris_core.commands.evaluate import Method
from iris_core.commands.registration import register_labels
from iris_core.errors import InputError
from iris_core.metrics import dice_score
from iris_core.models.blocks import PackedProjection, QKVCrossAttention
from iris_core.models.iris import TaskEncoder
from iris_core.options import SegmentOptions
from iris_core.pipeline.aot import CompiledMethod
from iris_core.pipeline.device import peak_rss_mb
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.task import EmbeddingTask, segment_target
from iris_core.types import ClassSpec, Reference


def _measure(model_spec: str, window: int, classes: list[int], repeats: int, threads: int | None,
             compile: bool = False) -> dict:

    if threads:
        torch.set_num_threads(threads)
    loaded = resolve_model(model_spec)
    model = loaded.model.eval()
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 1, window, window, window, generator=g)
    tgt = torch.randn(1, 1, window, window, window, generator=g)
    out: dict = {"model": loaded.name, "window": window, "threads": torch.get_num_threads(), "device": "cpu"}
    kmax = max(classes)
    masks = torch.zeros(1, kmax, window, window, window)
    for k in range(kmax):  # K distinct blocks
        a = (k * window) // kmax
        masks[0, k, a : a + max(window // kmax, 2), window // 4 : 3 * window // 4, window // 4 : 3 * window // 4] = 1
    with torch.inference_mode():
        _, out["encode_one_reference_s"] = _timed(lambda: model.encode_task(ref, masks[:, :1]), repeats)
        emb_all = model.encode_task(ref, masks)
        for k in classes:
            e = [t[:, :k] for t in emb_all]
            _, out[f"window_{k}_classes_s"] = _timed(lambda e=e: model.segment(tgt, e), repeats)
        if compile:
            # the compiled window for the most classes asked (a real run segments all its classes in one pass)
            e = [t[:, :kmax] for t in emb_all]
            eager = model.segment(tgt, e)
            seg = CompiledMethod(model, "segment", list_arg=True)
            t0 = time.perf_counter()
            compiled = seg(tgt, e)
            if seg.fallback:
                raise RuntimeError(f"--compile: the network could not be compiled ({seg.fallback})")
            out["compile_s"] = time.perf_counter() - t0  # compile, or load when cached
            out["compile_cached"] = not seg.built
            out["compiled_classes"] = kmax
            _, out[f"window_{kmax}_classes_compiled_s"] = _timed(lambda: seg(tgt, e), repeats)
            out["compiled_max_abs_difference"] = float((eager - compiled).abs().max())
            out["compiled_speedup"] = (out[f"window_{kmax}_classes_s"]["median"]
                                       / out[f"window_{kmax}_classes_compiled_s"]["median"])
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_benchmark(models: list[str], window: int = 128, classes: tuple[int, ...] = (1, 15), repeats: int = 3,
                  threads: int | None = None, compile: bool = False) -> list[dict]:
    """Measure each model in its own process; returns one dict of figures per model."""
    results = []
    for spec in models:
        code = (f"import json; from iris_core.commands.bench import _measure; "
                f"print(json.dumps(_measure({spec!r}, {window}, {list(classes)!r}, {repeats}, {threads!r}, {compile!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["the measuring process failed"])[-1]
            # 'iris_core.errors.CheckpointError: m.pth: ...' -> the message the user can act on
            results.append({"model": spec, "error": re.sub(r"^[\w.]*(Error|Exception): ", "", last)})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def format_table(results: list[dict]) -> str:
    """Markdown table of :func:`run_benchmark` figures."""
    keys = sorted({k for r in results for k, v in r.items() if k.endswith("_s") and isinstance(v, dict)})
    head = "| model | window | threads | " + " | ".join(k.replace("_s", " (s)") for k in keys) + " | peak RSS (MB) |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |")
            continue
        cells = [f"{r[k]['median']:.3f} ({r[k]['min']:.3f}-{r[k]['max']:.3f})" for k in keys]
        lines.append(f"| {r['model']} | {r['window']}^3 | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['peak_rss_mb']:.0f} |")
    for r in results:
        if "compiled_speedup" in r:
            how = "loaded from the cache in" if r.get("compile_cached") else "compiled ahead of time in"
            lines.append(f"\n{r['model']}: {how} {r['compile_s']:.1f} s (first call), then "
                         f"{r['compiled_speedup']:.2f}x faster per window of {r['compiled_classes']} classes; max abs difference "
                         f"{r['compiled_max_abs_difference']:.1e}")
    return "\n".join(lines)


def _timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _set_reference_path(model, reference: bool) -> None:
    """Switch between the plain eager formulation and the optimised one (same weights)."""

    for m in model.modules():
        if isinstance(m, PackedProjection | QKVCrossAttention):
            m.fused = not reference
        if isinstance(m, TaskEncoder):
            m.fast_foreground = not reference


def pair_benchmark(model_spec: str = "default", repeats: int = 3, registration: bool = True,
                   threads: int | None = None) -> dict:
    """Figures on the real template pair (Colin27 + brain mask -> ICBM 2009a moved off MNI space):
    encoding, per-window time for 1 and 15 classes, whole-volume time, time per additional target
    with the cached embedding, skipped windows, the plain eager reference path beside the optimised
    one (time ratio and max abs difference), Dice, and atlas registration on the same pair."""
    import SimpleITK as sitk


    if threads:
        torch.set_num_threads(threads)
    loaded = resolve_model(model_spec)
    ref = sampledata.colin27("brain")
    targets = [sampledata.move_off_mni(sampledata.icbm2009a("brain"), seed=s) for s in range(3)]
    res: dict = {"model": loaded.name, "threads": torch.get_num_threads(), "target_size": targets[0].image.GetSize(),
                 "target_spacing": targets[0].image.GetSpacing()}
    model = loaded.model

    def run_all(reference: bool) -> dict:
        _set_reference_path(model, reference)
        eng = Engine(loaded, SegmentOptions(device="cpu"), skip_empty=not reference)
        r = Reference(ref.image, ref.labels, "colin27")
        emb, t_enc = _timed(lambda: eng.encode(r, [ClassSpec("brain", 1)]), repeats)
        out = {"encode_reference_s": t_enc}
        w = eng.window
        x = torch.randn(1, 1, *w, generator=torch.Generator().manual_seed(0))
        tok1 = emb.batched("cpu")
        tok15 = [t.expand(-1, 15, -1, -1).contiguous() for t in tok1]
        with torch.inference_mode():
            logits1, out["window_1_class_s"] = _timed(lambda: model.segment(x, tok1), repeats)
            _, out["window_15_classes_s"] = _timed(lambda: model.segment(x, tok15), repeats)
        per_target, labels = [], []
        for t in targets:
            t0 = time.perf_counter()
            lab = segment_target(eng, EmbeddingTask(emb), t.image, t.name).labels
            per_target.append(time.perf_counter() - t0)
            labels.append(lab)
        out["whole_volume_first_target_s"] = per_target[0]
        out["per_additional_target_s"] = statistics.median(per_target[1:])
        out["skipped_windows"] = eng.windows.skipped
        out["dice"] = [dice_score(sitk.GetArrayFromImage(lab) > 0, sitk.GetArrayFromImage(t.labels) > 0)
                       for lab, t in zip(labels, targets)]
        out["_logits"] = logits1
        out["_labels"] = labels
        return out

    fast = run_all(reference=False)
    plain = run_all(reference=True)
    _set_reference_path(model, False)
    res["optimised"] = {k: v for k, v in fast.items() if not k.startswith("_")}
    res["reference_path"] = {k: v for k, v in plain.items() if not k.startswith("_")}
    res["max_abs_logit_difference"] = float((fast["_logits"] - plain["_logits"]).abs().max())
    res["logit_range"] = float(plain["_logits"].abs().max())
    res["label_agreement_dice"] = [dice_score(sitk.GetArrayFromImage(a) > 0, sitk.GetArrayFromImage(b) > 0)
                                   for a, b in zip(fast["_labels"], plain["_labels"])]
    res["ratio_15_to_1_classes"] = fast["window_15_classes_s"]["median"] / fast["window_1_class_s"]["median"]
    res["identity_dice"] = [dice_score(
        sitk.GetArrayFromImage(sitk.Resample(ref.labels, t.image, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0,
        sitk.GetArrayFromImage(t.labels) > 0) for t in targets]
    if registration:

        for name in ("ants:SyN", "elastix"):
            method = Method("ants", name.split(":")[1]) if name.startswith("ants") else Method("elastix")
            t0 = time.perf_counter()
            try:
                warped = register_labels(method, targets[0].image, ref.image, ref.labels)
            except InputError as exc:  # the registration package is not installed
                res[f"{name}_skipped"] = str(exc)
                continue
            res[f"{name}_s"] = time.perf_counter() - t0
            res[f"{name}_dice"] = dice_score(sitk.GetArrayFromImage(warped) > 0,
                                             sitk.GetArrayFromImage(targets[0].labels) > 0)
    res["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def format_pair(res: dict) -> str:
    """Markdown report of :func:`pair_benchmark`."""
    f, p = res["optimised"], res["reference_path"]

    def m(d):
        return f"{d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f})" if isinstance(d, dict) else f"{d:.3f}"

    rows = [("encode one reference (s)", m(f["encode_reference_s"]), m(p["encode_reference_s"])),
            ("one window, 1 class (s)", m(f["window_1_class_s"]), m(p["window_1_class_s"])),
            ("one window, 15 classes (s)", m(f["window_15_classes_s"]), m(p["window_15_classes_s"])),
            ("whole volume, first target (s)", m(f["whole_volume_first_target_s"]),
             m(p["whole_volume_first_target_s"])),
            ("each additional target, cached embedding (s)", m(f["per_additional_target_s"]),
             m(p["per_additional_target_s"])),
            ("windows skipped (background only)", str(f["skipped_windows"]), str(p["skipped_windows"])),
            ("Dice per target", ", ".join(f"{d:.4f}" for d in f["dice"]), ", ".join(f"{d:.4f}" for d in p["dice"]))]
    lines = [f"Model {res['model']}, {res['threads']} threads, target {res['target_size']} voxels at "
             f"{tuple(round(s, 2) for s in res['target_spacing'])} mm", "",
             "| figure | optimised | plain eager reference |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"max abs logit difference (one window): {res['max_abs_logit_difference']:.2e} "
              f"(logits up to {res['logit_range']:.3g} in magnitude)",
              "label agreement optimised vs reference (Dice): "
              + ", ".join(f"{d:.4f}" for d in res["label_agreement_dice"]),
              f"15 classes / 1 class per window: {res['ratio_15_to_1_classes']:.2f}",
              "identity resampling Dice: " + ", ".join(f"{d:.4f}" for d in res["identity_dice"])]
    for k in ("ants:SyN", "elastix"):
        if f"{k}_s" in res:
            lines.append(f"{k} registration on the first target: {res[f'{k}_s']:.1f} s, Dice {res[f'{k}_dice']:.4f}")
    lines.append(f"peak RSS {res['peak_rss_mb']:.0f} MB"
                 + (f", peak CUDA {res['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in res else ""))
    return "\n".join(lines)


def whole_brain_speed(model_spec: str = "default", repeats: int = 3, threads: int | None = None) -> dict:
    """In-process time to segment a whole 1 mm brain (ICBM 2009a at its native 1 mm grid, 197 x 233 x 189)
    from Colin27 + its brain mask: encoding once, then prepare + sliding windows + resampling back per
    target (median of ``repeats``), wall clock and this process's CPU time."""

    if threads:
        torch.set_num_threads(threads)
    loaded = resolve_model(model_spec)
    ref = sampledata.colin27("brain")
    target = sampledata.icbm2009a("brain")
    eng = Engine(loaded, SegmentOptions(device="cpu"))
    t0 = time.perf_counter()
    emb = eng.encode(Reference(ref.image, ref.labels, "colin27"), [ClassSpec("brain", 1)])
    encode_s = time.perf_counter() - t0

    def one_target():
        return segment_target(eng, EmbeddingTask(emb), target.image, target.name).labels

    c0 = time.process_time()
    _, wall = _timed(one_target, repeats)
    return {"model": loaded.name, "threads": torch.get_num_threads(), "target_size": target.image.GetSize(),
            "target_spacing": target.image.GetSpacing(), "encode_reference_s": encode_s, "whole_brain_s": wall,
            "whole_brain_cpu_s": (time.process_time() - c0) / repeats}


def format_whole_brain(res: dict) -> str:
    """Markdown line(s) of :func:`whole_brain_speed`."""
    w = res["whole_brain_s"]
    return (f"Model {res['model']}, {res['threads']} threads: a whole 1 mm brain ({res['target_size']} voxels) in "
            f"{w['median']:.2f} s (min {w['min']:.2f}, max {w['max']:.2f}; {res['whole_brain_cpu_s']:.2f} s of CPU "
            f"time per target), after encoding the reference once in {res['encode_reference_s']:.2f} s")
