"""The scorer's errors; they are defined in :mod:`inspection_core.errors` (one hierarchy for the system).

Kept so ``from scorer.errors import HeadError`` reads naturally in model code; importing it loads no torch.
"""

from inspection_core.errors import BackboneError, ConfigError, DatasetError, HeadError, ImageError, InspectionError

__all__ = ["BackboneError", "ConfigError", "DatasetError", "HeadError", "ImageError", "InspectionError"]
