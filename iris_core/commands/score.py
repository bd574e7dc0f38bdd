"""``iris-segment score RESULT TRUTH``: an existing segmentation (of this tool or another) scored against its
truth with the metrics ``evaluate`` uses (Dice, HD95, ASSD, both volumes per class: ``metrics.segment_metrics``),
the classes matched by segment name when both files name them (Slicer ``.seg.nrrd``), else by label value.
Several pairs, or a folder of results and a folder of truths (matched by file name), score a cohort: a table
per pair and the mean per class. Markdown on the terminal; CSV, JSON and Markdown files on request."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.errors import InputError
from iris_core.io.dicom_seg import is_dicom_seg
from iris_core.io.imaging import labels_on_grid, read_image
from iris_core.io.names import split_volume_name
from iris_core.io.outputs import (
    VOLUME_EXTENSIONS,
    check_output_file,
    first_line_is,
    read_record,
    refuse_overwriting_inputs,
    write_csv,
)
from iris_core.io.segmentations import (
    matching_value,
    read_layered_segmentation,
    slicer_layer_count,
    slicer_segment_names,
)
from iris_core.metrics import finite_mean, segment_metrics
from iris_core.options import class_requests

log = logging.getLogger(__name__)

#: the first line of the Markdown report: how a later run knows it may replace it
MARKDOWN_MARK = "<!-- iris-segment score -->"
FIELDS = ["result", "truth", "class", "class_name", "result_class", "dice", "hd95_mm", "assd_mm", "volume_pred_ml",
          "volume_true_ml"]


@dataclass
class LabelFile:
    """A segmentation on a grid: one label map, or several whose classes may overlap (a layered Slicer
    ``.seg.nrrd``), and the names its file gives the classes ({} for a plain label map)."""

    path: str
    layers: list[np.ndarray]
    names: dict[int, str]
    image: sitk.Image  # the first layer (the grid, the spacing)

    def values(self) -> list[int]:
        return sorted({int(v) for layer in self.layers for v in np.unique(layer) if v})

    def mask(self, value: int | None) -> np.ndarray:
        out = np.zeros(self.layers[0].shape, bool)
        for layer in self.layers if value is not None else []:
            out |= layer == value
        return out


def read_label_file(path: str, what: str, grid: sitk.Image | None = None) -> LabelFile:
    """A result or a truth: a label map or a Slicer ``.seg.nrrd`` (layered too), placed on ``grid`` (the truth's;
    a map on part of it is padded); a file on another grid is refused naming both."""
    if is_dicom_seg(path):
        raise InputError(f"{what} {path}: a DICOM SEG; score takes label maps and .seg.nrrd files (export the "
                         "DICOM SEG to a label map, or evaluate it with its series through `evaluate`)")
    if slicer_layer_count(path) > 1:
        if grid is None:
            grid = sitk.VectorIndexSelectionCast(sitk.ReadImage(str(path)), 0)
        maps, names = read_layered_segmentation(path, grid, f"{what} {path}")
    else:
        image = read_image(path, what)
        maps = [labels_on_grid(image, path, image if grid is None else grid, "the truth")]
        names = slicer_segment_names(path)
    return LabelFile(str(path), [sitk.GetArrayFromImage(m) for m in maps], names, maps[0])


def class_pairs(result: LabelFile, truth: LabelFile, classes: str | None) -> list[tuple[str, int, int | None]]:
    """(name, truth value, result value or None) of each class to score: every class of the truth, or those
    ``classes`` asks for (segment names, label values of the truth, NAME=VALUE); a class is found in the result
    by name when both files name their classes, else by value."""
    truth_values = truth.values() or sorted(truth.names)
    wanted = class_requests(classes)
    if wanted is None:
        wanted = [(truth.names.get(v, f"label_{v}"), v) for v in truth_values]
    pairs = []
    for name, value in wanted:
        if value == 0:  # by name: the truth's segment of that name
            value = matching_value(name, 0, truth.names)
            if value is None:
                listed = ", ".join(repr(n) for n in truth.names.values()) or "none (a plain label map: give values)"
                raise InputError(f"classes: the truth {truth.path} has no segment named {name!r}; its segments: "
                                 f"{listed}", inputs=("classes",))
        named = value in truth.names
        label = truth.names.get(value, name)
        if value in {v for _, v, _ in pairs}:
            raise InputError(f"classes: {label} asked for twice (by name and by value?)", inputs=("classes",))
        pairs.append((label, value, matching_value(label if named else None, value, result.names)))
    return pairs


def score_pair(result_path: str, truth_path: str, classes: str | None) -> list[dict]:
    """The rows of one result against its truth: per class, Dice, HD95, ASSD (mm), both volumes (ml)."""
    truth = read_label_file(truth_path, "truth")
    result = read_label_file(result_path, "result", truth.image)
    pairs = class_pairs(result, truth, classes)
    unmatched = [result.names.get(v, str(v)) for v in result.values() if v not in {r for _, _, r in pairs}]
    if unmatched and classes is None:
        log.warning("%s: classes not in the truth %s, not scored: %s", result_path, truth_path, ", ".join(unmatched))
    spacing = truth.image.GetSpacing()[::-1]
    rows = []
    for name, value, found in pairs:
        if found is None:
            log.warning("%s: no class named %r (the truth's class %d); scored as empty", result_path, name, value)
        m = segment_metrics(result.mask(found), truth.mask(value), spacing)
        rows.append({"result": result_path, "truth": truth_path, "class": value, "class_name": name,
                     "result_class": "" if found is None else found} | {k: round(v, 5) for k, v in m.items()})
    return rows


def volume_files(folder: Path) -> dict[str, Path]:
    """The volumes of a folder by stem (``case01.nii.gz`` -> ``case01``); sidecars and pictures are left out."""
    return {split_volume_name(p.name)[0]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.lower().endswith((*VOLUME_EXTENSIONS, ".seg.nrrd")) and not p.name.startswith(".")}


def pair_folders(results: Path, truths: Path) -> list[tuple[str, str]]:
    """Results and truths of two folders paired by name: ``case01_seg.nii.gz`` (as ``segment`` names a cohort's
    outputs) or ``case01.nii.gz`` with the truth ``case01.nii.gz``; a result without a truth is refused, a truth
    without a result is named in a warning."""
    found, truth_files = volume_files(results), volume_files(truths)
    pairs, alone = [], []
    for stem, path in found.items():
        key = stem if stem in truth_files else stem.removesuffix("_seg")
        if key not in truth_files:
            alone.append(path.name)
        else:
            pairs.append((str(path), str(truth_files[key])))
    if alone:
        raise InputError(f"results without a truth of the same name in {truths}: {', '.join(alone[:5])}"
                         f"{' and more' if len(alone) > 5 else ''} (a result case01.nii.gz or case01_seg.nii.gz is "
                         "scored against case01.nii.gz)")
    missing = sorted(set(truth_files) - {split_volume_name(Path(t).name)[0] for _, t in pairs})
    if missing:
        log.warning("%d truths have no result in %s, not scored: %s", len(missing), results, ", ".join(missing))
    if not pairs:
        raise InputError(f"{results}: no result volume ({', '.join(VOLUME_EXTENSIONS)}) to score")
    return pairs


def check_score_args(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The RESULT TRUTH pairs (two folders: their files, paired by name when scored), checked before any work:
    an odd count, a missing file, a file beside a folder; the outputs written where they can be, an existing
    one replaced only when this command wrote it (or with --overwrite); ``--classes``' syntax."""
    class_requests(args.classes)
    for path, what, ours in ((args.csv, "--csv", first_line_is(",".join(FIELDS))),
                             (args.markdown, "--markdown", first_line_is(MARKDOWN_MARK)),
                             (args.json, "--json", lambda p: read_record(p) is not None)):
        if path:
            check_output_file(path, what, args.overwrite, ours)
    refuse_overwriting_inputs({"--csv": args.csv, "--markdown": args.markdown, "--json": args.json},
                              {f"path {i}": p for i, p in enumerate(args.pairs, 1)})
    return score_pairs(args.pairs)


def score_pairs(args_pairs: list[str]) -> list[tuple[str, str]]:
    """RESULT TRUTH [RESULT TRUTH ...] as pairs: an odd count, a missing file or a file beside a folder is
    refused."""
    if len(args_pairs) % 2:
        raise InputError(f"score takes RESULT TRUTH pairs; {len(args_pairs)} path{'s' if len(args_pairs) > 1 else ''} "
                         f"given (the last, {args_pairs[-1]}, has no partner)")
    pairs = list(zip(args_pairs[::2], args_pairs[1::2]))
    for result, truth in pairs:
        for what, path in (("result", result), ("truth", truth)):
            if not Path(path).exists():
                raise InputError(f"{what} {path}: file not found")
        if Path(result).is_dir() != Path(truth).is_dir():
            raise InputError(f"score {result} {truth}: give two files, or two folders (results, truths)")
    return pairs


def markdown(rows: list[dict]) -> str:
    """The scores as Markdown: a row per pair and class, then (several pairs) the mean per class (the file
    written starts with ``MARKDOWN_MARK``, an HTML comment Markdown does not show)."""
    lines = ["# Scores", "",
             "| result | truth | class | Dice | HD95 (mm) | ASSD (mm) | volume result (ml) | volume truth (ml) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {Path(r['result']).name} | {Path(r['truth']).name} | {r['class_name']} | {r['dice']:.4f} | "
              f"{r['hd95_mm']:.2f} | {r['assd_mm']:.2f} | {r['volume_pred_ml']:.2f} | {r['volume_true_ml']:.2f} |"
              for r in rows]
    if len({r["result"] for r in rows}) > 1:
        lines += ["", "## Mean per class", "", "| class | n | Dice mean | Dice median | Dice std | HD95 mean (mm) | "
                  "ASSD mean (mm) |", "|---|---|---|---|---|---|---|"]
        for name in dict.fromkeys(r["class_name"] for r in rows):
            sel = [r for r in rows if r["class_name"] == name]
            d = np.array([r["dice"] for r in sel], float)
            lines.append(f"| {name} | {len(sel)} | {d.mean():.4f} | {np.median(d):.4f} | {d.std():.4f} | "
                         f"{finite_mean([r['hd95_mm'] for r in sel]):.2f} | "
                         f"{finite_mean([r['assd_mm'] for r in sel]):.2f} |")
    return "\n".join(lines) + "\n"


def run_score(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> int:
    """Score every pair, print the Markdown, write the files asked for."""
    from iris_core.io.names import publish
    from iris_core.io.outputs import write_json_report

    expanded = []
    for result, truth in pairs:
        expanded += pair_folders(Path(result), Path(truth)) if Path(result).is_dir() else [(result, truth)]
    rows = [row for result, truth in expanded for row in score_pair(result, truth, args.classes)]
    text = markdown(rows)
    print(text, end="")
    if args.csv:
        write_csv(Path(args.csv), FIELDS, rows)
    if args.json:
        write_json_report(args.json, {"pairs": [{"result": r, "truth": t} for r, t in expanded], "rows": rows})
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.markdown).with_name(f".{Path(args.markdown).name}.partial")
        tmp.write_text(f"{MARKDOWN_MARK}\n{text}", encoding="utf-8")
        publish(tmp, Path(args.markdown))
    return 0

