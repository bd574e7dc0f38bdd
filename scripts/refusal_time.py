"""How long ``iris-segment`` takes to refuse a mistake, from the command to the ``error:`` line (issue [24]: a
refusal must come within 1.5 s; it took 4-8 s when torch and MONAI were imported first).

Usage: python scripts/refusal_time.py [--repeats 5]
Runs each mistake below as a new process of this environment's ``iris-segment`` (the console script beside this
Python) and prints the median and the slowest wall time per mistake. Nothing is written: every output named is
refused, or lies in a temporary folder removed at the end."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "Resources" / "SampleData"
TARGET, REF, REF_SEG = (str(SAMPLE / n) for n in ("ICBM2009a-moved.nrrd", "Colin27.nrrd", "Colin27.seg.nrrd"))


def mistakes(tmp: Path) -> dict[str, list[str]]:
    """The mistakes a newcomer makes, each a command line that must be refused."""
    base = ["segment", "--target", TARGET, "--reference", REF, REF_SEG]
    (tmp / "mine.nii.gz").write_bytes(b"the user's")
    return {
        "missing target": ["segment", "--target", str(tmp / "nope.nii.gz"), "--reference", REF, REF_SEG,
                           "--output", str(tmp / "s.nii.gz")],
        "bad option (--window 8,8)": [*base, "--window", "8,8", "--output", str(tmp / "s.nii.gz")],
        "output is the user's manual segmentation": [*base, "--output", str(SAMPLE / "ICBM2009a-moved.seg.nrrd")],
        "output not writable (/proc)": [*base, "--output", "/proc/seg.nii.gz"],
        "misspelt segment name (--classes brian)": [*base, "--classes", "brian", "--output", str(tmp / "s.nii.gz")],
        "existing output of the user's": [*base, "--output", str(tmp / "mine.nii.gz")],
        "score of a missing file": ["score", str(tmp / "nope.nii.gz"), str(SAMPLE / "ICBM2009a-moved.seg.nrrd")],
        "bench --json under a file": ["bench", "--json", str(tmp / "mine.nii.gz" / "b.json")],
    }


def command() -> list[str]:
    """This environment's ``iris-segment`` (what a user types), else ``python -m iris_core.commands.cli``."""
    script = Path(sys.executable).with_name("iris-segment" + (".exe" if sys.platform == "win32" else ""))
    return [str(script)] if script.is_file() else [sys.executable, "-m", "iris_core.commands.cli"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="iris-refusal-"))
    try:
        print("| mistake | median s | slowest s | error |\n|---|---|---|---|")
        worst = 0.0
        for name, cli in mistakes(tmp).items():
            times, err = [], ""
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                proc = subprocess.run([*command(), *cli], capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                if proc.returncode == 0 or not err.startswith("error:"):
                    print(f"{name}: not refused ({err})", file=sys.stderr)
                    return 1
            worst = max(worst, max(times))
            print(f"| {name} | {statistics.median(times):.2f} | {max(times):.2f} | {err[:90]} |")
        print(f"\nslowest refusal: {worst:.2f} s (goal: 1.5 s)")
        return 0 if worst <= 1.5 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
