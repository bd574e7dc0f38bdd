"""The pipeline policy of a model: every choice of the pipeline around the network, from reading the image to
writing the label map, as one frozen object stored in the model file (``hub.checkpoint`` reads and writes it).
Each choice's strings are compared here and only here: the pipeline asks the policy what a choice means
(``policy.native_grid``, ``policy.mass_blending``, ...). Layer 0 (plain data), so the hub can load it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from iris_core.errors import ConfigError, InputError
from iris_core.options import POSTPROCESSING, check_choice

#: the pipeline's swappable parts: each string field of the policy and its values (ours first)
POLICY_CHOICES: dict[str, tuple[str, ...]] = {
    "grid": ("physical", "native"),
    "modality_rule": ("iris", "mass"),
    "reference_crop": ("volume", "union", "per-label"),
    "reference_masks": ("soft", "nearest"),
    "blending": ("monai", "mass"),
    "labels_on": ("target", "model"),
    "align": ("none", "affine", "identity"),
    "prior_labels": ("linear", "nearest"),
}


@dataclass(frozen=True)
class Preprocessing:
    """The inference policy of a model: every choice of the pipeline around the network, from reading
    the image to writing the label map. ``Preprocessing()`` is this project's own pipeline (our
    models); :meth:`mass` is the pipeline of the MASS authors' ``inference.py`` (``mass_base.pth``
    and any foreign Iris checkpoint). Stored in our checkpoint format, so a converted or fine-tuned
    MASS model keeps it."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    window: tuple[int, int, int] = (128, 128, 128)
    ct_window: tuple[float, float] = (-990.0, 500.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    #: 'iris-segment' (ours) or 'mass' (the authors' inference.py); a label for humans and sidecars
    name: str = "iris-segment"
    #: orientation code applied first ('RAS' with sitk.DICOMOrient); '' keeps the file's
    orientation: str = ""
    #: 'physical': identity-direction grid over the physical extent, sizes a multiple of 16, anti-aliased;
    #: 'native': same origin and direction, size round(size * spacing / new spacing), no smoothing
    grid: str = "physical"
    #: modality guess of 'auto': 'iris' (1st percentile < -500 -> CT) or 'mass' (0.5/99.5 percentiles)
    modality_rule: str = "iris"
    #: target body crop margin (z, y, x voxels); empty: no body crop
    body_margin: tuple[int, ...] = ()
    ct_body_threshold: float = -500.0
    #: reference crops: 'volume' (the whole reference volume, padded to a multiple of 16, when the network takes
    #: it; else as much of it around the classes as it takes), 'union' (all classes in one sliding-window-sized
    #: window, volume-normalised) or 'per-label' (one window per label centred on its box, zero-padded,
    #: normalised on the crop). 'volume' because cutting the reference changes its features (instance norms see
    #: other statistics): the copy test lost 0.16 Dice to a 64^3 crop of a whole head (issue [11])
    reference_crop: str = "volume"
    #: reference label maps onto the model grid: 'soft' (anti-aliased, >= 0.5) or 'nearest'
    reference_masks: str = "soft"
    #: sliding window: 'monai' (background padding, MONAI Gaussian) or 'mass' (zero padding at the
    #: far end, separable Gaussian sigma 0.125 x edge normalised to max 1)
    blending: str = "monai"
    overlap: float = 0.5
    #: windows holding only background are skipped (their output is taken as 0)
    skip_empty: bool = True
    threshold: float = 0.5
    #: labels decided 'target' (probabilities resampled linearly, then argmax) or 'model' (on the model
    #: grid, then nearest neighbour onto the target grid)
    labels_on: str = "target"
    #: keep each label's largest connected component by default; connectivity 6 (faces) or 26
    largest_component: bool = False
    connectivity: int = 26
    #: 'affine': each reference is registered to each target first (iris_core.pipeline.align) and a model
    #: with a position-aware memory readout weighs reference voxels by their distance after it; 'none';
    #: 'identity': distances in each image's own scanner coordinates, no registration (the ablation's
    #: "position term without alignment")
    align: str = "none"
    #: with an alignment: the weight of the aligned reference's labels as a prior on the logits on the target
    #: grid, scaled by local image agreement (iris_core.pipeline.prior; chosen on held-out tasks: the model card);
    #: 0 turns it off
    prior_weight: float = 0.0
    #: the agreement's power in that weight (``w * s**p``; chosen on held-out tasks: the model card): the higher, the more the prior
    #: is kept to where the aligned reference matches the target (a moved copy) and off a different subject's tissue
    prior_power: float = 1.0
    #: how the aligned reference's labels reach the target grid for the prior: 'linear' (each label's indicator
    #: interpolated: a share in [0, 1]) or 'nearest' (nearest neighbour: the label map atlas registration gives)
    prior_labels: str = "linear"
    #: a target whose model grid spans at most this many voxels along an axis gets one window along it, as long
    #: as the grid (never shorter than ``window``) instead of overlapping ``window``-sized ones: each voxel is
    #: computed once instead of up to 2^3 times (issue [21]; 96 takes a 3 mm head in one window: the bundled model
    #: keeps 0, the model card says why); 0: always ``window``. An explicit --window or --compile keeps ``window``
    fit_window: int = 0

    def __post_init__(self) -> None:
        """Every choice checked once, when the policy is made (a model file with an unknown value fails as it
        loads, not in the middle of a run)."""
        for name, allowed in POLICY_CHOICES.items():
            check_choice(getattr(self, name), allowed, f"pipeline policy {name}")
        if self.connectivity not in (6, 26):
            raise ConfigError(f"pipeline policy connectivity {self.connectivity!r}: use 6 or 26")
        if len(self.spacing) != 3 or min(self.spacing) <= 0 or len(self.window) != 3 or min(self.window) < 1:
            raise ConfigError(f"pipeline policy spacing {self.spacing} / window {self.window}: three positive values")
        if self.prior_weight < 0 or (self.prior_weight and self.align == "none"):
            raise ConfigError(f"pipeline policy prior_weight {self.prior_weight}: >= 0, and only with an alignment")
        if self.prior_power <= 0:
            raise ConfigError(f"pipeline policy prior_power {self.prior_power}: > 0")
        if self.fit_window < 0:
            raise ConfigError(f"pipeline policy fit_window {self.fit_window}: >= 0 (0: always the model's window)")
        if not 0 <= self.overlap < 1 or not 0 < self.threshold < 1:
            raise ConfigError(f"pipeline policy overlap {self.overlap} / threshold {self.threshold}: in [0, 1) / (0, 1)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def mass(cls) -> Preprocessing:
        """The MASS authors' pipeline (Stanford-AIMI/MASS inference.py, every option at its default);
        see README: MASS checkpoints."""
        return cls(spacing=(1.5, 1.5, 1.5), window=(128, 128, 128), ct_window=(-991.0, 500.0),
                   mr_percentiles=(2.0, 98.0), name="mass", orientation="RAS", grid="native",
                   modality_rule="mass", body_margin=(16, 32, 32), ct_body_threshold=-500.0,
                   reference_crop="per-label", reference_masks="nearest", blending="mass", overlap=0.5,
                   skip_empty=False, threshold=0.5, labels_on="model", largest_component=True,
                   connectivity=6)

    # -- what each choice means: the one place its strings are compared ------------------------------------
    @property
    def nearest_prior_labels(self) -> bool:
        """'nearest': the aligned-label prior takes the reference's labels through the alignment by nearest
        neighbour (a share of 0 or 1); 'linear': each label's indicator interpolated."""
        return self.prior_labels == "nearest"

    @property
    def native_grid(self) -> bool:
        """'native': the image's own origin and direction at the policy's spacing, a target cropped to its body
        (the MASS authors'); else an identity-direction grid over the physical extent."""
        return self.grid == "native"

    @property
    def mass_modality_rule(self) -> bool:
        """'mass': 'auto' guesses the modality from the 0.5 / 99.5 percentiles (CT, PET or MR)."""
        return self.modality_rule == "mass"

    @property
    def crops_whole_reference(self) -> bool:
        """'volume': a reference is encoded whole where the network takes it."""
        return self.reference_crop == "volume"

    @property
    def crops_per_label(self) -> bool:
        """'per-label': one window per label centred on its box, normalised on the crop."""
        return self.reference_crop == "per-label"

    @property
    def nearest_reference_masks(self) -> bool:
        """'nearest': reference label maps go to the model grid by nearest neighbour (else anti-aliased)."""
        return self.reference_masks == "nearest"

    @property
    def mass_blending(self) -> bool:
        """'mass': windows placed and blended as the MASS authors do (iris_core.pipeline.sliding)."""
        return self.blending == "mass"

    @property
    def labels_on_model_grid(self) -> bool:
        """'model': labels decided on the model grid, then moved to the target by nearest neighbour."""
        return self.labels_on == "model"

    @property
    def aligns(self) -> bool:
        """'affine' or 'identity': reference positions are put in each target's space (registered, or as they
        are in the scanner's coordinates) for a position-aware readout."""
        return self.align != "none"

    @property
    def registers(self) -> bool:
        """'affine': each reference is registered to each target first (iris_core.pipeline.align); 'identity'
        keeps each image's own scanner coordinates."""
        return self.align == "affine"

    def postprocess_of(self, asked: str | None) -> str:
        """The post-processing a run applies: ``asked`` ('none', 'largest'), or the policy's when None."""
        how = ("largest" if self.largest_component else "none") if asked is None else asked
        check_choice(how, POSTPROCESSING, "post-processing", InputError)
        return how


#: the inference policy object (one frozen dataclass; ``Preprocessing`` is its historical name)
Policy = Preprocessing


