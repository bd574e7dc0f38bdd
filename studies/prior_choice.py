"""Issue [20] study: how sharply the aligned-label prior follows the local agreement, chosen on held-out tasks,
never on the dev benchmark. The prior adds ``w * s**p * (2 q - 1)`` to each class's logit (iris_core.pipeline.
prior.fuse; ``s`` the local agreement in [0, 1], ``q`` the aligned label share). With p = 1 (the first choice,
label_prior_weight.py) a weight that lets a moved copy of the reference take its aligned labels (s near 1) also
pushes them onto a different subject's tissue (s about 0.5); a higher power keeps the weight where the aligned
image matches the target and drops it where it only resembles it: patch-based label fusion's weights
(Coupe et al. 2011) fall off as sharply with patch dissimilarity.

The labels reach the target grid either as each label's indicator interpolated linearly (a share in [0, 1]) or
by nearest neighbour (the label map atlas registration gives; the policy's prior_labels): both are tried.

The model runs once per pair (probabilities saved, prior off); every (labels, w, p) is applied offline through
``fuse``. Cohorts: label_prior_weight.py's held-out ones. Prints one table per cohort (rows: labels and p,
columns: w) and the mean over cohorts.
Usage: python studies/prior_choice.py MODEL [heldout-self,heldout-mni,tissue]
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
import SimpleITK as sitk

from iris_core.api import resolve_model, segment
from iris_core.metrics import dice_score
from iris_core.pipeline.align import align_affine
from iris_core.pipeline.prior import AlignedPrior, fuse
from iris_core.types import ClassSpec, Reference

sys.path.insert(0, "studies")
from label_prior_weight import pairs  # noqa: E402

WEIGHTS = (0, 10, 20, 40, 100, 1000)
POWERS = (1, 2, 4, 8)
LABELS = ("linear", "nearest")


def main(model: str, cohorts: list[str]) -> None:
    loaded = resolve_model(model)
    loaded = dataclasses.replace(loaded, preprocessing=dataclasses.replace(loaded.preprocessing, prior_weight=0.0))
    thr = loaded.preprocessing.threshold
    mean: dict[tuple[str, int, float], list] = {}
    rows = [(m, p) for m in LABELS for p in POWERS]
    head = "| labels | power | " + " | ".join(f"w {w}" for w in WEIGHTS) + " |\n" + "|---" * (len(WEIGHTS) + 2) + "|"
    for name in cohorts:
        ref, targets = pairs(name)
        classes = [ClassSpec(n, v) for v, n in ref.label_names.items()]
        values = np.array([c.value for c in classes])
        scores: dict[tuple[str, int, float], list] = {}
        for tgt in targets:
            res = segment(tgt.image, [Reference(ref.image, ref.labels, ref.name)], classes, model=loaded,
                          device="cpu", save_probabilities=True)
            probs = [sitk.GetArrayFromImage(m) for m in res.probabilities]
            alignment = align_affine(tgt.image, ref.image)
            truth = sitk.GetArrayViewFromImage(tgt.labels)
            for mode in LABELS:
                prior = AlignedPrior(tgt.image, ref.image, ref.labels, alignment, nearest=mode == "nearest")
                shares = {int(v): prior.share(int(v)) for v in values}
                prior.share = shares.__getitem__  # computed once per class
                s = prior.agreement
                for p in POWERS:
                    pr = copy.copy(prior)
                    pr.agreement = s**p
                    for w in WEIGHTS:
                        f = np.stack([fuse(pb, [pr], int(v), w) for pb, v in zip(probs, values)])
                        lab = np.where(f.max(0) >= thr, values[f.argmax(0)], 0)
                        scores.setdefault((mode, p, w), []).extend(dice_score(lab == v, truth == v) for v in values)
            print(f"{name} {tgt.name}: agreement inside the labels mean {float(s[truth > 0].mean()):.3f}, "
                  f"median {float(np.median(s[truth > 0])):.3f}", file=sys.stderr, flush=True)
        print(f"\n{name}\n\n{head}")
        for mode, p in rows:
            print(f"| {mode} | {p} | " + " | ".join(f"{np.mean(scores[(mode, p, w)]):.4f}" for w in WEIGHTS) + " |",
                  flush=True)
            for w in WEIGHTS:
                mean.setdefault((mode, p, w), []).append(np.mean(scores[(mode, p, w)]))
    print(f"\nmean over cohorts\n\n{head}")
    for mode, p in rows:
        print(f"| {mode} | {p} | " + " | ".join(f"{np.mean(mean[(mode, p, w)]):.4f}" for w in WEIGHTS) + " |")


if __name__ == "__main__":
    main(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "heldout-self,heldout-mni,tissue").split(","))
