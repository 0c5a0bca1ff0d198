"""A numpy interpreter for the ML Programs that `mlxkit export-coreml` writes (test-only).

Core ML runs a package only on macOS; coremltools on Linux converts and saves but cannot
predict. So the tests read the saved package back with coremltools' own loader (the spec,
`milproto.load`, and its weight-blob reader) and execute the program here, op by op, per the
MIL op definitions. Only the ops the exported graph contains are implemented; any other op
raises, so a graph that changes cannot pass unnoticed.

Every op computes in float64 from its inputs and rounds its result to the dtype the program
declares for that output: a float16 program is emulated as float16 at every op boundary
(the Neural Engine's own rounding inside an op is not modelled), a float32 program as
float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import erf

_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}


class UnsupportedOp(NotImplementedError):
    pass


class Package:
    """A saved .mlpackage, loaded the way coremltools loads it."""

    def __init__(self, path: str | Path):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto import load as milproto

        path = Path(path)
        self.spec = ct.utils.load_spec(str(path))
        weights = path / "Data" / "com.apple.CoreML" / "weights"
        self.program = milproto.load(self.spec, self.spec.specificationVersion, str(weights))

    @property
    def functions(self) -> list[str]:
        return list(self.program.functions)

    def op_types(self, function: str) -> set[str]:
        return {op.op_type for op in self.program.functions[function].operations}

    def run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coremltools.converters.mil.mil import types

        fn = self.program.functions[function]
        env: dict[str, object] = {}
        for name, var in fn.inputs.items():
            value = np.asarray(inputs[name])
            if value.shape != tuple(var.shape):
                raise ValueError(f"input {name}: shape {value.shape}, expected {var.shape}")
            env[name] = value.astype(_DTYPES[types.builtin_to_string(var.dtype)])
        for op in fn.operations:
            if op.op_type == "const":
                env[op.outputs[0].name] = op.outputs[0].val
                continue
            impl = OPS.get(op.op_type)
            if impl is None:
                raise UnsupportedOp(f"op {op.op_type} ({op.name}) is not in the test interpreter")
            args = {
                name: (
                    [env[v.name] for v in var] if isinstance(var, (list, tuple)) else env[var.name]
                )
                for name, var in op.inputs.items()
            }
            results = impl(**args)
            results = results if isinstance(results, tuple) else (results,)
            for var, value in zip(op.outputs, results, strict=True):
                value = np.asarray(value)
                if tuple(value.shape) != tuple(var.shape):
                    raise AssertionError(f"{op.name}: shape {value.shape}, declared {var.shape}")
                env[var.name] = value.astype(_DTYPES[types.builtin_to_string(var.dtype)])
        return {var.name: env[var.name] for var in fn.outputs}


# --- ops (MIL semantics, float64 inside) -----------------------------------------------------


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _cast(x, dtype):
    if str(dtype) not in _DTYPES:
        raise UnsupportedOp(f"cast to {dtype}")
    return _f(x) if str(dtype).startswith("fp") else np.asarray(x)


def _linear(x, weight, bias=None):
    y = _f(x) @ _f(weight).T
    return y + _f(bias) if bias is not None else y


def _reshape(x, shape):
    shape = [int(s) for s in np.asarray(shape)]
    if 0 in shape:
        raise UnsupportedOp("reshape with a 0 (copy-dimension) entry")
    return np.reshape(x, shape)


def _transpose(x, perm):
    return np.transpose(x, [int(p) for p in np.asarray(perm)])


def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    axes = tuple(int(a) for a in np.asarray(axes).reshape(-1))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + float(epsilon))
    if gamma is not None:
        y = y * _f(gamma)
    if beta is not None:
        y = y + _f(beta)
    return y


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = np.ndim(x)
    begin, end = np.asarray(begin).reshape(-1), np.asarray(end).reshape(-1)
    stride = np.ones(rank, int) if stride is None else np.asarray(stride).reshape(-1)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.asarray(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.asarray(end_mask)
    squeeze = np.zeros(rank, bool) if squeeze_mask is None else np.asarray(squeeze_mask)
    index = []
    for i in range(rank):
        if squeeze[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return np.asarray(x)[tuple(index)]


def _split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=axis))
    bounds = np.cumsum(np.asarray(split_sizes).reshape(-1))[:-1]
    return tuple(np.split(x, bounds, axis=axis))


def _concat(values, axis, interleave=False):
    if bool(interleave):
        raise UnsupportedOp("concat with interleave")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


def _sdpa(query, key, value, attn_mask=None):
    if attn_mask is not None:
        raise UnsupportedOp("scaled_dot_product_attention with a mask")
    q, k, v = _f(query), _f(key), _f(value)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ v


def _gelu(x, mode="EXACT"):
    x = _f(x)
    if mode == "EXACT":
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    raise UnsupportedOp(f"gelu mode {mode}")


def _upsample_bilinear(x, scale_factor_height=1, scale_factor_width=1, align_corners=True):
    """Output sides floor(side * scale); with align_corners, output i samples input
    i * (in - 1) / (out - 1) (the op's definition), linearly between its two neighbours."""
    if not bool(align_corners):
        raise UnsupportedOp("upsample_bilinear without align_corners")
    x = _f(x)
    for axis, scale in ((-2, scale_factor_height), (-1, scale_factor_width)):
        size_in = x.shape[axis]
        size_out = int(np.floor(size_in * float(scale)))
        step = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        src = np.minimum(np.arange(size_out) * step, size_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, size_in - 1)
        frac = (src - lo).reshape([-1 if a == x.ndim + axis else 1 for a in range(x.ndim)])
        x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
    return x


OPS = {
    "add": lambda x, y: _f(x) + _f(y),
    "sub": lambda x, y: _f(x) - _f(y),
    "mul": lambda x, y: _f(x) * _f(y),
    "cast": _cast,
    "linear": _linear,
    "reshape": _reshape,
    "transpose": _transpose,
    "layer_norm": _layer_norm,
    "slice_by_index": _slice_by_index,
    "split": _split,
    "concat": _concat,
    "scaled_dot_product_attention": _sdpa,
    "gelu": _gelu,
    "upsample_bilinear": _upsample_bilinear,
}
