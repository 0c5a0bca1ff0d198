"""Predicted decode speed: a memory-bandwidth roofline, and the expected gain of MTP drafting.

Decoding one token at batch 1 reads every weight of the main model once, plus the KV cache
and the recurrent state; the arithmetic is negligible next to that, so

    tokens/s = EFFICIENCY × bandwidth / bytes read per token.

EFFICIENCY = 0.6 is an assumption, not a measurement: quantized mat-vec kernels reach
roughly 60-80 % of peak DRAM bandwidth on Apple GPUs, and a phone GPU also pays fixed
per-kernel launch costs that a small model does not amortise. Treat the result as an upper
bound to be calibrated on a real device (none is available to this project).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxkit.models.qwen3_5 import TextConfig

from .memory import (
    kv_bytes_per_token_per_layer,
    n_full_layers,
    n_linear_layers,
    recurrent_state_bytes,
)

EFFICIENCY = 0.6


@dataclass(frozen=True)
class WeightReads:
    """Bytes of the weights a decode step touches, from the planned tensors."""

    layers: int  # every decoder layer + final norm
    lm_head: int  # the output projection: the embedding matrix when tied
    mtp: int  # the MTP head (fc, its decoder layer, norms)


def step_bytes(cfg: TextConfig, w: WeightReads, position: int, b: int) -> int:
    """One plain decode step at `position` tokens of context: the layers and the lm_head,
    the full-attention KV cache read (position · 2·nkv·hd·b per layer), and each recurrent
    state read and written once (the conv window is negligible). The embedding lookup reads
    one row and is ignored."""
    kv = n_full_layers(cfg) * position * kv_bytes_per_token_per_layer(cfg, b)
    state = n_linear_layers(cfg) * 2 * recurrent_state_bytes(cfg)
    return w.layers + w.lm_head + kv + state


def draft_step_bytes(cfg: TextConfig, w: WeightReads, position: int, b: int) -> int:
    """One MTP draft step: the MTP head, the shared lm_head (the largest single tensor of the
    small models, which is why drafting is not free), and the MTP layer's own KV cache."""
    return (
        w.mtp
        + w.lm_head
        + cfg.mtp_num_hidden_layers * position * kv_bytes_per_token_per_layer(cfg, b)
    )


def tokens_per_second(bandwidth: float, nbytes: int, efficiency: float = EFFICIENCY) -> float:
    return efficiency * bandwidth / nbytes


def expected_tokens_per_round(acceptance: float, num_draft: int) -> float:
    """With k drafts, each accepted with probability a given that the previous ones were
    (a is the per-position acceptance rate), a round emits the accepted prefix plus the one
    token the verify pass always yields: E = 1 + a + a² + … + a^k = (1 − a^(k+1)) / (1 − a)."""
    if acceptance >= 1.0:
        return num_draft + 1.0
    return (1 - acceptance ** (num_draft + 1)) / (1 - acceptance)


def mtp_speedup(
    cfg: TextConfig, w: WeightReads, position: int, b: int, acceptance: float, num_draft: int
) -> float:
    """Expected speedup of MTP drafting over plain decoding in the bandwidth roofline:

        speedup = E(a, k) · step / (verify + k · draft)

    where step is one plain decode step, verify ≈ step (k+1 tokens read the same weights;
    recording each Gated-DeltaNet state adds (k+1) state writes) and draft is one MTP draft
    step. With draft cost r = draft/step and k = 1 this is (1 + a) / (1 + r); the shared
    notes' (1 + a) / (2 − a) is a cruder model in which a rejected draft costs a full extra
    step. Reported for Qwen3.5-4B 4-bit on a Mac: 1.32× at 73.5 % acceptance of 2 drafts,
    below this bound (verification and Python overheads are not bandwidth)."""
    step = step_bytes(cfg, w, position, b)
    verify = step + n_linear_layers(cfg) * (num_draft + 1) * recurrent_state_bytes(cfg)
    draft = draft_step_bytes(cfg, w, position, b)
    return expected_tokens_per_round(acceptance, num_draft) * step / (verify + num_draft * draft)
