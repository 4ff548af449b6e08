"""scorer.artifact: one safetensors file, manifest in __metadata__, never a pickle."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inspection_core.errors import HeadError
from scorer.artifact import FORMAT_VERSION, file_sha256, head_to_bytes, load_head, read_manifest, save_head
from scorer.head import knn_head

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def saved(tmp_path: Path, fitted_heads) -> tuple[Path, str]:
    path = tmp_path / "heads" / "bottle-v3.safetensors"
    sha = save_head(fitted_heads["cff"], path, product="bottle", version=3, reference_sha256=["a" * 64] * 3)
    return path, sha


def _header(path: Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert 0 < n < len(data)
    return json.loads(data[8 : 8 + n])


@pytest.mark.parametrize("method", ["cff", "aprilgan"])
def test_round_trip_identical_scores(tmp_path: Path, fitted_heads, tiny_vit, references, method: str) -> None:
    head = fitted_heads[method]
    path = tmp_path / f"{method}.safetensors"
    save_head(head, path)
    loaded = load_head(path, tiny_vit)
    assert loaded.backbone is tiny_vit
    assert (loaded.method, loaded.bank_features, loaded.taps, loaded.grid) == (
        head.method,
        head.bank_features,
        head.taps,
        head.grid,
    )
    assert loaded.image_threshold == head.image_threshold and loaded.pixel_threshold == head.pixel_threshold
    assert loaded.options == head.options
    for a, b in zip(loaded.bank, head.bank, strict=True):
        assert a.dtype == torch.float16 and torch.equal(a, b)
    rng = np.random.default_rng(0)
    images = [*references, rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    s1, s2 = head.score(images), loaded.score(images)
    # identical tensors; BLAS may still round a last bit differently on other buffers
    np.testing.assert_allclose(s2.image_scores, s1.image_scores, rtol=1e-6, atol=1e-7)
    # maps are float16: a last-bit fp32 difference in the matmul order may flip one float16 step
    np.testing.assert_allclose(s2.maps.astype(np.float32), s1.maps.astype(np.float32), rtol=2e-3, atol=1e-5)
    np.testing.assert_array_equal(s1.is_defect, s2.is_defect)
    assert [len(r) for r in s1.regions] == [len(r) for r in s2.regions]
    assert loaded.meta["fit_metrics"] == json.loads(json.dumps(head.meta["fit_metrics"]))


def test_manifest_fields(saved: tuple[Path, str], fitted_heads, tiny_vit) -> None:
    path, _ = saved
    m = read_manifest(path)
    head = fitted_heads["cff"]
    assert m["format"] == "cff-inspect-head" and m["format_version"] == FORMAT_VERSION
    assert m["backbone"] == "tiny-vit" and m["weights_sha256"] == tiny_vit.weights_id
    assert m["taps"] == [1, 2, 3, 4] and m["image_size"] == 64 and m["grid"] == [8, 8]
    assert m["shots"] == 3 and m["method"] == "cff"
    assert m["product"] == "bottle" and m["version"] == 3 and m["reference_sha256"] == ["a" * 64] * 3
    assert m["image_threshold"] == pytest.approx(head.image_threshold)
    assert m["pixel_threshold"] == pytest.approx(head.pixel_threshold)
    assert m["fit_metrics"]["held_out"] == "leave-one-out"
    assert isinstance(m["created"], str) and m["created"][:2] == "20"
    loaded = load_head(path)
    assert loaded.meta["product"] == "bottle" and loaded.meta["version"] == 3
    assert loaded.meta["created"] == m["created"]


def test_sha256_is_of_the_file_bytes_and_write_is_atomic(saved: tuple[Path, str]) -> None:
    path, sha = saved
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_file_is_plain_safetensors_without_pickle(saved: tuple[Path, str], fitted_heads) -> None:
    path, _ = saved
    data = path.read_bytes()
    assert data[:1] != b"\x80" and data[:2] != b"PK"  # neither a pickle nor a torch zip
    header = _header(path)
    assert set(header["__metadata__"]) == {"manifest"}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {v["dtype"] for v in tensors.values()} <= {"F16", "F32"}
    n_stages = 4
    for name in ("bank", "proj_w", "proj_b", "calib_w", "calib_b", "folded_w", "folded_b"):
        assert all(f"{name}.{i}" in tensors for i in range(n_stages)), name
    assert "prototypes" in tensors and tensors["bank.0"]["dtype"] == "F16"
    # the folded tensors are the composition the worker serves
    head = fitted_heads["cff"]
    with safe_open(str(path), framework="pt") as f:
        for i, (w, b) in enumerate(head.folded()):
            assert torch.equal(f.get_tensor(f"folded_w.{i}"), w.float())
            assert torch.equal(f.get_tensor(f"folded_b.{i}"), b.float())
    assert head_to_bytes(replace(head, meta={**head.meta, "created": "fixed"})) == head_to_bytes(
        replace(head, meta={**head.meta, "created": "fixed"})
    )


def test_truncated_artifact_names_path(saved: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = saved
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    for keep in (4, 8 + n // 2, 8 + n + 100, len(data) - 1):
        bad = tmp_path / f"cut-{keep}.safetensors"
        bad.write_bytes(data[:keep])
        with pytest.raises(HeadError) as ei:
            load_head(bad)
        assert str(bad) in str(ei.value), keep


def test_random_and_empty_bytes_name_path(tmp_path: Path) -> None:
    rnd = random.Random(0)
    for i, blob in enumerate([b"", bytes(rnd.getrandbits(8) for _ in range(4096)), b"\x02" + b"\x00" * 7 + b"{}"]):
        p = tmp_path / f"junk{i}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(HeadError) as ei:
            load_head(p)
        assert str(p) in str(ei.value)
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(HeadError, match="absent"):
        load_head(missing)


def test_malformed_headers_are_head_errors(tmp_path: Path) -> None:
    """A header that is JSON but not an object, or a manifest that is not JSON, is still a HeadError."""
    p = tmp_path / "list.safetensors"
    p.write_bytes((2).to_bytes(8, "little") + b"[]")
    with pytest.raises(HeadError, match="list.safetensors"):
        read_manifest(p)
    q = tmp_path / "badmanifest.safetensors"
    save_file({"x": torch.zeros(1)}, str(q), metadata={"manifest": "{not json"})
    with pytest.raises(HeadError, match="badmanifest"):
        load_head(q)
    r = tmp_path / "nomanifest.safetensors"
    save_file({"x": torch.zeros(1)}, str(r), metadata={"other": "1"})
    with pytest.raises(HeadError, match="manifest"):
        load_head(r)


def test_newer_format_and_foreign_format_refused(tmp_path: Path, fitted_heads) -> None:
    p = tmp_path / "future.safetensors"
    save_head(fitted_heads["cff"], p, extra={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(HeadError, match="newer"):
        load_head(p)
    q = tmp_path / "foreign.safetensors"
    save_head(fitted_heads["cff"], q, extra={"format": "something-else"})
    with pytest.raises(HeadError, match="something-else"):
        load_head(q)


def test_load_with_another_backbone_is_refused(saved: tuple[Path, str], tiny_vit_seed1) -> None:
    path, _ = saved
    with pytest.raises(HeadError) as ei:
        load_head(path, tiny_vit_seed1)
    msg = str(ei.value)
    assert str(path) in msg and "random:1" in msg


def test_nan_thresholds_survive(tmp_path: Path, tiny_vit, references) -> None:
    head = knn_head(tiny_vit, tiny_vit.embed(references[:1]))
    assert math.isnan(head.image_threshold)
    head = head.with_thresholds(pixel=0.25)
    p = tmp_path / "knn.safetensors"
    save_head(head, p)
    m = read_manifest(p)
    assert m["image_threshold"] is None and m["pixel_threshold"] == 0.25
    loaded = load_head(p, tiny_vit)
    assert math.isnan(loaded.image_threshold) and loaded.pixel_threshold == 0.25
    assert loaded.method == "knn" and loaded.proj_w is None and loaded.calib_w is None and loaded.prototypes is None
    s1, s2 = head.score(references), loaded.score(references)
    np.testing.assert_array_equal(s1.maps, s2.maps)
    assert np.isnan(s2.normalized_scores).all()
