"""Training configuration: one frozen dataclass read from TOML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "iris-small"
    steps: int = 2000
    batch: int = 2
    crop_sizes: tuple[int, ...] = (48, 64)
    crop_probs: tuple[float, ...] = (0.75, 0.25)
    max_classes: int = 3
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup: int = 100
    ema: float = 0.995
    clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    sources: tuple[str, ...] = ("colin27",)
    # labelled datasets in the nnU-Net / MSD layout (folders), composable with ``sources``
    datasets: tuple[str, ...] = ()
    skullstrip_prob: float = 0.3
    modality_loss_weight: float = 0.01  # Hermes auxiliary modality classification
    optimizer: str = "adamw"  # "adamw" or "lamb" (the Iris paper's)
    device: str = "auto"
    amp: bool = True  # bf16/fp16 autocast and channels-last on GPUs (no effect on the CPU)
    checkpointing: bool = False  # activation checkpointing of the conv stages (less memory, more time)
    val_episodes: int = 8  # fixed held-aside episodes scored (Dice of the EMA model) at every save
    # template parcels never used as training tasks ("labelset:value"): the validation scores them, and
    # the reference-sensitivity check can use them as unseen structures
    # the query is the reference view itself: the collapse-detector test's setting, in which only the mask
    # can say which of several shapes is the task (a model that ignores its reference cannot learn it)
    same_view: bool = False
    # at every save, the reference-sensitivity check (iris-segment check-model: ten Colin27 structures
    # onto a moved copy) on the EMA model, logged, plotted and written to OUT/check.{json,md,png}
    check_model: bool = True
    # a compact resume point (training.loop.write_resume_point) to start from when OUT/state.pt is absent
    resume_point: str = ""
    holdout: tuple[str, ...] = ("aal:1", "aal:2", "aal:37", "aal:38", "aal:77", "aal:78", "brodmann:17")



def load_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A TrainConfig from a TOML file (``[train]`` table or top level) with keyword overrides."""
    import tomllib

    data: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        data = raw.get("train", raw)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        from ..errors import InputError

        raise InputError(f"training config {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

