"""The few-shot anomaly scorer: backbones, heads (training-free knn by default; cff with --method cff), metrics.

Pure model code: nothing here knows of Kafka or gRPC. Importing the package (or ``scorer.errors``,
``scorer.images``) does not load torch; ``Backbone``, ``Head`` and ``load_backbone`` are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from inspection_core.errors import BackboneError, ConfigError, DatasetError, HeadError, ImageError, InspectionError

if TYPE_CHECKING:
    from scorer.backbones import Backbone, BackboneOutput, load_backbone
    from scorer.head import Head, ScoreOptions

_LAZY = {
    "Backbone": "scorer.backbones",
    "BackboneOutput": "scorer.backbones",
    "load_backbone": "scorer.backbones",
    "Head": "scorer.head",
    "ScoreOptions": "scorer.head",
}


def __getattr__(name: str) -> object:
    """PEP 562: the torch-backed names load their module when first asked for."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scorer' has no attribute {name!r}")


__all__ = [
    "Backbone",
    "BackboneOutput",
    "BackboneError",
    "ConfigError",
    "DatasetError",
    "Head",
    "HeadError",
    "ImageError",
    "InspectionError",
    "ScoreOptions",
    "load_backbone",
]
