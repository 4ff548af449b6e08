"""The fast scoring path computes what the slow reference protocol computes, within stated tolerances."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from scorer.reference import reference_score

# fp32 fast path vs the reference: same math, different order (batched matmuls, folded weights).
FP32_MAP_ATOL = 2e-4
# bf16 autocast / bf16 bank search vs the fp32 path: relative to the map's range.
BF16_MAP_RTOL = 0.03


@pytest.mark.parametrize("method", ["knn", "aprilgan", "cff"])
def test_fast_path_matches_the_reference_protocol(method, fitted_heads, tiny_vit, references, make_refs) -> None:  # noqa: ANN001
    from scorer.head import knn_head

    imgs = make_refs(5, seed=7)
    head = knn_head(tiny_vit, tiny_vit.embed(references)) if method == "knn" else fitted_heads[method]
    head = replace(head, backbone=tiny_vit)
    fast = head.score(imgs, batch_size=4)
    ref_scores, ref_maps = reference_score(head, imgs)
    np.testing.assert_allclose(fast.image_scores, ref_scores, atol=FP32_MAP_ATOL, rtol=1e-4)
    # fast maps are stored as float16: compare within half precision of the map's scale
    scale = float(np.abs(ref_maps).max())
    np.testing.assert_allclose(fast.maps.astype(np.float32), ref_maps, atol=FP32_MAP_ATOL + 1e-3 * scale)


def test_batched_equals_one_at_a_time(fitted_heads, tiny_vit, make_refs) -> None:

    head = replace(fitted_heads["cff"], backbone=tiny_vit)
    imgs = make_refs(6, seed=3)
    batched = head.score(imgs, batch_size=6)
    single = [head.score([im], batch_size=1) for im in imgs]
    np.testing.assert_allclose(batched.image_scores, [s.image_scores[0] for s in single], rtol=1e-5, atol=1e-6)


def test_bf16_path_is_close_to_fp32(fitted_heads, tiny_vit, make_refs) -> None:

    head = replace(fitted_heads["cff"], backbone=tiny_vit)
    imgs = make_refs(4, seed=11)
    ref = head.score(imgs)
    fast = head.with_options(bank_dtype="bfloat16")
    with tiny_vit.precision_scope("bf16"):
        got = fast.score(imgs)
    rng = float(ref.maps.max() - ref.maps.min())
    assert np.abs(got.maps.astype(np.float32) - ref.maps.astype(np.float32)).max() <= BF16_MAP_RTOL * rng
    assert np.abs(got.image_scores - ref.image_scores).max() <= BF16_MAP_RTOL * max(rng, 1e-6)


def test_tensor_preprocessing_matches_pil(fitted_heads, tiny_vit, make_refs) -> None:
    """uint8 CHW tensors (what decode_jpeg on a GPU gives) are resized where they are, close to PIL."""
    import torch

    head = replace(fitted_heads["cff"], backbone=tiny_vit)
    imgs = [np.ascontiguousarray(np.pad(im, ((0, 13), (0, 5), (0, 0)), mode="edge")) for im in make_refs(3, seed=5)]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in imgs]
    px_pil = tiny_vit.preprocess(imgs)
    px_t = tiny_vit.preprocess(tensors)
    assert px_t.shape == px_pil.shape
    assert float((px_t - px_pil).abs().mean()) < 0.02  # antialiased bicubic vs PIL bicubic, normalised units
    a, b = head.score(imgs), head.score(tensors)
    rng = float(a.maps.max() - a.maps.min())
    # a random tiny model is sensitive to resampling at the borders: judge the map on average, the score exactly
    assert np.abs(a.maps.astype(np.float32) - b.maps.astype(np.float32)).mean() <= 0.02 * rng
    np.testing.assert_allclose(b.image_scores, a.image_scores, rtol=0.01)
    from inspection_core.errors import ImageError

    with pytest.raises(ImageError, match="3 x H x W uint8"):
        tiny_vit.preprocess([torch.zeros(4, 8, 8, dtype=torch.uint8)])


def test_inference_tensors_are_cached_per_device_and_dtype(fitted_heads) -> None:
    import torch

    head = replace(fitted_heads["cff"])
    with torch.inference_mode():
        a = head.on_device(torch.device("cpu"), "bfloat16")
        assert head.on_device(torch.device("cpu"), "bfloat16") is a  # copied once, not per batch
        assert a["bank"][0].dtype == torch.bfloat16
        assert head.on_device(torch.device("cpu"), "float32")["bank"][0].dtype == torch.float32
    assert head.with_thresholds(image=1.0)._cache == {}  # a changed head never sees stale tensors


def test_attention_is_fused(tiny_vit) -> None:
    """timm's ViT blocks use F.scaled_dot_product_attention (the GPU path relies on it)."""
    flags = [m.fused_attn for m in tiny_vit.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)


def test_bad_precision_is_named(tiny_vit) -> None:
    from inspection_core.errors import ConfigError

    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        tiny_vit.set_precision("int4")
    assert tiny_vit.precision == "fp32"


def test_auto_precision_follows_the_hardware() -> None:
    from pathlib import Path

    from scorer.backbones.base import auto_precision

    assert auto_precision("cuda") == "bf16"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert auto_precision("cpu") == ("bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32")


def test_fits_run_in_fp32_whatever_the_backbone_scores_in(tiny_vit, references) -> None:
    from scorer.fit import FitOptions, fit_head

    seen = []
    real = tiny_vit.run

    def spy(px, depth=None):  # noqa: ANN001, ANN202
        seen.append(tiny_vit.active_precision)
        return real(px, depth)

    opts = FitOptions(steps_stage1=1, steps_stage2=1, n_synthetic=2)
    tiny_vit.run = spy  # type: ignore[method-assign]
    try:
        with tiny_vit.precision_scope("bf16"):
            a = fit_head(tiny_vit, references, options=opts, method="cff")
            assert tiny_vit.active_precision == "bf16"  # restored after the fit
        b = fit_head(tiny_vit, references, options=opts, method="cff")
    finally:
        del tiny_vit.run
    assert seen and set(seen) == {"fp32"}
    assert a.image_threshold == pytest.approx(b.image_threshold)  # same head as a plain fp32 fit


def test_token_cache_keeps_precisions_apart(tiny_vit, tmp_path) -> None:
    from PIL import Image

    from scorer.features import FeatureCache

    p = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(p)
    cache = FeatureCache(tmp_path / "cache")
    k32 = cache._key(tiny_vit, p)  # noqa: SLF001
    with tiny_vit.precision_scope("bf16"):
        assert cache._key(tiny_vit, p) != k32  # noqa: SLF001 - bf16 tokens never answer an fp32 lookup
    assert cache._key(tiny_vit, p) == k32  # noqa: SLF001


def test_precision_scope_is_per_thread(tiny_vit) -> None:
    """A calibrator fit in fp32 must not change the precision a worker thread scores with."""
    import threading

    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def fit_thread() -> None:
        with tiny_vit.precision_scope("fp32"):
            seen["fit"] = tiny_vit.active_precision
            inside.set()
            release.wait(5)

    with tiny_vit.precision_scope("bf16"):
        t = threading.Thread(target=fit_thread)
        t.start()
        inside.wait(5)
        seen["worker"] = tiny_vit.active_precision
        release.set()
        t.join()
        assert tiny_vit.active_precision == "bf16"
    assert seen == {"fit": "fp32", "worker": "bf16"}
    assert tiny_vit.active_precision == tiny_vit.precision == "fp32"


def test_bad_compile_mode_is_named(tiny_vit) -> None:
    from inspection_core.errors import ConfigError

    with pytest.raises(ConfigError, match="compile mode must be one of off, default"):
        tiny_vit.enable_compile("turbo")


@pytest.mark.slow
def test_compiled_backbone_equals_eager(make_refs) -> None:
    """torch.compile (inductor; ~20 s to compile the tiny model on a CPU) gives the eager tokens."""
    from scorer.backbones import load_backbone

    bb = load_backbone("tiny-vit")
    px = bb.preprocess(make_refs(2, seed=4))
    eager = bb.run(px)
    compiled = bb.enable_compile("default").run(px)
    for a, b in zip(eager.tokens, compiled.tokens, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    three = bb.preprocess(make_refs(3, seed=5))  # padded to 4 inside, sliced back to 3
    got = bb.run(three)
    assert got.tokens[0].shape[0] == 3
    bb.enable_compile("off")
    for a, b in zip(bb.run(three).tokens, got.tokens, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert bb.__dict__.get("_compiled") is None
