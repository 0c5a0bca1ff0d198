"""The multimodal model against transformers' float64 logits, through the runtime's own prompt
path: `run_prompt` into a PromptCache (compiled cached attention, chunked prefill, the tower's
features at the pads, M-RoPE positions, the MTP head fed alongside)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxkit.decode import run_prompt
from mlxkit.models.qwen3_5 import Rotary
from mlxkit.multimodal import PromptInputs
from mlxkit.prompt_cache import PromptCache
from mlxkit.vision import VisionInput
from tests.helpers import load_f32, reference
from tests.vision_helpers import VISION

CASES = {  # what each fixture prompt shows, in order
    "one_image": ["image0"],
    "two_images": ["image0", "image1"],
    "second_turn": ["image0", "image1"],
    "video": ["video"],
}


def fixture_input(name: str, part: str) -> VisionInput:
    """A fixture image or video as transformers' processor made it (its patches and grid)."""
    ref = reference(name)
    grid = tuple(int(v) for v in ref[f"{part}_grid"])
    kind = "video" if part == "video" else "image"
    merge = 2 if name.endswith("p4") else 3
    return VisionInput(kind, ref[f"{part}_patches"], grid, merge, (0, 0), (0, 0))


def prompt_logits(model, ids: list[int], parts: list[VisionInput], chunk: int) -> np.ndarray:
    """Logits at every prompt position, as `run_prompt` computes them chunk by chunk."""
    hidden, forward = [], model.hidden

    def recording(*args):
        hidden.append(forward(*args))
        return hidden[-1]

    model.hidden = recording
    try:
        images = [p for p in parts if p.kind == "image"]
        videos = [p for p in parts if p.kind == "video"]
        run_prompt(model, PromptCache.new(model), ids, chunk, images, videos)
    finally:
        del model.hidden
    return np.array(model.logits(mx.concatenate(hidden, axis=1))[0]).astype(np.float64)


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_float64(name, case, monkeypatch):
    """Every position within 2× transformers' own float32 error on this network (the largest of
    its float32 runs on these prompts), in one chunk and in chunks of 7 that cut through the
    images; the logits depend on the M-RoPE positions (ordinary RoPE is far off)."""
    ref, model = reference(name), load_f32(name)
    ids = ref[f"{case}_ids"].tolist()
    parts = [fixture_input(name, p) for p in CASES[case]]
    embed = np.array(model.language_model.model.embed_tokens.weight).astype(np.float64)
    expected = ref[f"{case}_hidden_f64"] @ embed.T
    budget = 2 * ref["err_f32"]
    for chunk in (512, 7):
        err = np.abs(prompt_logits(model, ids, parts, chunk) - expected).max()
        assert err <= budget, (chunk, err, budget)
    monkeypatch.setattr(PromptInputs, "rotary", lambda self, first, count: Rotary.text(0))
    plain = np.abs(prompt_logits(model, ids, parts, 512) - expected).max()
    assert plain > 100 * budget, plain
