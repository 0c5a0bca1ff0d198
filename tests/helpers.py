"""Small shared pieces for tests: fixture paths and copies, a float32 model loader, mlx-vlm's
MTP drafter run on a fixture's reference, and the "copying" MTP head."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxkit.checkpoint import weight_files
from mlxkit.load import load_model
from mlxkit.models.qwen3_5 import Model

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ("tiny_tied", "tiny_untied")


@cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as f:
        return dict(f)


def conversions(tmp_path_factory) -> Callable[..., Path]:
    """(fixture name, **convert options) -> OUT, converting each fixture once per setting: the
    body of a module-scoped `converted` fixture."""
    from mlxkit.convert import convert

    made: dict = {}

    def get(name: str, **options) -> Path:
        key = (name, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("converted") / f"{name}-out"
            convert(FIXTURES / name, out, quiet=True, **options)
            made[key] = out
        return made[key]

    return get


def load_f32(name: str) -> Model:
    return load_model(FIXTURES / name, dtype=mx.float32)


def mlx_vlm_mtp_logits(target, drafter, name: str) -> np.ndarray:
    """Logits of mlx-vlm's MTP drafter, bound to its `target`, on fixture `name`'s tokens
    and float64 main-model hidden states: to compare with the reference's mtp_logits_f64."""
    ref = reference(name)
    drafter.bind(target)
    tokens = mx.array(ref["tokens"])[None]
    hidden = mx.array(ref["hidden_f64"][:-1], dtype=mx.float32)[None]
    h = drafter._forward_hidden(
        drafter._input_embed(tokens[:, 1:]), hidden, None, mx.arange(tokens.shape[1] - 1)[None]
    )
    return np.array(drafter._lm_head_fn(h)[0].astype(mx.float32))


def copy_fixture(tmp_path: Path, name: str = "tiny_tied", as_name: str | None = None) -> Path:
    """A copy of a fixture checkpoint to edit, at tmp_path / (as_name or name)."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / (as_name or name)))


# The projections through which a mixer or an MLP writes into the residual stream.
_WRITERS = ("o_proj.weight", "out_proj.weight", "down_proj.weight")
_FINAL_NORM = {True: "model.language_model.norm.weight", False: "language_model.model.norm.weight"}


def copying_mtp_head(
    weights: Mapping[str, mx.array], hf_layout: bool, mixer_scale: float = 0.0
) -> dict[str, mx.array]:
    """Replacement tensors that make the MTP head copy the main model. The main model's mixers
    and MLPs are scaled by `mixer_scale`: at 0 they write nothing, so its prediction depends
    only on the current token, and the MTP head, passing the embedding of the token it is
    given straight to the final norm and the shared lm_head, computes that same function one
    token ahead: every draft is right. A small scale makes drafts right only some of the time.

    `weights` are Hugging Face tensors (norms stored as w for x·(1 + w)) with `hf_layout`, else
    our parameter paths (1 + w stored); replacements keep each tensor's dtype.
    """
    final_norm = _FINAL_NORM[hf_layout]
    H = weights["mtp.fc.weight"].shape[0]
    updates = {
        name: value * mixer_scale
        for name, value in weights.items()
        if not name.startswith("mtp.") and name.endswith(_WRITERS)
    }
    updates["mtp.fc.weight"] = mx.concatenate([mx.eye(H), mx.zeros((H, H))], axis=1)
    updates["mtp.pre_fc_norm_embedding.weight"] = mx.full((H,), 0.0 if hf_layout else 1.0)
    updates["mtp.norm.weight"] = weights[final_norm]
    for name in ("mtp.layers.0.self_attn.o_proj.weight", "mtp.layers.0.mlp.down_proj.weight"):
        updates[name] = mx.zeros_like(weights[name])
    return {name: value.astype(weights[name].dtype) for name, value in updates.items()}


def copying_mtp_checkpoint(tmp_path: Path, mixer_scale: float = 0.0) -> Path:
    """tiny_untied rewired in the HF layout by `copying_mtp_head`: at mixer_scale 0 every draft
    of its MTP head is right, at a small scale some are."""
    d = copy_fixture(tmp_path, "tiny_untied", "copying")
    shards = {f: mx.load(str(f)) for f in weight_files(d)}
    all_weights = {k: v for w in shards.values() for k, v in w.items()}
    updates = copying_mtp_head(all_weights, hf_layout=True, mixer_scale=mixer_scale)
    mx.eval(all_weights, updates)  # before any shard is overwritten
    for f, w in shards.items():
        mx.save_safetensors(str(f), {k: updates.get(k, v) for k, v in w.items()})
    return d


# Two logits within this many bfloat16 units in the last place of the larger (0.25 at logits
# of 8 to 16) are a near-tie: a verify pass over k+1 positions, or a batch's pass over B rows,
# rounds differently from one position of one sequence at a time (as another prefill_chunk
# does), and may pick the other token there.
NEAR_TIE_ULPS = 4


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at x."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def assert_equal_up_to_a_near_tie(model, prompt: list[int], spec: list[int], plain: list[int]):
    """`spec` (MTP's tokens, or a batch's) is `plain` (decoding alone, one token at a time), or
    parts from it first at a step where the model's top two logits are a near-tie (from there on
    both are greedy decodings of the model, under different rounding)."""
    if spec == plain:
        return
    i = next(j for j, (a, b) in enumerate(zip(spec, plain)) if a != b)
    logits = model(mx.array([prompt + plain[:i]]))[0, -1].astype(mx.float32)
    second, first = mx.sort(logits)[-2:].tolist()
    assert first - second <= NEAR_TIE_ULPS * bf16_ulp(first), (i, first, second)
