"""Images and video for Qwen 3.5: pixels → patches, the prompt's vision pads, M-RoPE positions.

Everything follows transformers' reference semantics so that the same picture gives the same
tokens as there:

* images — `Qwen2VLImageProcessor` (its Pillow backend): convert to RGB (transparency composited
  onto white), resize with bicubic so both sides are multiples of patch·merge and the pixel count
  lies within [min_pixels, max_pixels] (`smart_resize`), rescale by 1/255, normalize, repeat the
  still image to `temporal_patch_size` frames, flatten into patches;
* video — `Qwen3VLVideoProcessor`: frames sampled to the processor's fps, the same resize with the
  frame count in the budget, fused rescale+normalize, the last frame repeated to fill the final
  temporal group, the same flattening; timestamps as `Qwen3VLProcessor` computes them;
* the prompt — each `<|image_pad|>` the chat template wrote becomes one pad per merged patch; each
  video becomes, per temporal group, `<t.t seconds>` + vision_start + pads + vision_end;
* positions — `get_rope_index` of Qwen 3.5: (t, row, col) offsets from where each image starts,
  text resuming after it at start + max(rows, cols).

By default an image is capped at DEFAULT_MAX_IMAGE_TOKENS vision tokens (as MLX Swift does):
attention over one image costs N² in its patch count, and an uncapped screenshot would ask for
tens of GB. A per-call `max_pixels` overrides the cap.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from mlxkit.checkpoint import model_file, read_json
from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.fields import local_path, mapping, number, sequence, shown
from mlxkit.models.qwen3_5_vision import Grid, VisionConfig

DEFAULT_MAX_IMAGE_TOKENS = 1280  # vision tokens per image unless max_pixels says otherwise
DEFAULT_VIDEO_FPS = 2.0  # the rate of a list of frames when the caller gives none
MAX_PIXELS = 1 << 26  # the most any pixel bound may ask for: 4× Qwen 3.5's largest default
# The most pixels the sampled frames of one video may hold as decoded, before resizing (3 GB
# as RGB): every sampled frame is held at its full size until the clip is resized as a whole.
MAX_VIDEO_SOURCE_PIXELS = 1 << 30

# transformers' Qwen2VLImageProcessor and Qwen3VLVideoProcessor settings beside config.json;
# mlx-vlm and MLX Swift's VLM loader read the first (its `processor_class` picks the processor).
PREPROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
# What the chat template writes for an image or a video part, and what the processor expands.
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray
# What a preprocessor file may say: pixels are rescaled to [0, 1] (by at most 1: 1/255 for
# 8-bit), then normalized by a mean in [0, 1] and a std that keeps them within ±100.
NORMALIZATION_RANGES = {
    "rescale_factor": (0.0, 1.0),  # (0, 1]
    "image_mean": (0.0, 1.0),
    "image_std": (0.01, 10.0),
}
MAX_FPS = 240.0  # frames a second the video processor may keep
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resample Qwen 3.5's processor uses


class VisionInputError(MlxkitError):
    """An image, a video or a prompt that the vision path cannot use."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class VisionTokens:
    """The four token ids of the vision path, always from config.json: mlx-vlm and MLX Swift
    fall back to wrong vision_start/end ids when they are missing, which shifts every position."""

    image: int
    video: int
    start: int
    end: int

    @classmethod
    def from_config(cls, config: dict) -> VisionTokens:
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        missing = [k for k in keys if not isinstance(config.get(k), int)]
        if missing:
            raise ConfigError(f"config.json lacks the vision token id(s) {', '.join(missing)}")
        return cls(*(config[k] for k in keys))


@dataclass(frozen=True)
class Preprocessor:
    """preprocessor_config.json and video_preprocessor_config.json, with Qwen 3.5's values where
    a file or key is absent. Pixel bounds are totals: per image, or over all frames of a video."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    min_pixels: int = 65_536
    max_pixels: int = 16_777_216
    video_min_pixels: int = 4_096
    video_max_pixels: int = 25_165_824
    video_fps: float = 2.0  # frames per second the video processor keeps
    video_min_frames: int = 4
    video_max_frames: int = 768

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this: one merged patch."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, model_dir: str | Path, vision: VisionConfig) -> Preprocessor:
        model_dir = Path(model_dir)
        image, video = (_read_json(model_dir / name) for name in PREPROCESSOR_FILES)
        fields: dict = {
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size,
        }
        for key, value in fields.items():
            for name, cfg in zip(PREPROCESSOR_FILES, (image, video)):
                if key in cfg and (type(cfg[key]) is not int or cfg[key] != value):
                    raise ConfigError(
                        f"{model_dir / name}: {key} {shown(cfg[key])} differs from the vision "
                        f"tower's {value} in config.json"
                    )
        for name, cfg in zip(PREPROCESSOR_FILES, (image, video)):
            _check_fixed_steps(model_dir / name, cfg)
            normalization = preprocessor_normalization(model_dir / name, cfg)
            if name == PREPROCESSOR_FILES[0]:
                fields.update(normalization)
            elif any(fields.get(k, getattr(cls, k)) != v for k, v in normalization.items()):
                raise ConfigError(
                    f"{model_dir / name}: image_mean, image_std and rescale_factor must be those "
                    f"of {PREPROCESSOR_FILES[0]} (mlxkit normalizes video frames like images)"
                )
        for prefix, cfg in (("", image), ("video_", video)):
            size = mapping(cfg.get("size") or {}, f"{model_dir}: preprocessor size")
            lo = cfg.get("min_pixels", size.get("shortest_edge"))
            hi = cfg.get("max_pixels", size.get("longest_edge"))
            if lo is not None:
                fields[prefix + "min_pixels"] = lo
            if hi is not None:
                fields[prefix + "max_pixels"] = hi
        where = model_dir / "video_preprocessor_config.json"
        if "fps" in video:
            fields["video_fps"] = number(video["fps"], f"{where}: fps", 0, MAX_FPS, lo_open=True)
        for key, name in (("min_frames", "video_min_frames"), ("max_frames", "video_max_frames")):
            if key in video:
                fields[name] = video[key]
        pre = cls(**fields)
        pre._check(model_dir)
        return pre

    def _check(self, model_dir: Path) -> None:
        for key in (
            "min_pixels",
            "max_pixels",
            "video_min_pixels",
            "video_max_pixels",
            "video_min_frames",
            "video_max_frames",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{model_dir}: preprocessor {key} must be a positive integer")
        for lo, hi, limit in (
            ("min_pixels", "max_pixels", MAX_PIXELS),
            ("video_min_pixels", "video_max_pixels", MAX_PIXELS),
            ("video_min_frames", "video_max_frames", None),
        ):
            if getattr(self, lo) > getattr(self, hi) or (limit and getattr(self, hi) > limit):
                raise ConfigError(
                    f"{model_dir}: preprocessor {lo} .. {hi} must be an increasing range"
                    + (f" up to {limit:,}" if limit else "")
                )


def preprocessor_normalization(where: Path | str, cfg: dict) -> dict:
    """A preprocessor file's image_mean, image_std and rescale_factor, where given, within
    the ranges a processor of 8-bit pixels can mean (NORMALIZATION_RANGES): a rescale_factor of
    1e300 or a std of 1e-300 parses as a number, and the tower then sees infinities."""
    out: dict = {}
    for key, (lo, hi) in NORMALIZATION_RANGES.items():
        if key not in cfg:
            continue
        if key == "rescale_factor":
            out[key] = number(cfg[key], f"{where}: {key}", lo, hi, lo_open=True)
            continue
        values = sequence(cfg[key], f"{where}: {key}")
        if len(values) != 3:
            raise ConfigError(f"{where}: {key} needs 3 values (R, G, B), got {len(values)}")
        out[key] = tuple(number(v, f"{where}: {key}", lo, hi) for v in values)
    return out


def _check_fixed_steps(where: Path, cfg: dict) -> None:
    """The steps mlxkit always takes (as Qwen 3.5 was trained): a file that turns one off, or
    resizes with another filter, would be preprocessed differently from what it says."""
    for key in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
        if key in cfg and cfg[key] is not True:
            raise ConfigError(
                f"{where}: {key} is {shown(cfg[key])}; mlxkit always takes this step (true)"
            )
    if "resample" in cfg and (type(cfg["resample"]) is not int or cfg["resample"] != BICUBIC):
        raise ConfigError(
            f"{where}: resample {shown(cfg['resample'])}; mlxkit resizes with bicubic "
            f"({BICUBIC}), as Qwen 3.5's processor"
        )


def _read_json(path: Path) -> dict:
    """A preprocessor file, read like config.json; {} when there is none."""
    if model_file(path.parent, path.name, path.name) is None:
        return {}
    data = read_json(path, path.name, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


# --------------------------------------------------------------------------- pixels


@dataclass(frozen=True)
class VisionInput:
    """One preprocessed image or video, ready for the vision tower."""

    kind: Literal["image", "video"]
    pixel_values: np.ndarray  # [t·h·w, C·T·P·P] float32, merge blocks consecutive
    grid: Grid  # (t, h, w) in patches
    merge_size: int
    source_size: tuple[int, int]  # (height, width) as given
    size: tuple[int, int]  # (height, width) after resizing
    timestamps: tuple[float, ...] = ()  # video: seconds of each temporal group
    capped: bool = False  # image: made smaller than rounding alone would, to fit max_pixels

    @property
    def num_tokens(self) -> int:
        """Vision pads this input takes in the prompt."""
        t, h, w = self.grid
        return t * h * w // self.merge_size**2

    @cached_property
    def key(self) -> str:
        """What a prompt cache remembers this input by: a hash of its kind, grid, timestamps and
        pixel values (two inputs with equal pads differ here when their pictures do)."""
        digest = hashlib.sha256(f"{self.kind}{self.grid}{self.timestamps}".encode())
        digest.update(memoryview(np.ascontiguousarray(self.pixel_values)).cast("B"))
        return digest.hexdigest()


def load_image(image: ImageLike) -> Image.Image:
    """A path, an image file's bytes, a PIL image, or a uint8 array (H×W, H×W×3 or H×W×4) as a
    PIL image."""
    if isinstance(image, Image.Image):
        try:
            image.load()  # an Image.open()ed file is decoded only now
        except (OSError, SyntaxError, ValueError) as e:
            raise VisionInputError(f"the image is not readable ({e})") from None
        return image
    if isinstance(image, np.ndarray):
        return _array_image(image)
    if isinstance(image, bytes):
        return _decode(io.BytesIO(image), "the image data")
    if not isinstance(image, (str, os.PathLike)):
        raise VisionInputError(
            "an image must be a path, an image file's bytes, a PIL.Image or an H×W×3 uint8 "
            f"array, not {type(image).__name__}"
        )
    refuse_url(image, "image")
    path = local_path(image, "image", VisionInputError)
    if path.is_dir():
        raise VisionInputError(f"{path}: a directory, not an image file")
    if not path.is_file():
        raise VisionInputError(f"{path}: no such image file")
    return _decode(path, str(path))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(value: str | os.PathLike, what: str) -> None:
    """A URL given as a path: as a Path, `https://x` would become `https:/x` and be reported
    missing. Nothing is downloaded here, so say so, with the URL as given."""
    text = os.fspath(value)
    if isinstance(text, str) and _URL.match(text):
        url = text if len(text) <= 2000 and text.isprintable() else shown(text)
        raise VisionInputError(
            f"{url}: a URL; {what}s are not downloaded: save the file and pass its path"
        )


# Pillow reports what it forgives (damaged EXIF, a picture past its decompression-bomb warning
# size) as Python warnings, and catching them changes process-wide state: one decode at a time.
_DECODING = threading.Lock()
_PILLOW_DIR = os.path.dirname(Image.__file__)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    """An image file decoded now (Pillow decodes lazily), turned as photos are shown (EXIF
    orientation, as transformers does); what Pillow cannot read is one VisionInputError.

    Pillow's warnings become ours: past its bomb-warning size an image is simply read (it is
    resized to the cap; past its error size it is refused), and anything else it forgave is one
    warning naming the image."""
    with _DECODING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = ImageOps.exif_transpose(Image.open(source))
            img.load()
        except Image.DecompressionBombError as e:
            raise VisionInputError(
                f"{name}: too large to decode safely ({e}); downscale it first"
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise VisionInputError(f"{name}: not a readable image ({e})") from None
    forgiven = []
    for w in caught:
        if not w.filename.startswith(_PILLOW_DIR):  # another thread's, caught meanwhile
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif not issubclass(w.category, Image.DecompressionBombWarning):
            forgiven.append(" ".join(str(w.message).split()))
    if forgiven:
        warnings.warn(f"{name}: read despite damage ({forgiven[0]})", stacklevel=3)
    return img


def _array_image(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise VisionInputError(f"an image array must be uint8 (got {a.dtype})")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise VisionInputError(f"an image array must be H×W, H×W×3 or H×W×4 (got {a.shape})")
    return Image.fromarray(np.ascontiguousarray(a))


# Pillow's modes with associated (premultiplied) alpha, and their straight-alpha forms: Pillow
# cannot convert La to RGB at all, and RGBa → RGB drops the alpha without compositing.
_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}


def to_rgb(img: Image.Image, name: str = "the image") -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it, any transparency (an alpha band or
    palette transparency) composited onto white, for every mode Pillow opens: premultiplied
    alpha is un-premultiplied first, and 16-bit, 32-bit and float grayscale is scaled to 8
    bits (`_to_8bit`) where Pillow's own conversion would clip it."""
    if img.mode in _STRAIGHT_ALPHA:
        img = img.convert(_STRAIGHT_ALPHA[img.mode])
    elif img.mode == "F" or img.mode.startswith("I"):
        img = _to_8bit(img, name)
    if img.mode in ("LA", "PA", "RGBA") or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image, name: str) -> Image.Image:
    """Grayscale of more than 8 bits as 8-bit L (LA where a PNG marks one value transparent).
    16-bit modes (I;16...) and 32-bit integers (I: how Pillow opens 32-bit TIFFs, and 16-bit
    PNGs in older versions) are read as 16-bit, 0..65535; floats (F) as 0..1, the convention
    of float images. Values outside that range have no agreed meaning: refused."""
    a = np.asarray(img)
    top = 1.0 if img.mode == "F" else 65535.0
    if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= top):
        kind = "a floating-point" if img.mode == "F" else "a 32-bit integer"
        raise VisionInputError(
            f"{name} is {kind} grayscale image with values outside 0..{top:g}; save it with "
            "8 or 16 bits per sample"
        )
    gray = np.round(a.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int) and img.mode != "F":
        alpha = np.where(a == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1))  # LA
    return Image.fromarray(gray)  # L


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Sides that are multiples of `factor`, near the original aspect ratio, with a pixel count
    in [min_pixels, max_pixels] (transformers' `smart_resize`; a side never drops below factor)."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_video(
    num_frames: int, height: int, width: int, pre: Preprocessor, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """`smart_resize` for a clip: the budget counts every frame (Qwen3VLVideoProcessor)."""
    factor, tf = pre.factor, pre.temporal_patch_size
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / tf) * tf
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames: np.ndarray, pre: Preprocessor) -> tuple[np.ndarray, Grid]:
    """[F, C, H, W] normalized frames → patch rows [t·h·w, C·T·P·P] and the grid (t, h, w).

    The last frame is repeated to fill the final temporal group (a still image becomes T
    identical frames). Rows go temporal group, merge-block row, merge-block column, row and column
    within the block; each row holds channel, frame, pixel row, pixel column."""
    T, P, m = pre.temporal_patch_size, pre.patch_size, pre.merge_size
    if pad := -len(frames) % T:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    F, C, H, W = frames.shape
    t, h, w = F // T, H // P, W // P
    x = frames.reshape(t, T, C, h // m, m, P, w // m, m, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, bh, bw, mh, mw, C, T, P, P
    return np.ascontiguousarray(x.reshape(t * h * w, C * T * P * P), dtype=np.float32), (t, h, w)


def _pixel_bounds(
    pre: Preprocessor, min_pixels: int | None, max_pixels: int | None, video: bool
) -> tuple[int, int]:
    if not isinstance(pre, Preprocessor):
        raise VisionInputError(
            f"pre must be a Preprocessor (Preprocessor.from_dir), not {type(pre).__name__}"
        )
    if video:
        lo, hi = pre.video_min_pixels, pre.video_max_pixels
    else:
        lo = pre.min_pixels
        hi = min(pre.max_pixels, DEFAULT_MAX_IMAGE_TOKENS * pre.factor**2)
    lo = lo if min_pixels is None else min_pixels
    hi = hi if max_pixels is None else max_pixels
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise VisionInputError(f"{name} must be a positive integer (got {v!r})")
        if v > MAX_PIXELS:
            raise VisionInputError(f"{name} {v:,} is more than the {MAX_PIXELS:,} allowed")
    if lo > hi:
        raise VisionInputError(f"min_pixels {lo} is larger than max_pixels {hi}")
    return lo, hi


def _check_shape(name: str, height: int, width: int, pre: Preprocessor) -> None:
    if min(height, width) < pre.patch_size:
        raise VisionInputError(
            f"{name} is {width}×{height} pixels; the vision tower needs at least "
            f"{pre.patch_size}×{pre.patch_size} (one patch)"
        )
    if max(height, width) / min(height, width) > 200:
        raise VisionInputError(
            f"{name} is {width}×{height} pixels: an aspect ratio over 200 is not supported"
        )


def _describe(image: ImageLike) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else "the image"


def preprocess_image(
    image: ImageLike,
    pre: Preprocessor,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> VisionInput:
    """One image → patches. `max_pixels` defaults to DEFAULT_MAX_IMAGE_TOKENS vision tokens (or
    the preprocessor's own bound, when smaller); `capped` on the result says that bound applied."""
    lo, hi = _pixel_bounds(pre, min_pixels, max_pixels, video=False)
    rgb = to_rgb(load_image(image), _describe(image))
    width, height = rgb.size
    _check_shape(_describe(image), height, width, pre)
    h, w = smart_resize(height, width, pre.factor, lo, hi)
    capped = round(height / pre.factor) * round(width / pre.factor) * pre.factor**2 > hi
    rows, grid = resized_patches(rgb, (h, w), pre)
    return VisionInput("image", rows, grid, pre.merge_size, (height, width), (h, w), capped=capped)


def resized_patches(rgb: Image.Image, size: tuple[int, int], pre: Preprocessor):
    """An RGB picture resized (bicubic) to `size` (height, width), rescaled, normalized and
    flattened: patch rows and their grid (`patchify`)."""
    h, w = size
    resized = np.asarray(rgb.resize((w, h), resample=Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * pre.rescale_factor).astype(np.float32)
    x = (x - np.float32(pre.image_mean)) / np.float32(pre.image_std)
    return patchify(x.transpose(2, 0, 1)[None], pre)


def sample_frame_indices(num_frames: int, fps: float, pre: Preprocessor) -> np.ndarray:
    """Which of `num_frames` frames given at `fps` the processor keeps: its own rate, at least
    min_frames and at most max_frames (never more than given), evenly spread."""
    keep = int(min(num_frames / fps * pre.video_fps, num_frames))  # a tiny fps: inf
    keep = min(max(keep, pre.video_min_frames), pre.video_max_frames, num_frames)
    return np.linspace(0, num_frames - 1, keep).round().astype(int)


def group_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal group: the mean of its first and last frame's time (the last
    frame repeated to fill the final group, as the pixels are)."""
    indices = list(indices)
    indices += indices[-1:] * (-len(indices) % temporal_patch_size)
    times = [int(i) / fps for i in indices]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2
        for i in range(0, len(times), temporal_patch_size)
    ]


def check_video_pixels(pixels: int, name: str) -> None:
    """Refuses a video whose sampled frames would hold more than MAX_VIDEO_SOURCE_PIXELS once
    decoded: a few megabytes of a lossless codec can describe gigabytes of frames (the video
    form of a decompression bomb), and every sampled frame is held until the clip is resized."""
    if pixels > MAX_VIDEO_SOURCE_PIXELS:
        raise VisionInputError(
            f"{name}: the frames sampled hold {pixels:,} pixels decoded, more than the "
            f"{MAX_VIDEO_SOURCE_PIXELS:,} a video may; downscale or shorten it first"
        )


def preprocess_video(
    frames: Sequence[ImageLike] | np.ndarray,
    pre: Preprocessor,
    *,
    fps: float = DEFAULT_VIDEO_FPS,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> VisionInput:
    """Video frames (images, or an F×H×W×3 uint8 array) shown at `fps` → patches + timestamps.

    Frames are resized with Pillow's bicubic filter as images are; transformers resizes video
    frames with torchvision, so resized frames can differ from its output by a rounding step."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise VisionInputError(f"video fps must be a positive number (got {fps!r})")
    if not math.isfinite(1 / fps):
        raise VisionInputError(f"video fps {fps!r} is too small: frame times are infinite")
    lo, hi = _pixel_bounds(pre, min_pixels, max_pixels, video=True)
    if isinstance(frames, (str, bytes)) or not isinstance(frames, (Sequence, np.ndarray)):
        raise VisionInputError(
            f"video frames must be a list of images or an F×H×W×3 array, not "
            f"{type(frames).__name__}"
        )
    if len(frames) < pre.temporal_patch_size:
        raise VisionInputError(
            f"a video needs at least {pre.temporal_patch_size} frames (got {len(frames)}); "
            "pass a single frame as an image instead"
        )
    indices = sample_frame_indices(len(frames), fps, pre)
    if isinstance(frames, np.ndarray) and frames.ndim >= 3:  # known before a frame is copied
        check_video_pixels(len(indices) * frames.shape[1] * frames.shape[2], "the video array")
    rgb, held = [], 0
    for i in indices:  # frames given as files are decoded one by one: bound them as they come
        rgb.append(to_rgb(load_image(frames[i]), "a video frame"))
        held += rgb[-1].width * rgb[-1].height
        check_video_pixels(held, f"the video of {len(frames)} frames")
    sizes = {im.size for im in rgb}
    if len(sizes) > 1:
        raise VisionInputError(f"video frames differ in size: {sorted(sizes)}")
    width, height = rgb[0].size
    _check_shape("a video frame", height, width, pre)
    h, w = smart_resize_video(len(indices), height, width, pre, lo, hi)
    x = np.stack([np.asarray(im.resize((w, h), resample=Image.Resampling.BICUBIC)) for im in rgb])
    scale = 1.0 / pre.rescale_factor  # transformers fuses rescale into normalize for video
    mean = np.float32(np.float32(pre.image_mean) * scale)
    std = np.float32(np.float32(pre.image_std) * scale)
    x = (x.astype(np.float32) - mean) / std
    rows, grid = patchify(x.transpose(0, 3, 1, 2), pre)
    stamps = group_timestamps(indices, fps, pre.temporal_patch_size)
    return VisionInput("video", rows, grid, pre.merge_size, (height, width), (h, w), tuple(stamps))


# --------------------------------------------------------------------------- prompt


_PAD = re.compile(
    re.escape(VISION_START + VIDEO_PAD + VISION_END)
    + "|"
    + re.escape(VIDEO_PAD)
    + "|"
    + re.escape(IMAGE_PAD)
)


def video_placeholder(video: VisionInput) -> str:
    """Per temporal group: its timestamp, then vision_start, one pad per merged patch, vision_end."""
    per_group = video.num_tokens // video.grid[0]
    return "".join(
        f"<{s:.1f} seconds>" + VISION_START + VIDEO_PAD * per_group + VISION_END
        for s in video.timestamps
    )


def expand_prompt(
    text: str, images: Sequence[VisionInput] = (), videos: Sequence[VisionInput] = ()
) -> str:
    """The rendered chat prompt with each image / video part expanded to its vision pads.

    The i-th `<|image_pad|>` takes images[i]. A video part the template wrote as
    `<|vision_start|><|video_pad|><|vision_end|>` is replaced as a whole by its per-group blocks,
    as Qwen's processor (and transformers 4.x, mlx-vlm) do; a bare `<|video_pad|>` is replaced by
    them alone (transformers 5.x replaces only the pad, leaving an outer vision_start/end)."""
    counts = {"image": 0, "video": 0}
    for m in _PAD.finditer(text):
        counts["image" if m.group() == IMAGE_PAD else "video"] += 1
    for kind, given in (("image", images), ("video", videos)):
        if counts[kind] != len(given):
            raise VisionInputError(
                f"the prompt has {counts[kind]} {kind} part(s) but {len(given)} {kind}(s) were given"
            )
    it = {"image": iter(images), "video": iter(videos)}

    def replace(m: re.Match) -> str:
        if m.group() == IMAGE_PAD:
            return IMAGE_PAD * next(it["image"]).num_tokens
        return video_placeholder(next(it["video"]))

    return _PAD.sub(replace, text)


# --------------------------------------------------------------------------- M-RoPE


def mrope_positions(
    input_ids: Sequence[int] | np.ndarray,
    image_grids: Sequence[Grid],
    video_grids: Sequence[Grid],
    merge_size: int,
    tokens: VisionTokens,
    start: int = 0,
) -> tuple[np.ndarray, int]:
    """M-RoPE position ids [3, L] (temporal, row, column) of a prompt, and the position the next
    token takes. Text counts up on all three axes; the pads of an image (or of one temporal group
    of a video) take start + (0, row, col) of their merged patch, and the text after them resumes
    at start + max(rows, cols). `start` continues a prompt already in the cache."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    kind = np.where(ids == tokens.image, 1, np.where(ids == tokens.video, 2, 0))
    # a video is positioned as one image per temporal group (they are separated by timestamps)
    grids = {1: list(image_grids), 2: [(1, h, w) for t, h, w in video_grids for _ in range(t)]}
    used = {1: 0, 2: 0}
    out, pos, i = [], start, 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and kind[j] == kind[i]:
            j += 1
        if kind[i] == 0:
            out.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
            pos += j - i
        else:
            k, covered = kind[i], 0
            while covered < j - i:
                if used[k] == len(grids[k]):
                    raise VisionInputError(f"the prompt has more {_NAMES[k]} pads than its grids")
                t, h, w = grids[k][used[k]]
                used[k] += 1
                gh, gw = h // merge_size, w // merge_size
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                out.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
                covered += t * gh * gw
                pos += max(gh, gw)
            if covered != j - i:
                raise VisionInputError(f"{_NAMES[k]} pads do not match the grids given")
        i = j
    for k in (1, 2):
        if used[k] != len(grids[k]):
            raise VisionInputError(f"the prompt has fewer {_NAMES[k]} pads than its grids need")
    positions = np.concatenate(out, axis=1) if out else np.zeros((3, 0), dtype=np.int64)
    return positions.astype(np.int64), pos


_NAMES = {1: "image", 2: "video"}


def mrope_section(config: dict) -> tuple[int, int, int]:
    """rope_parameters.mrope_section of the text config: how many rotary frequencies follow the
    temporal, row and column positions (interleaved)."""
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = rope.get("mrope_section", [11, 11, 10])
    if len(section) != 3 or not all(isinstance(s, int) and s >= 0 for s in section):
        raise ConfigError(f"config.json: mrope_section must be three counts (got {section!r})")
    return tuple(section)


def mrope_cos_sin(
    positions: np.ndarray, rotary_dim: int, theta: float, section: Sequence[int]
) -> tuple[mx.array, mx.array]:
    """Rotate-half cos and sin [..., L, rotary_dim] (float32) for M-RoPE position ids
    [3, ..., L], the angles formed in float64 on the host (the positions are known there).

    Frequency j (of rotary_dim / 2) turns with the row position when j % 3 == 1 and
    j < 3·section[1], with the column when j % 3 == 2 and j < 3·section[2], else with the
    temporal one. For text, where the three positions agree, this is plain RoPE."""
    half = rotary_dim // 2
    if sum(section) != half:
        raise ConfigError(
            f"mrope_section {list(section)} does not add up to rotary_dim / 2 = {half}"
        )
    axis = np.zeros(half, dtype=np.int64)
    axis[1 : 3 * section[1] : 3] = 1
    axis[2 : 3 * section[2] : 3] = 2
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    pos = np.moveaxis(np.asarray(positions, dtype=np.float64)[axis], 0, -1)  # [..., L, half]
    angles = np.concatenate([pos * inv_freq, pos * inv_freq], axis=-1)
    return mx.array(np.cos(angles), dtype=mx.float32), mx.array(np.sin(angles), dtype=mx.float32)
