"""Episodic in-context training of Iris (and Hermes) on task sources that run offline.

``config`` (TrainConfig, TOML), ``sources`` (templates, nnU-Net datasets, class-agnostic
clusters, procedural and label-to-image synthetic volumes), ``episodes`` (reference and
query views, crops, batches), ``loop`` (resumable training, EMA, validation, export),
``checks`` (does a model follow its reference: the checks a training runs at each save, and
``iris-segment check-model``). Imported by ``train`` and ``check-model``: segmentation never needs it.
"""

from iris_core.training.config import TrainConfig, load_config
from iris_core.training.loop import train

__all__ = ["TrainConfig", "load_config", "train"]
