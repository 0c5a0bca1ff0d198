"""Images and video at generation time: from what a caller passes (`images=`, `videos=`, chat
parts) to a prompt of token ids with its vision pads expanded, and from there to what each
prefill chunk gives the model (`PromptInputs`): its rotary positions, and its embeddings with
the vision tower's features at the pads.

A prompt as text or chat holds one `<|image_pad|>` per image (the chat template writes an image
part as vision_start, pad, vision_end); `mlxkit.vision.expand_prompt` repeats it once per merged
patch. A prompt of token ids is what the model reads: its pads are already expanded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxkit.models.qwen3_5 import Model, Rotary
from mlxkit.models.qwen3_5_vision import place_vision_embeddings
from mlxkit.vision import (
    DEFAULT_VIDEO_FPS,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    ImageLike,
    VisionInput,
    VisionInputError,
    check_video_pixels,
    mrope_cos_sin,
    mrope_positions,
    preprocess_image,
    preprocess_video,
    refuse_url,
    sample_frame_indices,
)


@dataclass(frozen=True)
class Video:
    """Video frames (images, or an F×H×W×3 uint8 array) shown at `fps` frames per second. A bare
    list of frames is taken at DEFAULT_VIDEO_FPS."""

    frames: Sequence[ImageLike] | np.ndarray
    fps: float = DEFAULT_VIDEO_FPS


VideoLike = str | os.PathLike | Video | Sequence[ImageLike] | np.ndarray


# --------------------------------------------------------------------------- inputs


def image_list(images: object) -> list:
    """`images=` as a list. One image (a path, bytes, a PIL image, an array, a prepared input)
    is a list of one: a path string is never read as a sequence of one-character paths, and an
    array never as a list of its rows."""
    if images is None:
        return []
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray, VisionInput)):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise VisionInputError(
            f"images must be an image or a list of images, not {type(images).__name__}"
        )
    return list(images)


def video_list(videos: object) -> list:
    """`videos=` as a list. One video (a file path, a `Video`, an F×H×W×3 array, a prepared
    input) is a list of one; in a list, each item is a whole video, so a frame there (a PIL
    image, bytes, a 2- or 3-dimensional array) means a list of frames was passed as videos."""
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike, Video, np.ndarray, VisionInput)):
        return [videos]
    if not isinstance(videos, (list, tuple)):
        raise VisionInputError(
            f"videos must be a video or a list of videos, not {type(videos).__name__}"
        )
    for v in videos:
        if isinstance(v, (Image.Image, bytes)) or (isinstance(v, np.ndarray) and v.ndim < 4):
            raise VisionInputError(
                f"videos holds a single frame ({type(v).__name__}): each item of videos is a "
                "whole video; pass a list of frames as videos=[Video(frames, fps)]"
            )
    return list(videos)


def _need_vision(model: Model) -> None:
    if not model.has_vision:
        raise VisionInputError(
            "images and videos need a model with a vision tower; this one has none (a "
            "text-only checkpoint, one converted with --no-vision, or a bundle whose vision "
            "encoder is Core ML, which only the app runs)"
        )


def prepare_images(
    model: Model,
    images: ImageLike | VisionInput | Sequence[ImageLike | VisionInput],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> list[VisionInput]:
    """Images (paths, PIL images, H×W×3 uint8 arrays, or inputs already prepared; one alone
    counts as a list of one) → patches, each capped at DEFAULT_MAX_IMAGE_TOKENS vision tokens
    unless `max_pixels` says otherwise."""
    images = image_list(images)
    if not images:
        return []
    _need_vision(model)
    return [
        im
        if isinstance(im, VisionInput)
        else preprocess_image(im, model.preprocessor, min_pixels=min_pixels, max_pixels=max_pixels)
        for im in images
    ]


def prepare_videos(
    model: Model, videos: VideoLike | VisionInput | Sequence[VideoLike | VisionInput]
) -> list[VisionInput]:
    """Videos (a file path, read with PyAV; a `Video`; a list or array of frames at
    DEFAULT_VIDEO_FPS; or an input already prepared; one alone counts as a list of one) →
    patches and timestamps."""
    videos = video_list(videos)
    if not videos:
        return []
    _need_vision(model)
    out = []
    for v in videos:
        if isinstance(v, VisionInput):
            out.append(v)
            continue
        if isinstance(v, (str, os.PathLike)):
            v = read_video(v, model)
        elif not isinstance(v, Video):
            v = Video(v)
        out.append(preprocess_video(v.frames, model.preprocessor, fps=v.fps))
    return out


class _SampledFrames(Sequence):
    """The frames of a video file that the preprocessor keeps, indexed as in the whole file."""

    def __init__(self, count: int, kept: dict[int, np.ndarray]) -> None:
        self.count, self.kept = count, kept

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        return self.kept[i]


def read_video(path: str | os.PathLike, model: Model) -> Video:
    """A video file's frames and rate, by PyAV (the optional `video` extra). Only the frames the
    preprocessor samples are kept in memory."""
    try:
        import av
    except ImportError:
        raise VisionInputError(
            f"{path}: reading a video file needs PyAV (pip install 'mlxkit[video]'); or pass "
            "its frames: videos=[Video(frames, fps)]"
        ) from None
    refuse_url(path, "video")
    if not os.path.isfile(path):
        raise VisionInputError(f"{path}: no such video file")

    def decode(count: int) -> tuple[int, dict[int, np.ndarray]]:
        wanted = set(sample_frame_indices(count, fps, model.preprocessor).tolist())
        check_video_pixels(len(wanted) * width * height, f"{path} ({width}×{height})")
        kept, n = {}, 0
        with av.open(str(path)) as container:
            for n, frame in enumerate(container.decode(video=0), start=1):
                if (frame.width, frame.height) != (width, height):
                    raise VisionInputError(
                        f"{path}: frame {n} is {frame.width}×{frame.height} pixels, but its "
                        f"stream says {width}×{height}"
                    )
                if n - 1 in wanted:
                    kept[n - 1] = frame.to_ndarray(format="rgb24")
        return n, kept

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VisionInputError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
            count = sum(1 for p in container.demux(stream) if p.size)
        if count == 0 or fps <= 0 or width <= 0 or height <= 0:
            raise VisionInputError(
                f"{path}: no frames, no frame size or no frame rate in its video stream"
            )
        decoded, kept = decode(count)  # bounded by what the stream says, before decoding
        if decoded != count:  # packets and frames differ: sample again from the real count
            count = decoded
            decoded, kept = decode(count) if count else (0, {})
    except av.error.FFmpegError as e:
        raise VisionInputError(f"{path}: not a readable video ({e})") from None
    return Video(_SampledFrames(count, kept), fps)


# --------------------------------------------------------------------------- chat parts


PART_TEXT = {  # what a chat template writes for an image or a video part
    "image": VISION_START + IMAGE_PAD + VISION_END,
    "video": VISION_START + VIDEO_PAD + VISION_END,
}


def _part_kind(part: object, where: str) -> str:
    """ "text", "image" or "video" for one content part, as transformers reads them."""
    if not isinstance(part, dict):
        raise VisionInputError(f"{where} must be an object such as {{'type': 'text', ...}}")
    kind = part.get("type")
    if kind is None:
        kind = next((k for k in ("image", "video", "text") if k in part), None)
    if kind not in ("text", "image", "video"):
        raise VisionInputError(f"{where} has type {kind!r}; expected text, image or video")
    if kind == "text" and not isinstance(part.get("text"), str):
        raise VisionInputError(f'{where} is a text part without a "text" string')
    return kind


def chat_media(
    messages: Sequence[dict], images: Sequence, videos: Sequence
) -> tuple[list[dict], list, list]:
    """Chat messages whose content may be a list of parts → the same messages with string
    content (an image part written as the template writes it: vision_start, image pad,
    vision_end; a video part likewise), and the images and videos in the order their parts
    appear. A part {"type": "image", "image": X} brings its own image; a bare {"type": "image"}
    (or an `<|image_pad|>` in string content) takes the next of `images`, which must all be
    used; videos likewise."""
    given = {"image": list(images), "video": list(videos)}
    used = {"image": 0, "video": 0}
    found: dict[str, list] = {"image": [], "video": []}

    def take(kind: str) -> None:
        if used[kind] == len(given[kind]):
            raise VisionInputError(
                f"the chat has more {kind} parts (without their own {kind}) than the "
                f"{len(given[kind])} {kind}(s) given"
            )
        found[kind].append(given[kind][used[kind]])
        used[kind] += 1

    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            for kind, pad in (("image", IMAGE_PAD), ("video", VIDEO_PAD)):
                for _ in range(content.count(pad)):
                    take(kind)
            out.append(message)
            continue
        text = []
        for j, part in enumerate(content):
            kind = _part_kind(part, f"messages[{i}].content[{j}]")
            if kind == "text":
                text.append(part["text"])
                continue
            if part.get(kind) is not None:
                found[kind].append(part[kind])
            else:
                take(kind)
            text.append(PART_TEXT[kind])
        out.append({**message, "content": "".join(text)})
    for kind in ("image", "video"):
        if used[kind] < len(given[kind]):
            raise VisionInputError(
                f"{len(given[kind])} {kind}(s) given but the chat has {used[kind]} {kind} "
                f"part(s) to take them"
            )
    return out, found["image"], found["video"]


def check_pads(tokens: Sequence[int], model: Model, images: list, videos: list) -> None:
    """A token-id prompt's pads against the images and videos given for it."""
    ids = np.asarray(tokens)
    for kind, pad, given in (
        ("image", model.vision_tokens.image, images),
        ("video", model.vision_tokens.video, videos),
    ):
        have, need = int((ids == pad).sum()), sum(v.num_tokens for v in given)
        if have != need:
            raise VisionInputError(
                f"the prompt's token ids hold {have} {kind} pads; the {len(given)} {kind}(s) "
                f"given take {need} (token ids are read as they are: expand each {kind}'s pad "
                f"to its num_tokens, or pass text)"
            )


# --------------------------------------------------------------------------- prefill


def encode_vision(model: Model, inputs: Sequence[VisionInput]) -> mx.array | None:
    """The tower's features [Σ tokens, hidden] of inputs, one input at a time (attention over one
    image costs N² in its patches; encoding them together would add nothing but memory)."""
    features = []
    for v in inputs:
        f = model.vision_tower(mx.array(v.pixel_values), [v.grid])
        mx.eval(f)
        features.append(f)
    if not features:
        return None
    return features[0] if len(features) == 1 else mx.concatenate(features)


class PromptInputs:
    """What the prefill of a prompt's new tokens (after the `start` tokens a cache holds) gives
    the model, chunk by chunk: `rotary(first, count)` places any stretch of tokens, and
    `embeddings(s, e)` has the vision features at the pads of new tokens s..e (None where the
    stretch holds no pad: the model embeds the tokens itself).

    Text positions are the token index + a shift; only a stretch holding vision tokens needs
    M-RoPE's per-position cos/sin. Tokens before `start` are taken to be text (they are: a
    prompt ends in text, generated tokens are text), so the MTP head's pending state from the
    cache is placed as text."""

    def __init__(
        self,
        model: Model,
        start: int,
        rope_delta: int,
        new_tokens: Sequence[int],
        images: Sequence[VisionInput] = (),
        videos: Sequence[VisionInput] = (),
    ) -> None:
        self.model, self.start, self.old_delta = model, start, rope_delta
        self.ids = np.asarray(new_tokens, dtype=np.int64)
        self.positions = None  # [3, len(new_tokens)] when the new tokens hold vision pads
        self.features = {}
        end = start + len(self.ids)
        self.rope_delta = rope_delta
        if model.has_vision:
            tok = model.vision_tokens
            self.pads = {"image": tok.image, "video": tok.video}
            if images or videos or np.isin(self.ids, list(self.pads.values())).any():
                check_pads(self.ids, model, list(images), list(videos))
                self.positions, next_position = mrope_positions(
                    self.ids,
                    [v.grid for v in images],
                    [v.grid for v in videos],
                    model.preprocessor.merge_size,
                    tok,
                    start=start + rope_delta,
                )
                self.rope_delta = next_position - end
                self.features = {"image": encode_vision(model, images)}
                self.features["video"] = encode_vision(model, videos)
                # features before each new token, per kind: where a chunk's features begin
                self.before = {
                    k: np.concatenate([[0], np.cumsum(self.ids == pad)])
                    for k, pad in self.pads.items()
                }

    def _positions(self, first: int, count: int) -> np.ndarray:
        """M-RoPE positions [3, count] of tokens first.. (cache indices)."""
        idx = np.arange(first, first + count)
        out = np.broadcast_to(idx + self.old_delta, (3, count)).copy()
        new = idx >= self.start
        if self.positions is not None and new.any():
            out[:, new] = self.positions[:, idx[new] - self.start]
        return out

    def rotary(self, first: int, count: int) -> Rotary:
        """How to place tokens first..first+count (cache indices; the pass writes its cache at
        `first`)."""
        if self.positions is None:
            return Rotary.text(self.old_delta)
        pos = self._positions(first, count)
        shift = pos[0] - np.arange(first, first + count)
        if (pos == pos[0]).all() and (shift == shift[0]).all():
            return Rotary.text(int(shift[0]))
        cfg = self.model.config
        cos, sin = mrope_cos_sin(pos, cfg.rotary_dim, cfg.rope_theta, self.model.mrope_section)
        return Rotary(mx.array(0, dtype=mx.int32), cos, sin)

    def embeddings(self, s: int, e: int) -> mx.array | None:
        """Embeddings [1, e - s, H] of new tokens s..e with the features at their pads."""
        if self.positions is None:
            return None
        ids = self.ids[s:e]
        placed = None
        for kind, pad in self.pads.items():
            a, b = self.before[kind][s], self.before[kind][e]
            if a == b:
                continue
            if placed is None:
                placed = self.model.language_model.model.embed_tokens(mx.array(ids)[None])
            placed = place_vision_embeddings(placed, ids, pad, self.features[kind][a:b])
        return placed
