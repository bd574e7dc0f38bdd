"""What many classes cost (issue [21]), in one run on this machine, printed as Markdown:

1. one window of 128^3 voxels: 1, 6 and 15 classes, the bundled model (memory readout) beside the same small
   network with the published head (Iris's token head, no readout) - each in its own process;
2. the README demo pair (Colin27 onto the moved MNI152 head): 1, 6 and 15 Colin27 structures segmented in one
   pass through the pipeline users run (``api.segment``), seconds of segmentation and of the whole run;
3. the command line: seconds from ``iris-segment segment`` to its first log line and to its end, a whole 1 mm
   brain (the shipped Colin27 onto the shipped moved ICBM 2009a).

Usage: python scripts/bench_classes.py [--model default] [--threads 2] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: 15 Colin27 structures for the many-class runs: the six lobes' AAL groups split by side, the deep grey nuclei,
#: the cerebellum and the insulae (all in both the reference and, placed by MNI coordinates, the demo's truth)
MANY = {"frontal L": ("Frontal_*_L", "Precentral_L", "Rolandic_Oper_L", "Supp_Motor_Area_L", "Olfactory_L",
                      "Rectus_L", "Paracentral_Lobule_L"),
        "frontal R": ("Frontal_*_R", "Precentral_R", "Rolandic_Oper_R", "Supp_Motor_Area_R", "Olfactory_R",
                      "Rectus_R", "Paracentral_Lobule_R"),
        "parietal L": ("Parietal_*_L", "Postcentral_L", "SupraMarginal_L", "Angular_L", "Precuneus_L"),
        "parietal R": ("Parietal_*_R", "Postcentral_R", "SupraMarginal_R", "Angular_R", "Precuneus_R"),
        "temporal L": ("Temporal_*_L", "Heschl_L"), "temporal R": ("Temporal_*_R", "Heschl_R"),
        "occipital L": ("Occipital_*_L", "Calcarine_L", "Cuneus_L", "Lingual_L", "Fusiform_L"),
        "occipital R": ("Occipital_*_R", "Calcarine_R", "Cuneus_R", "Lingual_R", "Fusiform_R"),
        "caudate": ("Caudate_*",), "putamen": ("Putamen_*",), "pallidum": ("Pallidum_*",), "thalamus": ("Thalamus_*",),
        "cerebellum L": ("Cerebelum_*_L",), "cerebellum R": ("Cerebelum_*_R",), "insula": ("Insula_*",)}


def window_figures(model: str, threads: int, repeats: int) -> list[dict]:
    """Per-window seconds for 1, 6 and 15 classes: the model, and its network with the published head."""
    from iris_core.commands.bench import run_benchmark

    published = "preset:iris-small-token-head"
    return run_benchmark([model, published], window=128, classes=(1, 6, 15), repeats=repeats, threads=threads)


def demo_figures(model: str, threads: int) -> list[dict]:
    """Segmentation and total seconds of 1, 6 and 15 classes on the demo pair, one pass each."""
    from iris_core import sampledata
    from iris_core.api import resolve_model, segment
    from iris_core.commands.demo import demo_case
    from iris_core.types import ClassSpec, Reference

    case = demo_case()
    loaded = resolve_model(model)
    many = sampledata.aal_groups(MANY, "colin27-fifteen")
    rows = []
    for k, sample in ((1, case.reference), (6, case.reference), (15, many)):
        classes = [ClassSpec(n, v) for v, n in list(sample.label_names.items())[:k]]
        t0 = time.perf_counter()
        res = segment(case.target.image, [Reference(sample.image, sample.labels, sample.name)], classes, model=loaded,
                      device="cpu", threads=threads)
        rows.append({"classes": k, "total_s": time.perf_counter() - t0, **res.sidecar["timings_s"]})
    return rows


def cli_figures(model: str, threads: int) -> dict:
    """Seconds from starting ``iris-segment segment`` to its first log line and to its end (a whole 1 mm brain)."""
    root = Path(__file__).resolve().parents[1]
    data = root / "Resources" / "SampleData"
    exe = Path(sys.executable).with_name("iris-segment")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(exe), "segment", "--target", str(data / "ICBM2009a-moved.nrrd"), "--reference",
               str(data / "Colin27.nrrd"), str(data / "Colin27.seg.nrrd"), "--model", model, "--threads", str(threads),
               "--device", "cpu", "--output", str(Path(tmp) / "brain.nii.gz")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        first = None
        for line in proc.stderr:
            if first is None and line.strip():
                first = time.perf_counter() - t0
        proc.wait()
        end = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"iris-segment segment failed (exit {proc.returncode})")
    return {"first_log_line_s": first, "total_s": end}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write every figure here")
    args = ap.parse_args(argv)
    windows = window_figures(args.model, args.threads, args.repeats)
    print(f"## One 128^3 window ({args.threads} threads, median of {args.repeats})\n")
    print("| model | 1 class (s) | 6 classes (s) | 15 classes (s) | 15 / 1 |")
    print("|---|---|---|---|---|")
    for r in windows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} | | | |")
            continue
        s = [r[f"window_{k}_classes_s"]["median"] for k in (1, 6, 15)]
        print(f"| {r['model']} | {s[0]:.2f} | {s[1]:.2f} | {s[2]:.2f} | {s[2] / s[0]:.2f}x |")
    demo = demo_figures(args.model, args.threads)
    print("\n## The demo pair through the pipeline (one pass per row)\n")
    print("| classes | segmentation (s) | alignment (s) | encode (s) | whole call (s) |")
    print("|---|---|---|---|---|")
    for r in demo:
        print(f"| {r['classes']} | {r.get('segment', 0):.2f} | {r.get('align', 0):.2f} | {r.get('encode', 0):.2f} | "
              f"{r['total_s']:.2f} |")
    cli = cli_figures(args.model, args.threads)
    print(f"\n## The command line, a whole 1 mm brain\n\nfirst log line after {cli['first_log_line_s']:.2f} s; "
          f"done after {cli['total_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": windows, "demo": demo, "cli": cli}, indent=2))


if __name__ == "__main__":
    main()
