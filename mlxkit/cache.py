"""Per-layer decoding state: a KV cache for full-attention layers and a conv + recurrent state
for Gated-DeltaNet layers.

Speculative decoding verifies several tokens in one pass and then keeps only a prefix of them.
Both cache kinds support that without recomputation: `begin_verify()` before the pass makes the
Gated-DeltaNet layers record their state after every position, and `accept(n_kept, n_total)`
afterwards keeps the state as it was after the first `n_kept` of the `n_total` tokens.

The KV cache can be kept quantized (`KVQuantization`, mlx-lm's `--kv-bits` / `--kv-group-size`
/ `--quantized-kv-start`): only the full-attention layers' cache grows with the context, and at
4 bits it takes about a quarter of the bfloat16 bytes, which is what lets a phone hold long
contexts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from mlxkit.errors import MlxkitError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize takes


@dataclass(frozen=True)
class KVQuantization:
    """A quantized KV cache: each key and value row is stored as `bits`-bit integers in groups of
    `group_size` along the head dim, each group with a scale and a bias in the activation dtype
    (mx.quantize's affine layout, as mlx-lm's QuantizedKVCache keeps it). The cache stays in full
    precision until it holds `start` positions (0: quantized from the first token), then is
    quantized as a whole; it never goes back, not even when a rejected draft is trimmed off.
    MTP decoding on it gives plain decoding's tokens (float32, greedy) when `start` is 0; with a
    later start the one round that crosses it verifies against full-precision keys where plain
    decoding would already read quantized ones (mlx-lm converts the same way, after a pass)."""

    bits: int
    group_size: int = 64
    start: int = 0

    def packed_width(self, head_dim: int) -> int:
        """uint32 words per row of `head_dim` values."""
        return head_dim * self.bits // 32

    def groups(self, head_dim: int) -> int:
        return head_dim // self.group_size


def kv_quantization(
    bits: object, group_size: object = 64, start: object = 0, head_dim: int | None = None
) -> KVQuantization | None:
    """The user's `kv_bits` / `kv_group_size` / `quantized_kv_start`, checked (None bits: the
    cache stays in the activation dtype). `head_dim` given: the group size must divide it."""
    if bits is None:
        return None
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in KV_BITS:
        raise MlxkitError(f"kv_bits must be 4, 8 or None (no quantization), got {bits!r}")
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size not in KV_GROUP_SIZES
    ):
        raise MlxkitError(f"kv_group_size must be 32, 64 or 128, got {group_size!r}")
    if head_dim is not None and head_dim % group_size:
        raise MlxkitError(
            f"kv_group_size {group_size} does not divide this model's head dim {head_dim}; "
            "pass a group size that does"
        )
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise MlxkitError(f"quantized_kv_start must be an integer >= 0, got {start!r}")
    return KVQuantization(bits, group_size, start)


# A buffer of the cache: one array [B, kv_heads, capacity, head_dim], or, quantized, the packed
# values [.., capacity, head_dim·bits/32] (uint32) with the scales and biases [.., capacity,
# head_dim/group_size] of each group.
Buffer = mx.array | tuple[mx.array, mx.array, mx.array]
_QUANTIZED_PARTS = ("", "_scales", "_biases")  # state names: keys, keys_scales, keys_biases


def _parts(buffer: Buffer) -> tuple[mx.array, ...]:
    return buffer if isinstance(buffer, tuple) else (buffer,)


def _rebuild(parts: list[mx.array], quantized: bool) -> Buffer:
    return tuple(parts) if quantized else parts[0]


class KVCache:
    """Keys/values in buffers grown in steps of 256 positions, with mlx-lm's `update_and_fetch`.

    New keys/values are written at `offset` and the whole buffers come back with a mask that
    hides the slots beyond, so between growth steps the shapes do not change and the attention
    block stays compiled. A compiled function takes arrays, not this object: `run` hands it the
    buffers and the offset as an array (the graph must not depend on its value), the block
    writes through a `KVCache` built from them, and `run` keeps the buffers it returns.
    Trimming is just moving `offset` back.

    With `quantization` the buffers are (packed, scales, biases) triples once the cache holds
    `quantization.start` positions (`quantized`); new rows are quantized as they are written,
    each on its own, so a row's integers and scales do not depend on how it was batched.
    """

    step = 256

    def __init__(
        self,
        keys: Buffer | None = None,
        values: Buffer | None = None,
        offset: int | mx.array = 0,
        quantization: KVQuantization | None = None,
    ) -> None:
        self.keys = keys  # [B, kv_heads, capacity, head_dim] or its quantized triple
        self.values = values
        self.offset = offset
        self.quantization = quantization

    @property
    def quantized(self) -> bool:
        return isinstance(self.keys, tuple)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer, mx.array]:
        """Writes keys/values [B, kv_heads, L, head_dim] at `offset` (room made by `reserve`);
        returns the whole buffers and the mask [L, capacity] of the slots each new query sees
        (slot j is visible to query i when j <= offset + i; later slots hold stale data)."""
        start = mx.array(self.offset) if isinstance(self.offset, int) else self.offset
        self.keys = self._write(self.keys, keys, start)
        self.values = self._write(self.values, values, start)
        n = keys.shape[2]
        capacity = _parts(self.keys)[0].shape[2]
        mask = mx.arange(capacity)[None] <= (start + mx.arange(n))[:, None]
        self.offset = self.offset + n
        return self.keys, self.values, mask

    def _write(self, buffer: Buffer, rows: mx.array, start: mx.array) -> Buffer:
        if self.quantized:
            q = self.quantization
            rows = tuple(mx.quantize(rows, group_size=q.group_size, bits=q.bits))
        new = [
            mx.slice_update(b, r.astype(b.dtype), start, axes=(2,))
            for b, r in zip(_parts(buffer), _parts(rows))
        ]
        return _rebuild(new, self.quantized)

    def run(
        self, block: Callable, x: mx.array, heads: int, head_dim: int, *args: mx.array
    ) -> mx.array:
        """block(x, keys, values, offset, bits, group_size, *args) -> (out, keys, values) on this
        cache's buffers; bits and group_size are None unless the buffers are quantized."""
        self._quantize_when_due()  # e.g. a loaded full-precision state past `start`
        self.reserve(x.shape[0], heads, x.shape[1], head_dim, x.dtype)
        offset = mx.array(self.offset)
        q = self.quantization if self.quantized else None
        bits, group_size = (q.bits, q.group_size) if q else (None, None)
        out, self.keys, self.values = block(
            x, self.keys, self.values, offset, bits, group_size, *args
        )
        self.offset += x.shape[1]
        self._quantize_when_due()
        return out

    def attend_eagerly(
        self,
        attend: Callable[[KVCache], mx.array],
        heads: int,
        n: int,
        head_dim: int,
        dtype: mx.Dtype,
    ) -> mx.array:
        """`attend(self)` outside a compiled block, for one sequence of a batch (its
        `update_and_fetch` writes n positions of one row at `offset` and advances it)."""
        self._quantize_when_due()
        self.reserve(1, heads, n, head_dim, dtype)
        out = attend(self)
        self._quantize_when_due()
        return out

    def _quantize_when_due(self) -> None:
        """Quantizes the full-precision buffers once they hold `quantization.start` positions
        (mlx-lm's `maybe_quantize_kv_cache`; the slots past `offset` are zeros or stale)."""
        q = self.quantization
        if q is None or self.quantized or self.keys is None or self.offset < q.start:
            return
        self.keys, self.values = (
            tuple(mx.quantize(b, group_size=q.group_size, bits=q.bits))
            for b in (self.keys, self.values)
        )

    def reserve(self, batch: int, heads: int, n: int, head_dim: int, dtype: mx.Dtype) -> None:
        """Makes room for n more positions (a fresh cache starts quantized when
        `quantization.start` is 0)."""
        capacity = 0 if self.keys is None else _parts(self.keys)[0].shape[2]
        if self.offset + n <= capacity:
            return
        grown = ((self.offset + n + self.step - 1) // self.step) * self.step
        if self.keys is None:
            q = self.quantization
            if q is not None and q.start == 0:
                shapes = [
                    (q.packed_width(head_dim), mx.uint32),
                    (q.groups(head_dim), dtype),
                    (q.groups(head_dim), dtype),
                ]
            else:
                shapes = [(head_dim, dtype)]
            empty = _rebuild(
                [mx.zeros((batch, heads, 0, w), dtype=t) for w, t in shapes], len(shapes) == 3
            )
            self.keys = self.values = empty
        self.keys, self.values = (self._grown(b, grown) for b in (self.keys, self.values))

    def _grown(self, buffer: Buffer, capacity: int) -> Buffer:
        new = []
        for b in _parts(buffer):
            g = mx.zeros((*b.shape[:2], capacity, b.shape[3]), dtype=b.dtype)
            if self.offset:
                g[..., : self.offset, :] = b[..., : self.offset, :]
            new.append(g)
        return _rebuild(new, isinstance(buffer, tuple))

    def trim(self, n: int) -> None:
        self.offset -= min(n, self.offset)

    def begin_verify(self) -> None:
        """Nothing to record: positions past the accepted prefix are simply trimmed."""

    def accept(self, n_kept: int, n_total: int) -> None:
        self.trim(n_total - n_kept)

    @property
    def state(self) -> dict[str, mx.array]:
        """The filled part: `keys` and `values`, and when quantized also `keys_scales`,
        `keys_biases`, `values_scales` and `values_biases` (with `keys`/`values` packed)."""
        if self.keys is None:
            return {}
        arrays = {}
        for name, buffer in (("keys", self.keys), ("values", self.values)):
            for suffix, part in zip(_QUANTIZED_PARTS, _parts(buffer)):
                arrays[name + suffix] = part[..., : self.offset, :]
        return arrays

    @state.setter
    def state(self, arrays: dict[str, mx.array]) -> None:
        quantized = "keys_scales" in arrays
        self.keys, self.values = (
            _rebuild([arrays[name + s] for s in _QUANTIZED_PARTS], True)
            if quantized
            else arrays.get(name)
            for name in ("keys", "values")
        )
        self.offset = 0 if self.keys is None else _parts(self.keys)[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the buffers, not only the filled part)."""
        if self.keys is None:
            return 0
        return sum(p.nbytes for b in (self.keys, self.values) for p in _parts(b))


class BatchKVCache:
    """The full-precision KV caches of one attention layer's sequences in a batch, as one
    buffer [B, kv_heads, capacity, head_dim] while the batch's membership holds: row b is
    sequence b's cache, filled up to offset[b]. A step writes each row's new position at its
    own offset (a scatter), rotates each row's query and key at its own offset, and masks each
    row's slots beyond it, so sequences of any lengths share one attention pass with no
    left-padding. `release` gives each sequence its row back as its own cache. (Quantized
    caches run per sequence instead: a row crossing `quantized_kv_start` would change the
    layout of the whole buffer.)

    Like `KVCache`, the buffers keep their shape between growth steps and the offsets are an
    array, so the layer's attention block stays compiled (`run`): inside it a `RowWrites` over
    the buffers does the writing."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.offsets = [c.offset for c in caches]  # also as ints: sizes never wait on the graph
        self.offset = mx.array(self.offsets)  # [B]
        capacity = _rounded(max(self.offsets) + 1)
        self.keys, self.values = (
            mx.concatenate([self._row(getattr(c, name), c.offset, capacity) for c in caches])
            for name in ("keys", "values")
        )

    @staticmethod
    def _row(buffer: mx.array, offset: int, capacity: int) -> mx.array:
        """A sequence's filled part, zero-padded to `capacity` positions."""
        filled = buffer[..., :offset, :]
        pad = mx.zeros((*filled.shape[:2], capacity - offset, filled.shape[3]), filled.dtype)
        return mx.concatenate([filled, pad], axis=2)

    def run(self, block: Callable, x: mx.array, *args: mx.array) -> mx.array:
        """block(x, keys, values, offset, *args) -> (out, keys, values) for one new position
        per row (x [B, 1, H]), on buffers grown first if a row's position is past them."""
        capacity = self.keys.shape[2]
        if max(self.offsets) + 1 > capacity:
            grown = _rounded(capacity + 1)
            self.keys, self.values = (
                mx.concatenate(
                    [b, mx.zeros((*b.shape[:2], grown - capacity, b.shape[3]), b.dtype)], 2
                )
                for b in (self.keys, self.values)
            )
        out, self.keys, self.values = block(x, self.keys, self.values, self.offset, *args)
        self.offset = self.offset + 1
        self.offsets = [o + 1 for o in self.offsets]
        return out

    def release(self) -> None:
        """Each sequence's row back into its own cache (gathered, so that no cache keeps the
        whole batch's buffer alive)."""
        for b, (c, offset) in enumerate(zip(self.caches, self.offsets)):
            row = mx.array([b])
            c.keys, c.values = (mx.take(x, row, axis=0) for x in (self.keys, self.values))
            c.offset = offset


@dataclass
class RowWrites:
    """A `BatchKVCache`'s buffers inside its compiled attention block: what the attention
    layer writes through (`update_and_fetch`) and rotates by (`offset`, [B])."""

    keys: mx.array
    values: mx.array
    offset: mx.array
    quantized = False

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, ...]:
        """Writes one new position per row (keys/values [B, kv_heads, 1, head_dim]); returns
        the buffers and the mask [B, 1, 1, capacity] of the slots each row's query sees."""
        rows = mx.arange(keys.shape[0])
        self.keys[rows, :, self.offset] = keys[:, :, 0].astype(self.keys.dtype)
        self.values[rows, :, self.offset] = values[:, :, 0].astype(self.values.dtype)
        mask = mx.arange(self.keys.shape[2])[None] <= self.offset[:, None]
        return self.keys, self.values, mask[:, None, None, :]


def _rounded(n: int) -> int:
    """n positions rounded up to the KV caches' growth step."""
    return -(-n // KVCache.step) * KVCache.step


class LinearAttentionCache:
    """Gated-DeltaNet state: the last K-1 conv inputs and the recurrent matrix per value head."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None  # [B, K-1, conv_dim]
        self.recurrent_state: mx.array | None = None  # [B, Hv, Dv, Dk], float32
        self.offset = 0
        self.recording = False
        self._conv_in: mx.array | None = None  # [B, K-1+T, conv_dim] of the recorded pass
        self._states: mx.array | None = None  # [B, T, Hv, Dv, Dk] of the recorded pass

    def update(
        self, conv_in: mx.array, n_new: int, state: mx.array, states: mx.array | None
    ) -> None:
        """Called by the layer after a pass over n_new tokens; conv_in holds K-1 old + n_new inputs."""
        self.conv_state = conv_in[:, n_new:]
        self.recurrent_state = state
        self.offset += n_new
        if self.recording:
            self._conv_in, self._states = conv_in, states

    def begin_verify(self) -> None:
        self.recording = True

    def accept(self, n_kept: int, n_total: int) -> None:
        """Keep the state after the first n_kept tokens of the recorded pass."""
        self.recording = False
        if n_kept < n_total:
            w = self.conv_state.shape[1]
            self.conv_state = self._conv_in[:, n_kept : n_kept + w]
            self.recurrent_state = self._states[:, n_kept - 1]
            self.offset -= n_total - n_kept
        self._conv_in = self._states = None

    @property
    def state(self) -> dict[str, mx.array]:
        if self.conv_state is None:
            return {}
        return {
            "conv_state": self.conv_state,
            "recurrent_state": self.recurrent_state,
            "offset": mx.array(self.offset),
        }

    @state.setter
    def state(self, arrays: dict[str, mx.array]) -> None:
        self.conv_state = arrays.get("conv_state")
        self.recurrent_state = arrays.get("recurrent_state")
        self.offset = int(arrays["offset"].item()) if "offset" in arrays else 0

    @property
    def nbytes(self) -> int:
        if self.conv_state is None:
            return 0
        return self.conv_state.nbytes + self.recurrent_state.nbytes
