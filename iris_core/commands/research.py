"""The researcher's commands: ``demo``, ``evaluate`` (cohorts against manual labels), ``embed``, ``train``, ``bench``.

Modules are imported when a command runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from iris_core.commands.terminal import TerminalProgress

log = logging.getLogger("iris_core")

# defaults of options that may be given several times (action="extend": --method a --method b runs both;
# with a default list argparse would extend the default itself)
EVALUATE_METHODS = ["iris:one-shot", "identity"]
BENCH_MODELS = ["preset:mass-base", "preset:iris-small"]
BENCH_CLASSES = [1, 15]


def cmd_demo(args: argparse.Namespace) -> int:
    """Six brain structures in one pass on a moved head MR with its skull, from one real reference, beside
    registration, identity and a threshold."""
    from iris_core.io.outputs import output_folder

    output_folder(args.output, "--output", create=False)  # before the imports and the data: seconds
    from iris_core.commands.demo import format_summary, run_demo

    progress = TerminalProgress(sys.stderr.isatty())
    try:
        summary = run_demo(args.output, model=args.model, device=args.device, seed=args.seed,
                           registration=None if args.registration == "none" else args.registration,
                           progress=progress)
    finally:
        progress.close()
    print(format_summary(summary))
    print("wrote " + ", ".join(summary["files"].values()))
    return 0



def cmd_evaluate(args: argparse.Namespace) -> int:
    from iris_core.io.outputs import output_folder

    output_folder(args.out, "--out", create=False)  # before the imports and the cohort are read
    from iris_core.commands.evaluate import read_rows, run_evaluation
    from iris_core.io.datasets import load_dataset

    ds = load_dataset(args.dataset)
    summary = run_evaluation(ds, args.method or EVALUATE_METHODS, args.out, model=args.model, device=args.device, seed=args.seed,
                             overlays=not args.no_overlays, progress=sys.stderr.isatty(),
                             hermes_model=args.hermes_model, hermes_modality=args.hermes_modality,
                             fixed_reference=args.reference_case, postprocess=args.postprocess)
    if summary.is_file():
        print(summary.read_text(encoding="utf-8"))
    failures = Path(args.out) / "failures.csv"
    if int(os.environ.get("RANK", 0)) == 0 and failures.is_file():
        n = len(read_rows([failures]))
        print(f"error: {n} run{'s' if n != 1 else ''} failed (listed in {failures} and the summary); the others "
              "are in results.csv. A later run with the same --out retries them", file=sys.stderr)
        return 1
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Existing segmentations scored against their truths (Dice, HD95, ASSD per class, names matched); every
    file and output checked before the heavy imports."""
    from iris_core.commands.score import check_score_args, run_score  # numpy and SimpleITK, no torch

    return run_score(args, check_score_args(args))


def cmd_embed(args: argparse.Namespace) -> int:
    from iris_core.hub.library import is_library_file
    from iris_core.io.outputs import check_output_file, output_folder

    output_folder(args.out, "--out", create=False)
    check_output_file(Path(args.out) / "library.safetensors", "the task library in --out", args.overwrite,
                      ours=is_library_file)
    from iris_core.commands.embed_map import embed_dataset
    from iris_core.io.datasets import load_dataset

    res = embed_dataset(load_dataset(args.dataset), args.out, model=args.model, device=args.device,
                        max_cases=args.max_cases, progress=True)
    print(f"{res['classes']} class embeddings -> {res['library']}; map {res['map']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from iris_core.io.outputs import output_folder

    output_folder(args.out, "--out", create=False)  # a resumed run's folder is fine; a file or /proc is not
    from iris_core.pipeline.device import set_threads
    from iris_core.training import load_config, train

    set_threads(args.threads)
    cfg = load_config(args.config, steps=args.steps, preset=args.preset, seed=args.seed)  # ConfigError if wrong
    path = train(cfg, args.out, export=args.export)
    print(f"trained {cfg.steps} steps; EMA model {path}" + (f", exported {args.export}" if args.export else ""))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from iris_core.hub.download import check_model_spec
    from iris_core.io.outputs import check_output_file, read_record, write_json_report

    if args.json:  # before the benchmark: its figures are not lost to a folder that is missing or not writable
        check_output_file(args.json, "--json", args.overwrite, ours=lambda p: read_record(p) is not None)
    for spec in args.model or []:
        check_model_spec(spec)
    from iris_core.commands.bench import format_pair, format_table, pair_benchmark, run_benchmark

    if args.pipeline:
        from iris_core.commands.bench_pipeline import format_pipeline, pipeline_benchmark

        res = pipeline_benchmark(args.model[0] if args.model else "default", target=args.target,
                                 references=[tuple(r) for r in args.reference or []], intensity=args.intensity,
                                 compile=args.compile, threads=args.threads, further_targets=args.further_targets,
                                 compare=args.compare, precision=args.precision)
        print(format_pipeline(res))
        if args.json:
            write_json_report(args.json, res)
        return 0
    if args.pair:
        res = pair_benchmark(args.model[0] if args.model else "default", repeats=args.repeats,
                             registration=not args.no_registration, threads=args.threads)
        print(format_pair(res))
        if args.json:
            write_json_report(args.json, res)
        return 0
    args.model = args.model or BENCH_MODELS
    results = run_benchmark(args.model, window=args.window, classes=tuple(args.classes or BENCH_CLASSES), repeats=args.repeats,
                            threads=args.threads, compile=args.compile)
    print(format_table(results))
    if args.json:
        write_json_report(args.json, results)
    return 1 if any("error" in r for r in results) else 0


def add_parsers(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The options of ``demo``, ``evaluate``, ``score``, ``embed``, ``train`` and ``bench``."""
    from iris_core.options import PRECISIONS

    d = sub.add_parser("demo", parents=parents, help="six brain structures from one reference (Colin27) on a moved head MR with "
                                     "its skull (MNI152NLin6Asym), beside registration and a threshold")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--model", default="default")
    d.add_argument("--device", default="auto")
    d.add_argument("--seed", type=int, default=0, help="seed of the random rigid move of the target")
    d.add_argument("--registration", default="ants:SyN",
                   help="registration baseline: ants:SyN, ants:Affine, elastix or none (skipped when not installed)")
    d.set_defaults(func=cmd_demo)

    add_cohort_parsers(sub, parents)

    t = sub.add_parser("train", parents=parents, help="episodic in-context training (resumes from OUT/state.pt)")
    t.add_argument("--config", help="TOML file with a [train] table (see iris_core.training.config.TrainConfig)")
    t.add_argument("--out", required=True, help="run folder: state.pt, ema.safetensors, curve.png")
    t.add_argument("--steps", type=int)
    t.add_argument("--preset")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--export", help="write the final EMA model here (float16 safetensors)")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", parents=parents, help="time encoding and per-window segmentation, peak memory")
    b.add_argument("--model", nargs="+", action="extend",
                   help="model files, 'default' or preset:NAME (default: " + " ".join(BENCH_MODELS) + "; "
                        "--pipeline and --pair: 'default')")
    b.add_argument("--window", type=int, default=128)
    b.add_argument("--classes", type=int, nargs="+", action="extend", help="class counts (default: " + " ".join(map(str, BENCH_CLASSES)) + ")")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int)
    b.add_argument("--json", help="also write the figures as JSON (an object: a list of figures goes under 'results')")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --json file that iris-segment did "
                   "not write")
    b.add_argument("--pair", action="store_true",
                   help="whole-volume figures on the real template pair, optimised vs plain eager, and registration")
    b.add_argument("--no-registration", action="store_true", help="with --pair: skip the antspyx SyN baseline")
    b.add_argument("--pipeline", action="store_true",
                   help="one whole target through the model's pipeline (MASS checkpoints: the authors'), seconds "
                        "per stage and window, further targets, peak memory; default data: the MASS fixture MR case")
    b.add_argument("--target", help="with --pipeline: the target image")
    b.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="with --pipeline: a reference image and its label map")
    b.add_argument("--intensity", default="auto", help="with --pipeline: the intensity policy")
    b.add_argument("--further-targets", type=int, default=1, help="with --pipeline: further targets to time")
    b.add_argument("--compare", metavar="LABELS",
                   help="with --pipeline: a label map on the target grid to report agreement with (default data: "
                        "the authors' own output)")
    b.add_argument("--compile", action="store_true",
                   help="also time the compiled network per window (compile or cache load, ratio, max abs difference)")
    b.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="with --pipeline: float32, bfloat16 or auto (as segment --precision)")
    b.set_defaults(func=cmd_bench)


def add_cohort_parsers(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The options of the commands over cohorts: ``evaluate``, ``score`` and ``embed``."""
    from iris_core.options import POSTPROCESSING, SegmentOptions

    default = SegmentOptions()

    e = sub.add_parser("evaluate", parents=parents, help="compare methods against manual labels over a cohort")
    e.add_argument("--dataset", required=True,
                   help="a built-in real cohort ('templates': brain pairs across templates; 'cross-atlas'; "
                        "'macaque'; 'copy' and 'gyri-moved': the copy test's ten gyri on the image itself and on a "
                        "moved copy; 'sample-pair': the Slicer sample data), an nnU-Net/MSD folder, or a CSV "
                        "(case,image,labels or target_image,target_labels,reference_image,reference_labels)")
    e.add_argument("--method", nargs="+", action="extend",
                   help="iris:one-shot | iris:ensemble:K | iris:retrieval:K | iris:tuning | hermes | ants:SyN | "
                        "ants:Affine | elastix | align | identity (several, or --method repeated; default: "
                        + " ".join(EVALUATE_METHODS) + ")")
    e.add_argument("--out", required=True, help="folder: results.csv, summary.md, boxplot.png, overlays/")
    e.add_argument("--model", default="default")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0, help="seed of the reference choice")
    e.add_argument("--reference-case", help="use this case as the one fixed reference (instead of seeded draws)")
    e.add_argument("--hermes-model", help="Hermes model for method 'hermes' (classes by dataset.json names)")
    e.add_argument("--hermes-modality", help="Hermes modality (default from dataset.json: CT or T1)")
    e.add_argument("--no-overlays", action="store_true")
    e.add_argument("--postprocess", choices=POSTPROCESSING, default=default.postprocess,
                   help="applied to Iris and Hermes predictions")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("score", parents=parents, help="score existing segmentations against their truths (Dice, "
                       "HD95, ASSD per class, classes matched by segment name)")
    s.add_argument("pairs", nargs="+", metavar="RESULT TRUTH",
                   help="a result and its truth (label maps or Slicer .seg.nrrd files, the result on the truth's "
                        "grid or part of it); several pairs; or a folder of results and a folder of truths, "
                        "paired by name (case01_seg.nii.gz or case01.nii.gz with case01.nii.gz)")
    s.add_argument("--classes", help="the classes to score: segment names (brain), the truth's label values "
                   "(1,3) or NAME=VALUE (default: every class of the truth)")
    s.add_argument("--csv", help="also write the rows as CSV")
    s.add_argument("--json", help="also write the pairs and rows as JSON")
    s.add_argument("--markdown", help="also write the Markdown printed")
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing --csv/--json/--markdown files that this command did not write")
    s.set_defaults(func=cmd_score)

    m = sub.add_parser("embed", parents=parents, help="encode labelled references into a task library and draw a 2-D map")
    m.add_argument("--dataset", required=True, help="'templates', 'atlases', an nnU-Net/MSD folder or a CSV")
    m.add_argument("--out", required=True)
    m.add_argument("--model", default="default")
    m.add_argument("--device", default="auto")
    m.add_argument("--max-cases", type=int)
    m.add_argument("--overwrite", action="store_true", help="replace a library.safetensors in --out that is not "
                   "a task library of iris-segment")
    m.set_defaults(func=cmd_embed)
