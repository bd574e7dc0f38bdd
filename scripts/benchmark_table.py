"""One table of the dev benchmark (scripts/model_card_eval.sh): per cohort, the mean Dice over its classes and
runs of each method, and whether Iris reaches the deterministic affine there (``align``, the pipeline's own
alignment alone; antspyx Affine beside it); then the ablation of issue [20] where OUT/ablation exists.

Usage: python scripts/benchmark_table.py OUT   (the folder model_card_eval.sh wrote)
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

#: cohort folder (relative to OUT) -> what it measures
COHORTS = {
    "copy": "copy test: ten gyri, the reference image itself as the target",
    "gyri-moved": "the ten gyri onto a rigidly moved Colin27",
    "sample-pair": "Slicer sample pair: Colin27 2 mm brain onto moved ICBM 2009a",
    ".": "moved-template brain pairs (6)",
    "cross-atlas": "cross-atlas: AAL reference, Harvard-Oxford truth (9 structures)",
    "macaque": "macaque, held-out species (4 structures)",
}
METHODS = ("iris:one-shot", "align", "ants:Affine", "ants:SyN", "identity")
#: the ablation's model variants (OUT/ablation/VARIANT/COHORT/results.csv), in the order of the table
ABLATION = {"features": "features only (no alignment, no position term)",
            "unaligned": "position term, no alignment (each image's own scanner coordinates)",
            "aligned": "alignment + position term",
            "bundled": "alignment + position term + aligned-label prior (the bundled model)"}


def cohort_means(path: Path) -> dict[str, float]:
    """Mean Dice per method over every (case, class) row of a results.csv."""
    scores: dict[str, list[float]] = defaultdict(list)
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            scores[row["method"]].append(float(row["dice"]))
    return {m: sum(v) / len(v) for m, v in scores.items()}


def main(out: Path) -> str:
    lines = ["| cohort | Iris one-shot | align (deterministic affine) | antspyx Affine | antspyx SyN | identity | "
             "Iris >= align? |", "|---|---|---|---|---|---|---|"]
    for folder, what in COHORTS.items():
        path = out / folder / "results.csv"
        if not path.is_file():
            continue
        means = cohort_means(path)
        cells = [f"{means[m]:.3f}" if m in means else "-" for m in METHODS]
        verdict = "yes" if means.get("iris:one-shot", 0) >= means.get("align", 2) else "no"
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {verdict} |")
    demo = out / "demo" / "summary.json"
    if demo.is_file():
        methods = json.loads(demo.read_text(encoding="utf-8"))["methods"]
        iris = methods["iris one-shot"]["mean_dice"]
        syn = next((m["mean_dice"] for k, m in methods.items() if k.startswith("registration")), None)
        ident = next((m["mean_dice"] for k, m in methods.items() if k.startswith("identity")), None)
        lines.append(f"| README demo: six lobes onto the moved MNI152 head | {iris:.3f} | - | "
                     f"{syn:.3f} | {ident:.3f} | (SyN) {'yes' if syn is not None and iris >= syn else 'no'} |"
                     if syn is not None and ident is not None else f"| README demo | {iris:.3f} | - | - | - | - |")
    copy = out / "check" / "copy.json"
    if copy.is_file():
        c = json.loads(copy.read_text(encoding="utf-8"))
        lines.append(f"\ncheck-model copy test: mean Dice {c['mean_dice']:.3f} ({'PASSED' if c['passed'] else 'FAILED'}; "
                     f"{c['rule']})")
    lines += ablation(out)
    return "\n".join(lines)


def ablation(out: Path) -> list[str]:
    """Issue [20]'s ablation: mean Dice of Iris one-shot per model variant and cohort, and the alignment alone."""
    root = out / "ablation"
    if not root.is_dir():
        return []
    cohorts = [c for c in COHORTS if c != "." and (root / "features" / c / "results.csv").is_file()]
    lines = ["", "Ablation (Iris one-shot, mean Dice; the same weights in every row):", "",
             "| variant | " + " | ".join(cohorts) + " |", "|---" * (len(cohorts) + 1) + "|"]
    for variant, what in ABLATION.items():
        folder = out if variant == "bundled" else root / variant  # everything on: the model's own rows
        means = [cohort_means(p).get("iris:one-shot") if (p := folder / c / "results.csv").is_file() else None
                 for c in cohorts]
        lines.append(f"| {what} | " + " | ".join("-" if m is None else f"{m:.3f}" for m in means) + " |")
    align = [cohort_means(out / c / "results.csv").get("align") if (out / c / "results.csv").is_file() else None
             for c in cohorts]
    lines.append("| alignment alone (align: the reference's labels through it) | "
                 + " | ".join("-" if m is None else f"{m:.3f}" for m in align) + " |")
    return lines


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/model-card/eval")))
