"""The MLX vision tower against transformers' float64 run, mlx-vlm, and its own invariants."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxkit.errors import ConfigError
from mlxkit.models.qwen3_5_vision import PREFIX, VisionConfig, sanitize_vision_tensor
from tests.helpers import FIXTURES, reference
from tests.vision_helpers import PARTS, VISION, config, load_tower, tower_inputs, tower_weights


@pytest.mark.parametrize("name", VISION)
def test_tower_matches_transformers_float64(name):
    """Two images and a video of ≥2 temporal groups in one call, within 2× the float32 error of
    transformers itself (observed: 1.01× on p4, 1.54× on p6)."""
    ref = reference(name)
    out = np.array(load_tower(name)(*tower_inputs(name))).astype(np.float64)
    assert out.shape == ref["tower_f64"].shape
    err = np.abs(out - ref["tower_f64"]).max()
    assert ref["err_tower_f32"] > 0
    assert err <= 2 * ref["err_tower_f32"], (err, float(ref["err_tower_f32"]))
    # the scale of what is compared: errors are ~1e-6 of outputs of order 1
    assert np.abs(ref["tower_f64"]).max() > 0.5


@pytest.mark.parametrize("name", VISION)
def test_attention_stays_within_each_image_and_temporal_group(name):
    """Encoding the parts one by one, or a video's temporal groups as separate clips, gives
    what the batched call gives; a batch in another order gives the rows reordered."""
    model = load_tower(name)
    batched = np.array(model(*tower_inputs(name)))
    alone = np.concatenate([np.array(model(*tower_inputs(name, [p]))) for p in PARTS])
    np.testing.assert_allclose(alone, batched, rtol=0, atol=1e-5)

    ref = reference(name)
    t, h, w = (int(v) for v in ref["video_grid"])
    frames = ref["video_patches"].reshape(t, h * w, -1)
    per_group = np.concatenate([np.array(model(mx.array(f), [(1, h, w)])) for f in frames])
    video = np.array(model(*tower_inputs(name, ["video"])))
    np.testing.assert_allclose(per_group, video, rtol=0, atol=1e-5)

    swapped = np.array(model(*tower_inputs(name, ["video", "image0", "image1"])))
    n_video = len(video)
    np.testing.assert_allclose(swapped[n_video:], batched[: len(batched) - n_video], atol=1e-5)


@pytest.mark.parametrize("name", VISION)
def test_mlx_vlm_reads_the_layout_and_agrees(name):
    """mlx-vlm 0.7's qwen3_5 vision tower on our `vision_tower.*` tensors, channels-last patch
    weight included, without re-transposing: like ours, within 2× transformers' own float32
    error of its float64 output (observed 1.02× on p4, 1.69× on p6), so within the sum of both
    budgets of ours."""
    from mlx_vlm.models.qwen3_5.config import VisionConfig as VlmVisionConfig
    from mlx_vlm.models.qwen3_5.vision import VisionModel as VlmVisionModel

    vlm = VlmVisionModel(VlmVisionConfig.from_dict(config(name)["vision_config"]))
    weights = {k[len(PREFIX) :]: v for k, v in tower_weights(name).items()}
    sanitized = vlm.sanitize(weights)
    key = "patch_embed.proj.weight"
    assert sanitized[key] is weights[key]  # kept as stored, not transposed again
    vlm.load_weights(list(sanitized.items()), strict=True)
    patches, grids = tower_inputs(name)
    theirs, _ = vlm(patches, mx.array(grids))
    ours = load_tower(name)(patches, grids)
    ref = reference(name)
    tol = 2 * ref["err_tower_f32"]
    np.testing.assert_allclose(np.array(theirs), ref["tower_f64"], rtol=0, atol=tol)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=0, atol=2 * tol)


def test_sanitize_names_and_patch_layout():
    raw = dict(mx.load(str(FIXTURES / "tiny_vision_p6" / "model.safetensors")))
    w = raw["model.visual.patch_embed.proj.weight"]
    assert w.shape == (48, 3, 3, 6, 6)  # PyTorch Conv3d: [D, C, T, P, P]
    path, value = sanitize_vision_tensor("model.visual.patch_embed.proj.weight", w)
    assert path == "vision_tower.patch_embed.proj.weight"
    assert value.shape == (48, 3, 6, 6, 3)  # MLX Conv3d: [D, T, P, P, C]
    assert value[5, 2, 1, 4, 0].item() == w[5, 0, 2, 1, 4].item()
    assert sanitize_vision_tensor("model.language_model.norm.weight", w) is None
    assert sanitize_vision_tensor("mtp.fc.weight", w) is None
    bias = raw["model.visual.blocks.1.attn.qkv.bias"]
    path, value = sanitize_vision_tensor("model.visual.blocks.1.attn.qkv.bias", bias, mx.float32)
    assert path == "vision_tower.blocks.1.attn.qkv.bias" and value.dtype == mx.float32
    # every vision tensor of the checkpoint lands on a parameter of the tower, and vice versa
    from mlx.utils import tree_flatten

    params = {PREFIX + k for k, _ in tree_flatten(load_tower("tiny_vision_p6").parameters())}
    assert params == set(tower_weights("tiny_vision_p6"))


def _with(name: str, **changes) -> dict:
    cfg = config(name)
    cfg["vision_config"] = {**cfg["vision_config"], **changes}
    return cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"deepstack_visual_indexes": [1, 3]}, "DeepStack vision towers"),
        ({"num_position_embeddings": 20}, "must be a square"),
        ({"hidden_act": "silu"}, "hidden_act 'silu' is not supported"),
        ({"num_heads": 3}, "multiple of 4"),
        ({"patch_size": [16, 16]}, "patch_size must be a positive integer"),
        ({"depth": None}, "depth must be a positive integer"),
    ],
)
def test_config_refusals(changes, message):
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_dict(_with("tiny_vision_p4", **changes))


def test_config_reads_everything_from_the_checkpoint():
    cfg = VisionConfig.from_dict(config("tiny_vision_p6"))
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size) == (6, 3, 3)
    assert (cfg.position_grid_side, cfg.head_dim, cfg.patch_dim) == (5, 12, 324)
    missing = config("tiny_vision_p4")
    del missing["vision_config"]["out_hidden_size"]
    with pytest.raises(ConfigError, match="lacks 'out_hidden_size'"):
        VisionConfig.from_dict(missing)


def test_patches_must_match_the_grids():
    model = load_tower("tiny_vision_p4")
    patches, grids = tower_inputs("tiny_vision_p4", ["image0"])
    with pytest.raises(ValueError, match="do not match the grids"):
        model(patches[:-1], grids)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(patches, [(1, 5, 12)])
