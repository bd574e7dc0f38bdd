"""Task embeddings: K classes' tokens, computed once, reused for any number of targets,
averaged (context ensemble), compared (retrieval) and saved as a task library."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iris_core.errors import CheckpointError, InputError
from iris_core.hub.checkpoint import read_safetensors, write_safetensors
from iris_core.hub.library import LibraryInfo
from iris_core.models.config import MEMORY_MIN_TOKENS


def is_memory(t: torch.Tensor) -> bool:
    """Whether a stage tensor [K, T, C] is a memory sample rather than task tokens."""
    return t.shape[1] >= MEMORY_MIN_TOKENS


#: a memory row is (key, mask values, [position x, y, z in mm,] log weight): the position columns of a
#: model with a position-aware readout (``memory_positions``) are the three before the last
POSITION_COLUMNS = slice(-4, -1)


def memory_groups(memory: torch.Tensor, values: slice) -> list[list[int]]:
    """The classes of a memory stage [K, M, cols] in groups that share their rows (every column but the mask
    ``values``: keys, positions, weights; encoded from one reference crop, or merged from the same
    references), which the network reads out in one call; first-seen order."""
    shared = torch.ones(memory.shape[-1], dtype=torch.bool)
    shared[values] = False
    groups: list[list[int]] = []
    for ki in range(memory.shape[0]):
        for g in groups:
            if torch.equal(memory[g[0]][:, shared], memory[ki][:, shared]):
                g.append(ki)
                break
        else:
            groups.append([ki])
    return groups


def merge_memories(rows: list[torch.Tensor]) -> torch.Tensor:
    """One memory [M, C + 2] from the memories of several references (each [M, C + 2]): reference j
    gives its rows j, j + n, j + 2n, ... (each stratum of its sample thinned evenly) and every row then
    stands for n times as many voxels (log weight + log n)."""
    n = len(rows)
    if n == 1:
        return rows[0]
    out = torch.empty_like(rows[0])
    for j, r in enumerate(rows):
        out[j::n] = r[j::n]
    out[:, -1] += math.log(n)  # padding rows (log weight -1e4) stay unattended
    return out


def model_fingerprint(model: nn.Module) -> str:
    """Short hash identifying a network's architecture and weights (embeddings only fit their model)."""
    h = hashlib.sha256(model.arch.encode())
    h.update(json.dumps(repr(model.config)).encode())
    for key in ("task_embedding.0.task_query", "out.norm.weight"):
        t = model.state_dict().get(key)
        if t is not None:
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class TaskEmbedding:
    """Tokens per prior stage, each [K, T, C] (float32, CPU), with class names and label values."""

    tokens: list[torch.Tensor]
    names: list[str]
    values: list[int]

    def __post_init__(self) -> None:
        k = {t.shape[0] for t in self.tokens}
        if k != {len(self.names)} or len(self.names) != len(self.values):
            raise ValueError("TaskEmbedding: token, name and value counts differ")

    def __len__(self) -> int:
        return len(self.names)

    def batched(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Tokens as the network takes them: [1, K, T, C] per stage."""
        return [t.unsqueeze(0).to(device=device, dtype=dtype) for t in self.tokens]

    def select(self, names: list[str]) -> TaskEmbedding:
        """The classes ``names``, in that order."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise InputError(f"classes {missing} are not in this embedding (it has {self.names})")
        idx = [self.names.index(n) for n in names]
        return TaskEmbedding([t[idx] for t in self.tokens], list(names), [self.values[i] for i in idx])

    def with_positions(self, mapping: Callable[[np.ndarray], np.ndarray] | None) -> TaskEmbedding:
        """A copy whose memory rows' positions (:data:`POSITION_COLUMNS`; a model with a position-aware
        readout) are mapped by ``mapping`` (points [N, 3] in mm: the reference's space to the target's), or
        made unknown (NaN: the readout then reads by features alone) where ``mapping`` is None."""
        tokens = []
        for t in self.tokens:
            if is_memory(t):
                t = t.clone()
                pos = t[..., POSITION_COLUMNS]
                if mapping is None:
                    pos[:] = float("nan")
                else:
                    pos[:] = torch.from_numpy(mapping(pos.reshape(-1, 3).double().numpy()).reshape(pos.shape))
            tokens.append(t)
        return TaskEmbedding(tokens, list(self.names), list(self.values))

    def has_positions(self) -> bool:
        """Whether every memory row of every class knows its position (an aligned reference)."""
        return any(is_memory(t) for t in self.tokens) and all(
            bool(torch.isfinite(t[..., POSITION_COLUMNS]).all()) for t in self.tokens if is_memory(t))

    def vectors(self) -> torch.Tensor:
        """One flat vector per class [K, sum(T*C)] of the task tokens (memory samples left out), for
        cosine similarity."""
        return torch.cat([t.flatten(1) for t in self.tokens if not is_memory(t)], dim=1)

    @staticmethod
    def concat(parts: list[TaskEmbedding]) -> TaskEmbedding:
        return TaskEmbedding(
            [torch.cat([p.tokens[s] for p in parts]) for s in range(len(parts[0].tokens))],
            [n for p in parts for n in p.names],
            [v for p in parts for v in p.values],
        )

    @staticmethod
    def average(parts: list[TaskEmbedding]) -> TaskEmbedding:
        """Context ensemble: per class name, the mean of the embeddings of every part holding it
        (memory samples: merged, :func:`merge_memories`)."""
        names: list[str] = []
        values: list[int] = []
        for p in parts:
            for n, v in zip(p.names, p.values):
                if n not in names:
                    names.append(n)
                    values.append(v)
        tokens = []
        for s in range(len(parts[0].tokens)):
            per_class = []
            for n in names:
                stack = [p.tokens[s][p.names.index(n)] for p in parts if n in p.names]
                per_class.append(merge_memories(stack) if is_memory(stack[0]) else torch.stack(stack).mean(0))
            tokens.append(torch.stack(per_class))
        return TaskEmbedding(tokens, names, values)

    def save(self, path: str | Path, fingerprint: str, info: dict | None = None) -> Path:
        """Write a task library (safetensors) usable later with no reference."""
        tensors = {f"stage{s}": t.contiguous() for s, t in enumerate(self.tokens)}
        meta = LibraryInfo(list(self.names), list(self.values), fingerprint, info or {}).to_metadata()
        return write_safetensors(Path(path), tensors, meta)

    @staticmethod
    def load(path: str | Path, fingerprint: str | None = None) -> TaskEmbedding:
        """Read a task library; with ``fingerprint``, refuse one made with another model."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"task library {path}: file not found")
        meta, tensors = read_safetensors(path, "task library")
        lib = LibraryInfo.from_metadata(meta, path)
        if fingerprint is not None and lib.model != fingerprint:
            raise CheckpointError(
                f"task library {path}: made with another model (fingerprint {lib.model}, "
                f"this model {fingerprint}); re-encode the references with this model"
            )
        n = len([k for k in tensors if k.startswith("stage")])
        return TaskEmbedding([tensors[f"stage{s}"] for s in range(n)], lib.names, lib.values)
