"""``iris-segment segment``: one or more targets from references, a task library or (Hermes) named structures.

Modules are imported when the command runs: ``iris-segment --help`` and argument errors answer without
importing torch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from iris_core.commands.terminal import TerminalProgress, in_cli_words, preview_title
from iris_core.errors import InputError, IrisError

log = logging.getLogger("iris_core")

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
    from iris_core.options import SegmentOptions

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
        overlaps=len(args.target) == 1 and str(args.output).lower().endswith((".seg.nrrd", ".dcm")))


def _volume_stem(path: str) -> str:
    """``case01.nii.gz`` -> ``case01``; a DICOM folder -> its name."""
    from iris_core.io.names import split_volume_name

    return split_volume_name(Path(path).name)[0]


def segment_jobs(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """(target, output, preview) per target: one target writes where --output/--preview say; several write
    ``<stem>_seg.nii.gz`` (and ``<stem>_seg.png``) into the folders --output (and --preview) name."""
    from iris_core.io.outputs import PICTURE_EXTENSIONS, VOLUME_EXTENSIONS

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


def segment_inputs(args: argparse.Namespace, jobs: list[tuple[str, str, str | None]]) -> dict[str, str | None]:
    """Every input file of the run, by what it is to the user ('target image 2', 'reference label map 1'),
    checked to exist (a model named by a known name or a preset is no file; with --server, the model and the
    task library are names the server offers); standard library alone."""
    from iris_core.hub.download import check_model_spec

    local = not args.server
    if local:
        check_model_spec(args.model)
    inputs = {"task library": args.library if local else None,
              "model file": args.model if local and Path(args.model).is_file() else None}
    inputs |= {(f"target image {i}" if len(jobs) > 1 else "target image"): t for i, (t, _, _) in enumerate(jobs, 1)}
    for k, (img, lab) in enumerate(args.reference or [], 1):
        inputs |= {f"reference image {k}": img, f"reference label map {k}": lab}
    for what, path in inputs.items():
        if path is not None and not Path(path).exists():
            raise InputError(f"{what} {path}: file not found")
    return inputs


def check_segment_outputs(args: argparse.Namespace, jobs: list[tuple[str, str, str | None]],
                          inputs: dict[str, str | None]) -> None:
    """Every file the run would write, checked before any work: never an input, a place it can be written, and
    an existing file replaced only when it is a result of ours (its sidecar says so) or with --overwrite."""
    from iris_core.hub.library import is_library_file
    from iris_core.io.names import sidecar_path
    from iris_core.io.outputs import (
        check_output_file,
        check_picture_output,
        check_volume_output,
        is_our_result,
        listed_by_result,
        output_folder,
        read_record,
        refuse_overwriting_inputs,
    )

    for target, output, preview in jobs:
        refuse_overwriting_inputs({"--output": output, "the sidecar of --output": sidecar_path(output),
                                   "--preview": preview, "--save-library": args.save_library}, inputs)
        if str(output).lower().endswith(".dcm"):  # a DICOM SEG: only of a DICOM series
            from iris_core.io.dicom_seg import check_dicom_seg_output

            check_dicom_seg_output(output, target)
        else:
            check_volume_output(output, "--output")
        check_output_file(output, "--output", args.overwrite, ours=is_our_result)
        check_output_file(sidecar_path(output), "the sidecar of --output", args.overwrite,
                          ours=lambda p: read_record(p) is not None)
        if preview:
            check_picture_output(preview, "--preview")
            check_output_file(preview, "--preview", args.overwrite, ours=listed_by_result(output))
        if args.save_probabilities:  # the class names come later: refuse any input a probability map could hit
            from iris_core.io.results import existing_probability_maps, refuse_probability_map_collisions

            refuse_probability_map_collisions(output, inputs)
            for path in existing_probability_maps(output):
                check_output_file(path, "a probability map of --output", args.overwrite,
                                  ours=listed_by_result(output))
    if args.save_library:
        check_output_file(args.save_library, "--save-library", args.overwrite, ours=is_library_file)
    if len(jobs) > 1:  # made when the first target is written: a run that fails before leaves none
        output_folder(args.output, "--output", create=False)
        if args.preview:
            output_folder(args.preview, "--preview", create=False)


def check_class_names(args: argparse.Namespace, requests: list[tuple[str, int]] | None) -> None:
    """A class asked for by a name no reference segment has (read from the label files' headers: a Slicer
    .seg.nrrd, a DICOM SEG) is refused now, listing the names there are, not after the model is loaded."""
    from iris_core.io.dicom_seg import segment_names
    from iris_core.io.segmentations import find_segment, unknown_segment

    if not (requests and args.reference) or args.library:
        return
    names: dict[int, str] = {}
    for _, labels in args.reference:
        names = segment_names(labels) | names  # the first reference's names first, as resolve_classes
    unknown = [n for n, v in requests if v == 0 and find_segment(n, names) is None]
    if unknown:
        raise unknown_segment(unknown[0], names)


def cmd_segment(args: argparse.Namespace) -> int:
    """Check everything the command line names (options, classes, input files, every output) before the
    heavy imports (torch, MONAI: seconds), so a mistake is refused at once; then segment, here or on a server."""
    from iris_core.options import class_requests

    jobs = segment_jobs(args)
    options = segment_options(args)
    requests = class_requests(args.classes, names_only=bool(args.library))
    inputs = segment_inputs(args, jobs)
    check_segment_outputs(args, jobs, inputs)
    check_class_names(args, requests)
    from iris_core.io.imaging import probe_image

    for k, (target, _, _) in enumerate(jobs, 1):  # an unreadable target is found now, not after hours of others
        probe_image(target, f"target image {k}" if len(jobs) > 1 else "target image")
    if args.server:  # a thin client: the server segments, this writes the same outputs
        from iris_core.commands.service import segment_on_server

        return segment_on_server(args, jobs, options)
    return segment_here(args, jobs, options)


def segment_here(args: argparse.Namespace, jobs: list[tuple[str, str, str | None]], options) -> int:
    """Segment the checked jobs on this computer (this rank's share under torchrun): the first target from the
    references (or library, or structures), each further one with the task the first left (the references are
    not encoded again); several targets: one that cannot be segmented is reported and the others are still done."""
    # the first line a user sees, before the imports of torch and the model (seconds; issue [21]); a terminal
    # draws bars instead of log lines
    if not sys.stderr.isatty() or args.quiet:
        log.info("inputs checked (%d target%s, %d reference%s): loading the model %s", len(jobs),
                 "s" * (len(jobs) != 1), len(args.reference or []), "s" * (len(args.reference or []) != 1),
                 args.model)
    from iris_core.api import load_references, parse_classes, resolve_classes, resolve_model

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    jobs, skipped = cohort_share(jobs, rank, world, args.skip_existing)
    if world > 1:  # under torchrun: on this rank's own GPU when there are GPUs
        options = cohort_device(options)
    loaded = resolve_model(args.model, allow_unsafe=args.trust_checkpoint)
    classes = parse_classes(args.classes, names_only=bool(args.library))
    references = [tuple(r) for r in args.reference or []]
    if references and len(jobs) > 1 and loaded.arch != "hermes" and not args.structures and not args.library:
        # read and checked once, before any target: a wrong reference fails now, not once per target
        references = load_references(references)
        classes = resolve_classes(references, classes)
    what = {"references": references, "classes": classes, "library": args.library, "structures": args.structures}
    failed: list[tuple[str, IrisError]] = []
    done: list[dict] = []
    saved = False
    for i, job in enumerate(jobs, 1):
        if len(jobs) > 1:
            log.info("target %d of %d: %s", i, len(jobs), job[0])
        try:
            result = _segment_target(args, job[0], what, loaded, options)
        except IrisError as exc:
            if len(jobs) == 1:
                raise
            # several targets: one that cannot be segmented is reported, the others are still done
            print(f"error: target {i} of {len(jobs)}: {in_cli_words(exc)}", file=sys.stderr)
            failed.append((job[0], exc))
            continue
        done.append(_write_outputs(args, job, result, loaded, several=len(jobs) > 1) | {"rank": rank})
        if args.save_library and not saved and result.embedding is not None:  # the first target's task
            from iris_core.pipeline.embedding import model_fingerprint

            result.embedding.save(args.save_library, model_fingerprint(loaded.model), {"model": loaded.name})
            saved = True
        if "task" not in what and args.strategy != "retrieval":  # retrieval encodes again for each target
            what = {"task": result.task}
    if world > 1:
        write_cohort_summary(Path(args.output), rank, world, done, failed, skipped)
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} targets not segmented (nothing written for them): "
              + ", ".join(t for t, _ in failed), file=sys.stderr)
        return failed[0][1].exit_code
    return 0


def _segment_target(args: argparse.Namespace, target: str, what: dict, loaded, options):
    """One target segmented with a progress bar on a terminal: from ``what`` a run segments (the references,
    library or structures; or the task an earlier target left: ``what['task']``)."""
    from iris_core.api import segment

    progress = TerminalProgress(sys.stderr.isatty() and not args.quiet)
    try:
        return segment(target, model=loaded, options=options, progress=progress, **what)
    finally:
        progress.close()


def _write_outputs(args: argparse.Namespace, job: tuple[str, str, str | None], result, loaded, several: bool) -> dict:
    """Write one target's label map, sidecar (naming its preview) and preview, print where; its summary."""
    from iris_core.io.imaging import output_folder, read_image
    from iris_core.io.outputs import relative_to_sidecar
    from iris_core.io.results import write_result
    from iris_core.io.viz import overlay_png

    target, output, preview = job
    if several:
        output_folder(args.output, "--output")
    if preview:  # the sidecar names its preview: a later run may replace both
        result.sidecar["preview"] = relative_to_sidecar(preview, output)
    out, side = write_result(result, output, target)
    if preview:
        if several:
            output_folder(args.preview, "--preview")
        overlay_png(read_image(target, "target image"), result.labels, preview,
                    title=preview_title(target, result.sidecar, loaded.name),
                    names={c.value: c.name for c in result.classes})
    t = result.sidecar["timings_s"]
    if args.precision != "float32":
        print("precision: " + result.sidecar["precision"]["summary"])
    print(f"wrote {out} ({len(result.classes)} classes, {t['total']:.1f} s on {result.sidecar['device']}) and "
          f"{side}")
    return {"target": target, "output": str(out), "seconds": t["total"], "classes": result.sidecar["classes"]}


def cohort_share(jobs: list, rank: int, world: int, skip_existing: bool) -> tuple[list, list]:
    """This rank's targets and the ones it skips. The share is fixed by the order of the targets alone (every
    ``world``-th from ``rank``), then each rank skips those of its share whose label map and sidecar exist (a
    cohort resumed; always under torchrun, else with --skip-existing). Sharding what is left instead would depend
    on when each rank looks: a rank that starts late sees the outputs another has just written, and targets are
    done twice or never."""
    from iris_core.io.names import sidecar_path

    share = list(jobs[rank::world])
    if not (world > 1 or skip_existing):
        return share, []
    skipped = [j for j in share if Path(j[1]).is_file() and sidecar_path(j[1]).is_file()]
    if skipped:
        log.info("%d of %d targets%s already segmented (their outputs exist): skipped", len(skipped), len(share),
                 f" of rank {rank}" if world > 1 else "")
    return [j for j in share if j not in skipped], skipped


def cohort_device(options):
    """Under torchrun with GPUs, each rank on its own (LOCAL_RANK); else the options' device."""
    import dataclasses

    import torch

    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        return dataclasses.replace(options, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return options


def write_cohort_summary(folder: Path, rank: int, world: int, done: list[dict], failed: list, skipped: list) -> None:
    """Each rank's part of the cohort, merged by rank 0 into ``summary.json`` in the output folder once every rank
    has finished (a gloo barrier): each target's output, rank and seconds, the failed and the skipped ones (of
    every rank)."""
    import torch.distributed as dist

    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".summary.rank{rank}.json"
    part.write_text(json.dumps({"done": done, "failed": [{"target": t, "error": str(e)} for t, e in failed],
                                "skipped": [{"target": t, "output": str(o)} for t, o, _ in skipped]}))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if rank == 0:
        parts = [json.loads((folder / f".summary.rank{r}.json").read_text()) for r in range(world)]
        summary = {"ranks": world, "done": sorted((d for p in parts for d in p["done"]), key=lambda d: d["target"]),
                   "failed": [f for p in parts for f in p["failed"]],
                   "skipped": sorted((k for p in parts for k in p["skipped"]), key=lambda k: k["target"])}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"cohort: {len(summary['done'])} segmented on {world} ranks, {len(summary['skipped'])} skipped, "
              f"{len(summary['failed'])} failed; summary {folder / 'summary.json'}")
    dist.barrier()
    part.unlink(missing_ok=True)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The ``segment`` command's options."""
    from iris_core.options import INTENSITY_POLICIES, POSTPROCESSING, PRECISIONS, STRATEGIES, SegmentOptions

    default = SegmentOptions()

    s = sub.add_parser("segment", parents=parents, help="segment a target from reference volumes with labels")
    s.add_argument("--target", required=True, nargs="+", action="extend",
                   help="target image (NIfTI, NRRD, MHA, a DICOM series folder or one file of the series, ...); "
                        "several: the task is encoded once and --output (and --preview) are folders")
    s.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a reference image and its label map; repeat for several references")
    s.add_argument("--classes", help="label values '1,3' or named 'liver=1,spleen=2' (default: every label, named "
                   "after a Slicer .seg.nrrd reference's segments, else label_N)")
    s.add_argument("--strategy", choices=STRATEGIES, default=default.strategy,
                   help="one-shot: each class from the reference holding it (several references holding one class: the "
                        "ensemble, as in Slicer); ensemble: the references' "
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
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing output files that are not results of iris-segment (a result of ours, "
                        "whose sidecar says so, is replaced without it; an input never is)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--compile", action="store_true", default=default.compile,
                   help="compile the network: on a CPU ahead of time, about a minute per model and input size "
                        "once per machine (cached in ~/.cache/iris-segment/compiled, IRIS_SEGMENT_COMPILED), "
                        "then loaded in a second by every later run; 1.5-3x faster per window")
    s.add_argument("--precision", choices=PRECISIONS, default=default.precision,
                   help="arithmetic of the windows on a CPU: float32 (default, the reference), bfloat16, or auto: "
                        "bfloat16 only on a CPU with native bfloat16 and only where a check on the first window "
                        "shows the same labels (>= 99.9 %%) and a speed-up; GPUs keep their mixed precision")
    s.add_argument("--skip-existing", action="store_true",
                   help="several targets: skip those whose label map and sidecar exist (resume a cohort; always on "
                        "under torchrun, which also shards the targets across ranks and writes OUTPUT/summary.json)")
    s.add_argument("--server", metavar="URL", help="segment on an iris-segment server (iris-segment serve) instead "
                   "of this computer; same outputs")
    s.add_argument("--token-file", help="with --server: a file holding the server's token")
    s.add_argument("--ca-bundle", metavar="PEM", help="with an https --server: trust the certificates in this file "
                   "(instead of the system's and SSL_CERT_FILE's)")
    s.add_argument("--proxy", metavar="URL", help="with --server: reach it through this HTTP proxy (http://host:port; "
                   "http_proxy and HTTPS_PROXY are never used, a loopback server is never proxied)")
    s.set_defaults(func=cmd_segment)
