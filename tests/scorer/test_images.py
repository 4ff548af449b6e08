"""scorer.images: every readable mode becomes H x W x 3 uint8 with the right values;
unreadable data raises ImageError naming its source."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from inspection_core.errors import ImageError
from inspection_core.names import MAX_PIXELS, MAX_SIDE
from scorer.images import check_size, decode_image, list_images, load_image, load_mask, to_rgb_uint8


def _png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _check_rgb(arr: np.ndarray, hw: tuple[int, int]) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (*hw, 3)
    assert arr.flags["C_CONTIGUOUS"]


# -- conversions ----------------------------------------------------------------
def test_grayscale_is_replicated_to_three_channels() -> None:
    g = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    for src in (Image.fromarray(g), g, g[..., None]):
        out = to_rgb_uint8(src)
        _check_rgb(out, (5, 6))
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], g)
    out = decode_image(_png_bytes(Image.fromarray(g)))
    np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, 2))


def test_rgba_drops_alpha_without_premultiplying() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (7, 9, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colour must still be kept as is
    expected = rgba[..., :3]
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(rgba, "RGBA")), expected)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), expected)
    np.testing.assert_array_equal(decode_image(_png_bytes(Image.fromarray(rgba, "RGBA"))), expected)


def test_la_mode_keeps_luminance() -> None:
    g = np.full((3, 4), 77, np.uint8)
    la = Image.fromarray(np.stack([g, np.zeros_like(g)], -1), "LA")
    out = to_rgb_uint8(la)
    _check_rgb(out, (3, 4))
    assert (out == 77).all()


def test_palette_image_maps_to_palette_colours() -> None:
    im = Image.new("P", (4, 2))
    palette = [0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 9)
    im.putpalette(palette)
    im.putdata([0, 1, 2, 1, 2, 2, 0, 1])
    out = decode_image(_png_bytes(im))
    _check_rgb(out, (2, 4))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [0, 128, 255])
    np.testing.assert_array_equal(out[1, 3], [255, 0, 0])


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    k = np.arange(0, 256, 17, dtype=np.uint16)  # 16 values
    a = (k * 257).reshape(4, 4).astype(np.uint16)
    a[0, 0] = 65535
    a[0, 1] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I"), im.mode  # really a 16-bit file
    out = load_image(path)
    _check_rgb(out, (4, 4))
    expected = (k.reshape(4, 4)).astype(np.uint8)
    expected[0, 0], expected[0, 1] = 255, 0
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_16bit_numpy_arrays_scaled() -> None:
    a = np.array([[0, 257, 257 * 100], [257 * 200, 65534, 65535]], dtype=np.uint16)
    out = to_rgb_uint8(a)
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 100], [200, 254, 255]])
    rgb16 = np.stack([a, a // 2, np.full_like(a, 65535)], -1)
    out = to_rgb_uint8(rgb16)
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 100], [200, 254, 255]])
    assert (out[..., 2] == 255).all()
    np.testing.assert_array_equal(out[..., 1], (a // 2).astype(np.uint32) // 257)


def test_signed_integer_images_keep_their_order() -> None:
    """Negative values must not wrap around to bright pixels (mode "I" TIFFs are signed 32-bit)."""
    a = np.array([[-5, 0, 1000, 30000]], dtype=np.int32)
    out = to_rgb_uint8(a)[0, :, 0].astype(int)
    assert (np.diff(out) >= 0).all(), out
    b = np.array([[-32768, 0, 32767]], dtype=np.int16)
    out = to_rgb_uint8(b)[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255 and 126 <= out[1] <= 129


def test_float_and_bool_images() -> None:
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_rgb_uint8(f)[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(f))[0, :, 0], [0, 128, 255])
    f255 = np.array([[0.0, 100.0, 255.0]], dtype=np.float64)  # 0-255 floats are not multiplied again
    np.testing.assert_array_equal(to_rgb_uint8(f255)[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[True, False]]))[0, :, 0], [255, 0])


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0), (2, 2, 5), (3,)])
def test_unsupported_shapes_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageError, match="cam-7"):
        to_rgb_uint8(np.zeros(shape, np.uint8), name="cam-7")


# -- unreadable data --------------------------------------------------------------
def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = _png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "broken_frame.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as ei:
        load_image(path)
    assert str(path) in str(ei.value)


def test_every_truncation_is_an_image_error() -> None:
    """Whatever PIL raises internally (OSError, SyntaxError, EOF...), the caller sees ImageError."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "BMP"):
        data = _png_bytes(Image.fromarray(arr), fmt)
        for n in range(1, len(data) - 60, 7):
            with pytest.raises(ImageError, match="frame-x"):
                decode_image(data[:n], name="frame-x")


def test_non_image_and_empty_bytes() -> None:
    with pytest.raises(ImageError, match="frame-1"):
        decode_image(b"this is not an image at all, just text", name="frame-1")
    with pytest.raises(ImageError, match="frame-2.*empty"):
        decode_image(b"", name="frame-2")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert str(p) in str(ei.value)


# -- masks ----------------------------------------------------------------------
def test_mask_threshold_is_above_127(tmp_path: Path) -> None:
    m = np.array([[0, 1, 126, 127], [128, 200, 254, 255]], dtype=np.uint8)
    p = tmp_path / "000_mask.png"
    Image.fromarray(m).save(p)
    out = load_mask(p, (2, 4))
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, [[False, False, False, False], [True, True, True, True]])


def test_mask_rgb_and_1bit_modes(tmp_path: Path) -> None:
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    p1 = tmp_path / "one.png"
    Image.fromarray(m).save(p1)  # mode "1"
    np.testing.assert_array_equal(load_mask(p1), m)
    p2 = tmp_path / "rgb.png"
    Image.fromarray(np.repeat(m[..., None].astype(np.uint8) * 255, 3, 2)).save(p2)
    np.testing.assert_array_equal(load_mask(p2, (5, 6)), m)


def test_16bit_mask(tmp_path: Path) -> None:
    m = np.zeros((4, 4), np.uint16)
    m[0, :2] = 65535
    p = tmp_path / "m16.png"
    Image.fromarray(m).save(p)
    np.testing.assert_array_equal(load_mask(p), m > 0)


def test_mask_size_mismatch_names_file_and_both_sizes(tmp_path: Path) -> None:
    p = tmp_path / "003_mask.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(p)  # W=30, H=20
    with pytest.raises(ImageError) as ei:
        load_mask(p, (20, 40))  # image H=20, W=40
    msg = str(ei.value)
    assert str(p) in msg
    assert "30x20" in msg and "40x20" in msg


def test_unreadable_mask(tmp_path: Path) -> None:
    p = tmp_path / "bad_mask.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError) as ei:
        load_mask(p)
    assert str(p) in str(ei.value)


def test_list_images_sorted_and_filtered(tmp_path: Path) -> None:
    for n in ("b.png", "a.JPG", "c.txt", "d.tiff"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "e.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "d.tiff"]


# -- decompression bombs ----------------------------------------------------------
@pytest.fixture
def pixel_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of the images whose pixels PIL decoded during the test (a spy on ``ImageFile.load``)."""
    seen: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile):  # noqa: ANN202 - PIL's own return type
        seen.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns about 10000 x 10000
def test_too_many_pixels_or_too_long_a_side_is_refused_from_the_header(png_bomb, pixel_loads) -> None:
    """A 79 kB PNG of 9000 x 9000 decodes to 243 MB: refused like PIL's own bombs, before any pixel is decoded."""
    real_9000 = _png_bytes(Image.new("L", (9000, 9000)))
    assert len(real_9000) < 100_000
    cases = {
        "real-9000.png": (real_9000, "9000x9000 (81000000 pixels)"),  # over MAX_PIXELS, under PIL's guard
        "claims-30000.png": (png_bomb(30000, 30000), "900000000 pixels"),  # PIL's DecompressionBombError
        "claims-10000.png": (png_bomb(10000, 10000), "10000x10000"),  # PIL only warns: refused all the same
        "strip.png": (png_bomb(MAX_SIDE + 1, 8), f"{MAX_SIDE + 1}x8"),  # few pixels, one side too long
    }
    for name, (data, size) in cases.items():
        with pytest.raises(ImageError) as ei:
            decode_image(data, name=name)
        msg = str(ei.value)
        assert msg.startswith(f"{name}: ") and size in msg, msg
        assert f"limit of {MAX_PIXELS} pixels and {MAX_SIDE} px a side" in msg and "before decoding" in msg
    assert pixel_loads == []  # no pixel of any of them was decoded
    decode_image(_png_bytes(Image.new("L", (40, 30))))
    assert set(pixel_loads) == {(40, 30)}  # the spy sees a decode that happens


def test_warning_as_error_is_our_error_too(png_bomb) -> None:
    """Where warnings are errors, PIL's DecompressionBombWarning (past ~89 Mpx) is raised inside Image.open."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=r"w\.png: image of 100000000 pixels exceeds the limit"):
            decode_image(png_bomb(10000, 10000), name="w.png")


def test_the_limits_are_the_shared_names_and_can_be_lowered(tmp_path: Path, png_bomb) -> None:
    rows = MAX_PIXELS // MAX_SIDE
    check_size(MAX_SIDE, rows, name="x")  # on the limits: accepted
    for w, h in ((MAX_SIDE, rows + 1), (MAX_SIDE + 1, 1), (0, 5)):
        with pytest.raises(ImageError, match=rf"x: image size {w}x{h} "):
            check_size(w, h, name="x")
    small = _png_bytes(Image.new("RGB", (200, 50)))
    assert decode_image(small).shape == (50, 200, 3)
    with pytest.raises(ImageError, match="limit of 9999 pixels"):
        decode_image(small, name="s", max_pixels=9999)
    with pytest.raises(ImageError, match="and 199 px a side"):
        decode_image(small, name="s", max_side=199)
    # the path loaders check too, and name the file
    bomb = tmp_path / "bomb_mask.png"
    bomb.write_bytes(png_bomb(30000, 30000))
    for load in (load_image, load_mask):
        with pytest.raises(ImageError, match="exceeds the limit") as ei:
            load(bomb)
        assert str(ei.value).startswith(f"{bomb}: ")
    (tmp_path / "small.png").write_bytes(small)
    with pytest.raises(ImageError, match="limit of 100 pixels"):
        load_image(tmp_path / "small.png", max_pixels=100)
    with pytest.raises(ImageError, match="limit of 100 pixels"):
        load_mask(tmp_path / "small.png", max_pixels=100)


def test_undecodable_bytes_name_the_frame_not_a_python_object() -> None:
    with pytest.raises(ImageError) as e:
        decode_image(b"hello world, not a picture", name="cam-1 frame 7")
    msg = str(e.value)
    assert msg.startswith("cam-1 frame 7: not an image") and "BytesIO" not in msg and "0x" not in msg


# -- decode bounds a header cannot show -----------------------------------------------------------------------
def test_formats_are_sniffed_from_their_magic_bytes() -> None:
    from scorer.images import sniff_format

    arr = Image.new("RGB", (8, 8), (1, 2, 3))
    for fmt, want in (("PNG", "PNG"), ("JPEG", "JPEG"), ("TIFF", "TIFF"), ("PPM", "PPM"), ("BMP", "BMP")):
        assert sniff_format(_png_bytes(arr, fmt)) == want
    assert sniff_format(b"") is None and sniff_format(b"hello world") is None


def test_open_checked_with_formats_keeps_other_parsers_away() -> None:
    from scorer.images import open_checked

    tiff = _png_bytes(Image.new("RGB", (8, 8)), "TIFF")
    with open_checked(io.BytesIO(tiff), name="t") as im:
        assert im.format == "TIFF"
    with pytest.raises(Exception, match="t: not a readable PNG image"):
        open_checked(io.BytesIO(tiff), name="t", formats=("PNG",))


def test_a_decode_over_its_time_budget_is_stopped() -> None:
    from scorer.images import DecodeLimitError, load_within, open_checked

    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)))
    with open_checked(io.BytesIO(data), name="big.png") as im:
        with pytest.raises(DecodeLimitError, match=r"big.png: decoding took over 1e-05 s \(the decode time budget\)"):
            load_within(im, 1e-5, name="big.png")
    with open_checked(io.BytesIO(data), name="big.png") as im:
        load_within(im, 30.0, name="big.png")
        assert im.size == (1500, 1500) and np.asarray(im).shape == (1500, 1500, 3)
