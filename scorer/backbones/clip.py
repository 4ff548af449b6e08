"""CLIP backbones (open_clip ViTs) for the April-GAN pipeline (spec a.1-a.3).

Nothing here downloads anything unless the caller asks for an open_clip pretrained
*tag* (e.g. ``openai``) on a machine with internet access; the normal offline path
is a local checkpoint file passed as ``weights``. ``build_tiny_clip`` is a seeded,
random-initialised small CLIP so that tests run with no weights at all.

Quirks of open_clip 3.3.0 that shape this module:

* ``VisionTransformer.forward_intermediates(x, indices, stop_early,
  normalize_intermediates, intermediates_only, output_fmt, output_extra_tokens)``
  returns ``{'image_intermediates': [...], 'image_features': pooled @ proj}``; the
  intermediates are the raw residual stream after the chosen blocks with the class
  token already split off. ``image_features`` is CLS -> ``ln_post`` -> ``proj``,
  *not* normalised.
* The built-in configs (``ViT-L-14-336``, ``ViT-B-16``) have no ``quick_gelu`` key, so
  they build with exact ``nn.GELU``; the OpenAI weights were trained with QuickGELU.
  April-GAN ran GELU (its released heads are trained on those features), hence
  ``act='gelu'`` is the default. With a *tag* open_clip warns "QuickGELU mismatch";
  with a local file it cannot know and says nothing.
* ``create_model(pretrained=<file>)`` does load with ``torch.load(weights_only=True)``
  (or safetensors), but only understands a top-level ``state_dict`` key and strips
  ``module.`` after looking at the first key alone, and it fails on OpenAI's JIT
  archives. We therefore build the architecture with ``create_model`` (no weights)
  and load the file ourselves, reusing open_clip's ``resize_pos_embed`` (bicubic,
  antialias on, CLS row kept) so that 336-px weights run at 518 px.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.tokenizer import SimpleTokenizer

from inspection_core.errors import BackboneError, ConfigError, ImageError
from scorer.backbones.base import OPENAI_MEAN, OPENAI_STD, Backbone, BackboneOutput, sha256_file
from scorer.prompts import build_prompts

log = logging.getLogger(__name__)

__all__ = [
    "ClipBackbone",
    "TINY_CLIP_CFG",
    "build_clip",
    "build_tiny_clip",
    "default_taps",
    "load_clip_state_dict",
    "load_clip_weights",
]

ACTS = ("gelu", "quickgelu")

#: Architecture of the random test model: 64 px, 8 px patches -> 8x8 grid, 4 blocks.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Keys OpenAI's original checkpoints carry that are metadata, not parameters.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")
_TEXT_BATCH = 128  # sentences per text-tower call: bounds memory for ViT-L on small GPUs

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


# -- helpers -----------------------------------------------------------------


def default_taps(n_blocks: int) -> tuple[int, ...]:
    """Four evenly spaced 1-indexed blocks ending at the last one (24 -> 6,12,18,24).

    This is April-GAN's choice for ViT-L (and 3,6,9,12 for ViT-B); fewer than four
    blocks tap every block.
    """
    if n_blocks < 1:
        raise BackboneError(f"a CLIP vision tower needs at least one block, got {n_blocks}")
    return tuple(sorted({max(1, -(-n_blocks * k // 4)) for k in range(1, 5)}))


def _default_image_size(model_name: str, native: int, patch: int) -> int:
    """April-GAN's resolution: 518 for patch-14 models, 448 for patch-16/32 ones.

    518 is not a multiple of 16, so ViT-B-16 falls back to 448 (spec a.9).
    """
    if model_name.startswith("ViT-L-14-336") or patch == 14:
        return 518
    if patch in (16, 32):
        return 448
    return native


def _resolve_model_name(name: str, act: str) -> tuple[str, bool]:
    """Map ``name`` + ``act`` to an open_clip config name and a force-QuickGELU flag."""
    if act not in ACTS:
        raise ConfigError(f"CLIP activation must be one of {', '.join(ACTS)}, got {act!r}")
    if not isinstance(name, str) or not name:
        raise BackboneError("a CLIP backbone needs an open_clip model name, e.g. ViT-L-14-336")
    if name.startswith(("hf-hub:", "local-dir:")):
        raise BackboneError(
            f"CLIP model {name!r}: schema names are not supported; use a built-in open_clip name "
            "(e.g. clip:ViT-L-14-336) and pass the checkpoint file with --weights"
        )
    cleaned = name.replace("/", "-")  # 'ViT-L/14' spelling, as open_clip itself accepts
    known = open_clip.list_models()
    if cleaned not in known:
        close = difflib.get_close_matches(cleaned, known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"unknown open_clip model {name!r}{hint}")
    if act == "gelu" or cleaned.endswith("-quickgelu"):
        # a '-quickgelu' name already is the QuickGELU variant, whatever act says
        return cleaned, False
    variant = f"{cleaned}-quickgelu"
    if variant in known:
        return variant, False
    return cleaned, True


def _looks_like_tag(weights: str) -> bool:
    """An open_clip tag is a bare word like ``openai`` or ``laion400m_e32``."""
    return (
        "/" not in weights
        and "\\" not in weights
        and not weights.lower().endswith(_CHECKPOINT_SUFFIXES)
        and weights.replace("_", "").replace("-", "").isalnum()
    )


def _no_weights_message(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    tag_hint = f" (open_clip tags for {model_name}: {', '.join(tags)})" if tags else ""
    return (
        f"no CLIP weights given for {model_name!r}: none ship with this project and nothing is "
        "downloaded on offline machines. Pass --weights PATH to a local checkpoint "
        "(.safetensors preferred; .bin/.pt/.pth state dicts are read with weights_only=True), "
        f"or an open_clip pretrained tag such as 'openai' on a machine with internet access{tag_hint}"
    )


def _is_safetensors(path: Path) -> bool:
    """Sniff the safetensors header (u64 length + '{'), whatever the file is called."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's ``ViT-L-14-336px.pt`` is a TorchScript zip (it has ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist())


def _torchscript_message(path: Path) -> str:
    return (
        f"CLIP checkpoint {str(path)!r} is a TorchScript archive (OpenAI's original .pt format). "
        "It cannot be read with torch.load(weights_only=True) and loading TorchScript runs code from "
        "the file, so it is refused. Convert it once, on a machine where you trust the file:\n"
        '  python -c "import torch, safetensors.torch as st; '
        f"m = torch.jit.load('{path}', map_location='cpu'); "
        "st.save_file({k: v.float().contiguous() for k, v in m.state_dict().items()}, "
        f"'{path.with_suffix('.safetensors')}')\"\n"
        "and pass the .safetensors file as --weights."
    )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the parameter dict inside common checkpoint layouts and normalise its keys."""
    for _ in range(3):  # e.g. {'state_dict': {...}} or {'model': {'state_dict': ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)),
            None,
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise BackboneError(f"CLIP checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise BackboneError(f"CLIP checkpoint {str(path)!r} contains no tensors")
    for prefix in ("module.", "_orig_mod."):  # DataParallel/DDP and torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    for k in _OPENAI_META_KEYS:
        sd.pop(k, None)
    return sd


def load_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file without ever unpickling arbitrary objects.

    safetensors is read with ``safetensors.torch.load_file``; anything else goes
    through ``torch.load(weights_only=True)``. TorchScript archives are refused.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise BackboneError(f"CLIP weights file not found: {str(path)!r}")
    try:
        if p.suffix == ".safetensors" or _is_safetensors(p):
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        elif _is_torchscript_archive(p):
            raise BackboneError(_torchscript_message(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except BackboneError:
        raise
    except Exception as e:  # unpickling refusals, truncated files, bad headers
        raise BackboneError(f"cannot read CLIP checkpoint {str(p)!r}: {type(e).__name__}: {e}") from e
    return _unwrap_state_dict(obj, p)


def load_clip_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint into an open_clip model, resizing position embeddings as needed.

    Strict: every parameter must be present and nothing may be left over, so a
    checkpoint for another architecture (or an April-GAN linear-head file passed
    by mistake) fails here with a message naming the file.
    """
    # OpenAI checkpoints are fp16 and bicubic-antialias resizing has no fp16 CPU kernel;
    # the model is fp32 anyway, so upcast once here.
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_clip_state_dict(path).items()}
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and "logit_scale" in sd and sd["logit_scale"].ndim != scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(scale.shape)
    try:
        resize_pos_embed(sd, model)  # bicubic, antialias=True, align_corners=False, CLS row kept
        resize_text_pos_embed(sd, model)
        result = model.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError) as e:
        raise BackboneError(f"CLIP checkpoint {str(path)!r} does not fit the model: {e}") from e
    unexpected = [k for k in result.unexpected_keys if not k.endswith("attn_mask")]
    if result.missing_keys or unexpected:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {', '.join(result.missing_keys[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise BackboneError(
            f"CLIP checkpoint {str(path)!r} does not match the model architecture: "
            f"{'; '.join(parts)} keys. Is it a full CLIP checkpoint for this model name?"
        )


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "initialized randomly" warning: our weights load right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    root = logging.getLogger()  # open_clip logs through the root logger
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


# -- the backbone --------------------------------------------------------------


class ClipBackbone(Backbone):
    """Frozen open_clip ViT: raw residual-stream taps, global embedding and text matrix."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        spec: str,
        weights_id: str,
        taps: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if visual is None or blocks is None or not hasattr(visual, "forward_intermediates"):
            raise BackboneError(
                f"CLIP backbone {spec!r}: only open_clip ViT vision towers are supported (got {type(visual).__name__})"
            )
        n_blocks = len(blocks)
        taps = tuple(taps) if taps is not None else default_taps(n_blocks)
        if not taps or any(t < 1 or t > n_blocks for t in taps) or list(taps) != sorted(set(taps)):
            raise ConfigError(f"CLIP backbone {spec!r}: taps {taps} must be increasing in 1..{n_blocks}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.taps = taps
        self.width = int(visual.transformer.width)
        self.embed_dim = int(visual.output_dim)
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.mean = OPENAI_MEAN
        self.std = OPENAI_STD
        self.weights_id = weights_id
        self.has_text = True
        self._text_cache: dict[tuple[str, bool], torch.Tensor] = {}

    @property
    def n_blocks(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    def extract(self, pixels: torch.Tensor, depth: int | None = None) -> BackboneOutput:
        """One full forward pass: tap tokens ``(B, N, width)`` and the unit-norm CLS embedding.

        All blocks always run, whatever ``depth``, because the global embedding needs the last one.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (self.image_size,) * 2:
            raise ImageError(
                f"backbone {self.spec!r} expects pixels (B, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixels.shape)}"
            )
        param = next(self.model.visual.parameters())
        out = self.model.visual.forward_intermediates(
            pixels.to(device=param.device, dtype=param.dtype),
            indices=[t - 1 for t in self.taps],
            stop_early=False,
            normalize_intermediates=False,  # raw residual stream: no ln_post, no proj (spec a.2)
            intermediates_only=False,
            output_fmt="NLC",
        )
        glob = F.normalize(out["image_features"].float(), dim=-1).to(param.dtype)
        return BackboneOutput(tokens=list(out["image_intermediates"]), grid=self.grid, global_embedding=glob)

    @torch.no_grad()
    def encode_texts(self, sentences: Sequence[str]) -> torch.Tensor:
        """``(n, E)`` unit-norm text embeddings, in batches of ``_TEXT_BATCH`` sentences."""
        feats = []
        for start in range(0, len(sentences), _TEXT_BATCH):
            tokens = self.tokenizer(list(sentences[start : start + _TEXT_BATCH])).to(self.device)
            feats.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(feats)

    def encode_text_prompts(self, object_name: str, *, single: bool = False) -> torch.Tensor:
        """Text matrix ``(E, 2)``: column 0 normal, column 1 anomalous, columns unit-norm.

        Each sentence is normalised, each group averaged and re-normalised (spec a.3).
        Computed under ``no_grad`` (not ``inference_mode``, so the result can take
        part in the head's training graph as a constant) and cached per object name.
        Computed in fp32; April-GAN used fp16 autocast, so values differ slightly.
        """
        key = (object_name, single)
        if key not in self._text_cache:
            normal, anomalous = build_prompts(object_name, single=single)
            cols = [F.normalize(self.encode_texts(g).mean(dim=0), dim=0) for g in (normal, anomalous)]
            self._text_cache[key] = torch.stack(cols, dim=1).cpu()
        return self._text_cache[key].to(self.device)


# -- builders -------------------------------------------------------------------


def build_clip(
    name: str,
    weights: str | None = None,
    image_size: int | None = None,
    act: str = "gelu",
) -> ClipBackbone:
    """Build ``clip:<name>`` from a local checkpoint (or an open_clip tag when online).

    ``act='gelu'`` uses the plain model name, matching April-GAN's features;
    ``act='quickgelu'`` the ``-quickgelu`` variant that matches how OpenAI trained.
    ``image_size`` defaults to 518 for patch-14 models and 448 for ViT-B-16.
    """
    model_name, force_quick_gelu = _resolve_model_name(name, act)
    spec_name = f"{model_name}-quickgelu" if force_quick_gelu else model_name

    cfg = open_clip.get_model_config(model_name) or {}
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        raise BackboneError(f"open_clip model {name!r} has no ViT vision tower; only ViT CLIPs are supported")
    native = vision.get("image_size", 224)
    patch = int(vision.get("patch_size", 16))
    native = int(native[0] if isinstance(native, list | tuple) else native)
    size = int(image_size) if image_size is not None else _default_image_size(model_name, native, patch)
    if size <= 0 or size % patch:
        raise ConfigError(
            f"image size {size} for CLIP {model_name!r} must be a positive multiple of its patch size "
            f"{patch} (e.g. {patch * max(1, round(size / patch))})"
        )

    if weights is None:
        raise BackboneError(_no_weights_message(model_name))
    path = Path(weights).expanduser()
    common: dict[str, Any] = {
        "force_image_size": size,
        "force_quick_gelu": force_quick_gelu,
        "pretrained_image": False,  # never fetch timm / HF tower weights behind the user's back
        "pretrained_text": False,
    }
    if weights == "random":  # speed benchmarks only: the architecture with seeded random weights
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(0)
            model = open_clip.create_model(model_name, pretrained=None, **common)
        weights_id = "random:0"
    elif path.is_file():
        try:
            with _quiet_random_init_warning():
                model = open_clip.create_model(model_name, pretrained=None, **common)
        except Exception as e:
            raise BackboneError(f"cannot build open_clip model {model_name!r}: {e}") from e
        load_clip_weights(model, path)
        weights_id = sha256_file(str(path))
        log.info("loaded CLIP %s from %s (sha256 %s) at %d px", spec_name, path, weights_id[:12], size)
    elif path.is_dir():
        raise BackboneError(f"CLIP weights path {weights!r} is a directory; pass the checkpoint file in it")
    elif _looks_like_tag(weights):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        tag = weights.lower().replace("-", "_")
        if tag not in tags:
            raise BackboneError(
                f"CLIP weights {weights!r} is neither an existing file nor an open_clip pretrained tag "
                f"for {model_name!r} (tags: {', '.join(tags) or 'none'})"
            )
        try:
            model = open_clip.create_model(model_name, pretrained=tag, **common)
        except Exception as e:
            raise BackboneError(
                f"cannot fetch open_clip weights {model_name}:{tag} ({e}); on an offline machine pass "
                "--weights PATH to a local checkpoint instead"
            ) from e
        weights_id = f"openclip:{tag}"
    else:
        raise BackboneError(f"CLIP weights file not found: {weights!r}")

    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBackbone(model.eval(), tokenizer, spec=f"clip:{spec_name}", weights_id=weights_id)


def _tiny_model(seed: int, image_size: int | None) -> torch.nn.Module:
    """Random tiny CLIP; the RNG is forked so seeding never disturbs the caller's stream."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_CLIP_CFG.items()}
    if image_size is not None:
        patch = cfg["vision_cfg"]["patch_size"]
        if image_size <= 0 or image_size % patch:
            raise ConfigError(f"tiny-clip image size must be a positive multiple of {patch}, got {image_size}")
        cfg["vision_cfg"]["image_size"] = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    return model


def build_tiny_clip(seed: int = 0, image_size: int | None = None) -> ClipBackbone:
    """Seeded random CLIP (64 px, 4 blocks, width 64, E 32) for tests without weights.

    Same seed and size give bit-identical weights. The tokenizer is open_clip's
    ``SimpleTokenizer``, whose BPE vocabulary ships inside the package.
    """
    model = _tiny_model(seed, image_size)
    model.requires_grad_(False)
    tokenizer = SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    return ClipBackbone(model.eval(), tokenizer, spec="tiny-clip", weights_id=f"random:{seed}")
