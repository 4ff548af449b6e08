"""The one interface every backbone implements.

A backbone turns a batch of decoded RGB images into the patch tokens of its
tapped blocks (raw residual stream, class and register tokens dropped), the
patch grid, an optional global embedding and, for CLIP, a text encoder. Heads,
the memory bank and the evaluation only ever talk to this interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspection_core.errors import ConfigError, ImageError
from inspection_core.names import COMPILE_MODES, PRECISIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_SCOPES = threading.local()  # per-thread precision overrides: a calibrator fit next to a scoring worker


def auto_precision(device: torch.device | str) -> str:
    """bf16 on GPUs and on CPUs with bf16 units (avx512_bf16 / AMX: 1.8x on ViT-S here), else fp32.

    Scoring in bf16 matches fp32 on real data; fitting does not, so fits run in fp32 whatever this says
    (``FitOptions.precision``; BENCHMARKS.md).
    """
    if torch.device(device).type == "cuda":
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


@dataclass(frozen=True)
class BackboneOutput:
    """Tokens of the tapped blocks of one forward pass.

    ``tokens[i]`` is ``(B, N, D)`` with ``N = grid[0] * grid[1]`` patch tokens in
    row-major order. ``global_embedding`` is ``(B, E)`` and L2-normalised, or None
    for backbones that have no joint embedding space.
    """

    tokens: list[torch.Tensor]
    grid: tuple[int, int]
    global_embedding: torch.Tensor | None = None
    # (B, 4) float: where each source image lies on the square input, as fractions (y0, x0, y1, x1) of it;
    # None = the whole input (squash resize). Letterboxed maps are cropped to it, so they cover the source only.
    content: torch.Tensor | None = None

    def select(self, idx: Sequence[int] | slice) -> BackboneOutput:
        """The same output for a subset of images (every per-image field sliced alike)."""
        ii = idx if isinstance(idx, slice) else torch.as_tensor(list(idx), dtype=torch.long)
        return BackboneOutput(
            [t[ii] for t in self.tokens],
            self.grid,
            None if self.global_embedding is None else self.global_embedding[ii],
            None if self.content is None else self.content[ii],
        )

    def __len__(self) -> int:
        return int(self.tokens[0].shape[0])


class Backbone(nn.Module):
    """Frozen feature extractor with a fixed input size.

    Subclasses set the attributes in ``__init__`` and implement :meth:`extract`.
    """

    spec: str
    taps: tuple[int, ...]  # 1-indexed block numbers
    width: int  # token width D
    embed_dim: int | None  # joint embedding width E (CLIP) or None
    image_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str  # sha256 of the weights file, or "random:<seed>"
    has_text: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for the forward pass (set_precision)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def extract(self, pixels: torch.Tensor, depth: int | None = None) -> BackboneOutput:  # pragma: no cover
        """Tokens after each tap; with ``depth`` only the first ``depth`` taps are computed (see subclasses)."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> BackboneOutput:
        return self.extract(pixels)

    # -- precision -----------------------------------------------------------
    def set_precision(self, precision: str) -> Backbone:
        """Autocast dtype for :meth:`run`: bf16 on GPUs (and CPUs with bf16 units), fp16, or fp32."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        return self

    @contextlib.contextmanager
    def precision_scope(self, precision: str) -> Iterator[Backbone]:
        """Run this backbone at ``precision`` in the calling thread only (others keep theirs)."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        scopes = _SCOPES.__dict__.setdefault("by_id", {})
        had, old = id(self) in scopes, scopes.get(id(self))
        scopes[id(self)] = precision
        try:
            yield self
        finally:
            if had:
                scopes[id(self)] = old
            else:
                scopes.pop(id(self), None)

    @property
    def active_precision(self) -> str:
        """The precision a forward pass in this thread uses: a scope's, else the backbone's."""
        return _SCOPES.__dict__.get("by_id", {}).get(id(self), self.precision)

    def enable_compile(self, mode: str = "default") -> Backbone:
        """``torch.compile`` the forward (``reduce-overhead`` adds CUDA graphs); shapes are static per batch size.

        The first call per batch size and precision compiles (seconds to minutes); results equal eager ones
        to float rounding. ``off`` goes back to eager.
        """
        if mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.__dict__["_compiled"] = None if mode == "off" else torch.compile(self.extract, mode=mode, dynamic=False)
        return self

    def run(self, pixels: torch.Tensor, depth: int | None = None) -> BackboneOutput:
        """One forward pass in inference mode under the active precision (attention uses fused SDPA).

        ``depth``: how many leading taps the caller reads (a knn head that ignores the last tap); a backbone may
        stop after that tap's block, and the taps past it then come back as zeros. ``None``: every tap.
        """
        prec = self.active_precision
        compiled = self.__dict__.get("_compiled")
        fn = compiled or self.extract
        b = pixels.shape[0]
        if compiled is not None and b & (b - 1):  # pad to a power of two: a few compiled shapes, not one per size
            pad = (1 << b.bit_length()) - b
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, *pixels.shape[1:])])
        with torch.inference_mode():
            if prec == "fp32":
                out = fn(pixels, depth)
            else:
                dtype = torch.bfloat16 if prec == "bf16" else torch.float16
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    out = fn(pixels, depth)
        if out.tokens[0].shape[0] != b:
            out = out.select(slice(0, b))
        return out

    def forward_images(
        self, images: Sequence[np.ndarray | torch.Tensor], *, letterbox: bool = False, depth: int | None = None
    ) -> BackboneOutput:
        out = self.run(self.preprocess(images, letterbox=letterbox), depth)
        if not letterbox:
            return out
        boxes = [letterbox_box(*image_hw(img), self.image_size) for img in images]
        content = torch.tensor(boxes, dtype=torch.float32) / self.image_size
        return BackboneOutput(out.tokens, out.grid, out.global_embedding, content)

    def encode_text_prompts(self, object_name: str) -> torch.Tensor:
        """Normal/anomalous text matrix ``(E, 2)``; only CLIP backbones have one."""
        raise ConfigError(f"backbone {self.spec!r} has no text encoder")

    # -- preprocessing -------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray | torch.Tensor], *, letterbox: bool = False) -> torch.Tensor:
        """Resize (squash, or letterbox) and normalise decoded RGB uint8 images.

        NumPy images (H x W x 3) are resized on the CPU and copied through pinned memory without
        blocking; uint8 tensors (3 x H x W, e.g. from ``torchvision.io.decode_jpeg(device="cuda")``)
        are resized where they are, so JPEG decode and resize can both stay on the GPU.
        """
        if len(images) and isinstance(images[0], torch.Tensor):
            return preprocess_tensors(
                images,  # type: ignore[arg-type]
                self.image_size,
                self.mean,
                self.std,
                device=self.device,
                letterbox=letterbox,
            )
        if self.device.type == "cuda":
            # uint8 to the GPU (4x less than float32, pinned, non-blocking) and resize there: a CPU thread
            # resizing with PIL would cap a GPU worker at a few hundred frames/s
            up = []
            for i, img in enumerate(images):
                if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    desc = getattr(img, "shape", type(img).__name__)
                    raise ImageError(f"image {i}: expected an H x W x 3 uint8 RGB array, got {desc}")
                t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).pin_memory()
                up.append(t.to(self.device, non_blocking=True))
            return preprocess_tensors(up, self.image_size, self.mean, self.std, letterbox=letterbox)
        px = preprocess_images(images, self.image_size, self.mean, self.std, letterbox=letterbox)  # type: ignore[arg-type]
        return px.to(self.device)

    @torch.inference_mode()
    def embed(
        self,
        images: Sequence[np.ndarray],
        *,
        batch_size: int = 8,
        letterbox: bool = False,
        progress: Callable[[int, int], None] | None = None,
        depth: int | None = None,
    ) -> BackboneOutput:
        """Extract tokens for many images in batches, results on the CPU in float32.

        ``progress(done, total)`` is called before the first batch and after each one; ``depth`` as in :meth:`run`.
        """
        outs: list[BackboneOutput] = []
        if progress is not None:
            progress(0, len(images))
        for start in range(0, len(images), batch_size):
            outs.append(self.forward_images(images[start : start + batch_size], letterbox=letterbox, depth=depth))
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
        return concat_outputs(outs)


def concat_outputs(outs: Sequence[BackboneOutput]) -> BackboneOutput:
    """Backbone outputs of several batches as one, in order, float32 on the CPU (global embeddings only where
    every part has them)."""
    if not outs:
        raise ConfigError("no images to extract features from")
    tokens = [torch.cat([o.tokens[i].float().cpu() for o in outs]) for i in range(len(outs[0].tokens))]
    glob = None
    if all(o.global_embedding is not None for o in outs):
        glob = torch.cat([o.global_embedding.float().cpu() for o in outs])  # type: ignore[union-attr]
    content = None
    if any(o.content is not None for o in outs):
        full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        content = torch.cat([o.content if o.content is not None else full.expand(len(o), 4) for o in outs])
    return BackboneOutput(tokens=tokens, grid=outs[0].grid, global_embedding=glob, content=content)


def image_hw(img: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """Height and width of an H x W x 3 array or a 3 x H x W tensor."""
    return (int(img.shape[1]), int(img.shape[2])) if isinstance(img, torch.Tensor) else img.shape[:2]


def letterbox_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``h x w`` image lands on a ``size`` square when scaled to fit and centred: (y0, x0, y1, x1)."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    return y0, x0, y0 + nh, x0 + nw


def preprocess_images(
    images: Sequence[np.ndarray],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    letterbox: bool = False,
) -> torch.Tensor:
    """``(B, 3, size, size)`` float tensor; bicubic resize like open_clip's val transform."""
    from PIL import Image

    batch = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            desc = getattr(img, "shape", type(img).__name__)
            raise ImageError(f"image {i}: expected an H x W x 3 uint8 RGB array, got {desc}")
        pil = Image.fromarray(img)
        if letterbox:
            y0, x0, y1, x1 = letterbox_box(*img.shape[:2], size)
            canvas = Image.new("RGB", (size, size), (0, 0, 0))
            canvas.paste(pil.resize((x1 - x0, y1 - y0), Image.BICUBIC), (x0, y0))
            pil = canvas
        else:
            pil = pil.resize((size, size), Image.BICUBIC)
        batch.append(np.asarray(pil))
    arr = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (arr - m) / s


def preprocess_tensors(
    images: Sequence[torch.Tensor],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str | None = None,
    letterbox: bool = False,
) -> torch.Tensor:
    """Like :func:`preprocess_images` for uint8 ``(3, H, W)`` tensors, on their device (antialiased bicubic)."""
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
            desc = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ImageError(f"image {i}: expected a 3 x H x W uint8 tensor, got {desc}")
        x = img.to(device) if device is not None else img
        if letterbox:
            y0, x0, y1, x1 = letterbox_box(int(x.shape[1]), int(x.shape[2]), size)
            x = F.interpolate(x[None].float(), size=(y1 - y0, x1 - x0), mode="bicubic", antialias=True)
            x = F.pad(x, (x0, size - x1, y0, size - y1))  # black, as the PIL path
        else:
            x = F.interpolate(x[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(x.clamp_(0, 255).round_())
    arr = torch.cat(out).div_(255.0)
    m = torch.tensor(mean, device=arr.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=arr.device).view(1, 3, 1, 1)
    return (arr - m) / s


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
