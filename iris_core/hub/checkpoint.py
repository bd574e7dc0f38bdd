"""One loader for every model file: our own format, MASS/Iris and Hermes-R checkpoints.

Our format is a safetensors file whose metadata names the architecture, its
config, the preprocessing policy and the class names. Foreign ``.pth`` files are
read with ``torch.load(weights_only=True)``: a model file can never run code. A
file that needs more than that is refused with the offending name; loading it
anyway takes ``allow_unsafe=True`` (CLI: ``--trust-checkpoint``), explicitly.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from iris_core.errors import CheckpointError
from iris_core.io.names import publish
from iris_core.models import PRESETS, build_model, config_from_dict, config_to_dict
from iris_core.models.config import HermesConfig, IrisConfig
from iris_core.pipeline.policy import Preprocessing

log = logging.getLogger(__name__)

FORMAT = "iris-segment/1"
# Wrapper keys of foreign training checkpoints, most preferred first (EMA weights infer best).
STATE_DICT_KEYS = ("ema_state_dict", "ema_model_state_dict", "ema_model", "model_state_dict", "state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadedModel:
    """A network ready for inference, with what the file said about it."""

    model: nn.Module
    arch: str
    config: Any
    preprocessing: Preprocessing
    source: str
    class_names: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.get("name") or Path(self.source).name


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    preprocessing: Preprocessing,
    class_names: list[str] | None = None,
    info: dict | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` in our safetensors format with its architecture, config and policy.
    ``half`` stores floating tensors as float16 (half the file; loading casts back to float32)."""
    meta = {
        "format": FORMAT,
        "arch": model.arch,
        "config": json.dumps(config_to_dict(model.config)),
        "preprocessing": json.dumps(preprocessing.to_dict()),
        "class_names": json.dumps(class_names or []),
        "info": json.dumps(info or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    return write_safetensors(Path(path), tensors, meta)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write tensors + string metadata through a temporary file (no partial file on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    return publish(tmp, path)


def read_safetensors(path: Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; unreadable or truncated files raise CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path}: unreadable or truncated safetensors file ({exc})") from None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "state_dict"
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key], key
    keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"{path}: no model weights found (looked for {', '.join(STATE_DICT_KEYS)}; the file holds {keys})"
    )


def infer_architecture(sd: dict[str, torch.Tensor], path: Path) -> tuple[str, Any]:
    """Architecture name and config of a foreign state_dict, read from its keys and shapes."""
    if "encoder.inc.conv1.weight" in sd and "task_embedding.0.task_query" in sd:
        stages = len({k.split(".")[1] for k in sd if k.startswith("task_embedding.")})
        channels = [sd["encoder.inc.conv1.weight"].shape[0]] + [
            sd[f"encoder.down{i}.conv.1.conv1.conv.weight"].shape[0] for i in range(1, 5)
        ]
        num_block = [
            len({k.split(".")[3] for k in sd if k.startswith(f"encoder.down{i}.conv.")}) for i in range(1, 5)
        ]
        attn = len({k.split(".")[3] for k in sd if k.startswith("task_embedding.0.attn_layers.")})
        expand = sd["task_embedding.0.expand.2.weight"].shape[0]
        shuffle = round(expand ** (1 / 3))
        cfg = IrisConfig(
            in_ch=sd["encoder.inc.conv1.weight"].shape[1],
            channels=tuple(channels),
            num_block=tuple(num_block),
            num_prior_stage=stages,
            query_tokens=sd["task_embedding.0.task_query"].shape[0],
            attn_blocks=attn,
            task_prior_slots=sd["task_prior_0"].shape[0] if "task_prior_0" in sd else 1,
            pos_embed_size=sd["task_embedding.0.pos_embed.embedding"].shape[-1],
            context_downsample=max(1, 16 // shuffle),
            # our small presets' prototype head (no MASS/Iris release has these weights)
            reference_prototype="prototype_scale" in sd,
            head_token="prototype" if "prototype_scale" in sd else "query",
        )
        if "memory_key.weight" in sd:  # our small presets' memory readout; its sample size is not a weight:
            # the preset's with these channels and key width (else iris-small's)

            dim = sd["memory_key.weight"].shape[0]
            like = next((p.config for p in PRESETS.values() if p.arch == "iris"
                         and p.config.memory_dim == dim and p.config.channels == cfg.channels),
                        PRESETS["iris-small"].config)
            cfg = replace(cfg, memory_tokens=like.memory_tokens, memory_dim=dim,
                          memory_subvoxels=like.memory_subvoxels)
        return "iris", cfg
    if "inc.conv1.weight" in sd and "prior_init_fuse_2.task_prior" in sd:
        base = sd["inc.conv1.weight"].shape[0]
        num_block = [len({k.split(".")[2] for k in sd if k.startswith(f"down{i}.conv.")}) for i in range(1, 5)]
        cfg = HermesConfig(
            in_ch=sd["inc.conv1.weight"].shape[1],
            base_ch=base,
            num_block=tuple(num_block),
            task_prior_slots=sd["prior_init_fuse_2.task_prior"].shape[0] - 1,
            modality_prior_slots=sd["prior_init_fuse_2.modality_prior"].shape[0],
            modality_tokens=sd["prior_init_fuse_2.modality_prior"].shape[1],
            deep_blocks=len({k.split(".")[2] for k in sd if k.startswith("prior_init_fuse_4.attn_layers.")}),
        )
        return "hermes", cfg
    sample = ", ".join(sorted(sd)[:5])
    raise CheckpointError(
        f"{path}: not an Iris/MASS or Hermes state_dict (first keys: {sample}); "
        "expected keys such as 'encoder.inc.conv1.weight' (Iris) or 'prior_init_fuse_2.task_prior' (Hermes)"
    )


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(f"{path}: weights do not fit the {model.arch} architecture: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _unsafe_global(exc: Exception) -> str | None:
    """The class or function a pickle asked for that weights-only loading refused; None when the
    refusal was something else (a byte no pickle holds: not a checkpoint at all)."""
    m = re.search(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)", str(exc))
    return m.group(1) if m else None


def _torch_load(path: Path, allow_unsafe: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _unsafe_global(exc)
        if name is None:  # e.g. a text file: 'Unsupported operand 35'; never advise running it
            detail = re.search(r"Unsupported operand \d+", str(exc))
            raise CheckpointError(f"{path}: not a model file (neither safetensors nor a PyTorch checkpoint"
                                  f"{': ' + detail.group(0).strip() if detail else ''})") from None
        if not allow_unsafe:
            raise CheckpointError(
                f"{path}: refused: the file needs '{name}', which loading weights must never run. "
                "If you trust the file's origin, pass --trust-checkpoint (Python: allow_unsafe=True)."
            ) from None
        log.warning("%s: loading with full unpickling (allow_unsafe=True; it needs %s)", path, name)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:
        # torch.load hands a *.safetensors name to safetensors itself, hence SafetensorError
        raise CheckpointError(f"{path}: {_unreadable_reason(path)} ({str(exc).splitlines()[0]})") from None


def _unreadable_reason(path: Path) -> str:
    """What an unreadable model file most likely is (a git-LFS pointer is a common surprise)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return "unreadable checkpoint"
    if head.startswith(b"version https://git-lfs"):
        return "a git-LFS pointer, not the model itself: fetch it with 'git lfs pull'"
    return "unreadable or truncated checkpoint"


def _with_evaluation_settings(prep: Preprocessing, obj: Any) -> Preprocessing:
    """The window and overlap a MASS training checkpoint records under config.evaluation (the
    authors' inference.py prefers them to its defaults)."""
    ev = obj.get("config", {}).get("evaluation", {}) if isinstance(obj, dict) else {}
    if not isinstance(ev, dict):
        return prep
    changes: dict = {}
    if isinstance(ev.get("window_size"), list | tuple) and len(ev["window_size"]) == 3:
        changes["window"] = tuple(int(w) for w in ev["window_size"])
    if isinstance(ev.get("overlap"), int | float):
        changes["overlap"] = float(ev["overlap"])
    return replace(prep, **changes) if changes else prep


def load_checkpoint(path: str | Path, allow_unsafe: bool = False, device: str | torch.device = "cpu") -> LoadedModel:
    """Load any supported model file into the matching network (eval mode) on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    meta: dict[str, str] = {}
    obj: Any = None
    if _is_safetensors(path):
        meta, sd = read_safetensors(path, "model")
        wrapper = "safetensors"
    else:
        obj = _torch_load(path, allow_unsafe)
        sd, wrapper = _find_state_dict(obj, path)
    sd = _strip_prefixes(dict(sd))
    if meta.get("format") == FORMAT:
        arch = meta["arch"]
        try:
            config = config_from_dict(arch, json.loads(meta["config"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: bad architecture metadata ({exc})") from None
        prep = Preprocessing.from_dict(json.loads(meta.get("preprocessing", "{}")))
        names = json.loads(meta.get("class_names", "[]"))
        info = json.loads(meta.get("info", "{}"))
    else:
        arch, config = infer_architecture(sd, path)
        # a foreign Iris checkpoint is a MASS/Iris release: the authors' pipeline, not ours
        prep = Preprocessing.mass() if arch == "iris" else Preprocessing()
        if arch == "iris":
            prep = _with_evaluation_settings(prep, obj)
        names, info = [], {"name": path.name, "format": f"foreign ({wrapper})"}
    model = build_model(arch, config)
    _load_into(model, sd, path)
    model.eval().to(device)
    return LoadedModel(model, arch, config, prep, str(path), names, info)


def preset_model(name: str, seed: int = 0) -> LoadedModel:
    """A randomly initialised (untrained) network of a named preset; for tests and training."""
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    torch.manual_seed(seed)
    model = build_model(p.arch, p.config).eval()
    prep = Preprocessing(spacing=p.spacing, window=p.window)
    return LoadedModel(model, p.arch, p.config, prep, f"preset:{name}", [], {"name": f"{name} (untrained)"})
