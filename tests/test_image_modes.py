"""Every image mode Pillow opens becomes the RGB picture it shows (`mlxkit.vision.to_rgb`):
premultiplied alpha (La, RGBa) composited as it looks, 16-bit, 32-bit and float grayscale
scaled to 8 bits, and the modes transformers' Qwen2VLImageProcessorPil reads rightly read as
it reads them. Also what Pillow forgives while decoding: one clean warning, no raw ones."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from mlxkit.models.qwen3_5_vision import VisionConfig
from mlxkit.vision import Preprocessor, VisionInputError, load_image, preprocess_image, to_rgb
from tests.helpers import FIXTURES
from tests.vision_helpers import config

NAME = "tiny_vision_p4"


def preprocessor() -> Preprocessor:
    return Preprocessor.from_dir(FIXTURES / NAME, VisionConfig.from_dict(config(NAME)))


def rgb_of(path) -> np.ndarray:
    """The RGB pixels the vision path reads from an image file."""
    return np.asarray(to_rgb(load_image(path))).astype(int)


def associated_alpha_tiff(image: Image.Image, path) -> None:
    """`image` (LA or RGBA) saved as a TIFF whose ExtraSamples tag says associated
    (premultiplied) alpha: Pillow opens it as La or RGBa."""
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 338:  # ExtraSamples
            struct.pack_into("<H", data, entry + 8, 1)  # 2 (unassociated) -> 1 (associated)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_mode_pillow_knows_becomes_rgb(mode):
    rgb = to_rgb(Image.new(mode, (16, 12)))
    assert (rgb.mode, rgb.size) == ("RGB", (16, 12))


def test_premultiplied_alpha_is_composited_as_it_shows(tmp_path):
    """Stored premultiplied, a colour c at alpha a is c·a/255; on white it shows as
    stored + 255 - a. Pillow opens such a grayscale TIFF as La, which it cannot convert at all
    (an RGB one it un-premultiplies itself; an RGBa image in memory: the next tests)."""
    gray = np.array([[[100, 128], [0, 0], [50, 255]]], np.uint8)  # half, clear, opaque
    associated_alpha_tiff(Image.fromarray(gray), tmp_path / "la.tif")
    assert Image.open(tmp_path / "la.tif").mode == "La"
    want = gray[..., 0].astype(int) + 255 - gray[..., 1]
    np.testing.assert_allclose(
        rgb_of(tmp_path / "la.tif"), np.repeat(want[..., None], 3, -1), atol=1
    )

    color = np.array([[[100, 50, 0, 128], [0, 0, 0, 0]]], np.uint8)
    associated_alpha_tiff(Image.fromarray(color), tmp_path / "rgba.tif")  # Pillow: RGBA
    want = color[..., :3].astype(int) + 255 - color[..., 3:]
    np.testing.assert_allclose(rgb_of(tmp_path / "rgba.tif"), want, atol=1)


def test_high_bit_depth_grayscale_is_scaled_to_8_bits(tmp_path):
    """16-bit (I;16) and 32-bit integer (I) samples are read as 0..65535, floats (F) as 0..1;
    Pillow's own conversion clips them, turning a 16-bit picture white."""
    levels = np.array([[0, 128 * 257, 65535]])
    Image.fromarray(levels.astype(np.uint16)).save(tmp_path / "16.png")
    Image.fromarray(levels.astype(np.int32)).save(tmp_path / "32.tif")
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32)).save(tmp_path / "f.tif")
    for name, mode, want in (
        ("16.png", "I;16", [0, 128, 255]),
        ("32.tif", "I", [0, 128, 255]),
        ("f.tif", "F", [0, 64, 255]),
    ):
        assert Image.open(tmp_path / name).mode == mode
        np.testing.assert_array_equal(rgb_of(tmp_path / name)[0], np.repeat([want], 3, 0).T)


def test_a_16_bit_png_keeps_its_transparent_value(tmp_path):
    pixels = np.array([[0, 128 * 257]], np.uint16)
    Image.fromarray(pixels).save(tmp_path / "t.png", transparency=0)
    assert Image.open(tmp_path / "t.png").info["transparency"] == 0
    np.testing.assert_array_equal(rgb_of(tmp_path / "t.png"), [[[255] * 3, [128] * 3]])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            np.array([[0.0, 2.0]], np.float32),
            "floating-point grayscale image with values outside 0..1",
        ),
        (np.array([[0.0, np.nan]], np.float32), "floating-point grayscale image"),
        (
            np.array([[-1, 5]], np.int32),
            "32-bit integer grayscale image with values outside 0..65535",
        ),
        (np.array([[0, 70_000]], np.int32), "32-bit integer grayscale image"),
    ],
)
def test_values_without_an_agreed_meaning_are_refused(tmp_path, values, message):
    Image.fromarray(values).save(tmp_path / "x.tif")
    with pytest.raises(VisionInputError, match=message) as e:
        preprocess_image(tmp_path / "x.tif", preprocessor())
    assert str(e.value).startswith(str(tmp_path / "x.tif")) and "\n" not in str(e.value)


def noise(mode: str, seed: int) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = np.random.default_rng(seed).integers(0, 256, (24, 20, bands), np.uint8)
    image = Image.frombytes(mode, (20, 24), data.tobytes())
    if mode == "P":
        image.putpalette(
            np.random.default_rng(seed).integers(0, 256, 768).astype(np.uint8).tobytes()
        )
        image.info["transparency"] = bytes(range(0, 256, 3))  # per-entry alpha, as PNG's tRNS
    if mode == "PA":
        image.putpalette(
            np.random.default_rng(seed).integers(0, 256, 768).astype(np.uint8).tobytes()
        )
    return image


def transformers_patches(image: Image.Image, pre: Preprocessor) -> np.ndarray:
    hf = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pre.min_pixels, "longest_edge": pre.max_pixels},
        patch_size=pre.patch_size,
        temporal_patch_size=pre.temporal_patch_size,
        merge_size=pre.merge_size,
        image_mean=list(pre.image_mean),
        image_std=list(pre.image_std),
    )
    return hf(image, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "LA", "RGBA", "RGBX", "CMYK", "YCbCr"])
def test_modes_transformers_reads_rightly_equal_it(mode):
    pre, image = preprocessor(), noise(mode, seed=len(mode))
    ours = preprocess_image(image, pre, max_pixels=pre.max_pixels).pixel_values
    np.testing.assert_array_equal(ours, transformers_patches(image, pre))


def test_the_other_modes_equal_transformers_on_their_plain_form():
    """La and RGBa equal transformers given the same picture un-premultiplied; 16-bit, 32-bit
    and float grayscale equal it given the 8-bit picture they scale to."""
    pre, level = preprocessor(), np.random.default_rng(5).integers(0, 256, (24, 20))
    la = noise("LA", seed=6)
    cases = [
        (la.convert("La"), la.convert("La").convert("LA")),
        (noise("RGBA", 7).convert("RGBa"), noise("RGBA", 7).convert("RGBa").convert("RGBA")),
        (Image.fromarray((level * 257).astype(np.uint16)), Image.fromarray(level.astype(np.uint8))),
        (Image.fromarray((level * 257).astype(np.int32)), Image.fromarray(level.astype(np.uint8))),
        (
            Image.fromarray((level / 255).astype(np.float32)),
            Image.fromarray(level.astype(np.uint8)),
        ),
    ]
    for given, plain in cases:
        ours = preprocess_image(given, pre, max_pixels=pre.max_pixels).pixel_values
        np.testing.assert_array_equal(ours, transformers_patches(plain, pre), err_msg=given.mode)


def test_lab_and_hsv_show_their_colour():
    """LAB has a band named "A" that is not alpha; pure sRGB red in either."""
    for image in (
        Image.new("LAB", (8, 8), (136, 208, 195)),
        Image.new("HSV", (8, 8), (0, 255, 255)),
    ):
        np.testing.assert_allclose(np.asarray(to_rgb(image))[0, 0], [255, 0, 0], atol=12)


# --------------------------------------------------------------------------- decoding warnings


def corrupt_exif_jpeg(path) -> None:
    """A JPEG whose EXIF block claims more entries than it holds (Pillow warns, reads on)."""
    exif = Image.Exif()
    exif[0x010E] = "a description"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    ifd = data.find(b"Exif\0\0") + 6 + 8  # after the TIFF header
    struct.pack_into(">H", data, ifd, 500)  # Pillow writes EXIF big-endian
    path.write_bytes(bytes(data))


def test_damaged_exif_is_one_warning_naming_the_image(tmp_path):
    corrupt_exif_jpeg(tmp_path / "photo.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = preprocess_image(tmp_path / "photo.jpg", preprocessor())
    assert image.source_size == (32, 32)
    assert [str(w.message).split(": ")[0] for w in caught] == [str(tmp_path / "photo.jpg")]
    assert "Corrupt EXIF data" in str(caught[0].message)
    assert "PIL" not in caught[0].filename


def test_past_pillows_bomb_warning_an_image_is_read_without_a_warning(tmp_path, monkeypatch):
    """Between Pillow's warning size and its error size (2×) an image is read and resized to
    the cap like any other; beyond, it is refused (test_vision_preprocess)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1,600 pixels: warning, not error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = preprocess_image(tmp_path / "big.png", preprocessor())
    assert image.source_size == (40, 40) and caught == []
