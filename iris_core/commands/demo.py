"""The demo: several brain structures segmented in one pass on a head MR *with its skull*, moved off MNI
space, from one labelled reference of another head; beside it atlas registration, identity resampling
and a plain threshold of the target, scored against the same truth.

A threshold cannot solve this task (it cannot tell the frontal lobe from the occipital lobe, and the
scalp is as bright as the brain); identity resampling fails because the target was moved. Only a method
that transfers what the reference shows (in-context segmentation, or registration) can.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core import sampledata
from iris_core.api import resolve_model, segment
from iris_core.commands.evaluate import parse_method
from iris_core.commands.registration import register_labels
from iris_core.errors import InputError
from iris_core.io.imaging import output_folder, write_image_atomic
from iris_core.io.resample import resample_to
from iris_core.io.results import write_result
from iris_core.io.viz import class_grid_png, overlay_png
from iris_core.metrics import dice_score
from iris_core.types import ClassSpec, ProgressFn

log = logging.getLogger(__name__)


@dataclass
class DemoCase:
    reference: sampledata.Sample  # Colin27 T1 with skull, lobes from AAL
    target: sampledata.Sample  # MNI152NLin6Asym T1 with skull, moved off MNI space, truth moved with it


def demo_case(seed: int = 0) -> DemoCase:
    """Colin27 with its AAL lobes as the reference; MNI152NLin6Asym (with skull) as the target, its truth
    the same lobes placed by MNI coordinates (how AAL is used on MNI152 data), the target then rigidly
    moved off MNI space (``move_off_mni``) with its truth."""
    ref = sampledata.colin27("lobes")
    mni = sampledata.mni152nlin6asym("brain")
    truth = resample_to(ref.labels, mni.image, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    target = sampledata.move_off_mni(sampledata.Sample(mni.name, mni.image, truth, ref.label_names), seed=seed)
    return DemoCase(ref, target)


def threshold_baseline(image: sitk.Image) -> sitk.Image:
    """A plain Otsu threshold of the image (label 1 above it): what needs no reference at all."""
    out = sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)
    out.CopyInformation(image)
    return out


def per_class_dice(pred: sitk.Image, truth: sitk.Image, values: list[int], single_mask: bool = False
                   ) -> dict[int, float]:
    """Dice per label value; with ``single_mask`` the prediction's one foreground is scored against each
    class (a threshold has no classes)."""
    p, t = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth)
    return {v: round(dice_score(p > 0 if single_mask else p == v, t == v), 4) for v in values}


def run_demo(out: str | Path, model: str = "default", device: str = "auto", seed: int = 0,
             registration: str | None = "ants:SyN", progress: ProgressFn | None = None) -> dict:
    """Write the demo's inputs, the Iris result, the baselines, ``demo.png`` and ``summary.json`` into
    ``out``; returns the summary (Dice per class and method, seconds)."""

    out = Path(out)
    if registration:  # a misspelt baseline is an error now, not a warning after the segmentation
        method = parse_method(registration)
        if method.kind not in ("ants", "elastix", "align"):
            raise InputError(f"--registration {registration!r}: use ants:SyN, ants:Affine (or another ANTs "
                             "transform), elastix, align (the pipeline's affine) or none")
    output_folder(out, "--output")
    case = demo_case(seed)
    ref, tgt = case.reference, case.target
    files = {"colin27_t1.nii.gz": ref.image, "colin27_lobes.nii.gz": ref.labels,
             "mni152_moved_t1.nii.gz": tgt.image, "mni152_moved_lobes_truth.nii.gz": tgt.labels}
    for name, img in files.items():
        write_image_atomic(img, out / name)
    classes = [ClassSpec(n, v) for v, n in sorted(ref.label_names.items())]
    values = [c.value for c in classes]
    loaded = resolve_model(model)
    res = segment(out / "mni152_moved_t1.nii.gz", [(out / "colin27_t1.nii.gz", out / "colin27_lobes.nii.gz")],
                  classes=classes, model=loaded, device=device, progress=progress)
    seg_path, side = write_result(res, out / "mni152_moved_lobes_iris.nii.gz")
    methods = {"iris one-shot": {"dice": per_class_dice(res.labels, tgt.labels, values),
                                 "seconds": res.sidecar["timings_s"]["total"]}}
    t0 = time.perf_counter()
    identity = resample_to(ref.labels, tgt.image, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    methods["identity resampling"] = {"dice": per_class_dice(identity, tgt.labels, values),
                                      "seconds": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    thr = threshold_baseline(tgt.image)
    methods["Otsu threshold (one mask)"] = {"dice": per_class_dice(thr, tgt.labels, values, single_mask=True),
                                            "seconds": round(time.perf_counter() - t0, 3)}
    shown: dict[str, sitk.Image] = {}
    if registration:
        t0 = time.perf_counter()
        try:
            warped = register_labels(parse_method(registration), tgt.image, ref.image, ref.labels)
        except InputError as exc:  # antspyx / itk-elastix not installed: the demo goes on without it
            log.warning("registration baseline skipped: %s", exc)
        else:
            write_image_atomic(sitk.Cast(warped, sitk.sitkUInt8), out / "mni152_moved_lobes_registration.nii.gz")
            shown[f"registration {registration}"] = warped
            methods[f"registration {registration}"] = {"dice": per_class_dice(warped, tgt.labels, values),
                                                      "seconds": round(time.perf_counter() - t0, 3)}
    for m in methods.values():
        m["mean_dice"] = round(float(np.mean(list(m["dice"].values()))), 4)
    iris = methods["iris one-shot"]
    png = overlay_png(tgt.image, res.labels, out / "demo.png", truth=tgt.labels, names=ref.label_names,
                      title=f"Colin27 lobes -> moved MNI152 with skull, one-shot, {loaded.name}: "
                            f"mean Dice {iris['mean_dice']:.3f}")
    grid = class_grid_png(tgt.image, {"Iris one-shot": res.labels, **shown, "identity": identity}, tgt.labels,
                          ref.label_names, out / "demo_classes.png",
                          title=f"each class: Iris ({loaded.name}) beside the baselines; truth dashed")
    summary = {"classes": {c.value: c.name for c in classes}, "methods": methods, "model": loaded.name,
               "device": res.sidecar["device"], "seed": seed,
               "files": {"result": str(seg_path), "sidecar": str(side), "picture": str(png),
                         "classes_picture": str(grid)}}
    tmp = out / "summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a Markdown table: one row per method, Dice per class, mean, seconds."""
    names = list(summary["classes"].values())
    lines = ["| method | " + " | ".join(names) + " | mean | s |", "|---" * (len(names) + 3) + "|"]
    for method, m in summary["methods"].items():
        dice = [f"{d:.3f}" for d in m["dice"].values()]
        lines.append(f"| {method} | " + " | ".join(dice) + f" | {m['mean_dice']:.3f} | {m['seconds']:.1f} |")
    return "\n".join(lines)
