"""Command-line options for a backbone, shared by every command and service that runs one.

``add_backbone_args`` defines them (defaults from ``CFF_INSPECT_<OPTION>``); ``backbone_from`` turns the
parsed namespace into a loaded backbone. torch is imported only when a backbone is actually built, so
parsers (and ``cff-inspect --help``) stay light.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from inspection_core.env import add_choice
from inspection_core.names import COMPILE_MODES, METHODS, PRECISION_CHOICES, PRECISIONS

if TYPE_CHECKING:
    from scorer.backbones import Backbone


def add_backbone_args(p: argparse.ArgumentParser, *, default: str | None = "dinov2-vits14", sized: bool = True) -> None:
    """``--backbone`` (``default=None``: taken from the head's manifest), weights, size, device, precision.

    ``sized=False`` for commands that score with existing heads: their input size is the heads' own, so an
    ``--image-size`` there could only be ignored or break them — it is not offered.
    """
    p.add_argument(
        "--backbone",
        default=default,
        help="dinov2-vits14 | clip:<open_clip name> | tiny-vit | tiny-clip (default: %(default)s)",
    )
    p.add_argument("--weights", default=None, help="local checkpoint path for the backbone")
    if sized:
        p.add_argument(
            "--image-size",
            type=int,
            default=None,
            help="backbone input size (default: the backbone's, 448 for dinov2-vits14)",
        )
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_choice(
        p,
        "--precision",
        PRECISION_CHOICES,
        "auto",
        "backbone autocast for scoring: auto = bf16 on a GPU or a CPU with bf16 units, else fp32",
    )
    add_choice(
        p,
        "--compile",
        COMPILE_MODES,
        "off",
        "torch.compile the backbone (reduce-overhead adds CUDA graphs); first batches compile (default: off)",
    )


def add_fit_precision_arg(p: argparse.ArgumentParser, what: str) -> None:
    add_choice(p, "--fit-precision", PRECISIONS, "fp32", f"{what} (default: %(default)s)")


def add_data_arg(p: argparse.ArgumentParser, what: str, *, required: bool = False) -> None:
    """``--data`` (repeatable) MVTec-layout folders; ``required`` unless ``CFF_INSPECT_DATA`` names some."""
    p.add_argument(
        "--data",
        action="append",
        required=required,
        default=None,
        help=what,
    )


def add_method_arg(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--method cff|aprilgan|knn`` for one fit (``default``: the environment's or cff)."""
    p.add_argument("--method", choices=METHODS, default=default or METHODS[0])


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` where a GPU is visible, else ``cpu``; other names pass through."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(args: argparse.Namespace, device: str) -> str:
    """``--precision auto`` -> what the device runs best (see ``scorer.backbones.base.auto_precision``)."""
    p = getattr(args, "precision", "auto")
    if p == "auto":
        from scorer.backbones.base import auto_precision

        return auto_precision(device)
    return p


LOCAL_BACKBONE_OPTIONS = {"weights": None, "image_size": None, "device": "auto", "threads": None, "compile": "off"}


def refuse_local_backbone_options(args: argparse.Namespace, why: str) -> None:
    """Where no backbone runs in this process (a fit on the calibrator), its options would be silently dropped."""
    given = [k for k, d in LOCAL_BACKBONE_OPTIONS.items() if getattr(args, k, d) not in (d, None)]
    if getattr(args, "precision", "auto") != "auto":
        given.append("precision")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        from inspection_core.errors import ConfigError

        raise ConfigError(f"{flags}: no backbone runs here ({why})")


def backbone_from(args: argparse.Namespace, *, image_size: int | None = None) -> Backbone:
    """The backbone the options of :func:`add_backbone_args` describe, on its device, at its precision, with its
    threads and compile mode (``image_size``: a head's, over the option)."""
    import torch

    from scorer.backbones import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    size = image_size or getattr(args, "image_size", None)
    bb = load_backbone(args.backbone, weights=args.weights, image_size=size, device=dev)
    if getattr(args, "compile", "off") != "off":
        bb.enable_compile(args.compile)
    return bb.set_precision(resolve_precision(args, dev))
