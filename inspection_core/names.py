"""Closed sets of names that options, messages and metric labels share, so none is retyped."""

from __future__ import annotations

from enum import StrEnum

METHODS = ("knn", "aprilgan", "cff")  # head fitting methods, the default first (BENCHMARKS.md: knn is the best)
# What `eval` compares: the deployable methods plus two baselines/ablations (scorer.evaluate says which is which)
EVAL_METHODS = (
    "knn",
    "knn-mean",
    "knn-auto",
    "knn-mid",
    "knn-views",
    "knn-noviews",
    "aprilgan",
    "cff",
    "cff-unguarded",
)
PRECISIONS = ("fp32", "bf16", "fp16")  # backbone autocast precisions
PRECISION_CHOICES = ("auto", *PRECISIONS)  # auto: bf16 on a GPU or a CPU with bf16 units, else fp32
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

# Decompression-bomb guard for frames and uploaded images: more pixels, or a longer side, is refused.
MAX_PIXELS = 40_000_000
MAX_SIDE = 16384

# Reference images per fit. A calibrator takes MAX_SHOTS unless its --max-shots says otherwise, at most
# MAX_SHOTS_CEILING (memory and fit time grow with each one); an offline `heads fit` may use the ceiling, and a
# calibrator then imports that head only if its --max-shots is as high.
MAX_SHOTS = 16
MAX_SHOTS_CEILING = 64
CHUNK_BYTES = 1 << 20  # the piece size of images and head files streamed over gRPC


class DeadLetterReason(StrEnum):
    """Why a message went to the dead-letter topic; the value is the metric label."""

    NOT_A_FRAME = "not_a_frame"  # the bytes do not parse as a Frame
    INVALID_PRODUCT = "invalid_product"  # a Frame whose product id breaks the id rule
    BAD_IMAGE = "bad_image"  # empty, unknown encoding, not the declared format, zero-size, too large or undecodable
    INVALID_FIELD = "invalid_field"  # an id, capture time or attribute set outside the frame rules
    DECODE_LIMIT = "decode_limit"  # an image whose decode would exceed its scan count or time budget
