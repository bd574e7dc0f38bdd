"""``iris-segment``: segment from references, inspect models, list presets."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import InputError, IrisError

log = logging.getLogger("iris_core")


class TerminalProgress:
    """A tqdm bar per stage on a terminal; quiet in a pipe (stage changes go to the log)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            if self.enabled:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=stage, unit="step", leave=False, file=sys.stderr)
            else:
                log.info("%s", stage)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _window(text: str | None):
    if not text:
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 3):
        raise IrisError(f"--window {text!r}: give one size (128) or three (128,128,96)")
    return tuple(parts * 3 if len(parts) == 1 else parts)


def segment_options(args: argparse.Namespace):
    """The run options the command line describes (``--modality``, the old shared name, maps to the
    Hermes modality with ``--structures``, else to the intensity policy)."""
    from .options import SegmentOptions

    intensity, hermes_modality = args.intensity, args.hermes_modality
    if args.modality is not None:
        log.warning("--modality is deprecated: use --intensity (CT, MR, PET, auto) or --hermes-modality")
        if args.structures:
            hermes_modality = hermes_modality or args.modality
        else:
            intensity = args.modality
    return SegmentOptions(
        strategy=args.strategy, tune_steps=args.tune_steps, tune_lr=args.tune_lr, device=args.device,
        threads=args.threads, window=_window(args.window), overlap=args.overlap, sw_batch=args.sw_batch,
        compile=args.compile, intensity=intensity, hermes_modality=hermes_modality, postprocess=args.postprocess,
        save_probabilities=args.save_probabilities, max_classes_per_forward=args.max_classes_per_forward,
        precision=args.precision,
        # a .seg.nrrd holds segments that overlap (one layer per group): classes that overlap in a reference
        # may overlap in the result
        overlaps=len(args.target) == 1 and str(args.output).lower().endswith(".seg.nrrd"))


def _volume_stem(path: str) -> str:
    """``case01.nii.gz`` -> ``case01``; a DICOM folder -> its name."""
    from .imaging import split_volume_name

    return split_volume_name(Path(path).name)[0]


# defaults of options that may be given several times (action="extend": --method a --method b runs both;
# with a default list argparse would extend the default itself)
EVALUATE_METHODS = ["iris:one-shot", "identity"]
BENCH_MODELS = ["preset:mass-base", "preset:iris-small"]
BENCH_CLASSES = [1, 15]


def segment_jobs(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """(target, output, preview) per target: one target writes where --output/--preview say; several write
    ``<stem>_seg.nii.gz`` (and ``<stem>_seg.png``) into the folders --output (and --preview) name."""
    from .imaging import VOLUME_EXTENSIONS
    from .viz import PICTURE_EXTENSIONS

    if len(args.target) == 1:
        return [(args.target[0], args.output, args.preview)]
    if args.output.lower().endswith(VOLUME_EXTENSIONS):
        raise IrisError(f"--output {args.output}: with {len(args.target)} targets --output is a folder (each "
                        "target's label map is written into it as <target>_seg.nii.gz)")
    if args.preview and args.preview.lower().endswith(PICTURE_EXTENSIONS):
        raise IrisError(f"--preview {args.preview}: with {len(args.target)} targets --preview is a folder (one "
                        "<target>_seg.png per target)")
    stems = [_volume_stem(t) for t in args.target]
    seen: dict[str, str] = {}
    for t, stem in zip(args.target, stems):
        if stem.casefold() in seen:
            raise IrisError(f"targets {seen[stem.casefold()]} and {t} would both be written as {stem}_seg.nii.gz; "
                            "give targets with distinct names")
        seen[stem.casefold()] = t
    return [(t, str(Path(args.output) / f"{stem}_seg.nii.gz"),
             str(Path(args.preview) / f"{stem}_seg.png") if args.preview else None)
            for t, stem in zip(args.target, stems)]


def cmd_segment(args: argparse.Namespace) -> int:
    from .api import (
        load_references,
        parse_classes,
        refuse_probability_map_collisions,
        resolve_classes,
        resolve_model,
        segment,
        sidecar_path,
        write_result,
    )
    from .imaging import check_volume_output, output_folder, probe_image, refuse_overwriting_inputs
    from .viz import check_picture_output, overlay_png

    jobs = segment_jobs(args)
    inputs = {"task library": args.library, "model file": args.model if Path(args.model).is_file() else None}
    inputs |= {(f"target image {i}" if len(jobs) > 1 else "target image"): t for i, (t, _, _) in enumerate(jobs, 1)}
    for k, (img, lab) in enumerate(args.reference or [], 1):
        inputs |= {f"reference image {k}": img, f"reference label map {k}": lab}
    for _, output, preview in jobs:
        refuse_overwriting_inputs({"--output": output, "the sidecar of --output": sidecar_path(output),
                                   "--preview": preview, "--save-library": args.save_library}, inputs)
        check_volume_output(output, "--output")
        if preview:
            check_picture_output(preview, "--preview")
        if args.save_probabilities:  # the class names come later: refuse any input a probability map could hit
            refuse_probability_map_collisions(output, inputs)
    if len(jobs) > 1:  # made when the first target is written: a run that fails before leaves none
        output_folder(args.output, "--output", create=False)
        if args.preview:
            output_folder(args.preview, "--preview", create=False)
    for k, (target, _, _) in enumerate(jobs, 1):  # an unreadable target is found now, not after hours of others
        probe_image(target, f"target image {k}" if len(jobs) > 1 else "target image")
    options = segment_options(args)
    loaded = resolve_model(args.model, allow_unsafe=args.trust_checkpoint)
    classes = parse_classes(args.classes, names_only=bool(args.library))
    references = [tuple(r) for r in args.reference or []]
    if references and len(jobs) > 1 and loaded.arch != "hermes" and not args.structures and not args.library:
        # read and checked once, before any target: a wrong reference fails now, not once per target
        references = load_references(references)
        classes = resolve_classes(references, classes)
    # the task is encoded once: later targets reuse the first one's embedding (retrieval picks references
    # per target, so it encodes again; Hermes has no embedding; a library is read again, it is small)
    reuse, saved = None, False
    failed: list[tuple[str, IrisError]] = []
    for i, (target, output, preview) in enumerate(jobs, 1):
        if len(jobs) > 1:
            log.info("target %d of %d: %s", i, len(jobs), target)
        progress = TerminalProgress(sys.stderr.isatty() and not args.quiet)
        try:
            if reuse is not None:
                result = segment(target, model=loaded, library=reuse, options=options, progress=progress)
            else:
                result = segment(target, references=references, classes=classes, model=loaded, library=args.library,
                                 structures=args.structures, options=options, progress=progress)
        except IrisError as exc:
            if len(jobs) == 1:
                raise
            # several targets: one that cannot be segmented is reported, the others are still done
            print(f"error: target {i} of {len(jobs)}: {in_cli_words(exc)}", file=sys.stderr)
            failed.append((target, exc))
            continue
        finally:
            progress.close()
        if len(jobs) > 1:
            output_folder(args.output, "--output")
        out, side = write_result(result, output)
        if args.save_library and not saved and result.embedding is not None:  # the first target's task
            from .embedding import model_fingerprint

            result.embedding.save(args.save_library, model_fingerprint(loaded.model), {"model": loaded.name})
            saved = True
        if reuse is None and args.strategy != "retrieval" and not args.structures and not args.library:
            reuse = result.embedding
        if preview:
            from .imaging import read_image

            names = {c.value: c.name for c in result.classes}
            if len(jobs) > 1:
                output_folder(args.preview, "--preview")
            overlay_png(read_image(target, "target image"), result.labels, preview,
                        title=f"{Path(target).name}: {args.strategy}, {loaded.name}", names=names)
        t = result.sidecar["timings_s"]
        if args.precision != "float32":
            print("precision: " + result.sidecar["precision"]["summary"])
        print(f"wrote {out} ({len(result.classes)} classes, {t['total']:.1f} s on {result.sidecar['device']}) and "
              f"{side}")
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} targets not segmented (nothing written for them): "
              + ", ".join(t for t, _ in failed), file=sys.stderr)
        return failed[0][1].exit_code
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Six brain structures in one pass on a moved head MR with its skull, from one real reference, beside
    registration, identity and a threshold."""
    from .demo import format_summary, run_demo

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


def cmd_info(args: argparse.Namespace) -> int:
    from .api import resolve_model
    from .models import config_to_dict

    m = resolve_model(args.model, allow_unsafe=args.trust_checkpoint)
    n = sum(p.numel() for p in m.model.parameters())
    print(json.dumps({"source": m.source, "arch": m.arch, "parameters": n, "config": config_to_dict(m.config),
                      "preprocessing": m.preprocessing.to_dict(), "class_names": m.class_names, "info": m.info},
                     indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .evaluate import read_rows, run_evaluation

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


def cmd_embed(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .embed_map import embed_dataset

    res = embed_dataset(load_dataset(args.dataset), args.out, model=args.model, device=args.device,
                        max_cases=args.max_cases, progress=True)
    print(f"{res['classes']} class embeddings -> {res['library']}; map {res['map']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .device import set_threads
    from .training import load_config, train

    set_threads(args.threads)
    cfg = load_config(args.config, steps=args.steps, preset=args.preset, seed=args.seed)  # ConfigError if wrong
    path = train(cfg, args.out, export=args.export)
    print(f"trained {cfg.steps} steps; EMA model {path}" + (f", exported {args.export}" if args.export else ""))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import check_model_spec
    from .bench import format_pair, format_table, pair_benchmark, run_benchmark

    if args.pipeline:
        from .bench_pipeline import format_pipeline, pipeline_benchmark

        res = pipeline_benchmark(args.model[0] if args.model else "default", target=args.target,
                                 references=[tuple(r) for r in args.reference or []], intensity=args.intensity,
                                 compile=args.compile, threads=args.threads, further_targets=args.further_targets,
                                 compare=args.compare, precision=args.precision)
        print(format_pipeline(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        return 0
    if args.pair:
        res = pair_benchmark(args.model[0] if args.model else "default", repeats=args.repeats,
                             registration=not args.no_registration, threads=args.threads)
        print(format_pair(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        return 0
    args.model = args.model or BENCH_MODELS
    for spec in args.model:  # before a process per model starts
        check_model_spec(spec)
    results = run_benchmark(args.model, window=args.window, classes=tuple(args.classes or BENCH_CLASSES), repeats=args.repeats,
                            threads=args.threads, compile=args.compile)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


def cmd_check_model(args: argparse.Namespace) -> int:
    """Collapse detector: ten different references on Colin27 must give ten different predictions; and the
    copy test: the reference image itself as the target must give the reference's labels back."""
    from .api import resolve_model
    from .checks import copy_test, standard_check

    if args.model and args.model_option and args.model != args.model_option:
        raise InputError(f"check-model: two models given ({args.model}, --model {args.model_option}); give one")
    args.model = args.model or args.model_option or "default"
    loaded = resolve_model(args.model, allow_unsafe=args.trust_checkpoint)
    report = standard_check(loaded, device=args.device, out_dir=args.output)
    print(report.to_markdown(f"Reference sensitivity of {loaded.name}"))
    copy = copy_test(loaded, device=args.device, out_dir=args.output) if loaded.arch == "iris" else None
    if copy is not None:
        print(copy.to_markdown(f"Copy test of {loaded.name}"))
    if args.output:
        print(f"wrote {Path(args.output) / 'check.json'}, check.md, check.png, copy.json, copy.md")
    return 0 if report.passed and (copy is None or copy.passed) else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from .models import PRESETS, build_preset

    for name, p in PRESETS.items():
        n = sum(q.numel() for q in build_preset(name).parameters()) / 1e6
        print(f"{name:12s} {p.arch:7s} {n:7.2f} M params  spacing {p.spacing} window {p.window}  {p.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from . import hub

    if args.action == "pull":
        if not args.name:
            raise_usage = f"models pull needs a name: {', '.join(n for n, m in hub.KNOWN.items() if m.repo_id)}"
            print(f"error: {raise_usage}", file=sys.stderr)
            return 2
        m = hub.KNOWN.get(args.name)
        if m is not None and m.repo_id:
            print(f"downloading {m.name} ({m.size_text()}) from {m.url}\nlicence: {m.licence}", file=sys.stderr)
        path = hub.pull(args.name, progress=not args.quiet)
        print(f"{args.name}: {path}\nverified: loads as the {hub.KNOWN[args.name].arch} layout; licence: "
              f"{hub.KNOWN[args.name].licence}\nuse it with --model {args.name}")
        return 0
    rows = hub.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = r["local"] or (f"not downloaded: {r['get']}" if r["get"] else "")
        print(f"{r['name']:10s} {r['size']:>7s}  {r['title']}\n{'':19s}licence: {r['licence']}\n"
              f"{'':19s}source:  {r['source']}" + (f"\n{'':19s}local:   {state}" if state else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .options import INTENSITY_POLICIES, POSTPROCESSING, PRECISIONS, STRATEGIES, SegmentOptions

    default = SegmentOptions()

    ap = argparse.ArgumentParser(prog="iris-segment", description="In-context 3D medical image segmentation")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a target from reference volumes with labels")
    s.add_argument("--target", required=True, nargs="+", action="extend",
                   help="target image (NIfTI, NRRD, MHA, a DICOM series folder or one file of the series, ...); "
                        "several: the task is encoded once and --output (and --preview) are folders")
    s.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a reference image and its label map; repeat for several references")
    s.add_argument("--classes", help="label values '1,3' or named 'liver=1,spleen=2' (default: every label, named "
                   "after a Slicer .seg.nrrd reference's segments, else label_N)")
    s.add_argument("--strategy", choices=STRATEGIES, default=default.strategy,
                   help="one-shot: each class from the first reference holding it; ensemble: the references' "
                        "embeddings averaged; retrieval: per class the reference most like the target; tuning: "
                        "the embedding optimised on the references (default: %(default)s)")
    s.add_argument("--library", help="segment from a saved task library instead of references")
    s.add_argument("--structures", help="Hermes models: named structures, e.g. liver,spleen or amos_ct/liver")
    s.add_argument("--save-library", help="save the task embedding used to this file (a task library)")
    s.add_argument("--model", default="default",
                   help="model file, 'default' (bundled), 'mass-base' (after `models pull mass-base`) or preset:NAME")
    s.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a model file that needs full unpickling (it can run code: trusted files only)")
    s.add_argument("--device", default=default.device, help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--threads", type=int, default=default.threads, help="CPU threads (default: torch's, one per core)")
    s.add_argument("--window", help="sliding-window size, e.g. 128 or 128,128,96 (default: the model's)")
    s.add_argument("--overlap", type=float, default=default.overlap,
                   help="sliding-window overlap (default: the model's, 0.5 for ours)")
    s.add_argument("--sw-batch", type=int, default=default.sw_batch,
                   help="windows per forward pass (0: from free memory)")
    s.add_argument("--max-classes-per-forward", type=int, default=default.max_classes_per_forward, metavar="N",
                   help="segment at most N classes per forward pass (less memory, one sweep per chunk; 0: all)")
    s.add_argument("--postprocess", choices=POSTPROCESSING, default=default.postprocess,
                   help="largest: keep each class's largest connected component (single structures only); "
                        "default: the model's (largest for MASS checkpoints, none for ours)")
    s.add_argument("--save-probabilities", action="store_true", default=default.save_probabilities,
                   help="also write one float probability map per class on the target grid, "
                        "OUTPUT_prob_<class>.nii.gz")
    s.add_argument("--intensity", choices=INTENSITY_POLICIES, default=default.intensity,
                   help="intensity policy of the preprocessing (auto: CT when the values look like HU)")
    s.add_argument("--hermes-modality", default=default.hermes_modality,
                   help="Hermes models: the target's modality prior, CT, PET, T1, T2 or cine")
    s.add_argument("--modality", help=argparse.SUPPRESS)  # deprecated: the two above
    s.add_argument("--tune-steps", type=int, default=default.tune_steps,
                   help="--strategy tuning: optimisation steps (default: %(default)s)")
    s.add_argument("--tune-lr", type=float, default=default.tune_lr,
                   help="--strategy tuning: Adam learning rate (default: %(default)s)")
    s.add_argument("--output", required=True, help="output label map on the target's grid")
    s.add_argument("--preview", help="also write a PNG with three planes of the result")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--compile", action="store_true", default=default.compile,
                   help="compile the network: on a CPU ahead of time, about a minute per model and input size "
                        "once per machine (cached in ~/.cache/iris-segment/compiled, IRIS_SEGMENT_COMPILED), "
                        "then loaded in a second by every later run; 1.5-3x faster per window")
    s.add_argument("--precision", choices=PRECISIONS, default=default.precision,
                   help="arithmetic of the windows on a CPU: float32 (default, the reference), bfloat16, or auto: "
                        "bfloat16 only on a CPU with native bfloat16 and only where a check on the first window "
                        "shows the same labels (>= 99.9 %%) and a speed-up; GPUs keep their mixed precision")
    s.set_defaults(func=cmd_segment)

    d = sub.add_parser("demo", help="six brain structures from one reference (Colin27) on a moved head MR with "
                                     "its skull (MNI152NLin6Asym), beside registration and a threshold")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--model", default="default")
    d.add_argument("--device", default="auto")
    d.add_argument("--seed", type=int, default=0, help="seed of the random rigid move of the target")
    d.add_argument("--registration", default="ants:SyN",
                   help="registration baseline: ants:SyN, ants:Affine, elastix or none (skipped when not installed)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="describe a model file")
    i.add_argument("--model", default="default")
    i.add_argument("--trust-checkpoint", action="store_true")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("evaluate", help="compare methods against manual labels over a cohort")
    e.add_argument("--dataset", required=True,
                   help="a built-in real cohort ('templates': brain pairs across templates; 'cross-atlas'; "
                        "'macaque'; 'copy' and 'gyri-moved': the copy test's ten gyri on the image itself and on a "
                        "moved copy; 'sample-pair': the Slicer sample data), an nnU-Net/MSD folder, or a CSV "
                        "(case,image,labels or target_image,target_labels,reference_image,reference_labels)")
    e.add_argument("--method", nargs="+", action="extend",
                   help="iris:one-shot | iris:ensemble:K | iris:retrieval:K | iris:tuning | hermes | ants:SyN | "
                        "ants:Affine | elastix | identity (several, or --method repeated; default: "
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

    m = sub.add_parser("embed", help="encode labelled references into a task library and draw a 2-D map")
    m.add_argument("--dataset", required=True, help="'templates', 'atlases', an nnU-Net/MSD folder or a CSV")
    m.add_argument("--out", required=True)
    m.add_argument("--model", default="default")
    m.add_argument("--device", default="auto")
    m.add_argument("--max-cases", type=int)
    m.set_defaults(func=cmd_embed)

    t = sub.add_parser("train", help="episodic in-context training (resumes from OUT/state.pt)")
    t.add_argument("--config", help="TOML file with a [train] table (see iris_core.training.config.TrainConfig)")
    t.add_argument("--out", required=True, help="run folder: state.pt, ema.safetensors, curve.png")
    t.add_argument("--steps", type=int)
    t.add_argument("--preset")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--export", help="write the final EMA model here (float16 safetensors)")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="time encoding and per-window segmentation, peak memory")
    b.add_argument("--model", nargs="+", action="extend",
                   help="model files, 'default' or preset:NAME (default: " + " ".join(BENCH_MODELS) + "; "
                        "--pipeline and --pair: 'default')")
    b.add_argument("--window", type=int, default=128)
    b.add_argument("--classes", type=int, nargs="+", action="extend", help="class counts (default: " + " ".join(map(str, BENCH_CLASSES)) + ")")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int)
    b.add_argument("--json", help="also write the figures as JSON")
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

    c = sub.add_parser("check-model", help="does the model follow its reference, and give a reference's labels back "
                       "when the target is the reference image (copy test)? (exit code 1 when not)")
    c.add_argument("model", nargs="?", help="model file, 'default' (bundled), a known name or preset:NAME "
                   "(or --model, as in the other commands; default: the bundled model)")
    c.add_argument("--model", dest="model_option", metavar="MODEL", help=argparse.SUPPRESS)
    c.add_argument("--output", help="folder for check.json, check.md and check.png")
    c.add_argument("--device", default="cpu")
    c.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a model file that needs full unpickling (it can run code: trusted files only)")
    c.set_defaults(func=cmd_check_model)

    mo = sub.add_parser("models", help="list known models (size, licence, source); 'models pull NAME' downloads one")
    mo.add_argument("action", nargs="?", choices=["list", "pull"], default="list")
    mo.add_argument("name", nargs="?", help="with pull: the model to download, e.g. mass-base")
    mo.add_argument("--json", action="store_true", help="list as JSON")
    mo.add_argument("--quiet", action="store_true", help="no progress bar")
    mo.set_defaults(func=cmd_models)

    p = sub.add_parser("presets", help="list the architecture presets")
    p.set_defaults(func=cmd_presets)
    return ap


#: the library's input names (IrisError.inputs) as this command line spells them
CLI_INPUTS = {"references": "--reference IMAGE LABELS", "library": "--library FILE", "structures": "--structures",
              "hermes_modality": "--hermes-modality", "classes": "--classes", "model": "--model FILE",
              "target": "--target", "output": "--output"}


def in_cli_words(exc: IrisError) -> str:
    """A library error as this command line's user reads it: the options it concerns named after it."""
    flags = [CLI_INPUTS[i] for i in exc.inputs if i in CLI_INPUTS]
    return f"{exc} ({' or '.join(flags)})" if flags else str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    from .device import retain_freed_memory

    retain_freed_memory()  # a process of our own: reuse freed memory (glibc), window after window
    try:
        return args.func(args)
    except IrisError as exc:
        if args.debug:
            raise
        print(f"error: {in_cli_words(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
