"""Model configurations (frozen dataclasses) and the table of presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from iris_core.errors import ConfigError

#: The least memory-readout sample size; a task-embedding stage with at least this many tokens per class
#: is a memory sample (rows: key, mask value, log weight), not task tokens (at most a few dozen).
MEMORY_MIN_TOKENS = 256


@dataclass(frozen=True)
class IrisConfig:
    """Architecture of an Iris network (in-context segmentation).

    ``context_downsample`` > 1 runs the task encoder's mask-conditioned context path
    at a coarser resolution than the reference (a CPU-friendly preset option; the
    published network uses 1). ``pos_embed_size`` is the edge of the learnable
    positional encoding, sliced to the input; inputs larger than it are refused.
    """

    in_ch: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    num_block: tuple[int, ...] = (2, 2, 2, 2)
    num_prior_stage: int = 3
    query_tokens: int = 10
    attn_blocks: int = 2
    task_prior_slots: int = 73
    pos_embed_size: int = 128
    context_downsample: int = 1
    head_token: str = "query"
    reference_prototype: bool = False
    memory_tokens: int = 0
    memory_dim: int = 64
    memory_subvoxels: bool = False
    memory_positions: bool = False
    position_sigma_mm: float = 20.0

    # ``head_token``: which task token of each stage the head turns into the class kernel. "query"
    # (token 0, a learnt query token: the published network) or "foreground" (the last token, the
    # reference features averaged inside the mask: a direct path from the mask to the kernel, which
    # small models trained briefly need to follow their reference - see the default model card).
    # ``reference_prototype``: the embedding also carries, per class, the reference's own decoder
    # features (last three levels: 1/4, 1/2 and full resolution) averaged inside its mask; the logit adds
    # a learnt affine map of the mean cosine between each target voxel's features and that prototype.
    # Encoder and decoder are shared by reference and target, so the two live in one feature space and
    # the mask reaches the prediction from the first step. ``head_token = "prototype"`` makes that the
    # whole head: the prediction is then a function of the similarity to what the reference shows, so
    # a model cannot answer the same whatever the reference (departures from the published network, for
    # our small presets only; see the default model card).
    # ``memory_tokens`` > 0 adds a memory readout (label propagation, as in space-time-memory video
    # segmentation): the embedding carries, per class, ``memory_tokens`` reference voxels at half
    # resolution, each a key (the encoder's multi-scale features, projected to ``memory_dim`` and
    # normalised), the mask value there and an importance log-weight (the voxels are a stratified sample:
    # inside, near and far from the mask). Every target voxel reads the mask out of the voxels whose keys
    # match its own (softmax attention); the logit adds a learnt scale times (readout - 0.5). The mask
    # enters the prediction linearly, so a model cannot answer the same whatever its reference.
    # ``memory_subvoxels``: each memory row carries the mask's eight sub-voxels (2x2x2 on the model grid)
    # instead of its fraction at half resolution, and the readout puts the eight values read back in place
    # (pixel shuffle) instead of upsampling one: the copy of a structure a few voxels thick keeps its shape
    # (issue [11]: a 6 mm fraction caps thin gyri, and read out through a sample it lost a third of the
    # copy test's Dice). No parameters change, so a model trained without it continues with it.
    # ``memory_positions`` (issue [20]): each memory row also keeps its reference voxel's position (mm);
    # once the pipeline has aligned the reference to the target (an affine registration) and mapped those
    # positions into the target's space, the readout adds -|x - y|^2 / (2 sigma^2) to the attention logits
    # (non-local patch-based label fusion: a reference voxel counts by its features and by how near it lies),
    # sigma learnt from ``position_sigma_mm``. Without positions (alignment off or failed) it reads by
    # features alone, as before.

    def __post_init__(self) -> None:
        if len(self.channels) != 5 or len(self.num_block) != 4:
            raise ConfigError("IrisConfig needs 5 channel counts and 4 block counts")
        if self.head_token not in ("query", "foreground", "prototype"):
            raise ConfigError(f"head_token must be 'query', 'foreground' or 'prototype', got {self.head_token!r}")
        if self.head_token == "prototype" and not self.reference_prototype:
            raise ConfigError("head_token 'prototype' needs reference_prototype = True")
        if self.memory_tokens and self.memory_tokens < MEMORY_MIN_TOKENS:
            raise ConfigError(f"memory_tokens must be 0 (no memory readout) or >= {MEMORY_MIN_TOKENS}, "
                              f"got {self.memory_tokens}")
        if not 1 <= self.num_prior_stage <= 3:
            raise ConfigError("num_prior_stage must be 1, 2 or 3")
        for c in self.channels[5 - self.num_prior_stage :]:
            if c % 32:
                raise ConfigError(f"prior-stage channels must be multiples of 32 (heads of 32), got {c}")

    @property
    def token_dims(self) -> tuple[int, ...]:
        """Channel count of the task tokens at each prior stage, deepest first."""
        return tuple(self.channels[4 - i] for i in range(self.num_prior_stage))

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (four max-pools)."""
        return 16


@dataclass(frozen=True)
class HermesConfig:
    """Architecture of a Hermes ResUNet with task and modality priors (context-prior learning)."""

    in_ch: int = 1
    base_ch: int = 32
    num_block: tuple[int, ...] = (2, 2, 2, 2)
    task_prior_slots: int = 72  # tasks + 1 null slot
    modality_prior_slots: int = 6
    modality_tokens: int = 10
    deep_blocks: int = 4

    @property
    def channels(self) -> tuple[int, ...]:
        b = self.base_ch
        return (b, 2 * b, 4 * b, 8 * b, 10 * b)

    @property
    def divisor(self) -> int:
        return 16


CONFIG_CLASSES = {"iris": IrisConfig, "hermes": HermesConfig}


@dataclass(frozen=True)
class Preset:
    """A named architecture with the preprocessing it was designed for."""

    arch: str
    config: Any
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    window: tuple[int, int, int] = (128, 128, 128)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "mass-base": Preset(
        "iris",
        IrisConfig(),
        description="The published MASS-base / Iris configuration (120.1 M parameters).",
    ),
    "iris-small": Preset(
        "iris",
        IrisConfig(channels=(8, 16, 32, 64, 128), num_block=(1, 1, 1, 1), query_tokens=4,
                   attn_blocks=1, task_prior_slots=1, pos_embed_size=64, context_downsample=2,
                   head_token="prototype", reference_prototype=True, memory_tokens=4096, memory_dim=32,
                   memory_subvoxels=True),
        spacing=(3.0, 3.0, 3.0),
        window=(64, 64, 64),
        description="CPU preset: 8..128 channels, one block per stage, coarse context path, 3 mm spacing, "
                    "head: memory readout of the reference mask (matched at half resolution, its 2x2x2 sub-voxels "
                    "read back onto the model grid) plus similarity to the reference's own multi-scale decoder "
                    "features (prototype).",
    ),
    "iris-small-token-head": Preset(
        "iris",
        IrisConfig(channels=(8, 16, 32, 64, 128), num_block=(1, 1, 1, 1), query_tokens=4,
                   attn_blocks=1, task_prior_slots=1, pos_embed_size=64, context_downsample=2),
        spacing=(3.0, 3.0, 3.0),
        window=(64, 64, 64),
        description="The iris-small network with the published Iris head (each class's token kernel on the "
                    "decoder's features; no memory readout): a speed reference for the many-class cost.",
    ),
    "iris-tiny": Preset(
        "iris",
        IrisConfig(channels=(4, 8, 32, 32, 32), num_block=(1, 1, 1, 1), query_tokens=2,
                   attn_blocks=1, task_prior_slots=1, pos_embed_size=32, context_downsample=2,
                   head_token="prototype", reference_prototype=True, memory_tokens=512, memory_dim=32,
                   memory_subvoxels=True),
        spacing=(4.0, 4.0, 4.0),
        window=(32, 32, 32),
        description="Test preset: runs in a fraction of a second on a CPU.",
    ),
    "hermes-r": Preset(
        "hermes",
        HermesConfig(),
        description="The published Hermes-R ResUNet (60.9 M parameters).",
    ),
    "hermes-tiny": Preset(
        "hermes",
        HermesConfig(base_ch=16, num_block=(1, 1, 1, 1), task_prior_slots=8, deep_blocks=1),
        spacing=(4.0, 4.0, 4.0),
        window=(32, 32, 32),
        description="Test preset of Hermes.",
    ),
}


def config_to_dict(config: Any) -> dict:
    """JSON-ready dict of a config dataclass."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(arch: str, data: dict) -> Any:
    """Rebuild a config dataclass from ``config_to_dict`` output; unknown keys are an error."""
    cls = CONFIG_CLASSES[arch]
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {arch} config keys: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
