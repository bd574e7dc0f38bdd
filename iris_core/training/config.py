"""Training configuration: one frozen dataclass read from TOML."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from iris_core.errors import ConfigError, InputError
from iris_core.models.config import PRESETS
from iris_core.options import field_type_problems


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
    # share of episodes whose query is the reference's own view (same deformation and intensities), cropped
    # elsewhere: the copy test's skill (give back what the reference shows where the target is that image),
    # with the crop's context changed so that matching cannot lean on identical windows
    copy_prob: float = 0.0
    # at every save, the reference-sensitivity check (iris-segment check-model: ten Colin27 structures
    # onto a moved copy) on the EMA model, logged, plotted and written to OUT/check.{json,md,png}
    check_model: bool = True
    # a compact resume point (training.loop.write_resume_point) to start from when OUT/state.pt is absent
    resume_point: str = ""
    # voxel spacing in mm the model is trained (and then runs) at; empty: the preset's own (3 mm for
    # iris-small). The exported model stores it, so inference follows it (issue 10 item 5: 2 mm vs 3 mm)
    spacing: tuple[float, ...] = ()
    # continuing a finished run (whose cosine schedule ended at lr ~0): from this step on, warm-up and
    # cosine decay start again over the remaining steps; 0: one schedule over the whole run
    lr_restart_at: int = 0
    holdout: tuple[str, ...] = ("aal:1", "aal:2", "aal:37", "aal:38", "aal:77", "aal:78", "brodmann:17")
    # issue [20]: a position-aware memory readout (the model's ``memory_positions``, its distance scale
    # starting at ``position_sigma_mm``); each episode's reference view is aligned to its query view by the
    # pipeline's own affine alignment (iris_core.pipeline.align), in a share ``align_prob`` of the episodes
    # (the rest, and failed alignments, read by features alone, as the pipeline does when alignment fails)
    memory_positions: bool = False
    position_sigma_mm: float = 20.0
    align_prob: float = 0.85

    def __post_init__(self) -> None:
        """User errors in a training config end in one ConfigError, listing every problem, before any work."""
        problems = list(field_type_problems(self).values())  # a string where a number belongs, ...
        for check in self._value_checks():  # ... and every value out of range (checks a wrong type breaks
            try:  # are skipped: that field's type is reported already)
                problem = check()
            except (TypeError, ValueError):
                continue
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError("training config: " + "; ".join(problems))

    def _value_checks(self) -> list:
        """One function per rule, each returning its problem or None."""
        crop_ok = len(self.crop_sizes) == len(self.crop_probs) and bool(self.crop_sizes)
        return [
            lambda: None if self.preset in PRESETS else f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})",
            lambda: None if self.optimizer in ("adamw", "lamb") else f"unknown optimizer {self.optimizer!r} (use adamw "
                                                                      "or lamb)",
            *[(lambda n=name: None if int(getattr(self, n)) >= 1 else f"{n} must be >= 1, got {getattr(self, n)}")
              for name in ("steps", "batch", "max_classes", "save_every")],
            lambda: None if crop_ok else (f"crop_sizes {list(self.crop_sizes)} and crop_probs {list(self.crop_probs)} "
                                          "need one probability per size"),
            lambda: None if not crop_ok or (abs(sum(self.crop_probs) - 1.0) <= 1e-6 and min(self.crop_probs) >= 0)
            else f"crop_probs {list(self.crop_probs)} must be non-negative and sum to 1",
            lambda: None if not any(int(c) % 16 or int(c) < 16 for c in self.crop_sizes)
            else f"crop_sizes {list(self.crop_sizes)} must be multiples of 16",
            lambda: None if 0 <= self.copy_prob <= 1 else f"copy_prob must be in [0, 1], got {self.copy_prob}",
            lambda: None if 0 <= self.align_prob <= 1 else f"align_prob must be in [0, 1], got {self.align_prob}",
            lambda: None if self.position_sigma_mm > 0 else f"position_sigma_mm must be > 0, got {self.position_sigma_mm}",
            lambda: None if (self.lr > 0 and 0 <= self.ema < 1 and self.warmup >= 0)
            else f"lr must be > 0 (got {self.lr}), ema in [0, 1) (got {self.ema}), warmup >= 0",
            lambda: None if not self.spacing or (len(self.spacing) == 3 and min(float(v) for v in self.spacing) > 0)
            else f"spacing {list(self.spacing)} must be three positive numbers in mm (or [] for the preset's)",
            lambda: None if 0 <= self.lr_restart_at < self.steps
            else f"lr_restart_at must be in [0, steps), got {self.lr_restart_at} with steps {self.steps}",
            lambda: None if (self.sources or self.datasets) else "no task sources: give sources and/or datasets",
        ]

    def grid(self) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
        """(spacing, window) the model trains and runs at: the preset's unless ``spacing`` is given."""

        preset = PRESETS[self.preset]
        spacing = tuple(float(v) for v in self.spacing) if self.spacing else preset.spacing
        return spacing, preset.window



def load_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A TrainConfig from a TOML file (``[train]`` table or top level) with keyword overrides."""

    data: dict = {}
    if path is not None:

        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise InputError(f"training config {path}: file not found") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"training config {path}: not readable TOML ({exc})") from None
        data = raw.get("train", raw)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    problems = [f"unknown keys {unknown}; known: {sorted(known)}"] if unknown else []
    try:  # the known keys checked too: every problem of the file in one message
        config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})
    except ConfigError as exc:
        problems.append(str(exc).removeprefix("training config: "))
    if problems:
        raise ConfigError(f"training config {path or '(defaults)'}: " + "; ".join(problems))
    return config

