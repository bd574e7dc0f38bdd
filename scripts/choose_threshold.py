"""Choose a model's label threshold (and memory sample size) on tasks it never trained on, not on the copy
test or the dev benchmark it is then reported on (issue [11]).

The tuning pairs: Colin27 with the parcels the trainer holds out as tasks (AAL hippocampus and thalamus, left
and right; Brodmann area 17) as the reference, rigidly moved copies of Colin27 as targets (seeds 7 and 8;
the benchmark's moved targets use seeds 0-2). Every combination runs the one pipeline users run
(``api.segment``) and is scored against the moved truth.

Usage: python scripts/choose_threshold.py MODEL [--memory 4096,16384] [--threshold 0.2,0.25,...] [--json F]
                                           [--tasks heldout|large]
Prints one Markdown row per combination (mean Dice over structures and pairs) and the best; ties within
0.002 go to the threshold nearest 0.5 and the smaller sample (the cheaper, less tuned choice).

``--tasks large`` probes the memory sample size on large structures instead (the held-out parcels are 4-20 ml
and do not tell sample sizes apart): five bilateral AAL gyri of 26-75 ml that neither the copy test nor the
cross-atlas benchmark uses (middle temporal, inferior temporal, fusiform, middle occipital, supramarginal).
They are training tasks, so this compares inference choices, not the model's skill.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import SimpleITK as sitk

from iris_core import sampledata
from iris_core.api import resolve_model, segment
from iris_core.metrics import dice_score
from iris_core.types import ClassSpec, Reference

#: the trainer's held-out AAL parcels (training config ``holdout``: aal:37, 38, 77, 78) without the precentral
#: gyri, which the copy test holds; Brodmann area 17 from the Brodmann map
TUNING_AAL = {"left hippocampus": ("Hippocampus_L",), "right hippocampus": ("Hippocampus_R",),
              "left thalamus": ("Thalamus_L",), "right thalamus": ("Thalamus_R",)}
TUNING_BRODMANN = {"Brodmann area 17": 17}
TUNING_SEEDS = (7, 8)
#: large bilateral AAL gyri outside the copy test and the cross-atlas benchmark (``--tasks large``)
LARGE_AAL = {"middle temporal gyrus": ("Temporal_Mid_L", "Temporal_Mid_R"),
             "inferior temporal gyrus": ("Temporal_Inf_L", "Temporal_Inf_R"),
             "fusiform gyrus": ("Fusiform_L", "Fusiform_R"),
             "middle occipital gyrus": ("Occipital_Mid_L", "Occipital_Mid_R"),
             "supramarginal gyrus": ("SupraMarginal_L", "SupraMarginal_R")}


def tuning_reference() -> sampledata.Sample:
    """Colin27 and a label map of the held-out tuning structures (values 1..5) on its grid: the AAL parcels,
    then Brodmann area 17 where no parcel is."""
    ref = sampledata.aal_groups(TUNING_AAL, "colin27-heldout")
    ba = sitk.GetArrayViewFromImage(sampledata.colin27("brodmann").labels)
    out = sitk.GetArrayFromImage(ref.labels)
    for name, v in TUNING_BRODMANN.items():
        value = len(ref.label_names) + 1
        out[(ba == v) & (out == 0)] = value
        ref.label_names[value] = name
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(ref.labels)
    return dataclasses.replace(ref, labels=labels)


#: --tasks: the reference of each task set and the report's title
TASKS = {"heldout": (tuning_reference, "Threshold choice on held-out tasks"),
         "large": (lambda: sampledata.aal_groups(LARGE_AAL, "colin27-large"), "Memory sample on large gyri")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--memory", default="4096,16384")
    ap.add_argument("--threshold", default="0.2,0.25,0.3,0.35,0.4,0.45,0.5")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--tasks", choices=tuple(TASKS), default="heldout")
    args = ap.parse_args()
    loaded = resolve_model(args.model)
    make_reference, title = TASKS[args.tasks]
    ref = make_reference()
    targets = [sampledata.move_off_mni(ref, seed=s) for s in TUNING_SEEDS]
    classes = [ClassSpec(n, v) for v, n in ref.label_names.items()]
    print(f"# {title}: {loaded.name}\n")
    print(f"Reference Colin27 ({', '.join(ref.label_names.values())}); targets: moved copies, seeds "
          f"{', '.join(map(str, TUNING_SEEDS))}.\n")
    print("| memory sample | threshold | mean Dice | per structure (mean over targets) | s |")
    print("|---|---|---|---|---|")
    rows = []
    for n in (int(x) for x in args.memory.split(",")):
        loaded.model.config = dataclasses.replace(loaded.model.config, memory_tokens=n)
        for thr in (float(x) for x in args.threshold.split(",")):
            run = dataclasses.replace(loaded, preprocessing=dataclasses.replace(loaded.preprocessing, threshold=thr))
            t0 = time.perf_counter()
            per = []
            for tgt in targets:
                res = segment(tgt.image, [Reference(ref.image, ref.labels, ref.name)], classes, model=run,
                              device="cpu")
                got = sitk.GetArrayViewFromImage(res.labels)
                truth = sitk.GetArrayViewFromImage(tgt.labels)
                per.append([float(dice_score(got == c.value, truth == c.value)) for c in classes])
            per_structure = np.mean(per, axis=0)
            row = {"memory": n, "threshold": thr, "mean": round(float(per_structure.mean()), 4),
                   "per_structure": [round(float(d), 4) for d in per_structure],
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"| {n} | {thr} | **{row['mean']:.3f}** | {' '.join(f'{d:.2f}' for d in per_structure)} | "
                  f"{row['seconds']} |", flush=True)
    top = max(r["mean"] for r in rows)
    best = min((r for r in rows if r["mean"] >= top - 0.002),
               key=lambda r: (abs(r["threshold"] - 0.5), r["memory"]))
    print(f"\nChosen: memory sample {best['memory']}, threshold {best['threshold']} (mean Dice {best['mean']:.3f}; "
          f"best {top:.3f})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": loaded.name, "structures": list(ref.label_names.values()),
                       "seeds": list(TUNING_SEEDS), "rows": rows, "chosen": best}, f, indent=2)


if __name__ == "__main__":
    main()
