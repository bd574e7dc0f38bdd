"""Model registry: one place that maps an architecture name and config to a network."""

from __future__ import annotations

from typing import Any

from torch import nn

from iris_core.errors import ConfigError
from iris_core.models.config import (
    PRESETS,
    HermesConfig,
    IrisConfig,
    Preset,
    config_from_dict,
    config_to_dict,
)
from iris_core.models.hermes import HermesNet
from iris_core.models.iris import IrisNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"iris": IrisNet, "hermes": HermesNet}


def build_model(arch: str, config: Any = None) -> nn.Module:
    """Instantiate the network of architecture ``arch`` ('iris' or 'hermes') with ``config``."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](config)


def build_preset(name: str) -> nn.Module:
    """Instantiate the network of a named preset (see ``PRESETS``), randomly initialised."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return build_model(p.arch, p.config)


__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "HermesConfig",
    "HermesNet",
    "IrisConfig",
    "IrisNet",
    "Preset",
    "build_model",
    "build_preset",
    "config_from_dict",
    "config_to_dict",
]
