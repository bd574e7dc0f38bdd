"""Run options: one frozen ``SegmentOptions`` built once (by the CLI, the API, the Slicer parameter node or
the worker job) and read by every stage, with the defaults in this one place. Torch-free, so the CLI's
``--help`` and the Slicer side can import it cheaply."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from iris_core.errors import ConfigError

STRATEGIES = ("one-shot", "ensemble", "retrieval", "tuning")
#: where the network runs ("auto": CUDA, then MPS, then the CPU)
DEVICES = ("auto", "cpu", "cuda", "mps")
#: intensity policy of the preprocessing: how voxel values are clipped and normalised
INTENSITY_POLICIES = ("auto", "CT", "MR", "PET")
POSTPROCESSING = ("none", "largest")
#: arithmetic of the windows on a CPU (see precision.py): auto uses bfloat16 only where checked safe and faster
PRECISIONS = ("float32", "bfloat16", "auto")


def check_choice(value: object, allowed: tuple[str, ...], what: str, error: type[Exception] = ConfigError) -> None:
    """The one check of a value against its list (strategy, intensity policy, post-processing, ...): ``error``
    naming the value and the choices."""
    if value not in allowed:
        raise error(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")


def strategy_for(strategy: str, classes_per_reference: list[list[str]]) -> str:
    """The strategy a run uses, the same from the CLI, the API and Slicer: one-shot becomes the context ensemble
    when several references hold a class (names compared case-insensitively, as Slicer's segments are), so each
    of them contributes instead of the first alone; any other strategy as asked."""
    if strategy != "one-shot":
        return strategy
    seen: set[str] = set()
    for names in classes_per_reference:
        folded = {n.casefold() for n in names}
        if seen & folded:
            return "ensemble"
        seen |= folded
    return strategy


def class_requests(text: str | None, names_only: bool = False) -> list[tuple[str, int]] | None:
    """``--classes`` as (name, value) pairs, torch-free (the CLI checks it before any import): '1,3' ->
    ('label_1', 1), ('label_3', 3); 'liver=1' -> ('liver', 1); 'brain' -> ('brain', 0), a class asked for by
    its segment name, whose value the references (or a task library) give. ``names_only`` (a task library,
    whose classes are found by name): every item is a name. None -> None (every class)."""
    if not text:
        return None
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if names_only:
            out.append((part.partition("=")[0].strip(), 0))
            continue
        name, _, value = (s.strip() for s in part.rpartition("=")) if "=" in part else ("", "", part)
        if "=" in part and not (name and value.isdecimal()):
            raise ConfigError(f"classes: {part!r} is not a label value, a segment name or NAME=VALUE (e.g. 1, "
                              "brain or liver=1)", inputs=("classes",))
        if not value.isdecimal():  # a segment's name (names may hold spaces and digits: 'Segment 2')
            out.append((part, 0))
            continue
        if int(value) == 0:
            raise ConfigError("classes: label 0 is background, not a class", inputs=("classes",))
        out.append((name or f"label_{int(value)}", int(value)))
    names = [n.casefold() for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"classes: duplicate class names in {[n for n, _ in out]}", inputs=("classes",))
    return out


# In-context tuning defaults. The embedding tokens are layer-normalised (elements of order 1):
# Adam at 1e-2 moves each element by at most ~0.01 per step, so 20 steps can reshape the
# embedding noticeably without leaving the region the decoder was trained on.
TUNE_STEPS = 20
TUNE_LR = 1e-2


@dataclass(frozen=True)
class SegmentOptions:
    """How to run one segmentation; what to segment (target, references, library, structures) is not here.

    ``intensity`` is the preprocessing's intensity policy; ``hermes_modality`` is the modality prior a
    Hermes model is conditioned on (CT, PET, T1, T2 or cine; see ``hermes_vocab``), two different things.
    """

    strategy: str = "one-shot"
    tune_steps: int = TUNE_STEPS
    tune_lr: float = TUNE_LR
    device: str = "auto"
    threads: int | None = None
    window: tuple[int, int, int] | None = None  # sliding-window size; None: the model's
    overlap: float | None = None  # sliding-window overlap; None: the model's policy's
    sw_batch: int = 0  # windows per forward pass; 0: from free memory
    compile: bool = False
    intensity: str = "auto"
    hermes_modality: str | None = None
    postprocess: str | None = None  # "none" or "largest"; None: the model's policy's (MASS: largest)
    save_probabilities: bool = False  # also one float32 probability map per class on the target grid
    max_classes_per_forward: int = 0  # classes per forward pass (chunks: less memory); 0: all at once
    precision: str = "float32"  # on a CPU: float32, bfloat16, or auto (bfloat16 where checked safe; precision.py)
    # each class decided on its own, so classes may overlap (a structure inside another): the result also comes
    # as label maps, one per group of classes that do not overlap (SegmentationResult.layers)
    overlaps: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "segment options")
        check_choice(self.strategy, STRATEGIES, "strategy")
        check_choice(self.intensity, INTENSITY_POLICIES, "intensity policy")
        if self.postprocess is not None:
            check_choice(self.postprocess, POSTPROCESSING, "post-processing")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap {self.overlap} must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads {self.threads} must be >= 1 (leave it unset for the default)")
        if self.sw_batch < 0:
            raise ConfigError(f"windows per forward pass {self.sw_batch} must be >= 0 (0: from free memory)")
        if self.max_classes_per_forward < 0:
            raise ConfigError(f"max classes per forward {self.max_classes_per_forward} must be >= 0 "
                              "(0: all at once)")
        if self.tune_steps < 0 or self.tune_lr <= 0:
            raise ConfigError(f"tuning needs steps >= 0 and a positive rate (got {self.tune_steps}, {self.tune_lr})")
        if self.window is not None and (len(self.window) != 3 or any(w <= 0 for w in self.window)):
            raise ConfigError(f"window {self.window}: three positive edges are needed")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (a tuple window becomes a list)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base: SegmentOptions | None = None) -> SegmentOptions:
        """Options from a dict (a job file, keyword overrides); keys not given keep ``base``'s values
        (the defaults when no ``base``); an unknown key is an error."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown segment options {unknown}; known: {sorted(known)}")
        if data.get("window") is not None:
            data["window"] = tuple(data["window"])
        return dataclasses.replace(base or cls(), **data)


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the type ``hint`` (the simple types config files hold)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], v) for v in value)
        return len(args) == len(value) and all(_accepts(h, v) for h, v in zip(args, value))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def field_type_problems(obj: Any) -> dict[str, str]:
    """Each dataclass field that does not hold a value of its annotated type (a string where a number
    belongs in a TOML file, say): field name -> the problem, naming the value, the type and the default."""
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _accepts(hints[f.name], value):
            out[f.name] = f"{f.name} = {value!r} is not a {_type_name(hints[f.name])}; the default is {f.default!r}"
    return out


def check_field_types(obj: Any, where: str) -> None:
    """Raise one ConfigError naming every field whose value is not of its annotated type."""
    problems = field_type_problems(obj)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems.values()))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
