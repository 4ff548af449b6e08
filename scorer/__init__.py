"""The few-shot anomaly scorer: backbones, CFF heads, memory bank, metrics, evaluation.

Pure model code: nothing here knows of Kafka or gRPC.
"""

from scorer.backbones import Backbone, BackboneOutput, load_backbone
from scorer.errors import (
    BackboneError,
    ConfigError,
    DatasetError,
    HeadError,
    ImageError,
    InspectionError,
)
from scorer.head import Head, ScoreOptions

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
