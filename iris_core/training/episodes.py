"""Episodes: reference and query views of one task source, cropped, batched."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from iris_core.errors import ConfigError
from iris_core.io.resample import crop_padded
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
    if cfg.copy_prob and rng.random() < cfg.copy_prob:
        q, qm = r, rm  # a copy episode: the reference's own view, cropped elsewhere below
    out = []
    # the query crop wanders far from the structures (they may be cut or absent: "nothing here" is a
    # valid answer); the reference crop stays centred on them
    q_jitter = int(getattr(src, "query_jitter", 0.5) * size)
    for img, m, jitter in ((q, qm, q_jitter), (r, rm, size // 8)):
        out += _crop_pair(img, m, size, jitter, rng)
    if cfg.same_view:
        out[:2] = out[2:]
    return tuple(out)


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
    out = []
    for idx, jitter in ((qi, size // 3), (ri, size // 8)):
        img, lab, bg = src.cases[idx]
        masks = torch.stack([lab == v for v in values])
        wimg, wm = random_warp(img, masks, bg, rng)
        wimg = random_intensity(wimg, rng)
        out += _crop_pair(wimg, wm, size, jitter, rng)
    return tuple(out)


def _crop_pair(img: torch.Tensor, masks: torch.Tensor, size: int, jitter: int, rng: np.random.Generator):
    zyx = np.argwhere(masks.any(0).numpy())
    centre = np.array(img.shape) // 2 if len(zyx) == 0 else (zyx.min(0) + zyx.max(0)) // 2
    start = centre - size // 2 + rng.integers(-jitter, jitter + 1, 3)
    return [crop_padded(img[None], start, size, float(img.min())), crop_padded(masks.float(), start, size, 0.0)]


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


