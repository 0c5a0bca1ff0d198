"""Per-layer decoding state: a KV cache for full-attention layers and a conv + recurrent state
for Gated-DeltaNet layers.

Speculative decoding verifies several tokens in one pass and then keeps only a prefix of them.
Both cache kinds support that without recomputation: `begin_verify()` before the pass makes the
Gated-DeltaNet layers record their state after every position, and `accept(n_kept, n_total)`
afterwards keeps the state as it was after the first `n_kept` of the `n_total` tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx


class KVCache:
    """Keys/values in buffers grown in steps of 256 positions, with mlx-lm's `update_and_fetch`.

    New keys/values are written at `offset` and the whole buffers come back with a mask that
    hides the slots beyond, so between growth steps the shapes do not change and the attention
    block stays compiled. A compiled function takes arrays, not this object: `run` hands it the
    buffers and the offset as an array (the graph must not depend on its value), the block
    writes through a `KVCache` built from them, and `run` keeps the buffers it returns.
    Trimming is just moving `offset` back.
    """

    step = 256

    def __init__(
        self,
        keys: mx.array | None = None,
        values: mx.array | None = None,
        offset: int | mx.array = 0,
    ) -> None:
        self.keys = keys  # [B, kv_heads, capacity, head_dim]
        self.values = values
        self.offset = offset

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Writes keys/values [B, kv_heads, L, head_dim] at `offset` (room made by `reserve`);
        returns the whole buffers and the mask [L, capacity] of the slots each new query sees
        (slot j is visible to query i when j <= offset + i; later slots hold stale data)."""
        start = mx.array(self.offset) if isinstance(self.offset, int) else self.offset
        self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), start, axes=(2,))
        self.values = mx.slice_update(
            self.values, values.astype(self.values.dtype), start, axes=(2,)
        )
        n = keys.shape[2]
        mask = mx.arange(self.keys.shape[2])[None] <= (start + mx.arange(n))[:, None]
        self.offset = self.offset + n
        return self.keys, self.values, mask

    def run(
        self, block: Callable, x: mx.array, heads: int, head_dim: int, *args: mx.array
    ) -> mx.array:
        """block(x, keys, values, offset, *args) -> (out, keys, values) on this cache's buffers."""
        self.reserve(x.shape[0], heads, x.shape[1], head_dim, x.dtype)
        offset = mx.array(self.offset)
        out, self.keys, self.values = block(x, self.keys, self.values, offset, *args)
        self.offset += x.shape[1]
        return out

    def reserve(self, batch: int, heads: int, n: int, head_dim: int, dtype: mx.Dtype) -> None:
        """Makes room for n more positions."""
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self.offset + n <= capacity:
            return
        grown = ((self.offset + n + self.step - 1) // self.step) * self.step
        keys = mx.zeros((batch, heads, grown, head_dim), dtype=dtype)
        values = mx.zeros((batch, heads, grown, head_dim), dtype=dtype)
        if self.keys is not None:
            keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = keys, values

    def trim(self, n: int) -> None:
        self.offset -= min(n, self.offset)

    def begin_verify(self) -> None:
        """Nothing to record: positions past the accepted prefix are simply trimmed."""

    def accept(self, n_kept: int, n_total: int) -> None:
        self.trim(n_total - n_kept)

    @property
    def state(self) -> dict[str, mx.array]:
        if self.keys is None:
            return {}
        k, v = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return {"keys": k, "values": v}

    @state.setter
    def state(self, arrays: dict[str, mx.array]) -> None:
        self.keys, self.values = arrays.get("keys"), arrays.get("values")
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the buffers, not only the filled part)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


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
