"""Generation with images and video through the public API, on the tiny vision fixtures: greedy
tokens equal transformers' float64 reference (and mlx-vlm's on a float32 conversion), MTP gives
plain decoding's tokens in float32, the prompt cache carries images across chat turns (each
image encoded once), videos come as frames or as a file."""

from __future__ import annotations

from fractions import Fraction

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from PIL import Image

from mlxkit import Video, load, multimodal, stream_generate
from mlxkit.cli import main
from mlxkit.generate import PromptCache, encode_prompt
from tests.helpers import FIXTURES, conversions, copying_mtp_head, reference
from tests.vision_helpers import VISION

QUESTION = "What is in the picture?"  # the fixture's generation prompt (make_fixtures.py)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens in the video?"
    "<|im_end|>\n<|im_start|>assistant\n"
)  # the fixture's video case, before expansion


def image_chat(part: dict) -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


def tokens_of(model, tokenizer, prompt, cache=None, **kw) -> tuple[list[int], list]:
    responses = list(stream_generate(model, tokenizer, prompt, prompt_cache=cache, **kw))
    return [r.token for r in responses], responses


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversions(tmp_path_factory)


@pytest.mark.parametrize("name", VISION)
def test_greedy_with_an_image_equals_transformers_float64(name):
    """The public API from an image file to tokens equals transformers' float64 greedy
    generation (16 tokens; its smallest top-1 − top-2 margin is 0.014 on p4, 0.022 on p6, far
    above float32 noise), whichever way the image is given."""
    ref, src = reference(name), FIXTURES / name
    model, tokenizer = load(src, dtype=mx.float32)
    path = src / "image0.png"
    expected, ids = ref["generate_greedy_f64"].tolist(), ref["generate_ids"].tolist()
    ways = [
        (image_chat({"type": "image"}), [path]),
        (image_chat({"type": "image", "image": Image.open(path)}), None),
        ([{"role": "user", "content": IMAGE + QUESTION}], [np.asarray(Image.open(path))]),
    ]
    for prompt, images in ways:
        cache = PromptCache.new(model)
        got, responses = tokens_of(
            model, tokenizer, prompt, cache, images=images, max_tokens=16, mtp=False
        )
        assert responses[0].prompt_tokens == len(ids) and cache.tokens[: len(ids)] == ids
        assert got == expected


def test_mlx_vlm_greedy_tokens_equal_ours_on_a_float32_conversion(converted):
    from mlx_vlm import load as vlm_load
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.utils import prepare_inputs

    name = VISION[0]
    out = converted(name, quantize=False, dtype="float32")
    image = str(FIXTURES / name / "image0.png")
    model, tokenizer = load(out)
    ours, _ = tokens_of(
        model, tokenizer, image_chat({"type": "image"}), images=[image], max_tokens=16, mtp=False
    )
    vlm, processor = vlm_load(str(out))
    text = tokenizer.apply_chat_template([{"role": "user", "content": IMAGE + QUESTION}])
    inputs = prepare_inputs(
        processor, images=[image], prompts=text, image_token_index=vlm.config.image_token_index
    )
    assert inputs["input_ids"][0].tolist() == reference(name)["generate_ids"].tolist()
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    extra.pop("attention_mask", None)
    steps = generate_step(
        inputs["input_ids"],
        vlm,
        inputs["pixel_values"],
        None,
        max_tokens=16,
        temperature=0.0,
        **extra,
    )
    theirs = [int(t) for t, _ in steps][:16]
    assert ours == theirs == reference(name)["generate_greedy_f64"].tolist()


def mixed_mtp(model) -> None:
    """MTP drafts that are right some of the time: the head copies what the main model would
    say from the drafted token alone (`copying_mtp_head`), the main model keeps its mixers (so
    the context, images included, decides how often that is right)."""
    weights = dict(tree_flatten(model.parameters()))
    updates = copying_mtp_head(weights, hf_layout=False, mixer_scale=1.0)
    model.load_weights(list(updates.items()), strict=False)


@pytest.mark.parametrize("name", VISION)
def test_mtp_with_images_and_video_equals_plain_decoding(name):
    ref, src = reference(name), FIXTURES / name
    images = [src / "image0.png", src / "image1.png"]
    video = Video(list(ref["video_frames"]), fps=float(ref["video_fps"]))
    prompts = [
        (image_chat({"type": "image"}), {"images": images[:1]}),
        (f"{IMAGE} and {IMAGE} Compare them.", {"images": images}),
        (VIDEO_PROMPT, {"videos": [video]}),
    ]
    for heads in ("random", "mixed"):
        model, tokenizer = load(src, dtype=mx.float32)
        if heads == "mixed":
            mixed_mtp(model)
        drafted = accepted = 0
        for prompt, media in prompts:
            plain, _ = tokens_of(model, tokenizer, prompt, max_tokens=20, mtp=False, **media)
            for k in (1, 2, 3):
                spec, responses = tokens_of(
                    model, tokenizer, prompt, max_tokens=20, num_draft=k, **media
                )
                assert spec == plain, (heads, prompt, k)
                drafted += responses[-1].drafted
                accepted += responses[-1].accepted
        if heads == "mixed":  # some drafts accepted, some not
            assert 0 < accepted < drafted, (accepted, drafted)
        else:  # the random head's drafts are all rejected
            assert accepted == 0 < drafted


def test_video_from_frames_and_from_a_file(tmp_path):
    """A video's prompt expands as the fixture's (timestamps, per-group pads), and a file read
    with PyAV gives the same tokens as its frames."""
    import av  # the video extra (and dev)

    name = VISION[0]
    ref = reference(name)
    model, tokenizer = load(FIXTURES / name, dtype=mx.float32)
    frames, fps = ref["video_frames"], float(ref["video_fps"])
    cache = PromptCache.new(model)
    from_frames, responses = tokens_of(
        model, tokenizer, VIDEO_PROMPT, cache, videos=[Video(list(frames), fps)], max_tokens=8
    )
    assert cache.tokens[: responses[0].prompt_tokens] == ref["video_ids"].tolist()
    path = tmp_path / "clip.mov"
    with av.open(str(path), "w") as container:  # PNG frames: lossless
        stream = container.add_stream("png", rate=Fraction(fps).limit_denominator())
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    from_file, _ = tokens_of(model, tokenizer, VIDEO_PROMPT, videos=[path], max_tokens=8)
    assert from_file == from_frames


def test_prompt_cache_across_chat_turns_encodes_each_image_once(monkeypatch):
    name = VISION[0]
    src = FIXTURES / name
    model, tokenizer = load(src, dtype=mx.float32)
    img0, img1 = src / "image0.png", src / "image1.png"
    encoded = []
    real = multimodal.encode_vision
    monkeypatch.setattr(
        multimodal,
        "encode_vision",
        lambda model, inputs: encoded.append([v.key for v in inputs]) or real(model, inputs),
    )
    cache = PromptCache.new(model)
    tokens_of(model, tokenizer, image_chat({"type": "image"}), cache, images=[img0], max_tokens=6)
    first_turn = list(cache.tokens)
    follow = encode_prompt(
        tokenizer,
        f"<|im_end|>\n<|im_start|>user\nAnd this one? {IMAGE}<|im_end|>\n<|im_start|>assistant\n",
        True,
        model,
        images=[img1],
    )
    turn2 = first_turn + follow.tokens
    key0, key1 = (
        encode_prompt(tokenizer, IMAGE, True, model, [p]).images[0].key for p in (img0, img1)
    )
    encoded.clear()
    reused, responses = tokens_of(model, tokenizer, turn2, cache, images=[img0, img1], max_tokens=8)
    assert responses[0].prompt_cached == len(first_turn)
    assert [k for ks in encoded for k in ks] == [key1]  # image0 came from the cache
    assert cache.image_keys == [key0, key1] and cache.rope_delta < 0
    fresh, _ = tokens_of(model, tokenizer, turn2, images=[img0, img1], max_tokens=8)
    assert reused == fresh
    # the same pads with another picture are not taken from a cache holding the first
    other = np.asarray(Image.open(img0))[::-1].copy()
    held = PromptCache.new(model)
    tokens_of(model, tokenizer, image_chat({"type": "image"}), held, images=[img0], max_tokens=6)
    assert held.reusable(turn2, [key0, key1]) == len(first_turn)
    _, responses = tokens_of(model, tokenizer, turn2, held, images=[other, img1], max_tokens=2)
    assert responses[0].prompt_cached == 0


def test_prompt_cache_with_images_saves_and_loads(tmp_path):
    name = VISION[1]
    src = FIXTURES / name
    model, tokenizer = load(src, dtype=mx.float32)
    cache = PromptCache.new(model)
    tokens_of(
        model,
        tokenizer,
        image_chat({"type": "image"}),
        cache,
        images=[src / "image0.png"],
        max_tokens=5,
    )
    more = cache.tokens + tokenizer.encode("<|im_end|>\n<|im_start|>user\nMore.")
    cache.save(tmp_path / "cache.safetensors")
    restored = PromptCache.load(tmp_path / "cache.safetensors", model)
    assert restored.image_keys == cache.image_keys and restored.rope_delta == cache.rope_delta
    kw = {"images": [src / "image0.png"], "max_tokens": 6}
    a, ra = tokens_of(model, tokenizer, more, cache, **kw)
    b, rb = tokens_of(model, tokenizer, more, restored, **kw)
    assert a == b and ra[0].prompt_cached == rb[0].prompt_cached > 0


def test_text_prompts_on_a_vision_model_are_untouched(converted, monkeypatch):
    """Text only: the tower never runs, and the tokens are those of the same checkpoint
    converted without its tower."""
    name = VISION[0]
    monkeypatch.setattr(multimodal, "encode_vision", None)  # any call would fail
    model, tokenizer = load(FIXTURES / name, dtype=mx.float32)
    cache = PromptCache.new(model)
    tokens, _ = tokens_of(model, tokenizer, "def f(x):", cache, max_tokens=12)
    assert cache.image_keys == [] and cache.rope_delta == 0
    text_model, _ = load(converted(name, vision=False, quantize=False, dtype="float32"))
    assert not text_model.has_vision
    assert tokens_of(text_model, tokenizer, "def f(x):", max_tokens=12)[0] == tokens


def test_cli_generate_with_an_image():
    name = VISION[0]
    src = FIXTURES / name
    ref = reference(name)
    args = [
        "generate",
        "--model",
        str(src),
        "--prompt",
        QUESTION,
        "--chat",
        "--no-mtp",
        "--image",
        str(src / "image0.png"),
        "--max-tokens",
        "16",
        "--verbose",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model, tokenizer = load(src)  # as the command loads it (bf16)
    expected, _ = tokens_of(
        model,
        tokenizer,
        image_chat({"type": "image"}),
        images=[src / "image0.png"],
        max_tokens=16,
        mtp=False,
    )
    assert result.stdout.rstrip("\n") == tokenizer.decode(expected)
    assert f"prompt {len(ref['generate_ids'])} tokens" in result.stderr


def test_cli_says_when_an_image_is_capped(tmp_path):
    """The fixture's preprocessor allows 2,048 pixels (32 vision tokens): a 100×120 image is
    downscaled, and the command says so; image0 (23×37) only rounds, and it says nothing."""
    src = FIXTURES / VISION[0]
    Image.fromarray(np.full((100, 120, 3), 90, np.uint8)).save(tmp_path / "big.png")
    base = ["generate", "--model", str(src), "--prompt", "Hi", "--max-tokens", "2"]
    result = CliRunner().invoke(main, [*base, "--image", str(tmp_path / "big.png")])
    assert result.exit_code == 0, result.output
    assert "big.png (120×100) downscaled to 48×40 to fit the cap: 30 vision tokens" in (
        result.stderr
    )
    result = CliRunner().invoke(main, [*base, "--image", str(src / "image0.png")])
    assert result.exit_code == 0 and "note:" not in result.stderr
