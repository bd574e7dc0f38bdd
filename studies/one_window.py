"""Issue [21] study: the policy's fit_window of the bundled model (one window as large as a small target's grid
instead of overlapping 64^3 ones), chosen on held-out tasks (never the dev benchmark): Dice and seconds of
segmentation with fit_window 0 (the model's 64^3 windows, half overlap) beside larger ones, on the held-out cohorts of ``label_prior_weight.py`` (held-out parcels onto moved Colin27 and moved
MNI152 heads, ICBM grey/white onto moved brains), each target through ``api.segment`` as users run it.

A 3 mm whole head of about 85 x 89 x 83 voxels takes 8 windows of 64^3 (each voxel computed 3.3 times) or one
of 96^3 (padded): the network and its readout are per voxel, so fewer, larger windows do less work, if the
network, trained on 64^3 crops, segments as well with more context.

Usage: python studies/one_window.py MODEL [0,96,128] [heldout-self,heldout-mni,tissue]
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import SimpleITK as sitk

from iris_core.api import resolve_model, segment
from iris_core.metrics import dice_score
from iris_core.types import ClassSpec, Reference

sys.path.insert(0, "studies")
from label_prior_weight import pairs  # noqa: E402


def main(model: str, windows: list[int], cohorts: list[str]) -> None:
    base = resolve_model(model)
    print("| cohort | " + " | ".join(f"fit {w}: Dice | fit {w}: s | fit {w}: window" for w in windows) + " |")
    print("|---" * (3 * len(windows) + 1) + "|")
    for name in cohorts:
        ref, targets = pairs(name)
        classes = [ClassSpec(n, v) for v, n in ref.label_names.items()]
        dice: dict[int, list] = {w: [] for w in windows}
        secs: dict[int, list] = {w: [] for w in windows}
        used: dict[int, set] = {w: set() for w in windows}
        for tgt in targets:
            truth = sitk.GetArrayViewFromImage(tgt.labels)
            for w in windows:
                loaded = dataclasses.replace(base, preprocessing=dataclasses.replace(base.preprocessing, fit_window=w))
                res = segment(tgt.image, [Reference(ref.image, ref.labels, ref.name)], classes, model=loaded,
                              device="cpu", threads=2)
                secs[w].append(res.sidecar["timings_s"]["segment"])
                used[w].add("x".join(map(str, res.sidecar["window"])))
                lab = sitk.GetArrayViewFromImage(res.labels)
                dice[w].extend(dice_score(lab == c.value, truth == c.value) for c in classes)
        print(f"| {name} | " + " | ".join(f"{np.mean(dice[w]):.4f} | {np.mean(secs[w]):.2f} | {', '.join(sorted(used[w]))}"
                                          for w in windows) + " |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(w) for w in (sys.argv[2] if len(sys.argv) > 2 else "0,96,128").split(",")],
         (sys.argv[3] if len(sys.argv) > 3 else "heldout-self,heldout-mni,tissue").split(","))
