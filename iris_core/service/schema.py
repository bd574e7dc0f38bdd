"""What a client may ask of ``iris-segment serve``: the job request (pydantic), with a bound on every field and no
field that names a path of the server (a model or a task library is named, and looked up among those the server
offers). The server publishes its JSON schema in ``GET /v1/info``; the client checks its request against it before
uploading anything (client.py). Torch-free."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from iris_core.options import (
    INTENSITY_POLICIES,
    POSTPROCESSING,
    PRECISIONS,
    STRATEGIES,
    TUNE_LR,
    TUNE_STEPS,
)

#: reference (image, label map) pairs a job may upload
MAX_REFERENCES = 16
#: in-context tuning steps of one job (the Slicer module offers at most 500)
MAX_TUNE_STEPS = 1000
#: sliding-window edge, voxels (the bundled model: 128)
MAX_WINDOW = 256
#: sliding-window overlap (0.75 already runs 64 windows where 0 runs one)
MAX_OVERLAP = 0.75
#: classes of one job, and their label values
MAX_CLASSES = 256
MAX_LABEL = 65535
#: the request part (JSON), bytes
MAX_REQUEST_BYTES = 64 * 1024
OUTPUT_EXTENSIONS = (".nii.gz", ".nrrd", ".seg.nrrd")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_Edge = Annotated[int, Field(ge=8, le=MAX_WINDOW)]


class OptionsRequest(_Strict):
    """The run options a client may set (``SegmentOptions``' fields, bounded). ``device`` and ``threads`` are the
    server's choice (its ``--device``, its ``--threads`` or its cores); probability maps are not returned."""

    strategy: Literal[STRATEGIES] = "one-shot"  # type: ignore[valid-type]
    tune_steps: int = Field(TUNE_STEPS, ge=0, le=MAX_TUNE_STEPS)
    tune_lr: float = Field(TUNE_LR, gt=0, le=1)
    device: str = Field("auto", max_length=32)  # the server's --device decides; any client's value is taken
    threads: int | None = Field(None, ge=1, le=1024)
    window: tuple[_Edge, _Edge, _Edge] | None = None
    overlap: float | None = Field(None, ge=0, le=MAX_OVERLAP)
    sw_batch: int = Field(0, ge=0, le=64)
    compile: bool = False
    intensity: Literal[INTENSITY_POLICIES] = "auto"  # type: ignore[valid-type]
    hermes_modality: str | None = Field(None, max_length=32)
    postprocess: Literal[POSTPROCESSING] | None = None  # type: ignore[valid-type]
    save_probabilities: Literal[False] = False
    max_classes_per_forward: int = Field(0, ge=0, le=MAX_CLASSES)
    precision: Literal[PRECISIONS] = "float32"  # type: ignore[valid-type]
    overlaps: bool = False


class ClassRequest(_Strict):
    name: str = Field(min_length=1, max_length=128)
    value: int = Field(ge=1, le=MAX_LABEL)


def _classes_kind(value: object) -> str | None:
    return "text" if isinstance(value, str) else "list" if isinstance(value, list) else None


#: 'liver=1,spleen=2' as the CLI takes them, or [{"name", "value"}] as Slicer sends them
_Classes = Annotated[Annotated[Annotated[str, Field(max_length=4096)], Tag("text")]
                     | Annotated[Annotated[list[ClassRequest], Field(max_length=MAX_CLASSES)], Tag("list")],
                     Discriminator(_classes_kind, custom_error_type="classes",
                                   custom_error_message="a text such as 'liver=1,spleen=2' or a list of {name, value}")]


class JobRequest(_Strict):
    """The ``request`` part of ``POST /v1/jobs``."""

    model: str = Field("default", min_length=1, max_length=512)
    options: OptionsRequest = OptionsRequest()
    classes: _Classes | None = None
    output: Literal[OUTPUT_EXTENSIONS] = ".nii.gz"  # type: ignore[valid-type]
    library: str | None = Field(None, min_length=1, max_length=128)
    keep_task: bool = False


def parse_request(text: str) -> JobRequest:
    """The request part parsed and checked (pydantic's JSON parser: its depth is bounded too), or ValueError with
    one line per problem, each naming the field (``options.tune_steps: ...``)."""
    if len(text.encode()) > MAX_REQUEST_BYTES:
        raise ValueError(f"request: over {MAX_REQUEST_BYTES // 1024} KiB")
    try:
        req = JobRequest.model_validate_json(text or "{}")
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False)[:10]:
            where = ".".join(str(p) for p in e["loc"] if p not in ("text", "list"))  # not the union's tags
            got = "" if e["type"] == "missing" or isinstance(e["input"], dict | list) else f" (got {e['input']!r:.60})"
            problems.append(f"{where + ': ' if where else ''}{e['msg']}{got}")
        raise ValueError("request: " + "; ".join(problems)) from None
    return req


def request_schema() -> dict:
    """The JSON schema of the request, as ``GET /v1/info`` publishes it."""
    return JobRequest.model_json_schema()
