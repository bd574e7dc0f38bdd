"""Segment click to result in the Slicer-like environment (issue [18] goal: a second click within 1.3x the
in-process segmentation). Builds the environment if needed (scripts/slicer_like_env.sh), then, in its Python,
with the logic as the widget builds it on the shipped sample pair and the bundled model: the first click (starts
the warm worker), then ``--repeats`` rounds of one more click and one in-process segmentation of the same pair
with the model kept loaded (interleaved, so a busy machine weighs on both alike). Prints a Markdown table.

    .venv/bin/python scripts/bench_slicer_click.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(repeats: int) -> None:
    """Runs inside the Slicer-like environment."""
    sys.path.insert(0, str(ROOT / "Testing" / "Slicer"))
    from slicer_like_scenario import Clicks

    from iris_core.api import resolve_model, segment
    from iris_core.resources import SAMPLE_DATA

    s = Clicks({})
    try:
        first = s.click()["click_s"]
        model = resolve_model("default")
        args = (str(SAMPLE_DATA / "ICBM2009a-moved.nrrd"),
                [(str(SAMPLE_DATA / "Colin27.nrrd"), str(SAMPLE_DATA / "Colin27.seg.nrrd"))])
        segment(*args, model=model)  # warm-up, as the worker's first run was
        later, floor = [], []
        for _ in range(repeats):
            later.append(s.click()["click_s"])
            t0 = time.perf_counter()
            segment(*args, model=model)
            floor.append(time.perf_counter() - t0)
    finally:
        s.logic.close()
    f = statistics.median(floor)
    print(f"Slicer-like environment ({sys.version.split()[0]}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), the bundled model, the shipped sample pair, median of {repeats} (min-max):\n")
    print("| path | seconds | min | max | x in-process |\n|---|---|---|---|---|")
    print(f"| in-process segmentation (the floor) | {f:.2f} | {min(floor):.2f} | {max(floor):.2f} | 1.00 |")
    print(f"| first Segment click (starts the warm worker) | {first:.2f} | | | {first / f:.2f} |")
    print(f"| later Segment clicks (warm worker) | {statistics.median(later):.2f} | {min(later):.2f} | "
          f"{max(later):.2f} | {statistics.median(later) / f:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside:
        bench(args.repeats)
        return 0
    pythons = subprocess.run(["bash", str(ROOT / "scripts" / "slicer_like_env.sh")], check=True, capture_output=True,
                             text=True).stdout.split()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.call([pythons[-1], __file__, "--inside", "--repeats", str(args.repeats)], env=env)


if __name__ == "__main__":
    sys.exit(main())
