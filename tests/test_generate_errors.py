"""Bad input to generation — API arguments, `mlxkit generate` values, prompt-cache files,
broken numbers — ends in one MlxkitError (one line on stderr and exit 2 from the CLI), never
a traceback or text made from NaNs. The table rows run through the shared bad-input harness
(tests/badinput.py), which also checks that nothing is left on disk and inputs are untouched."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxkit.errors import MlxkitError
from mlxkit.generate import PromptCache, Video, generate, stream_generate
from mlxkit.load import load
from tests.badinput import Inputs, api, cli, run_row
from tests.helpers import FIXTURES
from tests.vision_helpers import header_only_png

MODEL = FIXTURES / "tiny_tied"
NAN, INF = float("nan"), float("inf")


@cache
def _tiny():
    return load(MODEL, dtype=mx.float32)


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def api_generate(kw: dict, message: str):
    """A row: `generate` on the fixture with one bad argument (prompt "def f(x):", 2 tokens)."""
    kw = {"prompt": "def f(x):", "max_tokens": 2, **kw}

    def call(inputs: Inputs):
        model, tokenizer = _tiny()
        args = dict(kw)
        return generate(model, tokenizer, args.pop("prompt"), **args)

    shown = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return api(f"generate({shown})"[:80], call, needs=(), message=message)


API_ROWS = [
    api_generate({"temperature": NAN}, "temperature must be a finite number"),
    api_generate({"temperature": INF}, "temperature must be a finite number"),
    api_generate({"temperature": -0.5}, "temperature must be >= 0"),
    api_generate({"temperature": "0.7"}, "temperature must be a number"),
    api_generate({"top_p": NAN}, "top_p must be a finite number"),
    api_generate({"top_p": 0.0}, "top_p must be in (0, 1]"),
    api_generate({"top_p": 1.01}, "top_p must be in (0, 1]"),
    api_generate({"top_p": 1.5}, "top_p must be in (0, 1]"),
    api_generate({"min_p": NAN}, "min_p must be a finite number"),
    api_generate({"min_p": 1.0}, "min_p must be in [0, 1)"),
    api_generate({"min_p": -0.1}, "min_p must be in [0, 1)"),
    api_generate({"repetition_penalty": NAN}, "repetition_penalty must be a finite number"),
    api_generate({"repetition_penalty": INF}, "repetition_penalty must be a finite number"),
    api_generate({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    api_generate({"top_k": -1}, "top_k must be >= 0"),
    api_generate({"top_k": 2.5}, "top_k must be an integer"),
    api_generate({"seed": -1}, "seed must be between 0 and 18446744073709551615, got -1"),
    api_generate({"seed": 2**64}, "seed must be between 0 and"),
    api_generate({"seed": 2**70}, "seed must be between 0 and"),
    api_generate({"seed": 1.5}, "seed must be an integer"),
    api_generate({"seed": "7"}, "seed must be an integer"),
    api_generate({"prefill_chunk": 0}, "prefill_chunk must be >= 1, got 0"),
    api_generate({"prefill_chunk": -3}, "prefill_chunk must be >= 1"),
    api_generate({"prefill_chunk": 1.5}, "prefill_chunk must be an integer"),
    api_generate({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    api_generate({"max_tokens": -5}, "max_tokens must be >= 1"),
    api_generate({"max_tokens": None}, "max_tokens must be an integer"),
    api_generate({"max_tokens": True}, "max_tokens must be an integer"),
    api_generate({"num_draft": 0}, "num_draft must be between 1 and 8"),
    api_generate({"num_draft": 9}, "num_draft must be between 1 and 8"),
    api_generate({"num_draft": 2.0}, "num_draft must be an integer"),
    api_generate({"stop": [3]}, "stop must be a string or a list of strings"),
    api_generate({"prompt_cache": "cache.safetensors"}, "prompt_cache must be a PromptCache"),
    api_generate({"prompt": ""}, "the prompt is empty"),
    api_generate({"prompt": []}, "the prompt is empty"),
    api_generate({"prompt": [1, -1]}, "token id -1 is outside this model's vocabulary of 512"),
    api_generate({"prompt": [512]}, "token id 512 is outside"),
    api_generate({"prompt": [1, 2.5]}, "prompt must be a string, a list of token ids"),
    api_generate({"prompt": "caf\udce9"}, "the prompt is not valid UTF-8"),
    api_generate(
        {"prompt": [{"role": "user"}]}, 'every chat message needs a "role" and a "content"'
    ),
    api_generate({"prompt": [{"role": "user", "content": 3}]}, "every chat message needs"),
    api_generate({"prompt": [{"role": "user", "content": "caf\udce9"}]}, "not valid UTF-8"),
]


def generate_cli(*args: str, message: str, name: str = "", **kw):
    """A row: `mlxkit generate` on the fixture, 2 tokens, with bad values appended."""
    base = ("generate", "--model", "{src}", "--prompt", "hi", "--max-tokens", "2")
    return cli(f"generate {' '.join(args)}{name}", *base, *args, message=message, **kw)


def nan_weights(inputs: Inputs) -> None:
    """The final norm all NaN: every logit is NaN."""
    path = inputs.src / "model.safetensors"
    weights = mx.load(str(path))
    name = "model.language_model.norm.weight"
    weights[name] = mx.full(weights[name].shape, NAN, dtype=weights[name].dtype)
    mx.save_safetensors(str(path), weights)


CLI_ROWS = [
    generate_cli("--temp", "nan", message="temperature must be a finite number"),
    generate_cli("--temp", "inf", message="temperature must be a finite number"),
    generate_cli("--temp", "-1", message="temperature must be >= 0"),
    generate_cli("--top-p", "nan", message="top_p must be a finite number"),
    generate_cli("--top-p", "2", message="top_p must be in (0, 1]"),
    generate_cli("--min-p", "nan", message="min_p must be a finite number"),
    generate_cli(
        "--repetition-penalty", "nan", message="repetition_penalty must be a finite number"
    ),
    generate_cli(
        "--repetition-penalty", "-inf", message="repetition_penalty must be a finite number"
    ),
    generate_cli("--top-k", "-2", message="top_k must be >= 0"),
    generate_cli("--seed", "-1", message="seed must be between 0 and"),
    generate_cli("--seed", "1180591620717411303424", message="seed must be between 0 and"),
    generate_cli("--max-tokens", "0", message="max_tokens must be >= 1"),
    generate_cli("--num-draft", "0", message="num_draft must be between 1 and 8"),
    generate_cli("--num-draft", "9", message="num_draft must be between 1 and 8"),
    generate_cli("--prompt", "", message="the prompt is empty"),
    generate_cli("--prompt", "caf\udce9", message="the prompt is not valid UTF-8"),
    generate_cli("--chat", "--prompt", "caf\udce9", message="the prompt is not valid UTF-8"),
    # Through a real command line: Python hands bytes that are not UTF-8 on as lone
    # surrogates, which the subprocess gets back as the bytes \xe9 here.
    generate_cli(
        "--prompt", "caf\udce9", name=" (a process)", subprocess=True, message="not valid UTF-8"
    ),
    generate_cli(name="NaN weights", setup=nan_weights, message="non-finite logits (NaN or inf)"),
]


def test_prompt_longer_than_context():
    model, tokenizer = load(MODEL)
    too_long = [1] * model.config.max_position_embeddings
    with pytest.raises(MlxkitError, match="context"):
        generate(model, tokenizer, too_long, max_tokens=2)


def test_numpy_numbers_are_numbers(tiny):
    import numpy as np

    model, tokenizer = tiny
    kw = {"temperature": np.float32(0.5), "top_k": np.int64(5), "seed": np.int64(3)}
    a = generate(model, tokenizer, "def f(x):", max_tokens=np.int64(4), **kw)
    b = generate(model, tokenizer, "def f(x):", max_tokens=4, temperature=0.5, top_k=5, seed=3)
    assert a == b


# --------------------------------------------------------------------------- broken numbers


def nan_model(tiny):
    """The fixture with an all-NaN final norm: every logit is NaN."""
    model, tokenizer = load(MODEL, dtype=mx.float32)
    norm = model.language_model.model.norm.weight
    model.load_weights(
        [("language_model.model.norm.weight", mx.full(norm.shape, NAN))], strict=False
    )
    return model, tokenizer


@pytest.mark.parametrize("kw", [{"mtp": False}, {"mtp": True}, {"temperature": 0.8, "seed": 1}])
def test_non_finite_logits_end_generation_before_any_text(tiny, kw):
    model, tokenizer = nan_model(tiny)
    stream = stream_generate(model, tokenizer, "def f(x):", max_tokens=8, **kw)
    with pytest.raises(MlxkitError, match=r"non-finite logits \(NaN or inf\) at position"):
        next(stream)


@pytest.mark.parametrize("mtp", [False, True])
def test_non_finite_logits_mid_generation(tiny, mtp):
    """States turned NaN after the first token: the loop stops within a step or round,
    without handing out a token made from them."""
    model, tokenizer = tiny
    cache = PromptCache.new(model)
    kw = {"max_tokens": 20, "mtp": mtp}
    stream = stream_generate(model, tokenizer, "def f(x):", prompt_cache=cache, **kw)
    good = [next(stream).token]
    linear = next(c for c in cache.main if hasattr(c, "recurrent_state"))
    linear.recurrent_state = mx.full(linear.recurrent_state.shape, NAN)
    with pytest.raises(MlxkitError, match="non-finite logits"):
        good += [r.token for r in stream]
    clean = [r.token for r in stream_generate(model, tokenizer, "def f(x):", **kw)]
    assert len(good) <= 4 and good == clean[: len(good)]


# --------------------------------------------------------------------------- the context limit


def short_context(tiny, n: int):
    model, tokenizer = load(MODEL, dtype=mx.float32)
    model.config.max_position_embeddings = n
    return model, tokenizer


@pytest.mark.parametrize("mtp", [False, True])
def test_past_the_context_warns_once(tiny, mtp):
    model, tokenizer = short_context(tiny, 12)
    prompt = tokenizer.encode("def f(x):")  # 8 tokens or so
    n_free = 12 - len(prompt)
    assert n_free > 0
    with pytest.warns(UserWarning, match="went past this model's context") as caught:
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=12, mtp=mtp))
    assert len([w for w in caught if "context" in str(w.message)]) == 1
    assert len(responses) == 12  # it warns, it does not stop


@pytest.mark.parametrize("mtp", [False, True])
def test_stop_at_context(tiny, mtp):
    model, tokenizer = short_context(tiny, 12)
    prompt = tokenizer.encode("def f(x):")
    kw = {"max_tokens": 12, "mtp": mtp, "stop_at_context": True}
    responses = list(stream_generate(model, tokenizer, prompt, **kw))
    assert len(prompt) + len(responses) == 12
    assert responses[-1].finish_reason == "length"


# --------------------------------------------------------------------------- prompt-cache files


@cache
def _filled_cache() -> PromptCache:
    """A cache that `stream_generate` filled on the fixture (prompt and 6 tokens)."""
    model, tokenizer = _tiny()
    filled = PromptCache.new(model)
    list(stream_generate(model, tokenizer, "def f(x):", max_tokens=6, prompt_cache=filled))
    return filled


def _saved(path: Path) -> tuple[dict, dict]:
    _filled_cache().save(path)
    return mx.load(str(path), return_metadata=True)


CACHE_CASES = {
    "tokens not ids": (lambda a, m: (a, {**m, "tokens": "1,x,3"}), "comma-separated list of ids"),
    "token outside vocab": (lambda a, m: (a, {**m, "tokens": "1,99999"}), "outside this model"),
    "negative token": (lambda a, m: (a, {**m, "tokens": "-4,1"}), "outside this model"),
    "one token too many": (lambda a, m: (a, {**m, "tokens": m["tokens"] + ",5"}), "expected"),
    "one token too few": (
        lambda a, m: (a, {**m, "tokens": m["tokens"].rsplit(",", 1)[0]}),
        "expected",
    ),
    "no tokens but states": (lambda a, m: (a, {**m, "tokens": ""}), "mtp_pending without"),
    "mtp flag not a bool": (lambda a, m: (a, {**m, "mtp": "yes"}), "metadata mtp is 'yes'"),
    "mtp flag missing": (lambda a, m: (a, {"tokens": m["tokens"]}), "metadata mtp is None"),
    "mtp off but states": (lambda a, m: (a, {**m, "mtp": "False"}), "mtp_pending without"),
    "layer missing": (
        lambda a, m: ({k: v for k, v in a.items() if not k.startswith("main.0.")}, m),
        "main.0 holds []",
    ),
    "keys missing": (
        lambda a, m: ({k: v for k, v in a.items() if k != "main.3.keys"}, m),
        "main.3 holds ['values']",
    ),
    "extra array": (lambda a, m: ({**a, "main.99.keys": a["main.3.keys"]}, m), "unexpected"),
    "wrong shape": (
        lambda a, m: ({**a, "main.3.keys": a["main.3.keys"][:, :, :2]}, m),
        "main.3.keys has shape",
    ),
    "wrong dtype": (
        lambda a, m: ({**a, "main.3.keys": a["main.3.keys"].astype(mx.int32)}, m),
        "main.3.keys has dtype",
    ),
    "wrong offset": (
        lambda a, m: ({**a, "main.0.offset": mx.array(1)}, m),
        "main.0.offset is 1",
    ),
    "pending wrong width": (
        lambda a, m: ({**a, "mtp_pending": a["mtp_pending"][..., :3]}, m),
        "mtp_pending has shape",
    ),
    "pending missing": (
        lambda a, m: ({k: v for k, v in a.items() if k != "mtp_pending"}, m),
        "mtp_pending is missing",
    ),
}


def cache_row(case: str):
    """A row: PromptCache.load of the saved cache with one thing edited."""
    edit, message = CACHE_CASES[case]

    def setup(inputs: Inputs) -> None:
        path = inputs.root / "bad.safetensors"
        arrays, meta = edit(*_saved(path))
        mx.save_safetensors(str(path), arrays, metadata=meta)

    def call(inputs: Inputs):
        return PromptCache.load(inputs.root / "bad.safetensors", _tiny()[0])

    return api(f"PromptCache.load: {case}", call, setup=setup, needs=(), message=message)


# --------------------------------------------------------------------------- images and video

VISION = FIXTURES / "tiny_vision_p4"
IMAGE0 = str(VISION / "image0.png")
PAD = "<|vision_start|><|image_pad|><|vision_end|>"


@cache
def _vision():
    return load(VISION, dtype=mx.float32)


def text_only(inputs: Inputs) -> None:
    """{root}/text: tiny_tied converted without its vision tower."""
    from mlxkit.convert import convert

    convert(inputs.src, inputs.root / "text", vision=False, quiet=True)


def api_vision(id: str, prompt, message: str, text_model: bool = False, **kw):
    """A row: `generate` with images or videos on the vision fixture (or a text-only model)."""

    def call(inputs: Inputs):
        model, tokenizer = load(inputs.root / "text") if text_model else _vision()
        return generate(model, tokenizer, prompt, max_tokens=2, **kw)

    if text_model:
        return api(id, call, needs=("src",), setup=text_only, message=message)
    return api(id, call, needs=(), message=message)


def chat(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]


def write(name: str, data: bytes):
    def setup(inputs: Inputs) -> None:
        (inputs.root / name).write_bytes(data)

    return setup


def huge_png(inputs: Inputs) -> None:
    header_only_png(inputs.root / "huge.png", 20_000, 20_000)


def one_pixel(inputs: Inputs) -> None:
    from PIL import Image

    Image.new("RGB", (1, 1)).save(inputs.root / "dot.png")


def one_frame_video(inputs: Inputs) -> None:
    import av

    with av.open(str(inputs.root / "one.mov"), "w") as container:
        stream = container.add_stream("png", rate=2)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def without_pyav(inputs: Inputs) -> None:
    (inputs.root / "clip.mov").write_bytes(b"")


def vision_cli(*args: str, message: str, name: str = "", model: str = "{vision}", **kw):
    """A row: `mlxkit generate --chat` on the vision fixture with bad image / video options."""
    base = ("generate", "--model", model, "--prompt", "What is it?", "--chat", "--max-tokens", "2")
    needs = ("vision",) if model == "{vision}" else ("src", "vision")
    return cli(f"generate {' '.join(args)}{name}", *base, *args, message=message, needs=needs, **kw)


def _no_pyav_video(inputs: Inputs):
    import sys

    model, tokenizer = _vision()
    saved = sys.modules.get("av")
    sys.modules["av"] = None  # import av fails as if PyAV were not installed
    try:
        return generate(
            model,
            tokenizer,
            "<|vision_start|><|video_pad|><|vision_end|>",
            videos=[inputs.root / "clip.mov"],
            max_tokens=2,
        )
    finally:
        if saved is None:
            del sys.modules["av"]
        else:
            sys.modules["av"] = saved


VISION_ROWS = [
    vision_cli("--image", "{root}/missing.png", message="missing.png: no such image file"),
    vision_cli("--image", "{root}", message="a directory, not an image file"),
    vision_cli(
        "--image",
        "{root}/bad.png",
        name=" (not an image)",
        setup=write("bad.png", b"not a png at all"),
        message="not a readable image",
    ),
    vision_cli(
        "--image",
        "{root}/cut.png",
        name=" (truncated)",
        setup=write("cut.png", Path(IMAGE0).read_bytes()[:200]),
        message="not a readable image",
    ),
    vision_cli(
        "--image",
        "{root}/dot.png",
        name=" (1x1)",
        setup=one_pixel,
        message="is 1×1 pixels; the vision tower needs at least 4×4",
    ),
    vision_cli(
        "--image",
        "{root}/huge.png",
        name=" (20000x20000)",
        setup=huge_png,
        message="too large to decode safely",
    ),
    vision_cli(
        "--image",
        "{vision}/image0.png",
        model="{root}/text",
        name=" (text-only model)",
        setup=text_only,
        message="images and videos need a model with a vision tower",
    ),
    vision_cli(
        "--video",
        "{root}/one.mov",
        name=" (one frame)",
        setup=one_frame_video,
        message="a video needs at least 2 frames (got 1)",
    ),
    vision_cli("--video", "{root}/missing.mov", message="missing.mov: no such video file"),
    vision_cli(
        "--video",
        "{root}/bad.mov",
        name=" (not a video)",
        setup=write("bad.mov", b"\0" * 64),
        message="not a readable video",
    ),
    api_vision(
        "two image parts, one image",
        chat({"type": "image"}, {"type": "image"}),
        "the chat has more image parts",
        images=[IMAGE0],
    ),
    api_vision(
        "one image part, two images",
        chat({"type": "image"}),
        "2 image(s) given but the chat has 1 image part",
        images=[IMAGE0, IMAGE0],
    ),
    api_vision(
        "one pad, two images",
        PAD,
        "the prompt has 1 image part(s) but 2 image(s)",
        images=[IMAGE0, IMAGE0],
    ),
    api_vision(
        "no pad, one image", "What is it?", "the prompt has 0 image part(s) but 1", images=[IMAGE0]
    ),
    api_vision("token ids without pads", [1, 2, 3], "token ids hold 0 image pads", images=[IMAGE0]),
    api_vision(
        "an image that is a number",
        PAD,
        "an image must be a path, an image file's bytes",
        images=[3],
    ),
    api_vision(
        "a float image array",
        PAD,
        "an image array must be uint8",
        images=[np.zeros((8, 8, 3), np.float32)],
    ),
    api_vision(
        "min_pixels > max_pixels",
        PAD,
        "min_pixels 4096 is larger than max_pixels 1024",
        images=[IMAGE0],
        min_pixels=4096,
        max_pixels=1024,
    ),
    api_vision(
        "max_pixels 0", PAD, "max_pixels must be a positive integer", images=[IMAGE0], max_pixels=0
    ),
    api_vision(
        "a part of another type",
        chat({"type": "audio"}),
        "has type 'audio'; expected text, image or video",
    ),
    api_vision(
        "a one-frame video",
        "<|vision_start|><|video_pad|><|vision_end|>",
        "a video needs at least 2 frames",
        videos=[Video([np.zeros((8, 8, 3), np.uint8)])],
    ),
    api_vision(
        "images to a text-only model",
        PAD,
        "need a model with a vision tower",
        text_model=True,
        images=[IMAGE0],
    ),
    api(
        "a video file without PyAV",
        _no_pyav_video,
        setup=without_pyav,
        needs=(),
        message="reading a video file needs PyAV (pip install 'mlxkit[video]')",
    ),
]

ROWS = API_ROWS + CLI_ROWS + VISION_ROWS + [cache_row(case) for case in sorted(CACHE_CASES)]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_generation_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, built={})


def test_the_saved_cache_loads(tiny, tmp_path):
    """The rows edit a cache that loads as it is (so each row fails for its own edit)."""
    _, meta = _saved(tmp_path / "good.safetensors")
    loaded = PromptCache.load(tmp_path / "good.safetensors", tiny[0])
    assert loaded.tokens == _filled_cache().tokens and meta["tokens"]


def test_prompt_cache_load_refuses_another_models_cache(tiny, tmp_path):
    model, _ = tiny
    other, tokenizer = load("micro")
    cache = PromptCache.new(other)
    list(stream_generate(other, tokenizer, "def f(x):", max_tokens=3, prompt_cache=cache))
    cache.save(tmp_path / "other.safetensors")
    with pytest.raises(MlxkitError, match="not a prompt cache of this model"):
        PromptCache.load(tmp_path / "other.safetensors", model)


def test_prompt_cache_load_of_a_file_that_is_not_one(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "text.safetensors"
    path.write_text("hello")
    with pytest.raises(MlxkitError, match="not a prompt cache"):
        PromptCache.load(path, model)
