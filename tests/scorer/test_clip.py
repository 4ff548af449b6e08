"""CLIP backbone and prompt tests; random tiny configs only, no weights, no network."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from inspection_core.errors import BackboneError, ConfigError, ImageError
from scorer.backbones.base import sha256_file
from scorer.backbones.clip import (
    TINY_CLIP_CFG,
    ClipBackbone,
    _default_image_size,
    _looks_like_tag,
    _resolve_model_name,
    build_clip,
    build_tiny_clip,
    default_taps,
    load_clip_state_dict,
)
from scorer.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, build_prompts

TEST_MODEL = "scorer-test-tiny-clip"  # registered with open_clip from a tmp JSON below


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def registered_tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Make the tiny architecture a named open_clip config, as a real model name would be."""
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / f"{TEST_MODEL}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d)
    assert TEST_MODEL in open_clip.list_models()
    return TEST_MODEL


def _state_dict(bb: ClipBackbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in bb.model.state_dict().items()}


def _same_output(a: ClipBackbone, b: ClipBackbone, x: torch.Tensor) -> None:
    oa, ob = a.extract(x), b.extract(x)
    assert oa.grid == ob.grid
    for ta, tb in zip(oa.tokens, ob.tokens, strict=True):
        assert torch.equal(ta, tb)
    assert torch.equal(oa.global_embedding, ob.global_embedding)
    # one sentence per group keeps this cheap; the full ensemble is covered in test_text_matrix
    assert torch.equal(a.encode_text_prompts("screw", single=True), b.encode_text_prompts("screw", single=True))


# -- prompts ---------------------------------------------------------------------


def test_prompt_counts_match_april_gan() -> None:
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 5
    assert len(TEMPLATES) == 35 and len(set(TEMPLATES)) == 35
    normal, anomalous = build_prompts("metal_nut")
    assert len(normal) == 7 * 35 and len(anomalous) == 5 * 35
    assert normal[0] == "a bad photo of a metal_nut."  # raw folder name, underscore kept
    assert anomalous[-1] == "this is one metal_nut with damage in the scene."
    assert build_prompts("pcb1", single=True) == (
        ["a photo of a normal pcb1."],
        ["a photo of an anomalous pcb1."],
    )
    with pytest.raises(ConfigError):
        build_prompts("  ")


# -- tiny CLIP: shapes and what the taps are ---------------------------------------


def test_tiny_clip_shapes(tiny: ClipBackbone, pixels: torch.Tensor) -> None:
    assert (tiny.spec, tiny.weights_id, tiny.taps) == ("tiny-clip", "random:0", (1, 2, 3, 4))
    assert (tiny.width, tiny.embed_dim, tiny.image_size, tiny.patch_size) == (64, 32, 64, 8)
    assert tiny.has_text and tiny.grid == (8, 8)
    out = tiny.extract(pixels)
    assert out.grid == (8, 8)
    assert [tuple(t.shape) for t in out.tokens] == [(2, 64, 64)] * 4
    assert out.global_embedding is not None and out.global_embedding.shape == (2, 32)
    assert torch.allclose(out.global_embedding.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_taps_are_raw_residual_stream_without_cls(tiny: ClipBackbone, pixels: torch.Tensor) -> None:
    visual = tiny.model.visual
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o.detach().clone()))
        for i, blk in enumerate(visual.transformer.resblocks)
    ]
    try:
        out = tiny.extract(pixels)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == [0, 1, 2, 3]
    for tap, tokens in zip(tiny.taps, out.tokens, strict=True):
        raw = seen[tap - 1]
        assert raw.shape == (2, 65, 64)  # batch-first, CLS + 64 patches
        assert torch.equal(tokens, raw[:, 1:])
        assert not torch.allclose(tokens, visual.ln_post(raw[:, 1:]))  # no ln_post on taps
    # global embedding = last block's CLS -> ln_post -> proj, L2-normalised
    expected = F.normalize(visual.ln_post(seen[3][:, 0]) @ visual.proj, dim=-1)
    assert torch.allclose(out.global_embedding, expected, atol=1e-6)
    assert torch.allclose(out.global_embedding, tiny.model.encode_image(pixels, normalize=True), atol=1e-6)


def test_wrong_pixel_shape_is_an_image_error(tiny: ClipBackbone) -> None:
    with pytest.raises(ImageError, match="64, 64"):
        tiny.extract(torch.zeros(1, 3, 32, 32))


def test_seed_determinism_and_rng_isolation(pixels: torch.Tensor) -> None:
    a, b, c = build_tiny_clip(seed=7), build_tiny_clip(seed=7), build_tiny_clip(seed=8)
    sa, sb, sc = _state_dict(a), _state_dict(b), _state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    _same_output(a, b, pixels)
    assert c.weights_id == "random:8"
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_clip(seed=0)
    assert torch.equal(torch.rand(3), expected)  # building does not consume the caller's RNG


def test_tiny_clip_other_image_size() -> None:
    bb = build_tiny_clip(seed=0, image_size=96)
    out = bb.extract(torch.zeros(1, 3, 96, 96))
    assert bb.grid == (12, 12) and out.tokens[0].shape == (1, 144, 64)
    with pytest.raises(ConfigError):
        build_tiny_clip(image_size=60)


# -- text ------------------------------------------------------------------------


def test_text_matrix(tiny: ClipBackbone, monkeypatch: pytest.MonkeyPatch) -> None:
    t = tiny.encode_text_prompts("metal_nut")
    assert t.shape == (32, 2)
    assert torch.allclose(t.norm(dim=0), torch.ones(2), atol=1e-5)
    assert not torch.allclose(t, tiny.encode_text_prompts("pcb1"))
    assert not torch.allclose(t[:, 0], t[:, 1])
    normal, anomalous = build_prompts("metal_nut")
    manual = torch.stack([F.normalize(tiny.encode_texts(g).mean(0), dim=0) for g in (normal, anomalous)], dim=1)
    assert torch.allclose(t, manual, atol=1e-6)
    single = tiny.encode_text_prompts("metal_nut", single=True)
    assert single.shape == (32, 2) and not torch.allclose(single, t)

    calls = []
    monkeypatch.setattr(tiny, "encode_texts", lambda s: calls.append(s) or torch.zeros(len(s), 32))
    assert torch.equal(tiny.encode_text_prompts("metal_nut"), t)  # cached: no new encoding
    assert not calls


def test_text_matrix_has_no_grad(tiny: ClipBackbone) -> None:
    tiny.requires_grad_(True)
    try:
        t = tiny.encode_text_prompts("fresh_name_for_grad_check", single=True)
    finally:
        tiny.requires_grad_(False)
    assert not t.requires_grad and not t.is_inference()


def test_tokenizer_is_bundled_bpe(tiny: ClipBackbone) -> None:
    tokens = tiny.tokenizer(["a photo of a metal_nut."])
    assert tokens.shape == (1, 77) and tokens[0, 0].item() == 49406  # <start_of_text>


# -- build_clip: errors ------------------------------------------------------------


def test_build_clip_without_weights_explains_what_to_do() -> None:
    with pytest.raises(BackboneError) as e:
        build_clip("ViT-B-16", weights=None)
    msg = str(e.value)
    assert "ViT-B-16" in msg and "--weights" in msg and "openai" in msg and "offline" in msg


def test_build_clip_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ViT-B-16.safetensors"
    with pytest.raises(BackboneError, match="not found") as e:
        build_clip("ViT-B-16", weights=str(missing))
    assert str(missing) in str(e.value)
    with pytest.raises(BackboneError, match="not_a_tag"):  # bare word that is no known tag
        build_clip("ViT-B-16", weights="not_a_tag")
    with pytest.raises(BackboneError, match="directory"):
        build_clip("ViT-B-16", weights=str(tmp_path))


def test_build_clip_rejects_bad_names_sizes_and_acts() -> None:
    with pytest.raises(BackboneError, match="ViT-B-17"):
        build_clip("ViT-B-17", weights="openai")
    with pytest.raises(ConfigError, match="multiple of its patch size 16"):
        build_clip("ViT-B-16", weights="openai", image_size=518)
    with pytest.raises(ConfigError, match="activation"):
        build_clip("ViT-B-16", weights="openai", act="relu")


def test_model_name_resolution_and_defaults() -> None:
    assert _resolve_model_name("ViT-L-14-336", "gelu") == ("ViT-L-14-336", False)
    assert _resolve_model_name("ViT-L-14-336", "quickgelu") == ("ViT-L-14-336-quickgelu", False)
    assert _resolve_model_name("ViT-B/16", "quickgelu") == ("ViT-B-16-quickgelu", False)
    assert _resolve_model_name("ViT-B-16-quickgelu", "gelu") == ("ViT-B-16-quickgelu", False)
    assert _default_image_size("ViT-L-14-336", 336, 14) == 518
    assert _default_image_size("ViT-B-16", 224, 16) == 448
    assert default_taps(24) == (6, 12, 18, 24)
    assert default_taps(12) == (3, 6, 9, 12)
    assert default_taps(4) == (1, 2, 3, 4)
    assert _looks_like_tag("openai") and _looks_like_tag("laion400m_e32")
    assert not _looks_like_tag("weights/clip.pt") and not _looks_like_tag("clip.safetensors")


# -- build_clip: local checkpoints round-trip -----------------------------------------


def test_safetensors_round_trip(registered_tiny: str, tmp_path: Path, pixels: torch.Tensor) -> None:
    ref = build_tiny_clip(seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file(_state_dict(ref), str(path))
    bb = build_clip(registered_tiny, weights=str(path))  # default size: native 64 for patch 8
    assert bb.spec == f"clip:{registered_tiny}"
    assert bb.weights_id == sha256_file(str(path))
    assert bb.taps == (1, 2, 3, 4) and bb.image_size == 64
    _same_output(ref, bb, pixels)


def test_torch_save_round_trip_with_wrapped_layout(registered_tiny: str, tmp_path: Path, pixels: torch.Tensor) -> None:
    ref = build_tiny_clip(seed=4)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in _state_dict(ref).items()}}
    path = tmp_path / "epoch_3.pt"
    torch.save(wrapped, str(path))
    _same_output(ref, build_clip(registered_tiny, weights=str(path), image_size=64), pixels)


def test_checkpoint_position_embedding_is_resized(registered_tiny: str, tmp_path: Path) -> None:
    ref = build_tiny_clip(seed=5)
    path = tmp_path / "tiny.safetensors"
    sd = _state_dict(ref)
    save_file(sd, str(path))
    bb = build_clip(registered_tiny, weights=str(path), image_size=128)
    assert bb.grid == (16, 16) and bb.model.visual.positional_embedding.shape == (257, 64)
    pos = bb.model.visual.positional_embedding
    old = ref.model.visual.positional_embedding
    assert torch.equal(pos[0], old[0])  # CLS row kept as is
    grid = old[1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(pos[1:], want.permute(0, 2, 3, 1).reshape(256, 64), atol=1e-6)
    out = bb.extract(torch.zeros(1, 3, 128, 128))
    assert out.tokens[0].shape == (1, 256, 64)
    # OpenAI-style fp16 checkpoint with metadata keys: upcast before the (fp32-only) resize
    half = {k: v.half() for k, v in sd.items()}
    half["input_resolution"] = torch.tensor(64)
    save_file(half, str(tmp_path / "tiny_fp16.safetensors"))
    bb16 = build_clip(registered_tiny, weights=str(tmp_path / "tiny_fp16.safetensors"), image_size=128)
    assert bb16.model.visual.positional_embedding.dtype == torch.float32


def test_quickgelu_option(registered_tiny: str, tmp_path: Path, pixels: torch.Tensor) -> None:
    ref = build_tiny_clip(seed=6)
    path = tmp_path / "tiny.safetensors"
    save_file(_state_dict(ref), str(path))
    quick = build_clip(registered_tiny, weights=str(path), act="quickgelu")
    assert quick.spec == f"clip:{registered_tiny}-quickgelu"
    assert isinstance(quick.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(ref.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not torch.allclose(quick.extract(pixels).tokens[-1], ref.extract(pixels).tokens[-1])


def test_mismatched_checkpoint_names_file(registered_tiny: str, tmp_path: Path) -> None:
    sd = _state_dict(build_tiny_clip(seed=0))
    sd.pop("visual.proj")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(BackboneError, match="broken.safetensors.*missing.*visual.proj"):
        build_clip(registered_tiny, weights=str(path))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="garbage.bin"):
        build_clip(registered_tiny, weights=str(garbage))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"  # any non-allow-listed class stands in for a malicious pickle
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": argparse.Namespace(x=1)}, str(path))
    with pytest.raises(BackboneError, match="evil.pt"):
        load_clip_state_dict(path)


def test_torchscript_archive_is_refused_with_conversion_hint(tmp_path: Path) -> None:
    path = tmp_path / "ViT-L-14-336px.pt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    except Exception as e:  # TorchScript may be unavailable in some torch builds
        pytest.skip(f"cannot write a TorchScript archive here: {e}")
    with pytest.raises(BackboneError, match="TorchScript") as e:
        load_clip_state_dict(path)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)
