"""GPU path against the fp32 CPU path (run with `-m gpu` on a machine with CUDA; skipped elsewhere)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]
BF16_MAP_RTOL = 0.03


def test_cuda_bf16_matches_cpu_fp32(fitted_heads, make_refs) -> None:
    from scorer.backbones import load_backbone

    cpu_bb = load_backbone("tiny-vit")
    gpu_bb = load_backbone("tiny-vit", device="cuda").set_precision("bf16")
    imgs = make_refs(8, seed=21)
    ref = replace(fitted_heads["cff"], backbone=cpu_bb).score(imgs)
    got = replace(fitted_heads["cff"], backbone=gpu_bb).with_options(bank_dtype="bfloat16").score(imgs, batch_size=8)
    rng = float(ref.maps.max() - ref.maps.min())
    assert np.abs(got.maps.astype(np.float32) - ref.maps.astype(np.float32)).max() <= BF16_MAP_RTOL * rng
    np.testing.assert_allclose(got.image_scores, ref.image_scores, rtol=BF16_MAP_RTOL)


def test_jpeg_decoded_on_the_gpu_scores_like_pil(fitted_heads, make_refs) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    from scorer.backbones import load_backbone

    bb = load_backbone("tiny-vit", device="cuda")
    head = replace(fitted_heads["cff"], backbone=bb)
    imgs = make_refs(4, seed=2)
    jpegs = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    pil = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    dev = [
        decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8), mode=ImageReadMode.RGB, device="cuda")
        for j in jpegs
    ]
    assert all(t.is_cuda for t in dev)
    np.testing.assert_allclose(head.score(dev).image_scores, head.score(pil).image_scores, rtol=0.02)


def test_bank_is_copied_to_the_gpu_once(fitted_heads) -> None:
    head = replace(fitted_heads["cff"])
    with torch.inference_mode():
        a = head.on_device(torch.device("cuda"), "bfloat16")
        assert head.on_device(torch.device("cuda"), "bfloat16") is a and a["bank"][0].is_cuda


def test_numpy_frames_are_resized_on_the_gpu_like_pil(make_refs) -> None:
    from scorer.backbones import load_backbone

    cpu, gpu = load_backbone("tiny-vit"), load_backbone("tiny-vit", device="cuda")
    imgs = [np.pad(im, ((0, 7), (0, 3), (0, 0)), mode="edge") for im in make_refs(3, seed=9)]
    a, b = cpu.preprocess(imgs), gpu.preprocess(imgs)
    assert b.is_cuda and b.shape == a.shape
    assert float((b.cpu() - a).abs().mean()) < 0.02
