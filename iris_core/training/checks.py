"""Collapse detector: does a model's prediction follow its reference?

K different structures are marked on ONE image. Each mask in turn is the reference; the model
segments a rigidly moved copy of the same image (so copying the mask back is impossible), one
class per pass and all K in one pass. A model that has learnt in-context segmentation gives K
different predictions, each close to its own structure; a collapsed model (one that returns the
brain whatever the reference shows) gives K near-identical predictions. The report holds the
pairwise Dice of the predictions, the Dice of every prediction with every truth, the cosine
similarity of the K task embeddings and a verdict with its rule spelt out.

``reference_sensitivity`` works on tensors already on the model grid (what a trainer holds);
``standard_check`` builds the standard case (Colin27 at the model's spacing, ten structures).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iris_core import sampledata
from iris_core.api import resolve_model, segment
from iris_core.errors import InputError
from iris_core.hub.checkpoint import LoadedModel
from iris_core.io.resample import labels_to_masks
from iris_core.metrics import dice_score
from iris_core.pipeline.device import select_device
from iris_core.pipeline.embedding import is_memory
from iris_core.pipeline.preprocess import prepare_image
from iris_core.sampledata import COPY_STRUCTURES, aal_values, copy_labels
from iris_core.types import ClassSpec, Reference

# The verdict's rule (see SensitivityReport.passed): every threshold in one place.
MIN_IDENTIFIED = 0.7  # share of classes whose prediction overlaps its own truth more than any other truth
MIN_MARGIN = 0.2  # mean own-truth Dice minus mean other-truth Dice
MAX_EXCESS_AGREEMENT = 0.2  # mean off-diagonal prediction Dice minus the same mean over the truths

# The moved view: a rigid rotation about a fixed oblique axis and a shift in voxels (model grid).
MOVE_ANGLE_DEG = 10.0
MOVE_SHIFT_VOX = (3.0, -2.0, 2.0)  # (z, y, x)


Matrix = tuple[tuple[float, ...], ...]


def _matrix(a: np.ndarray) -> Matrix:
    return tuple(tuple(round(float(x), 4) for x in row) for row in a)


def dice_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Dice of every mask of ``a`` [K, ...] with every mask of ``b`` [L, ...] (bool): [K, L];
    two empty masks score 1."""
    a2, b2 = a.flatten(1).float(), b.flatten(1).float()
    inter = a2 @ b2.T
    total = a2.sum(1)[:, None] + b2.sum(1)[None, :]
    out = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return out.cpu().numpy().astype(np.float64)


def cosine_matrix(embedding: list[torch.Tensor]) -> np.ndarray:
    """Cosine similarity of the K class embeddings, every stage's tokens (memory samples left out)
    flattened into one vector.
    ``embedding`` is the model's list of [1, K, T, C_s] tensors."""

    flat = torch.cat([e[0].reshape(e.shape[1], -1).float() for e in embedding if not is_memory(e[0])], dim=1)
    flat = F.normalize(flat, dim=1)
    return (flat @ flat.T).cpu().numpy().astype(np.float64)


def rotation_matrix(axis: tuple[float, float, float], angle_deg: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    a = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def move_rigid(image: torch.Tensor, masks: torch.Tensor, angle_deg: float = MOVE_ANGLE_DEG,
               shift_vox: tuple[float, float, float] = MOVE_SHIFT_VOX,
               axis: tuple[float, float, float] = (1.0, 0.6, 0.3)) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rigid motion (rotation about the volume centre, shift in voxels, in (z, y, x)) applied
    to ``image`` [1, 1, D, H, W] (linear; outside filled with its minimum) and ``masks`` [K, D, H, W]
    (nearest). The motion is built in voxel units, so it stays rigid on any grid shape."""
    d, h, w = image.shape[2:]
    # affine_grid maps output to input coordinates in normalised (x, y, z) order
    half = np.array([(w - 1) / 2, (h - 1) / 2, (d - 1) / 2])
    rot = rotation_matrix(axis, angle_deg)
    shift = np.array(shift_vox[::-1], dtype=np.float64)
    a = np.diag(1 / half) @ rot @ np.diag(half)
    t = -(np.diag(1 / half) @ rot @ shift)
    theta = torch.tensor(np.concatenate([a, t[:, None]], 1), dtype=torch.float32, device=image.device)[None]
    grid = F.affine_grid(theta, [1, 1, d, h, w], align_corners=True)
    floor = image.min()
    moved = F.grid_sample(image - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + floor
    m = F.grid_sample(masks.float()[None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
    return moved, m > 0.5


@dataclass(frozen=True)
class SensitivityReport:
    """What :func:`reference_sensitivity` measured. Rows are predictions (one per reference mask),
    columns truths / predictions in the order of ``names``."""

    names: tuple[str, ...]
    truth_dice: Matrix  # Dice between the K moved truth masks (what a perfect model's predictions agree)
    pred_dice: Matrix  # Dice between the K one-class predictions
    pred_truth_dice: Matrix  # [i][j] Dice of one-class prediction i with truth j
    joint_pred_dice: Matrix  # as pred_dice, all K classes in one pass
    joint_pred_truth_dice: Matrix  # as pred_truth_dice, all K classes in one pass
    embedding_cosine: Matrix  # cosine similarity of the K task embeddings (all stages flattened)
    own_dice: float  # mean diagonal of pred_truth_dice
    other_dice: float  # mean off-diagonal of pred_truth_dice
    identified: float  # share of rows whose largest entry is on the diagonal
    pred_agreement: float  # mean off-diagonal of pred_dice
    truth_agreement: float  # mean off-diagonal of truth_dice
    joint_own_dice: float
    joint_identified: float
    embedding_cosine_mean: float  # mean off-diagonal of embedding_cosine
    passed: bool
    rule: str
    moved: bool
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (meaningful when the machine is shared)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def to_markdown(self, title: str = "Reference sensitivity") -> str:
        """The verdict, the summary figures and the matrices as Markdown tables."""
        short = [f"{i + 1}" for i in range(len(self.names))]
        lines = [f"# {title}", "",
                 f"**{'PASSED' if self.passed else 'FAILED'}**: {self.rule}", "",
                 f"Target: {'a rigidly moved copy of' if self.moved else ''} the reference image; "
                 f"{len(self.names)} structures; {self.seconds:.1f} s ({self.cpu_seconds:.1f} s of CPU time).", "",
                 "| figure | one class per pass | all classes in one pass |", "|---|---|---|",
                 f"| mean Dice with own truth | {self.own_dice:.3f} | {self.joint_own_dice:.3f} |",
                 f"| mean Dice with the other truths | {self.other_dice:.3f} | "
                 f"{_offdiag_mean(np.array(self.joint_pred_truth_dice)):.3f} |",
                 f"| share of predictions closest to their own truth | {self.identified:.2f} | "
                 f"{self.joint_identified:.2f} |",
                 f"| mean Dice between predictions (truths: {self.truth_agreement:.3f}) | "
                 f"{self.pred_agreement:.3f} | {_offdiag_mean(np.array(self.joint_pred_dice)):.3f} |",
                 f"| mean cosine between task embeddings | {self.embedding_cosine_mean:.3f} | |", "",
                 "Structures: " + ", ".join(f"{s} {n}" for s, n in zip(short, self.names)), ""]
        for label, mat, what in (
                ("Dice of each one-class prediction (row) with each truth (column)", self.pred_truth_dice, "pred"),
                ("Dice between one-class predictions", self.pred_dice, "pred"),
                ("Dice between the truths (what a perfect model's predictions would give)", self.truth_dice, "truth"),
                ("Dice of each prediction with each truth, all classes in one pass", self.joint_pred_truth_dice,
                 "pred"),
                ("Cosine similarity between task embeddings", self.embedding_cosine, "emb")):
            lines += [f"## {label}", "", "| " + what + " | " + " | ".join(short) + " |",
                      "|---" * (len(short) + 1) + "|"]
            lines += [f"| {s} | " + " | ".join(f"{x:.2f}" for x in row) + " |" for s, row in zip(short, mat)]
            lines.append("")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """PNG: prediction-vs-truth Dice, prediction-vs-prediction Dice and embedding cosines as heat maps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("prediction (row) vs truth Dice", self.pred_truth_dice, (0, 1)),
                  ("Dice between predictions", self.pred_dice, (0, 1)),
                  ("task-embedding cosine", self.embedding_cosine, (-1, 1))]
        k = len(self.names)
        fig, axes = plt.subplots(1, 3, figsize=(6 + 1.2 * k, 2.6 + 0.4 * k))
        for ax, (label, mat, (lo, hi)) in zip(axes, panels):
            arr = np.array(mat)
            im = ax.imshow(arr, vmin=lo, vmax=hi, cmap="viridis")
            ax.set_title(label, fontsize=9)
            ax.set_xticks(range(k), [n[:14] for n in self.names], rotation=90, fontsize=7)
            ax.set_yticks(range(k), [n[:14] for n in self.names], fontsize=7)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if arr[i, j] < lo + 0.6 * (hi - lo) else "black")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{title + ': ' if title else ''}{'PASSED' if self.passed else 'FAILED'} "
                     f"(own {self.own_dice:.2f}, other {self.other_dice:.2f}, identified {self.identified:.0%}, "
                     f"agreement {self.pred_agreement:.2f} vs truths {self.truth_agreement:.2f})", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _offdiag_mean(a: np.ndarray) -> float:
    k = a.shape[0]
    if k < 2:
        return math.nan
    return float((a.sum() - np.trace(a)) / (k * k - k))


def _identified(pred_truth: np.ndarray) -> float:
    """Share of rows whose own truth scores strictly highest (ties count as not identified)."""
    hits = 0
    for i, row in enumerate(pred_truth):
        others = np.delete(row, i)
        hits += bool(row[i] > others.max()) if others.size else True
    return hits / len(pred_truth)


def verdict(own: float, other: float, identified: float, joint_identified: float, pred_agreement: float,
            truth_agreement: float) -> tuple[bool, str]:
    """The pass rule and its wording with the measured figures."""
    checks = [
        (identified >= MIN_IDENTIFIED, f"{identified:.0%} of one-class predictions closest to their own truth "
                                        f"(need >= {MIN_IDENTIFIED:.0%})"),
        (joint_identified >= MIN_IDENTIFIED, f"{joint_identified:.0%} of the all-in-one-pass predictions closest "
                                              f"to their own truth (need >= {MIN_IDENTIFIED:.0%})"),
        (own - other >= MIN_MARGIN, f"mean Dice with own truth {own:.3f} vs other truths {other:.3f} "
                                    f"(need a margin >= {MIN_MARGIN})"),
        (pred_agreement - truth_agreement <= MAX_EXCESS_AGREEMENT,
         f"predictions agree at mean Dice {pred_agreement:.3f} where the truths agree at {truth_agreement:.3f} "
         f"(need at most {MAX_EXCESS_AGREEMENT} more)"),
    ]
    passed = all(ok for ok, _ in checks)
    return passed, "; ".join(("ok: " if ok else "FAILS: ") + text for ok, text in checks)


@torch.no_grad()
def reference_sensitivity(model, image: torch.Tensor, masks: torch.Tensor, names: list[str],
                          device: str | torch.device = "cpu", move: bool = True) -> SensitivityReport:
    """Encode a task from each of the K ``masks`` [K, D, H, W] (bool, K >= 2 different structures on
    ``image`` [1, 1, D, H, W], a preprocessed volume on the model grid, edges multiples of 16), segment
    a rigidly moved copy of the image (``move=False``: the image itself) one class per pass and all K
    in one pass, and compare predictions with each other and with the moved truths. ``model`` is an
    IrisNet; it is used in eval mode on ``device`` and handed back where and as it was."""
    t0, c0 = time.perf_counter(), time.process_time()
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"image must be [1, 1, D, H, W], got {tuple(image.shape)}")
    if masks.ndim != 4 or masks.shape[1:] != image.shape[2:]:
        raise ValueError(f"masks must be [K, D, H, W] on the image's grid {tuple(image.shape[2:])}, "
                         f"got {tuple(masks.shape)}")
    k = masks.shape[0]
    if k < 2 or len(names) != k:
        raise ValueError(f"need K >= 2 masks and one name each (got {k} masks, {len(names)} names)")
    if any(s % 16 for s in image.shape[2:]):
        raise ValueError(f"image edges {tuple(image.shape[2:])} must be multiples of 16 (the model grid)")
    masks = masks.bool()
    empty = [n for n, m in zip(names, masks) if not m.any()]
    if empty:
        raise ValueError(f"empty reference masks: {empty}")
    dev = torch.device(device)
    param = next(model.parameters())
    was_device, was_training = param.device, model.training
    model.to(dev).eval()
    try:
        image, masks = image.to(dev, torch.float32), masks.to(dev)
        target, truth = move_rigid(image, masks) if move else (image, masks)
        embedding = model.encode_task(image, masks[None].float())  # [1, K, T, C] per stage
        feats = model.encoder(target)  # encoded once, decoded K + 1 times
        # one class per pass: the K single-class embeddings as a batch of K decodes
        single = [e[0][:, None] for e in embedding]  # [K, 1, T, C]
        preds = model.segment_from_features(feats, single)[:, 0] > 0  # sigmoid > 0.5
        joint = model.segment_from_features(feats, embedding)[0] > 0
    finally:
        model.to(was_device).train(was_training)
    truth_dice = dice_matrix(truth, truth)
    pred_dice = dice_matrix(preds, preds)
    pred_truth = dice_matrix(preds, truth)
    joint_pred = dice_matrix(joint, joint)
    joint_truth = dice_matrix(joint, truth)
    cos = cosine_matrix([e.cpu() for e in embedding])
    own, other = float(np.mean(np.diag(pred_truth))), _offdiag_mean(pred_truth)
    identified, joint_identified = _identified(pred_truth), _identified(joint_truth)
    agreement, truth_agreement = _offdiag_mean(pred_dice), _offdiag_mean(truth_dice)
    passed, rule = verdict(own, other, identified, joint_identified, agreement, truth_agreement)
    return SensitivityReport(
        names=tuple(names), truth_dice=_matrix(truth_dice), pred_dice=_matrix(pred_dice),
        pred_truth_dice=_matrix(pred_truth), joint_pred_dice=_matrix(joint_pred),
        joint_pred_truth_dice=_matrix(joint_truth), embedding_cosine=_matrix(cos),
        own_dice=round(own, 4), other_dice=round(other, 4), identified=round(identified, 4),
        pred_agreement=round(agreement, 4), truth_agreement=round(truth_agreement, 4),
        joint_own_dice=round(float(np.mean(np.diag(joint_truth))), 4), joint_identified=round(joint_identified, 4),
        embedding_cosine_mean=round(_offdiag_mean(cos), 4), passed=passed, rule=rule, moved=move,
        seconds=round(time.perf_counter() - t0, 2), cpu_seconds=round(time.process_time() - c0, 2))


# -- the standard case: Colin27 at the model's spacing -----------------------------------------

#: The ten reference structures of the standard check, as sets of Colin27 AAL region names
#: ("brain" is ch2bet > 0). Large and small, nested and disjoint, single regions and groups.
STANDARD_STRUCTURES: dict[str, tuple[str, ...]] = {
    "brain": ("brain",),
    "left cerebral hemisphere": ("*_L",),  # every AAL cerebral region of the left side
    "cerebellum": ("Cerebelum_*", "Vermis_*"),
    "thalamus": ("Thalamus_L", "Thalamus_R"),
    "striatum": ("Caudate_L", "Caudate_R", "Putamen_L", "Putamen_R"),
    "left precentral gyrus": ("Precentral_L",),
    "right superior temporal gyrus": ("Temporal_Sup_R",),
    "occipital lobe": ("Occipital_Sup_L", "Occipital_Sup_R", "Occipital_Mid_L", "Occipital_Mid_R",
                       "Occipital_Inf_L", "Occipital_Inf_R", "Calcarine_L", "Calcarine_R", "Cuneus_L",
                       "Cuneus_R", "Lingual_L", "Lingual_R"),
    "left middle frontal gyrus": ("Frontal_Mid_L",),
    "insula": ("Insula_L", "Insula_R"),
}


def standard_case(preprocessing, structures: dict[str, tuple[str, ...]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Colin27 T1 prepared on a model grid of ``preprocessing`` (a checkpoint's Preprocessing) and
    the masks [K, D, H, W] of ``structures`` (default: STANDARD_STRUCTURES) on that grid."""
    import SimpleITK as sitk


    structures = structures or STANDARD_STRUCTURES
    aal = sampledata.colin27("aal")
    brain = sampledata.colin27("brain")
    prep = prepare_image(aal.image, "colin27", preprocessing, "MR", multiple=16)
    # one label map holding every structure at once would force them disjoint: build each mask alone
    aal_arr = sitk.GetArrayViewFromImage(aal.labels)
    masks = []
    for patterns in structures.values():
        if patterns == ("brain",):
            lab = brain.labels
        else:
            sel = np.isin(aal_arr, aal_values(patterns, aal.label_names)).astype(np.uint8)
            lab = sitk.GetImageFromArray(sel)
            lab.CopyInformation(aal.labels)
        masks.append(labels_to_masks(lab, prep.grid, [1])[0])
    image = torch.from_numpy(prep.array)[None, None]
    return image, torch.from_numpy(np.stack(masks).astype(bool)), list(structures)


def copy_case(preprocessing) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The copy test's case on a model grid: Colin27 and the masks of COPY_STRUCTURES (see standard_case)."""
    return standard_case(preprocessing, COPY_STRUCTURES)


def standard_check(model="default", device: str = "cpu", out_dir: str | Path | None = None,
                   title: str | None = None) -> SensitivityReport:
    """:func:`reference_sensitivity` on Colin27 at the model's spacing with the ten structures of
    STANDARD_STRUCTURES. ``model`` is a model file, 'default', 'preset:NAME' or a LoadedModel. With
    ``out_dir``: writes check.json, check.md and check.png there."""

    loaded = model if isinstance(model, LoadedModel) else resolve_model(str(model))
    if loaded.arch != "iris":

        raise InputError(f"{loaded.source} is a {loaded.arch} model; the reference check needs an Iris model")

    image, masks, names = standard_case(loaded.preprocessing)
    report = reference_sensitivity(loaded.model, image, masks, names, device=select_device(str(device)))
    if out_dir is not None:
        out = Path(out_dir)
        title = title or f"Reference sensitivity of {loaded.name} (Colin27, {len(names)} structures)"
        report.to_json(out / "check.json")
        (out / "check.md").write_text(report.to_markdown(title) + "\n", encoding="utf-8")
        report.plot(out / "check.png", loaded.name)
    return report


# -- the copy test: the reference image itself as the target ------------------------------------

#: The copy test passes when the mean Dice of the ten structures reaches this (issue [11]'s goal).
COPY_MIN_DICE = 0.85


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_test` measured: per-structure Dice of the labels given back, through the whole
    pipeline (preprocessing, reference crop, sliding windows, back onto the 1 mm target grid)."""

    model: str
    names: tuple[str, ...]
    dice: tuple[float, ...]
    mean_dice: float
    passed: bool
    rule: str
    seconds: float
    cpu_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    def to_markdown(self, title: str = "Copy test") -> str:
        lines = [f"# {title}", "", f"**{'PASSED' if self.passed else 'FAILED'}**: {self.rule}", "",
                 f"Model {self.model}; reference Colin27 with {len(self.names)} bilateral AAL gyri, target the same "
                 f"Colin27 image; {self.seconds:.1f} s ({self.cpu_seconds:.1f} s of CPU time).", "",
                 "| structure | Dice |", "|---|---|"]
        lines += [f"| {n} | {d:.3f} |" for n, d in zip(self.names, self.dice)]
        lines += [f"| **mean** | **{self.mean_dice:.3f}** |", ""]
        return "\n".join(lines)


def copy_test(model="default", device: str = "cpu", out_dir: str | Path | None = None,
              **options) -> CopyReport:
    """The copy test (issue [11]): Colin27 with the ten gyri of COPY_STRUCTURES as the reference, the same
    image as the target, segmented by the one pipeline users run (``api.segment``, keyword ``options`` as
    its SegmentOptions fields); Dice of each structure against the reference's own labels. A model that
    ignores its reference, or loses what it shows, cannot give them back. With ``out_dir``: copy.json and
    copy.md there."""
    import SimpleITK as sitk


    t0, c0 = time.perf_counter(), time.process_time()
    loaded = model if isinstance(model, LoadedModel) else resolve_model(str(model))
    if loaded.arch != "iris":

        raise InputError(f"{loaded.source} is a {loaded.arch} model; the copy test needs an Iris model")
    image, labels, names = copy_labels()
    ref = Reference(image, labels, "colin27")
    classes = [ClassSpec(n, i) for i, n in enumerate(names, start=1)]
    result = segment(image, [ref], classes, model=loaded, device=device, **options)
    got = sitk.GetArrayViewFromImage(result.labels)
    truth = sitk.GetArrayViewFromImage(labels)
    scores = tuple(round(float(dice_score(got == i, truth == i)), 4) for i in range(1, len(names) + 1))
    mean = float(np.mean(scores))
    passed = mean >= COPY_MIN_DICE
    rule = f"mean Dice {mean:.3f} of the reference's own labels given back (need >= {COPY_MIN_DICE})"
    report = CopyReport(loaded.name, tuple(names), scores, round(mean, 4), passed, rule,
                        round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2))
    if out_dir is not None:
        report.to_json(Path(out_dir) / "copy.json")
        (Path(out_dir) / "copy.md").write_text(report.to_markdown(f"Copy test of {loaded.name}") + "\n",
                                               encoding="utf-8")
    return report
