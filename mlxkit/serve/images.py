"""`image_url` content parts → what `mlxkit.vision` reads: an image file's bytes or its path.

A server must not become a way to read the machine's files, nor to make it fetch from the
network, so only two kinds of URL are taken:
- `data:image/...;base64,...` (what the `openai` client sends for a local picture; as RFC 2397
  has it, scheme, type and `base64` in any case, and the base64 may be wrapped over lines);
- a local file (`file:///abs/path`, or a bare absolute path) inside a directory the server was
  started with (`--allowed-local-media-path`, vLLM's name for it), judged after resolving links
  and `..`, so neither leads out.
http(s) URLs are refused: the server runs offline and does not fetch.

Requests render on a thread pool, several at once; their images are decoded one at a time
(`_DECODING`), so that the pixels held decoded at any moment are one image's (within Pillow's
decompression-bomb bound), not one per request waiting.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mlxkit.multimodal import prepare_images
from mlxkit.serve.protocol import RequestError
from mlxkit.vision import VisionInput, VisionInputError

_DECODING = threading.Lock()
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


def request_images(
    model, parts: Sequence[tuple[str, str]], allowed_dirs: Sequence[Path]
) -> list[VisionInput] | None:
    """A chat request's image parts ((url, param) in prompt order: `chat.image_parts`) prepared
    as the Python API prepares images (capped at DEFAULT_MAX_IMAGE_TOKENS); None for a text-only
    model, which refuses image parts."""
    if not model.has_vision:
        if parts:
            raise RequestError(
                "image_url content parts need a vision model; this model is text-only",
                param=parts[0][1],
            )
        return None
    images = []
    for url, param in parts:
        source = image_source(url, allowed_dirs, param)
        try:
            with _DECODING:
                images += prepare_images(model, [source])
        except VisionInputError as e:
            raise RequestError(str(e), param=param) from None
    return images


def image_source(url: str, allowed_dirs: Sequence[Path], param: str) -> bytes | Path:
    """The image an `image_url.url` names: decoded bytes of a data URL, or the resolved path of
    an allowed local file. Anything else is a RequestError (400) naming `param`."""
    if url[:5].lower() == "data:":
        return _data_url(url, param)
    split = urlsplit(url)
    scheme = split.scheme.lower()
    if scheme in ("http", "https"):
        raise RequestError(
            "this server does not fetch images from the network; send the image as a data URL "
            "(data:image/png;base64,...)",
            param=param,
        )
    if scheme == "file":
        if split.netloc not in ("", "localhost"):
            raise RequestError("a file URL must name a file on this machine", param=param)
        path = unquote(split.path)
    elif url.startswith("/"):
        path = url
    else:
        raise RequestError(
            "image_url.url must be a data URL (data:image/...;base64,...) or a local file "
            "(file:///path) the server may read",
            param=param,
        )
    return _allowed_file(path, allowed_dirs, param)


def _data_url(url: str, param: str) -> bytes:
    head, sep, payload = url[len("data:") :].partition(",")
    kind, *options = head.split(";")
    if not sep or "base64" not in (o.strip().lower() for o in options):
        raise RequestError("a data URL must be base64 (data:image/png;base64,...)", param=param)
    if kind and not kind.lower().startswith("image/"):
        raise RequestError(f"a data URL of type {kind!r} is not an image", param=param)
    try:
        data = base64.b64decode(_WHITESPACE.sub(b"", payload.encode("ascii")), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the data URL's base64 does not decode", param=param) from None
    if not data:
        raise RequestError("the data URL holds no image", param=param)
    return data


def _allowed_file(path: str, allowed_dirs: Sequence[Path], param: str) -> Path:
    if not allowed_dirs:
        raise RequestError(
            "this server reads no local image files; send a data URL, or start it with "
            "--allowed-local-media-path DIR",
            param=param,
        )
    if "\0" in path:
        raise RequestError("a file path may not hold a NUL byte", param=param)
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError):
        raise RequestError("not a usable file path", param=param) from None
    if not any(resolved.is_relative_to(d) for d in allowed_dirs):
        raise RequestError(
            "the image file is outside the directories this server may read "
            "(--allowed-local-media-path)",
            param=param,
        )
    return resolved
