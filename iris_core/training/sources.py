"""Task sources: volumes with label maps (or label generators) that episodes are drawn from."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from iris_core import sampledata
from iris_core.errors import ConfigError, InputError
from iris_core.io.datasets import load_nnunet
from iris_core.io.resample import crop_padded, resample_to
from iris_core.pipeline.policy import Preprocessing
from iris_core.pipeline.preprocess import prepare_image
from iris_core.training.config import TrainConfig
from iris_core.training.synth import random_label_map, relabel_groups, synthesize_image, warp_labels

TEMPLATE_LABELS = {"colin27": ("aal", "brodmann"), "icbm2009a": ("tissue",)}


class TemplateSource:
    """A real template on the model grid with every label set it carries; a task is the brain
    (rarely), one parcel, a random group of parcels, or a hemisphere (AAL: odd labels left)."""

    # task mix: whole brain rarely (a model that returns the brain must not get cheap reward)
    P_BRAIN, P_SINGLE, P_GROUP = 0.05, 0.6, 0.25

    def __init__(self, name: str, spacing: tuple[float, float, float], holdout: tuple[str, ...] = ()):
        if name not in TEMPLATE_LABELS:
            raise ConfigError(f"unknown template source {name!r}; known: {sorted(TEMPLATE_LABELS)}")
        load = sampledata.TEMPLATES[name]
        brain = load("brain")
        self.name = name
        self.modality = "MR"
        prep = prepare_image(brain.image, name, Preprocessing(spacing=spacing), "MR", multiple=16)
        self.image = torch.from_numpy(prep.array)
        self.background = float(prep.intensity.background)
        self.brain = torch.from_numpy(_nearest(brain.labels, prep.grid) > 0)
        self.label_sets: dict[str, tuple[torch.Tensor, list[int], dict[int, str]]] = {}
        self.held: dict[str, tuple[torch.Tensor, list[int], dict[int, str]]] = {}
        for key in TEMPLATE_LABELS[name]:
            sample = load(key)
            regions = torch.from_numpy(_nearest(sample.labels, prep.grid).astype(np.int64))
            vals, counts = np.unique(regions.numpy(), return_counts=True)
            values = [int(v) for v, c in zip(vals, counts) if v and c >= 20]
            held = {int(h.split(":")[1]) for h in holdout if h.split(":")[0] == key}
            self.label_sets[key] = (regions, [v for v in values if v not in held], sample.label_names)
            if held & set(values):
                self.held[key] = (regions, sorted(held & set(values)), sample.label_names)

    def held_out(self) -> TemplateSource:
        """A view of this template whose tasks are only the held-out parcels (one parcel per task)."""
        if not self.held:
            return self
        view = copy.copy(self)
        view.label_sets = self.held
        view.P_BRAIN, view.P_SINGLE, view.P_GROUP = 0.0, 1.0, 0.0
        return view

    def draw(self, k: int, rng: np.random.Generator):
        """(image, background, K task masks, brain mask for the skull-strip augmentation)."""
        return self.image, self.background, _draw_masks(self.sample_task, k, rng), self.brain

    def sample_task(self, rng: np.random.Generator) -> torch.Tensor:
        """One binary task (see the class docstring for the mix)."""
        r = rng.random()
        if r < self.P_BRAIN:
            return self.brain.clone()
        key = list(self.label_sets)[int(rng.integers(len(self.label_sets)))]
        regions, values, _ = self.label_sets[key]
        if r < self.P_BRAIN + self.P_SINGLE or len(values) < 3:
            return regions == int(rng.choice(values))
        if r < self.P_BRAIN + self.P_SINGLE + self.P_GROUP or key != "aal":
            chosen = rng.choice(values, size=int(rng.integers(2, min(12, len(values)) + 1)), replace=False)
            return torch.isin(regions, torch.as_tensor(chosen))
        parity = int(rng.integers(0, 2))
        return torch.isin(regions, torch.as_tensor([v for v in values if v % 2 == parity]))

    @property
    def tasks(self) -> list[tuple[str, int]]:
        """Named tasks for Hermes training: the brain and each parcel of the first label set."""
        _, values, names = next(iter(self.label_sets.values()))
        return [("brain", -1)] + [(names.get(v, f"region_{v}"), v) for v in values]

    def task_mask(self, value: int) -> torch.Tensor:
        regions = next(iter(self.label_sets.values()))[0]
        return self.brain.clone() if value == -1 else regions == value


class LabelSynthSource:
    """Label-to-image synthesis (SynthSeg manner): a label map - random smooth partition with blobs,
    or a crop of a real atlas's parcellation regrouped at random - deformed independently for
    reference and query, each view synthesised with its own per-label intensities. Only the
    reference mask says which structure is meant."""

    modality = "MR"
    query_jitter = 0.2  # fraction of the crop: the synthetic volume is little larger than a crop

    def __init__(self, base: str, spacing: tuple[float, float, float], holdout: tuple[str, ...] = ()):
        self.name = f"synth:{base}"
        self.atlas: torch.Tensor | None = None
        if base != "random":
            src = TemplateSource(base, spacing, holdout)
            key = next(iter(src.label_sets))  # the finest parcellation
            atlas = src.label_sets[key][0].clone()
            if key in src.held:  # held-out parcels are never a task: they join the background
                atlas[torch.isin(atlas, torch.as_tensor(src.held[key][1]))] = 0
            self.atlas = atlas

    def _base_labels(self, rng: np.random.Generator, size: int) -> torch.Tensor:

        if self.atlas is None:
            return random_label_map((size,) * 3, rng)
        fg = torch.nonzero(self.atlas)
        centre = fg.float().mean(0).numpy().astype(int) + rng.integers(-8, 9, 3)
        start = centre - size // 2
        crop = crop_padded(self.atlas, start, size, 0)
        return relabel_groups(crop, rng)

    def views(self, k: int, rng: np.random.Generator, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(query image, query masks), (reference image, reference masks)] of edge ``size`` plus a
        margin for the crop, K classes present in both."""

        for _ in range(20):
            base = self._base_labels(rng, size + size // 4)
            warped = [warp_labels(base, rng) for _ in range(2)]
            counts = [torch.bincount(w.flatten(), minlength=int(base.max()) + 1) for w in warped]
            ok = [v for v in range(len(counts[0])) if min(counts[0][v], counts[1][v]) >= 20]
            ok = [v for v in ok if counts[0][v] < 0.7 * base.numel()]  # not the whole crop
            if ok:
                break
        chosen = rng.permutation(ok)[:k]
        same = rng.random() < 0.5  # one contrast for both views (same scanner) or independent contrasts
        seed = int(rng.integers(2**31))
        out = []
        for w in warped:
            img = synthesize_image(w, np.random.default_rng(seed) if same else rng)
            out.append((img, torch.stack([w == int(v) for v in chosen])))
        return out


class NnunetSource:
    """Cases of an nnU-Net / MSD dataset preprocessed once onto the model grid (kept in memory)."""

    def __init__(self, folder: str, spacing: tuple[float, float, float]):

        refuse_evaluation_only(folder)
        ds = load_nnunet(folder)
        for case in ds.cases:
            for path in (case.image, case.labels):
                if isinstance(path, (str, Path)):
                    refuse_evaluation_only(path)
        self.name = ds.name
        self.modality = ds.modality if ds.modality != "auto" else "MR"
        self.label_names = ds.label_names
        self.cases = []
        for case in ds.cases:
            img, lab = case.read()
            prep = prepare_image(img, case.name, Preprocessing(spacing=spacing), self.modality, multiple=16)
            labels = torch.from_numpy(_nearest(lab, prep.grid).astype(np.int64))
            self.cases.append((torch.from_numpy(prep.array), labels, float(prep.intensity.background)))
        self.values = sorted({int(v) for _, lab, _ in self.cases for v in torch.unique(lab).tolist() if v})
        if not self.values:
            raise InputError(f"{folder}: no labels")

    @property
    def tasks(self) -> list[tuple[str, int]]:
        return [(self.label_names.get(v, f"label_{v}"), v) for v in self.values]

    def cases_with(self, value: int) -> list[int]:
        return [i for i, (_, lab, _) in enumerate(self.cases) if bool((lab == value).any())]


def _nearest(labels: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(resample_to(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32))



def _draw_masks(sample, k: int, rng: np.random.Generator, min_voxels: int = 10) -> torch.Tensor:
    masks = []
    for _ in range(50 * k):
        m = sample(rng)
        if int(m.sum()) > min_voxels:
            masks.append(m)
        if len(masks) == k:
            break
    if not masks:
        raise ValueError("task source produced only empty tasks")
    return torch.stack(masks)


class ClusterSource:
    """Class-agnostic tasks of an unlabelled volume (the annotation-free recipe of MASS): intensity
    clusters of the smoothed image inside its foreground, split into connected components."""

    def __init__(self, path: str, spacing: tuple[float, float, float], name: str | None = None):
        from scipy import ndimage

        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
        self.name = name or Path(path).name.split(".")[0]
        self.modality = "MR"
        prep = prepare_image(img, self.name, Preprocessing(spacing=spacing), "MR", multiple=16)
        self.image = torch.from_numpy(prep.array)
        self.background = float(prep.intensity.background)
        arr = ndimage.gaussian_filter(prep.array, 1.0)
        fg = arr > self.background + 0.5
        bins = np.quantile(arr[fg], [0.2, 0.4, 0.6, 0.8]) if fg.any() else []
        cluster = np.digitize(arr, bins) + 1
        cluster[~fg] = 0
        self.components = []
        for c in range(1, len(bins) + 2):
            lab, n = ndimage.label(cluster == c)
            sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
            for i in np.argsort(sizes)[::-1][:8]:
                if sizes[i] >= 30:
                    self.components.append(torch.from_numpy(lab == i + 1))
        self.foreground = torch.from_numpy(fg)
        if not self.components:
            raise InputError(f"{path}: no usable intensity clusters")

    def draw(self, k: int, rng: np.random.Generator):
        def sample(r):
            if r.random() < 0.15:
                return self.foreground.clone()
            return self.components[int(r.integers(len(self.components)))]

        return self.image, self.background, _draw_masks(sample, k, rng), None


class SyntheticSource:
    """Procedural volumes: smooth random shapes with their own textures, partial-volume edges and a
    bias field; each shape is a task. Teaches "copy what the reference shows" independently of anatomy."""

    name = "synthetic"
    modality = "MR"

    def __init__(self, shape: tuple[int, int, int] = (64, 64, 64), n_shapes: tuple[int, int] = (3, 8)):
        self.shape, self.n_shapes = shape, n_shapes
        self.background = 0.0

    def scene(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d, h, w = self.shape
        zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in self.shape], indexing="ij")
        labels = torch.zeros(self.shape, dtype=torch.int64)
        image = torch.zeros(self.shape)
        n = int(rng.integers(*self.n_shapes))
        for i in range(1, n + 1):
            c = torch.tensor(rng.uniform(-0.6, 0.6, 3), dtype=torch.float32)
            radii = torch.tensor(rng.uniform(0.08, 0.35, 3), dtype=torch.float32)
            coarse = torch.from_numpy(rng.normal(0, 0.25, (1, 1, 4, 4, 4)).astype(np.float32))
            wobble = F.interpolate(coarse, size=self.shape, mode="trilinear", align_corners=False)[0, 0]
            r = ((zz - c[0]) / radii[0]) ** 2 + ((yy - c[1]) / radii[1]) ** 2 + ((xx - c[2]) / radii[2]) ** 2
            inside = (r + wobble) < 1.0
            labels[inside] = i
        base = torch.from_numpy(rng.uniform(0.2, 1.0, n + 1).astype(np.float32))
        base[0] = float(rng.uniform(0.0, 0.15))
        image = base[labels]
        texture = torch.from_numpy(rng.normal(0, 1, (1, 1, 16, 16, 16)).astype(np.float32))
        texture = F.interpolate(texture, size=self.shape, mode="trilinear", align_corners=False)[0, 0]
        image = image + 0.05 * texture
        image = F.avg_pool3d(image[None, None], 3, stride=1, padding=1)[0, 0]  # partial-volume edges
        return (image - image.mean()) / (image.std() + 1e-6), labels

    def draw(self, k: int, rng: np.random.Generator):
        image, labels = self.scene(rng)
        values = [int(v) for v in torch.unique(labels).tolist() if v]
        chosen = rng.permutation(values)[:k]
        masks = torch.stack([labels == int(v) for v in chosen])
        return image, float(image.min()), masks, None



def _build_sources(cfg: TrainConfig, spacing) -> list:
    """The task sources a config names: templates, ``synthetic``, ``synth:random`` /
    ``synth:<template>`` (label-to-image), ``unlabelled:<file>``, plus nnU-Net datasets."""
    sources: list = []
    for s in cfg.sources:
        refuse_evaluation_only(s.split(":", 1)[1] if s.startswith(("unlabelled:", "synth:")) else s)
        if s == "synthetic":
            sources.append(SyntheticSource())
        elif s.startswith("synth:"):
            sources.append(LabelSynthSource(s.split(":", 1)[1], spacing, holdout=cfg.holdout))
        elif s.startswith("unlabelled:"):  # class-agnostic masks of an unlabelled volume
            sources.append(ClusterSource(s.split(":", 1)[1], spacing))
        elif s in TEMPLATE_LABELS:
            sources.append(TemplateSource(s, spacing, cfg.holdout))
        else:
            raise InputError(f"unknown task source {s!r}; use one of {sorted(TEMPLATE_LABELS)}, 'synthetic', "
                             "'synth:random', 'synth:<template>', 'unlabelled:<file>'")
    sources += [NnunetSource(d, spacing) for d in cfg.datasets]
    if not sources:
        raise InputError("no task source: set 'sources' and/or 'datasets'")
    return sources


# file-name fragments of data that is only ever evaluated on: the macaque template and the volumes (and head
# CT) of the compatibility fixtures
EVALUATION_ONLY = ("inia19", "invesalius", "ct_target", "ct_reference", "mr_target", "mr_reference")


def refuse_evaluation_only(name: str | Path) -> None:
    """The evaluation-only rule: a task source, file or dataset folder whose name holds an EVALUATION_ONLY
    fragment is refused, naming it (every source a config names passes here, and every case of a dataset)."""
    text = Path(str(name)).name.lower()
    hit = next((h for h in EVALUATION_ONLY if h in text), None)
    if hit:
        raise InputError(f"{name} is evaluation-only data ({hit!r}: a held-out species, modality or compatibility "
                         "fixture): never trained on")
