"""`PromptCache`: what a generation leaves behind to continue from without reprocessing.

It holds every layer's cache, the tokens they hold, and the main model's hidden states the MTP
head has not consumed yet. A caller that serves many conversations (a server) keeps a pool of
them and picks, per prompt, the one with the largest `reusable` count.

A quantized KV cache (`KVQuantization`) is part of the cache: its settings are saved with it,
and a cache is continued only under the settings it was filled with.

With images, equal tokens are not enough (two pictures of the same size give the same pads), so
the cache also remembers the key (`VisionInput.key`, a hash of the pixels) of every image and
video it holds, and `rope_delta`: how far they moved the positions of the text after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxkit.cache import KVCache, KVQuantization, LinearAttentionCache, kv_quantization
from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import Model, TextConfig


@dataclass
class PromptCache:
    """Everything needed to continue from `tokens` without reprocessing them.

    `mtp_pending` holds the main model's hidden states at the positions the MTP head has not
    consumed yet (it needs the token after each, which is not known for the last one); `mtp` is
    None when the MTP cache is not in step with the main one. `image_keys` and `video_keys`
    name the images and videos whose pads `tokens` hold, in order; the next token's position is
    len(tokens) + `rope_delta` (0 until an image has been seen; M-RoPE text after an image
    resumes at fewer positions than the image has tokens). `kv`: how its KV caches are kept
    (None: in the activation dtype).
    """

    main: list
    mtp: list | None
    tokens: list[int] = field(default_factory=list)
    mtp_pending: mx.array | None = None
    image_keys: list[str] = field(default_factory=list)
    video_keys: list[str] = field(default_factory=list)
    rope_delta: int = 0
    kv: KVQuantization | None = None

    @classmethod
    def new(cls, model: Model, kv: KVQuantization | None = None) -> PromptCache:
        mtp = model.make_mtp_cache(kv) if model.has_mtp else None
        return cls(model.make_cache(kv), mtp, kv=kv)

    def copy(self) -> PromptCache:
        """An independent snapshot (compact copies of the states): decoding on from either one
        leaves the other as it was. A server keeps such snapshots of shared prefixes."""

        def clone(c):
            new = KVCache(quantization=self.kv) if isinstance(c, KVCache) else type(c)()
            new.state = {k: mx.contiguous(v) for k, v in c.state.items()}
            return new

        main = [clone(c) for c in self.main]
        mtp = None if self.mtp is None else [clone(c) for c in self.mtp]
        pending = None if self.mtp_pending is None else mx.contiguous(self.mtp_pending)
        mx.eval([c.state for c in main + (mtp or [])], pending)
        return PromptCache(
            main,
            mtp,
            list(self.tokens),
            pending,
            list(self.image_keys),
            list(self.video_keys),
            self.rope_delta,
            self.kv,
        )

    def reusable(
        self, tokens: Sequence[int], image_keys: Sequence[str] = (), video_keys: Sequence[str] = ()
    ) -> int:
        """How many leading tokens of `tokens` this cache can skip: all it holds when they are
        a strict prefix (the last prompt token must run to give logits) and the prompt's first
        images and videos (their `key`s, in prompt order) are the ones it holds, else 0, since
        the recurrent states cannot be rewound to a shorter prefix."""
        n = len(self.tokens)
        same_media = all(
            list(keys[: len(held)]) == held
            for keys, held in ((image_keys, self.image_keys), (video_keys, self.video_keys))
        )
        return n if n < len(tokens) and list(tokens[:n]) == self.tokens and same_media else 0

    def start(
        self,
        model: Model,
        tokens: Sequence[int],
        mtp: bool,
        image_keys: Sequence[str] = (),
        video_keys: Sequence[str] = (),
        kv: KVQuantization | None = None,
    ) -> int:
        """Makes the cache ready to continue with `tokens` with its KV caches kept as `kv` says
        (emptied when it cannot be reused) and returns how many of them it already holds."""
        n = self.reusable(tokens, image_keys, video_keys)
        if n == 0:
            fresh = PromptCache.new(model, kv)
            self.main, self.mtp, self.tokens, self.mtp_pending = fresh.main, fresh.mtp, [], None
            self.image_keys, self.video_keys, self.rope_delta, self.kv = [], [], 0, kv
        if self.kv != kv:
            raise MlxkitError(
                f"this prompt cache was filled with {_kv_options(self.kv)}; pass the same "
                "or a new cache"
            )
        if mtp and self.mtp is None and self.tokens:
            raise MlxkitError(
                "this prompt cache was filled without MTP; pass mtp=False or a new cache"
            )
        if not mtp:
            self.mtp, self.mtp_pending = None, None
        return n

    def save(self, path: str | Path) -> None:
        arrays = {}
        for name, caches in (("main", self.main), ("mtp", self.mtp or [])):
            for i, c in enumerate(caches):
                for key, value in c.state.items():
                    arrays[f"{name}.{i}.{key}"] = value
        if self.mtp_pending is not None:
            arrays["mtp_pending"] = self.mtp_pending
        meta = {
            "tokens": ",".join(map(str, self.tokens)),
            "mtp": str(self.mtp is not None),
            "image_keys": ",".join(self.image_keys),
            "video_keys": ",".join(self.video_keys),
            "rope_delta": str(self.rope_delta),
            "kv_bits": "" if self.kv is None else str(self.kv.bits),
            "kv_group_size": "" if self.kv is None else str(self.kv.group_size),
            "quantized_kv_start": "" if self.kv is None else str(self.kv.start),
        }
        mx.save_safetensors(str(path), arrays, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model: Model) -> PromptCache:
        """A cache saved by `save` for this model; anything else raises MlxkitError."""
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise MlxkitError(f"{path}: not a prompt cache ({e})") from None
        try:
            return cls._from_saved(arrays, meta, model)
        except _BadCache as e:
            raise MlxkitError(f"{path}: not a prompt cache of this model ({e})") from None

    @classmethod
    def _from_saved(cls, arrays: dict, meta: dict, model: Model) -> PromptCache:
        cfg = model.config
        cache = cls.new(model, _saved_kv(meta, cfg))
        cache.tokens = _saved_tokens(meta.get("tokens", ""), cfg.vocab_size)
        if meta.get("mtp") not in ("True", "False"):
            raise _BadCache(f"metadata mtp is {meta.get('mtp')!r}, not True or False")
        if meta["mtp"] == "False" or cache.mtp is None:
            cache.mtp = None
        cache.image_keys = _saved_keys(meta, "image_keys")
        cache.video_keys = _saved_keys(meta, "video_keys")
        try:
            cache.rope_delta = int(meta.get("rope_delta", "0"))
        except ValueError:
            raise _BadCache(f"metadata rope_delta is {meta.get('rope_delta')!r}") from None
        if (cache.image_keys or cache.video_keys or cache.rope_delta) and not model.has_vision:
            raise _BadCache("it holds images; this model has no vision tower")
        n = len(cache.tokens)
        pending = arrays.pop("mtp_pending", None)
        n_pending = 0
        if cache.mtp is not None and n:
            n_pending = _pending_count(pending, cfg, n)
            cache.mtp_pending = pending
        elif pending is not None:
            raise _BadCache("mtp_pending without an MTP cache to go with it")
        # the MTP head has consumed every position but the pending ones
        for name, caches, positions in (
            ("main", cache.main, n),
            ("mtp", cache.mtp or [], n - n_pending),
        ):
            for i, c in enumerate(caches):
                prefix = f"{name}.{i}."
                state = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                _check_state(prefix[:-1], c, state, cfg, positions)
                c.state = state
                arrays = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
        if arrays:
            raise _BadCache(f"unexpected arrays {', '.join(sorted(arrays))}")
        return cache


class _BadCache(Exception):
    """A saved cache that does not fit the model (turned into MlxkitError with the path)."""


def _saved_tokens(text: object, vocab_size: int) -> list[int]:
    if not isinstance(text, str):
        raise _BadCache("metadata tokens is not a string")
    try:
        tokens = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise _BadCache("metadata tokens is not a comma-separated list of ids") from None
    if any(not 0 <= t < vocab_size for t in tokens):
        raise _BadCache(f"a token id is outside this model's vocabulary of {vocab_size}")
    return tokens


def _kv_options(kv: KVQuantization | None) -> str:
    """The stream_generate options that give `kv`."""
    if kv is None:
        return "kv_bits=None"
    return f"kv_bits={kv.bits}, kv_group_size={kv.group_size}, quantized_kv_start={kv.start}"


def _saved_kv(meta: dict, cfg: TextConfig) -> KVQuantization | None:
    """The KV quantization a cache was saved with (none recorded: full precision)."""
    values = [meta.get(k, "") for k in ("kv_bits", "kv_group_size", "quantized_kv_start")]
    if values == ["", "", ""]:
        return None
    try:
        bits, group_size, start = (int(v) for v in values)
        return kv_quantization(bits, group_size, start, cfg.head_dim)
    except (TypeError, ValueError, MlxkitError):
        raise _BadCache(
            f"metadata kv_bits, kv_group_size, quantized_kv_start are {values}"
        ) from None


def _saved_keys(meta: dict, name: str) -> list[str]:
    text = meta.get(name, "")
    keys = [k for k in text.split(",") if k] if isinstance(text, str) else None
    if keys is None or not all(len(k) == 64 and set(k) <= set("0123456789abcdef") for k in keys):
        raise _BadCache(f"metadata {name} is not a list of sha256 keys")
    return keys


def _pending_count(pending: mx.array | None, cfg: TextConfig, n_tokens: int) -> int:
    """Positions in mtp_pending, which must be [1, n, hidden] with 1 <= n <= the tokens."""
    if pending is None:
        raise _BadCache("mtp_pending is missing")
    shape = tuple(pending.shape)
    if len(shape) != 3 or shape[0] != 1 or shape[2] != cfg.hidden_size:
        raise _BadCache(f"mtp_pending has shape {shape}, expected (1, n, {cfg.hidden_size})")
    if not 1 <= shape[1] <= n_tokens:
        raise _BadCache(f"mtp_pending holds {shape[1]} positions for {n_tokens} tokens")
    return shape[1]


def _check_state(name: str, cache: object, state: dict, cfg: TextConfig, positions: int) -> None:
    """The saved arrays of one layer's cache against the shapes this model gives them."""
    if positions == 0 and not state:
        return
    expected = _expected_state(cache, state, cfg, positions)
    if set(state) != set(expected):
        raise _BadCache(f"{name} holds {sorted(state)}, expected {sorted(expected)}")
    for key, (shape, kind) in expected.items():
        if tuple(state[key].shape) != shape:
            raise _BadCache(f"{name}.{key} has shape {tuple(state[key].shape)}, expected {shape}")
        if not mx.issubdtype(state[key].dtype, kind):
            raise _BadCache(f"{name}.{key} has dtype {state[key].dtype}")
    if "offset" in state and state["offset"].item() != positions:
        raise _BadCache(f"{name}.offset is {state['offset'].item()}, expected {positions}")


def _expected_state(
    cache: object, state: dict, cfg: TextConfig, positions: int
) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """(shape, dtype kind) of each array a layer's saved state must hold. A KV cache saved
    quantized (it holds scales) must have been made with this cache's quantization; one saved
    in full precision is quantized at its next pass if its positions call for it."""
    if isinstance(cache, LinearAttentionCache):
        return {
            "conv_state": ((1, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), mx.floating),
            "recurrent_state": (
                (
                    1,
                    cfg.linear_num_value_heads,
                    cfg.linear_value_head_dim,
                    cfg.linear_key_head_dim,
                ),
                mx.floating,
            ),
            "offset": ((), mx.integer),
        }
    assert isinstance(cache, KVCache)
    rows = (1, cfg.num_key_value_heads, positions)
    q = cache.quantization
    if "keys_scales" not in state or q is None:
        return {
            "keys": ((*rows, cfg.head_dim), mx.floating),
            "values": ((*rows, cfg.head_dim), mx.floating),
        }
    expected = {}
    for name in ("keys", "values"):
        expected[name] = ((*rows, q.packed_width(cfg.head_dim)), mx.uint32)
        for part in ("_scales", "_biases"):
            expected[name + part] = ((*rows, q.groups(cfg.head_dim)), mx.floating)
    return expected
