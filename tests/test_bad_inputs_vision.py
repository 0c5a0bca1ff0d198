"""Bad images and videos, by class, through `mlxkit generate` and the API: URLs given as
paths, `images=` / `videos=` of the wrong shape, grayscale values without an agreed meaning,
videos that would hold too many pixels once decoded, and images for a bundle whose vision
encoder is Core ML. Each row runs through the shared harness (tests/badinput.py); the
generation helpers are tests/test_generate_errors.py's, the converted bundle
tests/test_bad_inputs.py's. Also: what Pillow forgives reaches the terminal as one clean line,
and a bundle's export log names the package where it ends up."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlxkit import vision
from mlxkit.cli import main
from mlxkit.generate import Video, generate
from tests.badinput import Inputs, cli, run_row
from tests.helpers import FIXTURES
from tests.test_generate_errors import IMAGE0, PAD, _vision, api_vision, chat, vision_cli
from tests.test_image_modes import corrupt_exif_jpeg

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
FRAME = np.zeros((16, 16, 3), np.uint8)


def gray_tiff(name: str, values: np.ndarray):
    def setup(inputs: Inputs) -> None:
        Image.fromarray(np.broadcast_to(values, (16, 16)).copy()).save(inputs.root / name)

    return setup


@pytest.fixture(scope="module")
def coreml(tmp_path_factory) -> tuple[Path, str]:
    """A bundle of the vision fixture whose images go through Core ML (one small grid), and
    what building it printed."""
    from mlxkit.ios_bridge import build_bundle

    out, log = tmp_path_factory.mktemp("coreml") / "bundle", io.StringIO()
    with contextlib.redirect_stderr(log):
        build_bundle(
            FIXTURES / "tiny_vision_p4",
            out,
            "iphone15",
            vision_encoder="coreml",
            coreml_grids="8x8",
            quiet=False,
        )
    return out, log.getvalue()


# fmt: off
ROWS = [
    # a URL is not a path: not fetched, and shown as given (a Path would make it https:/...)
    vision_cli("--image", "https://example.com/cat.png",
               message="https://example.com/cat.png: a URL; images are not downloaded"),
    vision_cli("--video", "http://example.com/clip.mp4",
               message="http://example.com/clip.mp4: a URL; videos are not downloaded"),
    api_vision("images= one URL string", PAD, "https://example.com/a.png: a URL",
               images="https://example.com/a.png"),
    api_vision("a video part with its own URL", chat({"type": "video", "video": "s3://b/c.mp4"}),
               "s3://b/c.mp4: a URL; videos are not downloaded"),
    # images= / videos= that are neither one input nor a list of them
    api_vision("images= a dict", PAD, "images must be an image or a list of images, not dict",
               images={"a": IMAGE0}),
    api_vision("images= a generator", PAD, "not generator", images=(i for i in [IMAGE0])),
    api_vision("images= one float array", PAD, "an image array must be uint8",
               images=np.zeros((8, 8, 3), np.float32)),
    api_vision("videos= a number", VIDEO, "videos must be a video or a list of videos, not int",
               videos=3),
    api_vision("videos= a list of frames", VIDEO, "videos holds a single frame (ndarray)",
               videos=[FRAME] * 4),
    api_vision("videos= a list of PIL frames", VIDEO, "videos holds a single frame (Image)",
               videos=[Image.fromarray(FRAME)] * 4),
    # grayscale whose values have no agreed meaning as 8 bits
    vision_cli("--image", "{root}/f.tif", name=" (float TIFF beyond 0..1)",
               setup=gray_tiff("f.tif", np.float32(2.5)),
               message="f.tif is a floating-point grayscale image with values outside 0..1"),
    vision_cli("--image", "{root}/i.tif", name=" (32-bit TIFF below 0)",
               setup=gray_tiff("i.tif", np.int32(-7)),
               message="i.tif is a 32-bit integer grayscale image with values outside 0..65535"),
    api_vision("a NaN float image", PAD, "the image is a floating-point grayscale image",
               images=Image.fromarray(np.full((16, 16), np.nan, np.float32))),
    # a Core ML bundle has no MLX tower: its images are the app's to encode
    cli("generate --image on a Core ML bundle", "generate", "--model", "{root}/coreml",
        "--prompt", "x", "--image", IMAGE0, needs=("coreml",),
        message="this bundle encodes images with its Core ML package (vision/)"),
    cli("generate --video on a Core ML bundle", "generate", "--model", "{root}/coreml",
        "--prompt", "x", "--video", "{root}/none.mp4", needs=("coreml",),
        message="build the bundle with --vision-encoder mlx"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_vision_input(row, tmp_path, monkeypatch, coreml):
    run_row(row, tmp_path, monkeypatch, built={"coreml": coreml[0]})


# --------------------------------------------------------------------------- video size bound

BOUND = 4 * 16 * 16 - 1  # one pixel short of four 16×16 frames


def ffv1_clip(name: str, frames: int = 4, size: int = 16):
    """A lossless clip at 2 fps (every frame sampled): few bytes for any frame size."""

    def setup(inputs: Inputs) -> None:
        import av

        with av.open(str(inputs.root / name), "w") as container:
            stream = container.add_stream("ffv1", rate=2)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for _ in range(frames):
                frame = av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), "rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())

    return setup


def frame_files(inputs: Inputs) -> None:
    for i in range(4):
        Image.fromarray(FRAME).save(inputs.root / f"f{i}.png")


def _frame_paths(inputs: Inputs) -> list[Path]:
    return [inputs.root / f"f{i}.png" for i in range(4)]


# fmt: off
BOUND_ROWS = [
    vision_cli("--video", "{root}/clip.mkv", name=" (frames past the pixel bound)",
               setup=ffv1_clip("clip.mkv"),
               message=f"clip.mkv (16×16): the frames sampled hold 1,024 pixels decoded, more "
                       f"than the {BOUND:,} a video may"),
    api_vision("video: a list of frames past the pixel bound", VIDEO,
               "the video of 4 frames: the frames sampled hold 1,024 pixels",
               videos=[Video([FRAME] * 4)]),
    api_vision("video: an F×H×W×3 array past the pixel bound", VIDEO,
               "the video array: the frames sampled hold 1,024 pixels", videos=np.stack([FRAME] * 4)),
]
# fmt: on


@pytest.mark.parametrize("row", BOUND_ROWS, ids=[r.id for r in BOUND_ROWS])
def test_videos_past_the_pixel_bound(row, tmp_path, monkeypatch):
    """The bound, lowered so that four 16×16 frames pass it (the real one, 2^30 pixels, is
    what 40 frames of 8192×8192 ask for, 2.7·10^9, and not a 1080p minute at 2 fps)."""
    assert 40 * 8192 * 8192 > vision.MAX_VIDEO_SOURCE_PIXELS > 120 * 1920 * 1080
    monkeypatch.setattr(vision, "MAX_VIDEO_SOURCE_PIXELS", BOUND)
    run_row(row, tmp_path, monkeypatch, built={})


def test_video_frame_files_are_bounded_as_they_are_decoded(tmp_path, monkeypatch):
    """A list of frame files: each is decoded only when sampled, and the count stops there."""
    monkeypatch.setattr(vision, "MAX_VIDEO_SOURCE_PIXELS", BOUND)
    frame_files(Inputs(tmp_path))
    decoded = []
    real = vision._decode
    monkeypatch.setattr(vision, "_decode", lambda *a: decoded.append(a) or real(*a))
    model, tokenizer = _vision()
    with pytest.raises(vision.VisionInputError, match="the video of 4 frames"):
        generate(model, tokenizer, VIDEO, videos=[_frame_paths(Inputs(tmp_path))], max_tokens=1)
    assert len(decoded) == 4  # the fourth frame crossed the bound; nothing after it


# --------------------------------------------------------------------------- what is printed


def _generate(*args: str) -> tuple[int, list[str]]:
    model = str(FIXTURES / "tiny_vision_p4")
    result = CliRunner().invoke(
        main, ["generate", "--model", model, "--prompt", "x", "--max-tokens", "1", *args]
    )
    return result.exit_code, result.stderr.splitlines()


def test_pillows_warnings_reach_the_terminal_as_one_clean_line(tmp_path, monkeypatch):
    corrupt_exif_jpeg(tmp_path / "photo.jpg")
    code, lines = _generate("--image", str(tmp_path / "photo.jpg"))
    assert code == 0
    assert lines[0].startswith(f"warning: {tmp_path / 'photo.jpg'}: read despite damage (")
    assert len(lines) == 2 and "tokens/s" in lines[1]  # then the stats line, nothing raw
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # past Pillow's warning size
    code, lines = _generate("--image", str(tmp_path / "big.png"))
    assert code == 0 and len(lines) == 1 and "tokens/s" in lines[0], lines


def test_the_bundle_export_log_names_the_package_where_it_ends_up(coreml):
    """Not the hidden folder the bundle is assembled in."""
    out, log = coreml
    assert f"wrote {out / 'vision' / 'VisionEncoder.mlpackage'} (" in log
    assert ".building" not in log and (out / "vision" / "VisionEncoder.mlpackage").is_dir()
