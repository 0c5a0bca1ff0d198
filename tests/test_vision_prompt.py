"""Prompt expansion and M-RoPE positions against transformers (get_rope_index, the Qwen3-VL
processor's replacement code, the text rotary embedding) and mlx-vlm's video placeholders."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_vlm.models.qwen3_vl.processing_qwen3_vl import (
    _timestamped_video_placeholder,
    _video_group_timestamps,
)
from tokenizers import Tokenizer
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model, Qwen3_5TextRotaryEmbedding
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import VideoMetadata

from mlxkit.errors import ConfigError
from mlxkit.models.qwen3_5_vision import VisionConfig, apply_rotary
from mlxkit.vision import (
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Preprocessor,
    VisionInput,
    VisionInputError,
    VisionTokens,
    expand_prompt,
    mrope_cos_sin,
    mrope_positions,
    mrope_section,
    preprocess_image,
    preprocess_video,
)
from tests.helpers import FIXTURES, reference
from tests.vision_helpers import VISION, config

CASES = ("one_image", "two_images", "second_turn", "video")
USER, REPLY = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def hf_rope_index(ids, image_grids, video_grids, merge: int, tokens: VisionTokens):
    """transformers' Qwen3_5Model.get_rope_index (it needs only the merge size of its model)."""
    stub = SimpleNamespace(
        config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=merge))
    )
    stub.get_vision_position_ids = partial(Qwen3_5Model.get_vision_position_ids, stub)
    input_ids = torch.tensor([list(ids)])
    types = (input_ids == tokens.image).int() + 2 * (input_ids == tokens.video).int()
    positions, delta = Qwen3_5Model.get_rope_index(
        stub,
        input_ids,
        types,
        torch.tensor(image_grids) if image_grids else None,
        torch.tensor(video_grids) if video_grids else None,
    )
    return positions[:, 0].numpy(), int(delta[0, 0])


# --------------------------------------------------------------------------- positions


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize("case", CASES)
def test_positions_equal_transformers_on_the_fixture_prompts(name, case):
    """One image, two images, an image in a second chat turn, a video of ≥2 temporal groups."""
    ref, cfg = reference(name), config(name)
    tokens, merge = VisionTokens.from_config(cfg), cfg["vision_config"]["spatial_merge_size"]
    ids = ref[f"{case}_ids"]
    uses = {"one_image": [0], "two_images": [0, 1], "second_turn": [0, 1], "video": []}[case]
    images = [tuple(ref[f"image{i}_grid"]) for i in uses]
    videos = [tuple(ref["video_grid"])] if case == "video" else []
    positions, next_position = mrope_positions(ids, images, videos, merge, tokens)
    np.testing.assert_array_equal(positions, ref[f"{case}_positions"])
    theirs, delta = hf_rope_index(ids, images, videos, merge, tokens)
    np.testing.assert_array_equal(positions, theirs)
    assert next_position == len(ids) + delta == positions.max() + 1
    assert (positions[1:] != positions[0]).any()  # not plain 1-D positions


def random_prompt(rng: np.random.Generator, merge: int, tokens: VisionTokens):
    """Text runs, images and videos in random order; returns ids and the grids used."""
    ids, images, videos = [], [], []
    for _ in range(int(rng.integers(1, 7))):
        ids += [int(v) for v in rng.integers(0, 400, size=int(rng.integers(1, 6)))]
        kind = rng.choice(["image", "video", "text"])
        h, w = (merge * int(v) for v in rng.integers(1, 6, size=2))
        if kind == "image":
            images.append((1, h, w))
            ids += [tokens.start] + [tokens.image] * (h * w // merge**2) + [tokens.end]
        elif kind == "video":
            t = int(rng.integers(1, 4))
            videos.append((t, h, w))
            for _ in range(t):  # each group: a timestamp in text, then its block
                ids += [int(v) for v in rng.integers(0, 400, size=3)]
                ids += [tokens.start] + [tokens.video] * (h * w // merge**2) + [tokens.end]
    return ids, images, videos


@pytest.mark.parametrize("merge", [1, 2, 3])
def test_positions_equal_transformers_on_random_prompts(merge):
    tokens = VisionTokens(image=500, video=501, start=502, end=503)
    rng = np.random.default_rng(merge)
    for _ in range(60):
        ids, images, videos = random_prompt(rng, merge, tokens)
        positions, next_position = mrope_positions(ids, images, videos, merge, tokens)
        theirs, delta = hf_rope_index(ids, images, videos, merge, tokens)
        np.testing.assert_array_equal(positions, theirs)
        assert next_position == len(ids) + delta


def test_positions_continue_across_chat_turns():
    """A prompt cut at any text token and positioned in two pieces, the second starting where
    the first ended (a prompt cache holding the first turn), equals the whole at once."""
    tokens = VisionTokens(image=500, video=501, start=502, end=503)
    rng = np.random.default_rng(7)
    for _ in range(30):
        ids, images, videos = random_prompt(rng, 2, tokens)
        whole, end = mrope_positions(ids, images, videos, 2, tokens)
        kinds = np.isin(ids, [tokens.image, tokens.video])
        for cut in [i for i in range(1, len(ids)) if not kinds[i - 1] and not kinds[i]]:
            head = ids[:cut]
            n_img = sum(1 for i, v in enumerate(head) if v == tokens.start and ids[i + 1] == 500)
            n_vid_groups = sum(
                1 for i, v in enumerate(head) if v == tokens.start and ids[i + 1] == 501
            )
            # a cut may not fall inside a video (between its groups): skip those
            groups = np.cumsum([t for t, _, _ in videos])
            if n_vid_groups and n_vid_groups not in groups:
                continue
            n_vid = int(np.searchsorted(groups, n_vid_groups, side="right"))
            first, mid = mrope_positions(head, images[:n_img], videos[:n_vid], 2, tokens)
            second, end2 = mrope_positions(
                ids[cut:], images[n_img:], videos[n_vid:], 2, tokens, start=mid
            )
            np.testing.assert_array_equal(np.concatenate([first, second], axis=1), whole)
            assert end2 == end


def test_positions_refuse_pads_that_do_not_match_the_grids():
    tokens = VisionTokens(image=500, video=501, start=502, end=503)
    ids = [1, 502] + [500] * 4 + [503, 2]
    with pytest.raises(VisionInputError, match="more image pads than its grids"):
        mrope_positions(ids, [], [], 2, tokens)
    with pytest.raises(VisionInputError, match="fewer image pads than its grids need"):
        mrope_positions(ids, [(1, 4, 4), (1, 2, 2)], [], 2, tokens)
    with pytest.raises(VisionInputError, match="image pads do not match the grids"):
        mrope_positions(ids, [(1, 2, 10)], [], 2, tokens)


def test_vision_token_ids_come_from_config_json():
    cfg = config("tiny_vision_p4")
    assert VisionTokens.from_config(cfg) == VisionTokens(452, 453, 449, 450)
    del cfg["vision_start_token_id"]
    with pytest.raises(ConfigError, match="lacks the vision token id\\(s\\) vision_start_token_id"):
        VisionTokens.from_config(cfg)


# --------------------------------------------------------------------------- rotary


def test_mrope_of_text_positions_is_plain_rope():
    """Where the three positions agree, M-RoPE is the text model's mx.fast.rope."""
    x = mx.random.normal((1, 4, 37, 256), key=mx.random.key(0))
    pos = np.broadcast_to(np.arange(5, 42), (3, 37))
    cos, sin = mrope_cos_sin(pos, 64, 1e7, (11, 11, 10))
    ours = apply_rotary(x, cos, sin)
    theirs = mx.fast.rope(x, 64, traditional=False, base=1e7, scale=1.0, offset=5)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=0, atol=2e-5)
    np.testing.assert_array_equal(np.array(ours[..., 64:]), np.array(x[..., 64:]))


@pytest.mark.parametrize("name", VISION)
def test_mrope_cos_sin_equal_transformers(name):
    """Against transformers' Qwen3_5TextRotaryEmbedding on the fixture's multimodal positions,
    with the fixture's section [2, 1, 1] and with the real models' [11, 11, 10]."""
    ref, cfg = reference(name), config(name)
    tc = dict(cfg["text_config"])
    positions = np.concatenate([ref[f"{c}_positions"] for c in CASES], axis=1) * 37
    real = {**tc["rope_parameters"], "mrope_section": [11, 11, 10], "rope_theta": 1e7}
    for rope in (tc["rope_parameters"], real):
        section = mrope_section({"text_config": {**tc, "rope_parameters": rope}})
        head_dim = 256 if section == (11, 11, 10) else tc["head_dim"]
        rotary = Qwen3_5TextRotaryEmbedding(
            Qwen3_5TextConfig(**{**tc, "head_dim": head_dim, "rope_parameters": rope})
        )
        x = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(x, torch.from_numpy(positions)[:, None])
        rd = int(head_dim * rope["partial_rotary_factor"])
        ours = mrope_cos_sin(positions, rd, rope["rope_theta"], section)
        np.testing.assert_allclose(np.array(ours[0]), cos[0].numpy(), rtol=0, atol=2e-4)
        np.testing.assert_allclose(np.array(ours[1]), sin[0].numpy(), rtol=0, atol=2e-4)


def test_mrope_section_is_read_and_checked():
    assert mrope_section(config("tiny_vision_p4")) == (2, 1, 1)
    assert mrope_section({"text_config": {}}) == (11, 11, 10)
    bad = {"text_config": {"rope_parameters": {"mrope_section": [11, 11]}}}
    with pytest.raises(ConfigError, match="three counts"):
        mrope_section(bad)
    with pytest.raises(ConfigError, match="does not add up to rotary_dim / 2 = 32"):
        mrope_cos_sin(np.zeros((3, 4)), 64, 1e7, (11, 11, 11))


# --------------------------------------------------------------------------- expansion


def inputs(name: str) -> tuple[dict[str, VisionInput], Preprocessor]:
    pre = Preprocessor.from_dir(FIXTURES / name, VisionConfig.from_dict(config(name)))
    ref = reference(name)
    out = {f"image{i}": preprocess_image(FIXTURES / name / f"image{i}.png", pre) for i in (0, 1)}
    out["video"] = preprocess_video(list(ref["video_frames"]), pre, fps=float(ref["video_fps"]))
    return out, pre


def part(kind: str) -> str:
    pad = IMAGE_PAD if kind == "image" else VIDEO_PAD
    return VISION_START + pad + VISION_END  # what the chat template writes for a part


TEMPLATES = {  # the fixture prompts as a chat template renders them, before expansion
    "one_image": (USER + part("image") + "What is in the picture?" + REPLY, ["image0", "image1"]),
    "two_images": (
        USER + part("image") + "and" + part("image") + "Compare the two pictures." + REPLY,
        ["image0", "image1"],
    ),
    "second_turn": (
        USER
        + part("image")
        + "Describe it."
        + REPLY
        + "A small box.<|im_end|>\n"
        + USER
        + "And this one? "
        + part("image")
        + REPLY,
        ["image0", "image1"],
    ),
    "video": (USER + part("video") + "What happens in the video?" + REPLY, ["video"]),
}


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize("case", CASES)
def test_expanded_prompt_tokenizes_to_the_fixture_prompt(name, case):
    """From the image files and video frames to token ids: the rendered template, expanded and
    tokenized, is the fixture's prompt (built from transformers' grids and timestamps), token
    for token, so its count is too."""
    given, _ = inputs(name)
    text, uses = TEMPLATES[case]
    images = [given[u] for u in uses if u != "video"][: text.count(IMAGE_PAD)]
    videos = [given["video"]] if "video" in uses else []
    expanded = expand_prompt(text, images, videos)
    tokenizer = Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    ids = tokenizer.encode(expanded).ids
    np.testing.assert_array_equal(ids, reference(name)[f"{case}_ids"])
    n_pads = sum(v.num_tokens for v in images + videos)
    assert expanded.count(IMAGE_PAD) + expanded.count(VIDEO_PAD) == n_pads


def hf_processor_stub(pre: Preprocessor) -> SimpleNamespace:
    stub = SimpleNamespace(
        image_processor=SimpleNamespace(merge_size=pre.merge_size),
        video_processor=SimpleNamespace(
            merge_size=pre.merge_size, temporal_patch_size=pre.temporal_patch_size
        ),
        image_token=IMAGE_PAD,
        video_token=VIDEO_PAD,
        vision_start_token=VISION_START,
        vision_end_token=VISION_END,
        all_special_multimodal_tokens=[IMAGE_PAD, VIDEO_PAD],
    )
    stub._calculate_timestamps = partial(Qwen3VLProcessor._calculate_timestamps, stub)
    return stub


@pytest.mark.parametrize("name", VISION)
def test_expansion_equals_transformers_processor_code(name):
    """Images, and a video written as a bare `<|video_pad|>`, expand as transformers'
    Qwen3VLProcessor (replace_image_token / replace_video_token / get_text_with_replacements)."""
    given, pre = inputs(name)
    ref = reference(name)
    stub = hf_processor_stub(pre)
    grids = {"image_grid_thw": np.array([given["image0"].grid, given["image1"].grid])}
    image_reps = [Qwen3VLProcessor.replace_image_token(stub, grids, i) for i in (0, 1)]
    metadata = VideoMetadata(
        total_num_frames=5, fps=float(ref["video_fps"]), frames_indices=ref["video_frame_indices"]
    )
    videos = {"video_grid_thw": np.array([given["video"].grid]), "video_metadata": [metadata]}
    video_reps = [Qwen3VLProcessor.replace_video_token(stub, videos, 0)]
    text = "a" + part("image") + "b " + VIDEO_PAD + " c" + IMAGE_PAD + "d"
    [theirs], _ = ProcessorMixin.get_text_with_replacements(stub, [text], image_reps, video_reps)
    ours = expand_prompt(text, [given["image0"], given["image1"]], [given["video"]])
    assert ours == theirs


@pytest.mark.parametrize("name", VISION)
def test_video_part_expands_as_mlx_vlm(name):
    """A video part the template wrote as vision_start + video_pad + vision_end is replaced as a
    whole, as in mlx-vlm 0.7 (and Qwen's processor before transformers 5)."""
    given, pre = inputs(name)
    ref = reference(name)
    video = given["video"]
    t, h, w = video.grid
    stamps = _video_group_timestamps(
        t,
        pre.temporal_patch_size,
        float(ref["video_fps"]),
        {"frames_indices": ref["video_frame_indices"], "fps": float(ref["video_fps"])},
    )
    per_group = h * w // pre.merge_size**2
    block = _timestamped_video_placeholder(stamps, per_group, VISION_START, VISION_END)
    block = block.replace("<|placeholder|>", VIDEO_PAD)
    text = USER + part("video") + "What?" + REPLY
    assert expand_prompt(text, [], [video]) == USER + block + "What?" + REPLY
    assert block.count(VISION_START) == t >= 2


def test_expansion_refuses_parts_and_inputs_that_do_not_match():
    given, _ = inputs("tiny_vision_p4")
    two = USER + part("image") + part("image") + REPLY
    with pytest.raises(VisionInputError, match="the prompt has 2 image part\\(s\\) but 1 image"):
        expand_prompt(two, [given["image0"]])
    with pytest.raises(VisionInputError, match="the prompt has 0 video part\\(s\\) but 1 video"):
        expand_prompt(two, [given["image0"], given["image1"]], [given["video"]])
    with pytest.raises(VisionInputError, match="the prompt has 1 image part\\(s\\) but 0 image"):
        expand_prompt(USER + IMAGE_PAD, [])


def test_one_image_or_video_alone_is_a_list_of_one():
    """`images="x.png"` is one image, not a list of one-character paths; an array one image,
    not a list of its rows; `videos=` likewise."""
    from mlxkit.generate import Video, encode_prompt
    from mlxkit.load import load

    name = VISION[0]
    model, tokenizer = load(FIXTURES / name, dtype=mx.float32)
    path = FIXTURES / name / "image0.png"
    image_prompt = VISION_START + IMAGE_PAD + VISION_END + "What is it?"
    want = encode_prompt(tokenizer, image_prompt, False, model, images=[path]).tokens
    pixels = np.asarray(preprocess_image(path, model.preprocessor).pixel_values)
    for alone in (str(path), path, path.read_bytes()):
        got = encode_prompt(tokenizer, image_prompt, False, model, images=alone)
        assert got.tokens == want and len(got.images) == 1
        np.testing.assert_array_equal(got.images[0].pixel_values, pixels)
    frames = reference(name)["video_frames"]
    video_prompt = VISION_START + VIDEO_PAD + VISION_END + "What happens?"
    want = encode_prompt(tokenizer, video_prompt, False, model, videos=[Video(frames)]).tokens
    for alone in (Video(frames), frames):
        assert encode_prompt(tokenizer, video_prompt, False, model, videos=alone).tokens == want
