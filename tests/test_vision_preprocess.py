"""Image and video preprocessing against transformers: Qwen2VLImageProcessorPil for images,
the pieces of its Qwen3-VL video processor that run without torchvision for video."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    smart_resize as hf_smart_resize_video,
)
from transformers.video_utils import VideoMetadata

from mlxkit.errors import ConfigError
from mlxkit.models.qwen3_5_vision import VisionConfig
from mlxkit.vision import (
    DEFAULT_MAX_IMAGE_TOKENS,
    Preprocessor,
    VisionInputError,
    group_timestamps,
    patchify,
    preprocess_image,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
)
from tests.helpers import FIXTURES, reference
from tests.vision_helpers import VISION, config, header_only_png

# Qwen 3.5's vision tower shapes (all four sizes): patch 16, temporal 2, merge 2
QWEN35 = VisionConfig(
    depth=1, hidden_size=64, intermediate_size=64, num_heads=4, out_hidden_size=64
)


def preprocessor(name: str) -> Preprocessor:
    return Preprocessor.from_dir(FIXTURES / name, VisionConfig.from_dict(config(name)))


def hf_processor(pre: Preprocessor, max_pixels: int, min_pixels: int | None = None):
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels or pre.min_pixels, "longest_edge": max_pixels},
        patch_size=pre.patch_size,
        temporal_patch_size=pre.temporal_patch_size,
        merge_size=pre.merge_size,
        image_mean=list(pre.image_mean),
        image_std=list(pre.image_std),
    )


def noise_image(mode: str, height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        rgba[: height // 2, :, 3] = 0  # fully transparent half: composited onto white
        return Image.fromarray(rgba)
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8), "LA")
    gray = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode == "L":
        return gray
    palette = gray.convert("P")
    palette.info["transparency"] = 7  # palette transparency, without an alpha band
    return palette


CASES = [  # (mode, format, height, width): odd sizes, above and below the pixel bounds
    ("RGB", "PNG", 37, 53),
    ("RGB", "JPEG", 61, 29),
    ("RGB", "JPEG", 97, 131),
    ("L", "PNG", 45, 23),
    ("L", "JPEG", 19, 77),
    ("RGBA", "PNG", 41, 41),
    ("LA", "PNG", 29, 35),
    ("P", "PNG", 33, 71),
]


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize(("mode", "fmt", "height", "width"), CASES)
def test_images_equal_transformers(tmp_path, name, mode, fmt, height, width):
    """Pixel values and grid bit for bit equal to Qwen2VLImageProcessorPil's, from the file."""
    pre = preprocessor(name)
    path = tmp_path / f"image.{fmt.lower()}"
    noise_image(mode, height, width, seed=height * width).save(path, format=fmt)
    ours = preprocess_image(path, pre)
    theirs = hf_processor(pre, pre.max_pixels)(Image.open(path), return_tensors="np")
    assert ours.grid == tuple(theirs["image_grid_thw"][0])
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
    assert ours.num_tokens == np.prod(ours.grid) // pre.merge_size**2
    assert ours.source_size == (height, width)


def test_fixture_images_equal_their_reference():
    for name in VISION:
        pre, ref = preprocessor(name), reference(name)
        for i in (0, 1):
            ours = preprocess_image(FIXTURES / name / f"image{i}.png", pre)
            np.testing.assert_array_equal(ours.pixel_values, ref[f"image{i}_patches"])
            assert ours.grid == tuple(ref[f"image{i}_grid"])


def test_arrays_and_pil_images_equal_the_file(tmp_path):
    pre = preprocessor("tiny_vision_p4")
    img = noise_image("RGB", 31, 47, seed=3)
    img.save(tmp_path / "a.png")
    expected = preprocess_image(tmp_path / "a.png", pre).pixel_values
    for given in (img, np.asarray(img), str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes()):
        np.testing.assert_array_equal(preprocess_image(given, pre).pixel_values, expected)
    gray = np.asarray(noise_image("L", 31, 47, seed=4))
    for given in (gray, gray[..., None]):
        ours = preprocess_image(given, pre).pixel_values
        theirs = hf_processor(pre, pre.max_pixels)(Image.fromarray(gray), return_tensors="np")
        np.testing.assert_array_equal(ours, theirs["pixel_values"])


def test_default_cap_is_1280_tokens_and_says_so():
    """With Qwen 3.5's preprocessor (16 px patches, 2×2 merge, up to 16.7 MP) a 12 MP photo is
    capped at 1,280 vision tokens, exactly as transformers does with that max_pixels; an
    explicit max_pixels lifts the cap."""
    pre = Preprocessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    assert pre.max_pixels == 16_777_216 and DEFAULT_MAX_IMAGE_TOKENS == 1280
    photo = np.asarray(noise_image("RGB", 300, 400, seed=5)).repeat(10, 0).repeat(10, 1)
    capped = preprocess_image(photo, pre)
    assert capped.num_tokens <= 1280 and capped.capped
    assert capped.source_size == (3000, 4000) and capped.size == (960, 1312)
    theirs = hf_processor(pre, 1280 * 32 * 32)(Image.fromarray(photo), return_tensors="np")
    np.testing.assert_array_equal(capped.pixel_values, theirs["pixel_values"])
    lifted = preprocess_image(photo, pre, max_pixels=2560 * 32 * 32)
    assert 1280 < lifted.num_tokens <= 2560 and lifted.capped
    assert not preprocess_image(photo[:400, :600], pre).capped  # 13×19 blocks: rounding only
    small = preprocess_image(photo, pre, max_pixels=64 * 32 * 32)
    assert small.num_tokens <= 64


def test_min_pixels_upscales_small_images():
    pre = preprocessor("tiny_vision_p4")
    img = noise_image("RGB", 9, 13, seed=6)
    ours = preprocess_image(img, pre, min_pixels=1024, max_pixels=4096)
    theirs = hf_processor(pre, 4096, min_pixels=1024)(img, return_tensors="np")
    assert not ours.capped and ours.size[0] * ours.size[1] >= 1024
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])


@pytest.mark.parametrize("seed", range(3))
def test_smart_resize_equals_transformers(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(16, 5000, size=2))
        factor = int(rng.choice([8, 18, 28, 32]))
        lo, hi = sorted(int(v) for v in rng.integers(factor**2, 4000 * factor**2, size=2))
        assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi)
        frames = int(rng.integers(2, 40))
        pre = Preprocessor(patch_size=factor // 2, temporal_patch_size=2, merge_size=2)
        theirs = hf_smart_resize_video(frames, h, w, 2, factor, lo, hi)
        assert smart_resize_video(frames, h, w, pre, lo, hi) == theirs


# --------------------------------------------------------------------------- bad images


def test_a_photo_is_turned_as_its_exif_orientation_says(tmp_path):
    """A phone photo stores its pixels sideways plus an EXIF orientation; transformers' and
    mlx-vlm's load_image turn it upright first, and so does a path given here."""
    from transformers.image_utils import load_image

    pre = preprocessor("tiny_vision_p4")
    pixels = noise_image("RGB", 40, 64, seed=3)  # 40 high, 64 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    pixels.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    want = preprocess_image(load_image(str(tmp_path / "photo.jpg")), pre)
    for given in (tmp_path / "photo.jpg", (tmp_path / "photo.jpg").read_bytes()):
        got = preprocess_image(given, pre)
        assert got.source_size == (64, 40)  # (height, width) upright
        np.testing.assert_array_equal(got.pixel_values, want.pixel_values)


def test_bad_images_get_one_clear_line(tmp_path):
    pre = preprocessor("tiny_vision_p4")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "notes.txt").write_text("hello")
    noise_image("RGB", 40, 40, seed=7).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    header_only_png(tmp_path / "huge.png", 20_000, 20_000)
    cases = [
        (tmp_path / "missing.png", "missing.png: no such image file"),
        (tmp_path, "a directory, not an image file"),
        (tmp_path / "corrupt.png", "corrupt.png: not a readable image"),
        (tmp_path / "notes.txt", "notes.txt: not a readable image"),
        (tmp_path / "cut.jpg", "cut.jpg: not a readable image"),
        (tmp_path / "huge.png", "huge.png: too large to decode safely"),
        (Image.new("RGB", (1, 1)), "is 1×1 pixels; the vision tower needs at least 4×4"),
        (Image.new("RGB", (1000, 4)), "aspect ratio over 200"),
        (np.zeros((8, 8, 3), dtype=np.float32), "must be uint8 \\(got float32\\)"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "must be H×W, H×W×3 or H×W×4"),
        (b"bytes", "the image data: not a readable image"),
        ((tmp_path / "huge.png").read_bytes(), "the image data: too large to decode safely"),
        (3, "an image must be a path, an image file's bytes, a PIL.Image"),
    ]
    for image, message in cases:
        with pytest.raises(VisionInputError, match=message) as e:
            preprocess_image(image, pre)
        assert "\n" not in str(e.value)


def test_bad_pixel_bounds():
    pre = preprocessor("tiny_vision_p4")
    img = noise_image("RGB", 20, 20, seed=8)
    for kw, message in (
        ({"max_pixels": 0}, "max_pixels must be a positive integer"),
        ({"min_pixels": 2.5}, "min_pixels must be a positive integer"),
        ({"min_pixels": 500, "max_pixels": 400}, "min_pixels 500 is larger than max_pixels"),
    ):
        with pytest.raises(VisionInputError, match=message):
            preprocess_image(img, pre, **kw)


# --------------------------------------------------------------------------- config


def test_preprocessor_reads_the_checkpoint_files(tmp_path):
    pre = preprocessor("tiny_vision_p6")
    assert (pre.patch_size, pre.temporal_patch_size, pre.merge_size) == (6, 3, 3)
    assert (pre.min_pixels, pre.max_pixels) == (648, 5184)
    assert (pre.video_min_pixels, pre.video_max_pixels, pre.video_fps) == (648, 15552, 2)
    # no preprocessor files: Qwen 3.5's values, with the patch shapes of the vision config
    bare = Preprocessor.from_dir(tmp_path, QWEN35)
    assert bare == Preprocessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    # the older top-level min_pixels / max_pixels keys win over size, as in transformers
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 1, "longest_edge": 2}, "max_pixels": 99_999})
    )
    assert Preprocessor.from_dir(tmp_path, QWEN35).max_pixels == 99_999
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    with pytest.raises(ConfigError, match="patch_size 14 differs from the vision tower's 16"):
        Preprocessor.from_dir(tmp_path, QWEN35)
    (tmp_path / "video_preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Preprocessor.from_dir(tmp_path, QWEN35)


# --------------------------------------------------------------------------- video


@pytest.mark.parametrize("name", VISION)
def test_video_equals_transformers_pipeline(name):
    """The fixture's frames through our video path: the frames kept, the patches and the
    timestamps equal those of transformers' video processor (the reference)."""
    pre, ref = preprocessor(name), reference(name)
    fps = float(ref["video_fps"])
    video = preprocess_video(list(ref["video_frames"]), pre, fps=fps)
    np.testing.assert_array_equal(sample_frame_indices(5, fps, pre), ref["video_frame_indices"])
    assert video.grid == tuple(ref["video_grid"]) and video.grid[0] >= 2
    np.testing.assert_array_equal(video.pixel_values, ref["video_patches"])
    assert video.timestamps == tuple(ref["video_timestamps"])
    assert video.num_tokens == np.prod(video.grid) // pre.merge_size**2
    same = preprocess_video(ref["video_frames"], pre, fps=fps)  # an F×H×W×3 array
    np.testing.assert_array_equal(same.pixel_values, video.pixel_values)


@pytest.mark.parametrize("frames", [2, 3, 5, 8])
def test_patchify_equals_transformers_video_patchify(frames):
    pre = Preprocessor(patch_size=4, temporal_patch_size=3, merge_size=2)
    x = np.random.default_rng(frames).normal(size=(frames, 3, 16, 24)).astype(np.float32)
    ours, grid = patchify(x, pre)
    theirs, t, h, w = Qwen3VLVideoProcessor.patchify(None, torch.from_numpy(x)[None], 4, 2, 3)
    assert grid == (t, h, w) == (-(-frames // 3), 4, 6)
    np.testing.assert_array_equal(ours, theirs[0].numpy())


def test_frame_sampling_and_timestamps_equal_transformers():
    pre = Preprocessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    sampler = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    for total in (2, 3, 4, 7, 30, 301, 2000):
        for fps in (1.0, 2.0, 7.5, 29.97, 60.0):
            indices = Qwen3VLVideoProcessor.sample_frames(sampler, VideoMetadata(total, fps=fps))
            np.testing.assert_array_equal(sample_frame_indices(total, fps, pre), indices)
            for tp in (2, 3):
                theirs = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, tp)
                assert group_timestamps(indices, fps, tp) == theirs


def test_bad_videos_get_one_clear_line():
    pre = preprocessor("tiny_vision_p4")
    frame = np.zeros((16, 16, 3), dtype=np.uint8)
    cases = [
        ([frame], {}, "a video needs at least 2 frames \\(got 1\\)"),
        ([], {}, "at least 2 frames \\(got 0\\)"),
        ([frame] * 4, {"fps": 0}, "fps must be a positive number"),
        ([frame] * 4, {"fps": float("nan")}, "fps must be a positive number"),
        ([frame, frame, np.zeros((16, 20, 3), np.uint8)], {}, "video frames differ in size"),
        ([frame[:2]] * 4, {}, "a video frame is 16×2 pixels"),
    ]
    for frames, kw, message in cases:
        with pytest.raises(VisionInputError, match=message):
            preprocess_video(frames, pre, **kw)
