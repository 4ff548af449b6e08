"""Text prompts for CLIP's zero-shot normal/anomalous text matrix (spec a.3).

The state words and the 35 templates are copied verbatim, in order, from
April-GAN's ``prompt_ensemble.py`` (``ByChelsea/VAND-APRIL-GAN``), because its
released linear-layer checkpoints were trained against exactly these text
embeddings. The list is the WinCLIP subset of CLIP's ImageNet templates; it is
*not* the full 80-template CLIP list, and a few CLIP templates that look similar
("a photo of a nice {}.", "a photo of the weird {}.", "the {} in the scene.") are
deliberately absent.

The object name is substituted raw (``metal_nut`` stays ``metal_nut``): that is
what April-GAN does with the dataset folder name.
"""

from __future__ import annotations

from inspection_core.errors import ConfigError

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

SINGLE_NORMAL = "a photo of a normal {}."
SINGLE_ANOMALOUS = "a photo of an anomalous {}."


def _expand(states: tuple[str, ...], templates: tuple[str, ...], object_name: str) -> list[str]:
    """Every state substituted into every template, state-major like April-GAN."""
    return [t.format(s.format(object_name)) for s in states for t in templates]


def build_prompts(object_name: str, single: bool = False) -> tuple[list[str], list[str]]:
    """``(normal_sentences, anomalous_sentences)`` for one product.

    The ensemble gives 7 x 35 = 245 normal and 5 x 35 = 175 anomalous sentences;
    ``single=True`` gives one sentence per group (a cheap ablation / debugging mode).
    """
    if not isinstance(object_name, str) or not object_name.strip():
        raise ConfigError(f"object name for the text prompts must be a non-empty string, got {object_name!r}")
    if single:
        return [SINGLE_NORMAL.format(object_name)], [SINGLE_ANOMALOUS.format(object_name)]
    return (
        _expand(NORMAL_STATES, TEMPLATES, object_name),
        _expand(ANOMALOUS_STATES, TEMPLATES, object_name),
    )
