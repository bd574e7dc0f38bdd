"""The copy test (issue [11]) through the whole pipeline under inference choices that need no training:
the memory sample size of the readout, the label threshold and the model-grid spacing.

Usage: python studies/copy_sweep.py MODEL [--memory 4096,16384] [--threshold 0.5,0.3] [--spacing 3]
Prints one Markdown row per combination (mean Dice, per structure, seconds). The copy test's own figure is
the model's stored choices; the others are what a policy change would give, not tuned defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from iris_core.api import resolve_model
from iris_core.training.checks import copy_test


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--memory", default="4096,16384")
    ap.add_argument("--threshold", default="0.5,0.3")
    ap.add_argument("--spacing", default="3")
    args = ap.parse_args()
    loaded = resolve_model(args.model)
    print(f"# Copy test under inference choices: {loaded.name}\n")
    print("| memory sample | threshold | spacing mm | mean Dice | per structure | s |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.memory.split(",")):
        loaded.model.config = dataclasses.replace(loaded.model.config, memory_tokens=n)
        for sp in floats(args.spacing):
            for thr in floats(args.threshold):
                policy = dataclasses.replace(loaded.preprocessing, threshold=thr, spacing=(sp, sp, sp))
                t0 = time.perf_counter()
                r = copy_test(dataclasses.replace(loaded, preprocessing=policy))
                print(f"| {n} | {thr} | {sp:g} | **{r.mean_dice:.3f}** | {' '.join(f'{d:.2f}' for d in r.dice)} | "
                      f"{time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
