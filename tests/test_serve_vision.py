"""`image_url` parts through a real `mlxkit serve` of the tiny vision fixture: the answer is the
Python API's for the same picture, data URLs and allowed local files alike; the prompt pool
reuses an image across turns only when it is the same picture; bad images are 400s."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
from click.testing import CliRunner
from PIL import Image

import mlxkit
from mlxkit.cli import main
from mlxkit.generate import encode_prompt
from mlxkit.serve.images import image_source, request_images
from mlxkit.serve.protocol import RequestError
from tests.helpers import FIXTURES
from tests.serve_helpers import Server, time_limit  # noqa: F401 - time_limit: autouse
from tests.test_image_modes import associated_alpha_tiff
from tests.test_serve import stream_text

NAME = "tiny_vision_p4"
QUESTION = "What is in the picture?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """The allowed directory: the fixture's picture, the same picture mirrored (equal size, so
    equal pads), a link that leads out, and, beside it, a picture that is not allowed."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    image = Image.open(FIXTURES / NAME / "image0.png")
    image.save(allowed / "image0.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(allowed / "mirrored.png")
    image.save(root / "outside.png")
    os.symlink(root / "outside.png", allowed / "link.png")
    return allowed


@pytest.fixture(scope="module")
def server(media):
    s = Server(
        "--model",
        str(FIXTURES / NAME),
        "--allowed-local-media-path",
        str(media),
        "--max-tokens",
        "64",
    )
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model():
    return mlxkit.load(FIXTURES / NAME)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def asking(url: str, text: str = QUESTION) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ],
    }


def python_chat(messages: list[dict]) -> list[dict]:
    return [
        {
            **m,
            "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]],
        }
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


def python_api(model, messages: list[dict], images: list[Path]) -> tuple[str, list[int]]:
    """The runtime's text and expanded prompt token ids for the same chat (image parts bare)."""
    chat = python_chat(messages)
    text = mlxkit.generate(*model, chat, images=images, max_tokens=MAX_TOKENS)
    return text, encode_prompt(model[1], chat, True, model[0], images).tokens


def answer(client, messages: list[dict], stream: bool = False):
    """(reasoning + content, usage) of a greedy chat completion."""
    r = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    if stream:
        content, reasoning, _, usage = stream_text(r)
    else:
        message, usage = r.choices[0].message, r.usage
        content, reasoning = message.content, message.model_extra.get("reasoning_content") or ""
    return reasoning + content, usage


@pytest.mark.parametrize("stream", [False, True])
def test_image_chat_equals_the_python_api(client, model, media, stream):
    """Thinking is on (the template's default), so the tiny model's whole answer is reasoning."""
    expected, ids = python_api(model, [asking("x")], [media / "image0.png"])
    got, usage = answer(client, [asking(data_url(media / "image0.png"))], stream)
    assert "</think>" not in expected and got == expected.strip()
    assert usage.prompt_tokens == len(ids)


def test_local_files_are_read_inside_the_allowed_directory_only(client, media):
    expected, _ = answer(client, [asking(data_url(media / "image0.png"))])
    for url in (
        f"file://{media}/image0.png",
        str(media / "image0.png"),
        f"file://localhost{media}/sub/../image0.png",
    ):
        assert answer(client, [asking(url)])[0] == expected
    refused = {
        f"file://{media}/../outside.png": "outside the directories this server may read",
        str(media / "link.png"): "outside the directories this server may read",
        f"file://{media}/missing.png": "missing.png: no such image file",
        "file://otherhost/x.png": "a file on this machine",
    }
    for url, message in refused.items():
        with pytest.raises(openai.BadRequestError, match=message) as e:
            answer(client, [asking(url)])
        assert e.value.body["param"] == "messages[0].content[0]"


def test_second_turn_with_an_image_reuses_it(server, client, model, media):
    """The second turn's prompt holds the first one's image; the pool's state holds it encoded,
    so the turn processes only what follows it, and its answer is the runtime's."""
    first = [asking(data_url(media / "image0.png"), "Describe it.")]
    prepared = server.stats()["tokens"]["prepared"]
    reply, _ = answer(client, first)
    server.wait_idle(prepared_after=prepared)
    second = [
        *first,
        {"role": "assistant", "content": "", "reasoning_content": reply},
        {"role": "user", "content": "And the colours?"},
    ]
    expected, ids = python_api(model, second, [media / "image0.png"])
    got, usage = answer(client, second)
    assert got == expected.strip() and usage.prompt_tokens == len(ids)
    last_pad = max(i for i, t in enumerate(ids) if t == model[0].vision_tokens.image)
    assert usage.prompt_tokens_details.cached_tokens > last_pad + 1


def test_an_equal_sized_other_picture_is_not_taken_from_the_pool(client, model, media):
    """The mirrored picture has the same size, hence the same tokens, as image0: only its key
    (a hash of the pixels) tells the pool's state of image0 from it."""
    answer(client, [asking(f"file://{media}/image0.png", "Look.")])
    expected, ids = python_api(model, [asking("x", "Look.")], [media / "mirrored.png"])
    got, usage = answer(client, [asking(f"file://{media}/mirrored.png", "Look.")])
    first_pad = ids.index(model[0].vision_tokens.image)
    assert got == expected.strip()
    assert usage.prompt_tokens_details.cached_tokens <= first_pad


@pytest.mark.parametrize(
    "spell",
    [
        lambda b64: "DATA:IMAGE/PNG;BASE64," + b64,
        lambda b64: "Data:image/png;Base64," + b64,
        lambda b64: (
            "data:image/png;base64," + "\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
        ),
        lambda b64: (
            "data:image/png;base64," + "\n ".join(b64[i : i + 60] for i in range(0, len(b64), 60))
        ),
    ],
    ids=["upper case", "mixed case", "wrapped at 76 (CRLF)", "wrapped at 60, indented"],
)
def test_data_urls_as_rfc_2397_allows_them(client, media, spell):
    """Scheme, type and `base64` in any case, base64 wrapped over lines: the same picture."""
    b64 = base64.b64encode((media / "image0.png").read_bytes()).decode()
    expected, _ = answer(client, [asking(data_url(media / "image0.png"))])
    assert answer(client, [asking(spell(b64))])[0] == expected


def mode_image(mode: str, path: Path) -> None:
    """A picture that Pillow opens in `mode`: La (a TIFF with associated alpha), PA (a
    paletted TIFF with alpha), I;16 (a 16-bit PNG), F (a float TIFF)."""
    level = np.random.default_rng(len(mode)).integers(0, 256, (40, 48))
    if mode == "La":
        associated_alpha_tiff(
            Image.fromarray(np.stack([level, level // 2], -1).astype(np.uint8)), path
        )
    elif mode == "PA":
        image = Image.fromarray(np.stack([level, 255 - level], -1).astype(np.uint8), "LA")
        image = image.convert("PA")
        image.putpalette(np.arange(768, dtype=np.uint8).tobytes())
        image.save(path, "TIFF")
    elif mode == "I;16":
        Image.fromarray((level * 257).astype(np.uint16)).save(path, "PNG")
    else:
        Image.fromarray((level / 255).astype(np.float32)).save(path, "TIFF")
    assert Image.open(path).mode == mode


@pytest.mark.parametrize("mode", ["La", "PA", "I;16", "F"])
def test_images_in_uncommon_modes_are_answered(client, model, tmp_path, mode):
    """Grayscale with associated alpha, paletted with alpha, 16-bit and float grayscale: the
    answer is the Python API's for the same file (these were 500s)."""
    mode_image(mode, tmp_path / "x")
    expected, ids = python_api(model, [asking("x")], [tmp_path / "x"])
    url = "data:image/tiff;base64," + base64.b64encode((tmp_path / "x").read_bytes()).decode()
    got, usage = answer(client, [asking(url)])
    assert got == expected.strip() and usage.prompt_tokens == len(ids)


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.png", "does not fetch images from the network"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:text/plain;base64,aGVsbG8=", "'text/plain' is not an image"),
        ("data:image/png;base64,***", "base64 does not decode"),
        ("data:image/png;base64,", "holds no image"),
        (
            "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
            "the image data: not a readable image",
        ),
        (png(np.zeros((1, 1, 3), np.uint8)), "1×1 pixels"),
        ("cat.png", "must be a data URL"),
    ],
)
def test_bad_images_get_400_and_the_server_keeps_serving(server, client, media, url, message):
    status, _, reply = server.request(
        "POST", "/v1/chat/completions", {"messages": [asking(url)], "max_tokens": 2}
    )
    assert status == 400 and message in reply["error"]["message"], reply
    assert reply["error"]["param"] == "messages[0].content[0]"
    assert answer(client, [asking(data_url(media / "image0.png"))])[1].completion_tokens > 0


def test_more_pads_than_images_is_a_400(server):
    """A pad typed into the text has no picture to take."""
    body = {"messages": [{"role": "user", "content": "<|image_pad|> what?"}], "max_tokens": 2}
    status, _, reply = server.request("POST", "/v1/chat/completions", body)
    assert status == 400 and "1 image part(s) but 0 image(s)" in reply["error"]["message"]


def test_a_text_only_model_refuses_image_parts():
    text_only = SimpleNamespace(has_vision=False)
    assert request_images(text_only, [], ()) is None
    with pytest.raises(RequestError, match="need a vision model; this model is text-only") as e:
        request_images(text_only, [("data:image/png;base64,AAAA", "messages[2].content[1]")], ())
    assert e.value.param == "messages[2].content[1]"


def test_local_files_need_the_option():
    with pytest.raises(RequestError, match="reads no local image files") as e:
        image_source("file:///etc/hosts", (), "p")
    assert e.value.param == "p"


def test_allowed_path_must_be_a_directory(tmp_path):
    r = CliRunner().invoke(
        main, ["serve", "--size", "micro", "--allowed-local-media-path", str(tmp_path / "none")]
    )
    assert r.exit_code == 2 and "none: not a directory" in r.output
