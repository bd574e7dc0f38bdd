"""Episodes: reference and query views of one task source, cropped, batched."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from iris_core.errors import ConfigError
from iris_core.io.resample import crop_padded
from iris_core.pipeline.align import AlignmentError, align_affine
from iris_core.training.config import TrainConfig
from iris_core.training.deform import random_warp
from iris_core.training.sources import NnunetSource


def random_intensity(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Gamma, smooth multiplicative bias field, contrast and Gaussian noise; re-standardised."""
    lo = float(image.min())
    x = image - lo
    x = x / (float(x.max()) + 1e-6)
    x = x ** float(np.exp(rng.uniform(-0.4, 0.4)))
    coarse = torch.from_numpy(rng.normal(0, 0.15, (1, 1, 4, 4, 4)).astype(np.float32))
    bias = torch.exp(F.interpolate(coarse, size=image.shape, mode="trilinear", align_corners=False)[0, 0])
    x = x * bias + torch.randn_like(x) * float(rng.uniform(0, 0.05))
    return (x - x.mean()) / (x.std() + 1e-6)


def make_episode(sources: list, cfg: TrainConfig, size: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, ...]:
    """(query [1,D,H,W], query masks [K,...], reference [1,...], reference masks [K,...]) from a
    volume source: two independent random deformations and intensity changes of one volume."""
    src = sources[int(rng.integers(len(sources)))]
    k = int(rng.integers(1, cfg.max_classes + 1))
    if hasattr(src, "views"):  # the source makes its own two views (label-to-image synthesis)
        (q, qm), (r, rm) = src.views(k, rng, size)
    else:
        image, background, masks, brain = src.draw(k, rng)
        views = []
        skull = brain is not None and rng.random() < cfg.skullstrip_prob
        for _ in range(2):
            img = image.clone()
            if skull:
                img = torch.where(brain, img, torch.full_like(img, background))
            wimg, wm = random_warp(img, masks, background, rng)
            views.append((random_intensity(wimg, rng), wm))
        (q, qm), (r, rm) = views
    copy = bool(cfg.copy_prob and rng.random() < cfg.copy_prob)
    if copy:
        q, qm = r, rm  # a copy episode: the reference's own view, cropped elsewhere below
    mapping = _alignment(q, r, cfg, rng, copy)
    out = []
    # the query crop wanders far from the structures (they may be cut or absent: "nothing here" is a
    # valid answer); the reference crop stays centred on them
    q_jitter = int(getattr(src, "query_jitter", 0.5) * size)
    own = False if mapping is False else _same  # the query's positions are its own (a model without: none)
    for img, m, jitter, where in ((q, qm, q_jitter, own), (r, rm, size // 8, mapping)):
        out += _crop_pair(img, m, size, jitter, rng, where, cfg)
    if cfg.same_view:
        out[:2] = out[2:]
    return tuple(out)


def _same(points: np.ndarray) -> np.ndarray:
    return points


def _alignment(query: torch.Tensor, reference: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator,
               copy: bool = False):
    """How the reference view's positions map into the query view's space for a model with a position-aware
    readout (issue [20]): the pipeline's own affine alignment of the two views, as users run it (a copy
    episode: the identity, which the alignment of an image with itself gives); None (positions unknown,
    read by features alone) for a share ``1 - align_prob`` of the episodes and where the alignment fails;
    nothing for other models."""
    if not cfg.memory_positions:
        return False
    if rng.random() >= cfg.align_prob:
        return None
    if copy:
        return _same
    spacing = cfg.grid()[0]
    try:
        return align_affine(_as_image(query, spacing), _as_image(reference, spacing)).apply
    except AlignmentError:
        return None


def _as_image(volume: torch.Tensor, spacing: tuple[float, ...]) -> sitk.Image:
    img = sitk.GetImageFromArray(volume.numpy().astype(np.float32, copy=False))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def make_nnunet_episode(src: NnunetSource, cfg: TrainConfig, size: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, ...]:
    """Iris episode from a labelled dataset: reference and query are different cases (when the
    dataset has several) holding the same labels; each is warped and re-contrasted independently."""
    k = int(rng.integers(1, cfg.max_classes + 1))
    first = int(rng.choice(src.values))
    candidates = src.cases_with(first)
    qi = int(rng.choice(candidates))
    others = [c for c in candidates if c != qi]
    ri = int(rng.choice(others)) if others else qi
    shared = [v for v in src.values if v != first and bool((src.cases[qi][1] == v).any())
              and bool((src.cases[ri][1] == v).any())]
    values = [first] + [int(v) for v in rng.permutation(shared)[: k - 1]]
    views = []
    for idx in (qi, ri):
        img, lab, bg = src.cases[idx]
        masks = torch.stack([lab == v for v in values])
        wimg, wm = random_warp(img, masks, bg, rng)
        views.append((random_intensity(wimg, rng), wm))
    mapping = _alignment(views[0][0], views[1][0], cfg, rng)
    out = []
    own = False if mapping is False else _same
    for (img, m), jitter, where in ((views[0], size // 3, own), (views[1], size // 8, mapping)):
        out += _crop_pair(img, m, size, jitter, rng, where, cfg)
    return tuple(out)


def _crop_pair(img: torch.Tensor, masks: torch.Tensor, size: int, jitter: int, rng: np.random.Generator,
               positions=False, cfg: TrainConfig | None = None):
    """The image [1, s, s, s] and masks [K, s, s, s] of a crop near the masks; with ``positions`` (a mapping
    of this view's points, mm, into the query's space; None: unknown) the image carries each voxel's
    position as channels 1-3 (x, y, z mm), as the pipeline's windows do."""
    zyx = np.argwhere(masks.any(0).numpy())
    centre = np.array(img.shape) // 2 if len(zyx) == 0 else (zyx.min(0) + zyx.max(0)) // 2
    start = centre - size // 2 + rng.integers(-jitter, jitter + 1, 3)
    image = crop_padded(img[None], start, size, float(img.min()))
    if positions is not False:
        spacing = np.array(cfg.grid()[0])[::-1]  # z, y, x
        idx = np.stack(np.meshgrid(*[np.arange(s0, s0 + size) for s0 in start], indexing="ij"), -1)
        points = (idx * spacing)[..., ::-1].reshape(-1, 3)  # x, y, z mm, the view's own space
        mapped = np.full_like(points, np.nan) if positions is None else positions(points)
        where = torch.from_numpy(mapped.reshape(size, size, size, 3).transpose(3, 0, 1, 2).astype(np.float32))
        image = torch.cat([image, where])
    return [image, crop_padded(masks.float(), start, size, 0.0)]


HERMES_MODALITY = {"CT": 0, "PET": 1, "MR": 2}


class TaskTable:
    """Global task indices over all sources (Hermes): source, value, name, modality slot."""

    def __init__(self, sources: list):
        self.entries = []
        for si, src in enumerate(sources):
            if not hasattr(src, "tasks"):
                raise ConfigError(f"task source {getattr(src, 'name', src)!r} has no named tasks; Hermes trains on "
                                 "labelled sources only (templates, nnU-Net datasets)")
            ds = getattr(src, "name", "template")
            modality = getattr(src, "modality", "MR")
            for name, value in src.tasks:
                self.entries.append((si, value, f"{ds}/{name}", HERMES_MODALITY.get(modality, 2)))

    @property
    def names(self) -> list[str]:
        return [e[2] for e in self.entries]

    def of_source(self, si: int) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e[0] == si]


def make_hermes_episode(sources: list, table: TaskTable, cfg: TrainConfig, size: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """(image [1,D,H,W], masks [K,...], global task indices [K], modality slot)."""
    si = int(rng.integers(len(sources)))
    src = sources[si]
    if isinstance(src, NnunetSource):
        ci = int(rng.integers(len(src.cases)))
        img, lab, bg = src.cases[ci]
        present = [t for t in table.of_source(si) if bool((lab == table.entries[t][1]).any())]
        mask_of = lambda t: lab == table.entries[t][1]  # noqa: E731
    else:
        img, bg = src.image, src.background
        present = table.of_source(si)
        mask_of = lambda t: src.task_mask(table.entries[t][1])  # noqa: E731
    k = min(len(present), int(rng.integers(1, cfg.max_classes + 1)))
    tasks = [int(t) for t in rng.choice(present, size=k, replace=False)]
    masks = torch.stack([mask_of(t) for t in tasks])
    wimg, wm = random_warp(img, masks, bg, rng)
    crop_img, crop_m = _crop_pair(random_intensity(wimg, rng), wm, size, size // 3, rng)
    return crop_img, crop_m, tasks, table.entries[tasks[0]][3]



def _iris_batch(sources, cfg, size, rng):
    eps = []
    for _ in range(cfg.batch):
        src = sources[int(rng.integers(len(sources)))]
        eps.append(make_nnunet_episode(src, cfg, size, rng) if isinstance(src, NnunetSource)
                   else make_episode([src], cfg, size, rng))
    k = min(e[1].shape[0] for e in eps)  # a batch shares K: extra classes of longer episodes are dropped
    return (torch.stack([e[0] for e in eps]), torch.stack([e[1][:k] for e in eps]),
            torch.stack([e[2] for e in eps]), torch.stack([e[3][:k] for e in eps]))


def _hermes_batch(sources, table, cfg, size, rng):
    eps = [make_hermes_episode(sources, table, cfg, size, rng) for _ in range(cfg.batch)]
    k = min(len(e[2]) for e in eps)
    return (torch.stack([e[0] for e in eps]), torch.stack([e[1][:k] for e in eps]),
            torch.tensor([e[2][:k] for e in eps]), torch.tensor([[e[3]] for e in eps]))


