"""Issue [20] study: the weight of the aligned-label prior (iris_core.pipeline.prior), chosen on held-out tasks,
never on the dev benchmark. The model runs once per pair (probabilities saved); every weight is then applied
offline through the pipeline's own ``fuse``, as a constant (no agreement map) and scaled by the local agreement.

Held-out cohorts (none in the benchmark; the parcels are the trainer's held-out tasks):
  heldout-self  Colin27 with the held-out parcels (hippocampi, thalami, Brodmann 17) onto moved copies of itself
                (seeds 7, 8; the benchmark's moved copies use seeds 0-2): structures defined by where they lie
  heldout-mni   the same parcels onto moved MNI152NLin6Asym heads (seeds 7, 8), truth the parcels' MNI positions
  tissue        ICBM 2009a grey/white matter onto moved Colin27 and MNI152NLin6Asym brains, truth each brain's own
                two-threshold Otsu classes: structures defined by their intensity, where registration misleads
Usage: python studies/label_prior_weight.py MODEL [heldout-self,heldout-mni,tissue]
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
import SimpleITK as sitk

from iris_core import sampledata
from iris_core.api import resolve_model, segment
from iris_core.io.resample import resample_to
from iris_core.metrics import dice_score
from iris_core.pipeline.align import align_affine
from iris_core.pipeline.prior import AlignedPrior, fuse
from iris_core.types import ClassSpec, Reference

sys.path.insert(0, "scripts")
from choose_threshold import tuning_reference  # noqa: E402

WEIGHTS = (0, 1, 2, 3, 5, 10, 1000)


def otsu_tissue(image: sitk.Image, brain: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(image)
    inside = sitk.GetArrayFromImage(brain) > 0
    f = sitk.OtsuMultipleThresholdsImageFilter()
    f.SetNumberOfThresholds(2)
    f.Execute(sitk.GetImageFromArray(arr[inside].reshape(-1, 1, 1).astype(np.float32)))
    lo, hi = sorted(f.GetThresholds())
    lab = np.zeros(arr.shape, np.uint8)
    lab[inside & (arr > lo) & (arr <= hi)] = 1
    lab[inside & (arr > hi)] = 2
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(image)
    return out


def pairs(name: str):
    if name in ("heldout-self", "heldout-mni"):
        ref = tuning_reference()
        base = ref
        if name == "heldout-mni":
            mni = sampledata.mni152nlin6asym("brain")
            truth = resample_to(ref.labels, mni.image, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            base = sampledata.Sample(mni.name, mni.image, truth, ref.label_names)
        return ref, [sampledata.move_off_mni(base, seed=s) for s in (7, 8)]
    icbm = sampledata.icbm2009a("tissue")
    targets = []
    for s in (sampledata.colin27("brain"), sampledata.mni152nlin6asym("brain")):
        brain = sitk.Mask(s.image, sitk.Cast(s.labels, sitk.sitkUInt8))
        sample = sampledata.Sample(s.name, brain, otsu_tissue(brain, s.labels), icbm.label_names)
        targets.append(sampledata.move_off_mni(sample, seed=7))
    return icbm, targets


def main(model: str, cohorts: list[str]) -> None:
    loaded = resolve_model(model)
    # the model's own probabilities, without the prior its file may carry: every weight is applied below
    loaded = dataclasses.replace(loaded, preprocessing=dataclasses.replace(loaded.preprocessing, prior_weight=0.0))
    thr = loaded.preprocessing.threshold
    print("| cohort | " + " | ".join([f"const {w}" for w in WEIGHTS] + [f"agreement {w}" for w in WEIGHTS]) + " |")
    print("|---" * (2 * len(WEIGHTS) + 1) + "|")
    for name in cohorts:
        ref, targets = pairs(name)
        classes = [ClassSpec(n, v) for v, n in ref.label_names.items()]
        values = np.array([c.value for c in classes])
        scores: dict[tuple[str, float], list] = {}
        for tgt in targets:
            res = segment(tgt.image, [Reference(ref.image, ref.labels, ref.name)], classes, model=loaded,
                          device="cpu", save_probabilities=True)
            probs = [sitk.GetArrayFromImage(m) for m in res.probabilities]
            prior = AlignedPrior(tgt.image, ref.image, ref.labels, align_affine(tgt.image, ref.image))
            constant = copy.copy(prior)  # the same labels, trusted everywhere
            constant.agreement = np.ones_like(prior.agreement)
            truth = sitk.GetArrayViewFromImage(tgt.labels)
            for kind, pr in (("const", constant), ("agreement", prior)):
                for w in WEIGHTS:
                    f = np.stack([fuse(p, [pr], int(v), w) for p, v in zip(probs, values)])
                    lab = np.where(f.max(0) >= thr, values[f.argmax(0)], 0)
                    scores.setdefault((kind, w), []).extend(dice_score(lab == v, truth == v) for v in values)
        print(f"| {name} | " + " | ".join(f"{np.mean(scores[(k, w)]):.3f}" for k in ("const", "agreement")
                                          for w in WEIGHTS) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "heldout-self,heldout-mni,tissue").split(","))
