"""Predicted decode speed: bytes read per token, a speed model fitted on published Mac
measurements, and the expected gain of MTP drafting.

Decoding one token at batch 1 reads every weight of the main model once, plus the KV cache
and the recurrent state; the time per token is modelled as

    seconds = bytes read / (efficiency × bandwidth) + a fixed cost per forward pass

with `efficiency` and the fixed cost fitted by benchmarks/fit_speed_model.py on the
published decode speeds of Qwen 3.5 4-bit models on Apple-silicon Macs
(benchmarks/data/mac_decode_speeds.md, each row with its source). Small models are far
from their bandwidth bound because the fixed cost (kernel launches, sampling,
synchronisation) is a large share of their step. The fit, its error per row and its leave-one-out error are in
benchmarks/results/speed_model.md; the parameters in speed_model.toml. An iPhone is
predicted by the same model with its own bandwidth: an extrapolation (no phone measurement
went into the fit, and a phone's slower CPU and GPU clocks likely make its fixed cost
higher than a Mac's).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mlxkit.cache import KVQuantization
from mlxkit.models.qwen3_5 import TextConfig

from .devices import tomllib
from .memory import (
    kv_bytes_per_token_per_layer,
    n_full_layers,
    n_linear_layers,
    recurrent_state_bytes,
)
from .runtimes import DecodeRuntime

SPEED_MODEL_FILE = Path(__file__).parent / "speed_model.toml"
SHORT_CONTEXT = 1024  # the context the headline speeds are given at
# Below this predicted gain a bundle's Swift decodes without the drafter (manifest.json →
# mtp.recommended false): the prediction is an upper bound (a phone's fixed cost per pass is
# likely higher than the Macs' it was fitted on), and a few percent is within its error.
MIN_MTP_GAIN = 1.05


@dataclass(frozen=True)
class SpeedModel:
    efficiency: float  # share of the peak bandwidth the weight reads reach
    fixed_seconds: float  # per forward pass of the whole model
    rows: int  # measurements it was fitted on
    loo_median_error: float  # leave-one-out median absolute relative error of tokens/s

    def seconds(self, nbytes: int, bandwidth: float, fixed_share: float = 1.0) -> float:
        """One forward pass reading `nbytes`; `fixed_share` scales the fixed cost for a pass
        that runs only part of the model (an MTP draft step runs one layer of 24-32)."""
        return nbytes / (self.efficiency * bandwidth) + fixed_share * self.fixed_seconds


@lru_cache(maxsize=2)
def speed_model(path: Path = SPEED_MODEL_FILE) -> SpeedModel:
    data = tomllib.loads(Path(path).read_text())
    return SpeedModel(
        efficiency=data["efficiency"],
        fixed_seconds=data["fixed_ms_per_token"] / 1000,
        rows=data["rows"],
        loo_median_error=data["loo_median_abs_error"],
    )


@dataclass(frozen=True)
class WeightReads:
    """Bytes of the weights a decode step touches, from the planned tensors."""

    layers: int  # every decoder layer + final norm
    lm_head: int  # the output projection: the embedding matrix when tied
    mtp: int  # the MTP head (fc, its decoder layer, norms)


def step_bytes(
    cfg: TextConfig,
    reads: WeightReads,
    position: int,
    dtype_bytes: int,
    kv_quantization: KVQuantization | None = None,
) -> int:
    """One plain decode step at `position` tokens of context: the layers and the lm_head,
    the full-attention KV cache read (position · 2·nkv·hd·b per layer; quantized, its packed
    values, scales and biases: at long context the cache is most of what a step reads), and
    each recurrent state read and written once (the conv window is negligible). The
    embedding lookup reads one row and is ignored."""
    per_token = kv_bytes_per_token_per_layer(cfg, dtype_bytes, kv_quantization)
    kv = n_full_layers(cfg) * position * per_token
    state = n_linear_layers(cfg) * 2 * recurrent_state_bytes(cfg)
    return reads.layers + reads.lm_head + kv + state


def draft_step_bytes(
    cfg: TextConfig,
    reads: WeightReads,
    position: int,
    dtype_bytes: int,
    kv_quantization: KVQuantization | None = None,
) -> int:
    """One MTP draft step: the MTP head, the shared lm_head (the largest single tensor of the
    small models, which is why drafting is not free), and the MTP layer's own KV cache
    (quantized like the main model's)."""
    kv_per_token = kv_bytes_per_token_per_layer(cfg, dtype_bytes, kv_quantization)
    return reads.mtp + reads.lm_head + cfg.mtp_num_hidden_layers * position * kv_per_token


def expected_tokens_per_round(acceptance: float, num_draft: int) -> float:
    """With k drafts, each accepted with probability a given that the previous ones were
    (a is the per-position acceptance rate), a round emits the accepted prefix plus the one
    token the verify pass always yields: E = 1 + a + a² + … + a^k = (1 − a^(k+1)) / (1 − a)."""
    if acceptance >= 1.0:
        return num_draft + 1.0
    return (1 - acceptance ** (num_draft + 1)) / (1 - acceptance)


def mtp_speedup(
    cfg: TextConfig,
    reads: WeightReads,
    position: int,
    dtype_bytes: int,
    acceptance: float,
    num_draft: int,
    bandwidth: float,
    model: SpeedModel,
    kv_quantization: KVQuantization | None = None,
) -> float:
    """Expected speedup of MTP drafting over plain decoding:

        speedup = E(a, k) · step / (verify + k · draft)

    in seconds from the speed model: a verify pass reads what a step reads plus (k+1)
    recorded Gated-DeltaNet states and pays the full fixed cost; a draft step reads the MTP
    head and the lm_head and pays the fixed cost of the layers it runs. Reported for
    Qwen3.5-4B 4-bit on a Mac: 1.32× at 73.5 % acceptance of 2 drafts (mlx-vlm)."""
    plain = step_bytes(cfg, reads, position, dtype_bytes, kv_quantization)
    recorded = n_linear_layers(cfg) * (num_draft + 1) * recurrent_state_bytes(cfg)
    step = model.seconds(plain, bandwidth)
    verify = model.seconds(plain + recorded, bandwidth)
    share = cfg.mtp_num_hidden_layers / cfg.num_hidden_layers
    drafted = draft_step_bytes(cfg, reads, position, dtype_bytes, kv_quantization)
    draft = model.seconds(drafted, bandwidth, share)
    return expected_tokens_per_round(acceptance, num_draft) * step / (verify + num_draft * draft)


@dataclass(frozen=True)
class Speed:
    """Predicted decode speed in one runtime."""

    runtime: DecodeRuntime
    num_draft: int  # drafts per MTP round (0: no MTP)
    acceptance: float
    context: int
    decode_tps: float  # at SHORT_CONTEXT tokens (or the context, when shorter)
    decode_tps_at_context: float
    mtp_speedup: float | None

    @property
    def mtp_tps(self) -> float | None:
        return None if self.mtp_speedup is None else self.decode_tps * self.mtp_speedup


def predict_speed(
    cfg: TextConfig,
    reads: WeightReads,
    dtype_bytes: int,
    bandwidth: float,
    context: int,
    runtime: DecodeRuntime,
    num_draft: int,
    acceptance: float,
    kv_quantization: KVQuantization | None = None,
    auto: bool = False,
) -> Speed:
    """Decode speed with the KV cache kept as `kv_quantization` says (None: the activation
    dtype), the cache the plan has chosen. With `auto` (mlxkit's num_draft="auto"),
    `num_draft` is the most drafts a round may make and the speed is that of the k in
    1..num_draft this model predicts fastest: what auto settles on at this acceptance."""
    model = speed_model()
    short = min(SHORT_CONTEXT, context)
    kv = kv_quantization

    def tps(position: int) -> float:
        return 1 / model.seconds(step_bytes(cfg, reads, position, dtype_bytes, kv), bandwidth)

    speedup = None
    if num_draft:
        gains = {
            k: mtp_speedup(cfg, reads, short, dtype_bytes, acceptance, k, bandwidth, model, kv)
            for k in (range(1, num_draft + 1) if auto else (num_draft,))
        }
        num_draft = max(gains, key=gains.__getitem__)
        speedup = gains[num_draft]
    return Speed(runtime, num_draft, acceptance, context, tps(short), tps(context), speedup)


def mtp_recommended(gain: float | None) -> bool:
    """Whether a predicted MTP gain is worth running the drafter for (None: no prediction,
    the target's bandwidth is unknown, so nothing speaks against it)."""
    return gain is None or gain >= MIN_MTP_GAIN
