"""One factory per ONNX op (default domain, opset 7 and later, the older attribute forms included).

Each factory reads a node's attributes once and returns a kernel over torch tensors. Semantics follow the
ONNX specification as onnxruntime implements it (the parity target); where a mode cannot be matched
exactly the factory refuses it with `OpRefused` rather than approximating.

Kernels receive the node's inputs positionally (None for an absent optional input, and for an input the
factory already read at build time with `spec.const`). A kernel returns one tensor when the node declares
one output, else a sequence whose first `spec.n_outputs` entries are the outputs.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onnxfair.errors import ModelError
import onnx
from onnx import TensorProto, helper

from onnxfair.interpret.spec import (
    Kernel,
    NodeSpec,
    OpRefused,
    register,
    sparse_to_dense,
    tensor_from_proto,
    torch_dtype,
)

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------- helpers


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX [b0, b1, .., e0, e1, ..] over the trailing axes → F.pad's last-axis-first pairs."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def _ints_or_runtime(spec: NodeSpec, i: int) -> tuple[list[int] | None, bool]:
    """(value, known): value of an int-list input known at build time, or (None, False) if dynamic."""
    if not spec.has(i):
        return None, True
    v = spec.const_list(i)
    return (v, True) if v is not None else (None, False)


def _as_list(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor) else v


# -------------------------------------------------------------------------------- elementwise unary

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Reciprocal": torch.reciprocal,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
}


def _fixed(fn: Callable[..., Tensor]) -> Callable[[NodeSpec], Kernel]:
    """Factory for an op without attributes: the kernel is the torch function itself."""
    return lambda spec: fn


for _name, _fn in _UNARY.items():
    register(_name)(_fixed(_fn))


@register("Identity")
def identity(spec: NodeSpec) -> Kernel:
    return lambda x: x


@register("Softplus")
def softplus(spec: NodeSpec) -> Kernel:
    # log(1 + exp(x)); torch switches to x above 20, where the two differ by < 3e-9 relative.
    return lambda x: F.softplus(x)


@register("IsInf")
def isinf(spec: NodeSpec) -> Kernel:
    pos, neg = int(spec.attr("detect_positive", 1)), int(spec.attr("detect_negative", 1))
    if pos and neg:
        return torch.isinf
    if pos:
        return torch.isposinf
    if neg:
        return torch.isneginf
    return lambda x: torch.zeros_like(x, dtype=torch.bool)


@register("LeakyRelu")
def leaky_relu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu")
def elu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register("Selu")
def selu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 1.67326319217681884765625))
    gamma = float(spec.attr("gamma", 1.05070102214813232421875))
    return lambda x: F.elu(x, alpha) * gamma


@register("Celu")
def celu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@register("ThresholdedRelu")
def thresholded_relu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, 0.0)




@register("HardSigmoid")
def hard_sigmoid(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 0.2))
    beta = float(spec.attr("beta", 0.5))
    # hardtanh rather than F.hardsigmoid: the latter has no second derivative, which Hessian-vector
    # products (the risk pre-check) need
    return lambda x: F.hardtanh(x * alpha + beta, 0.0, 1.0)


@register("Gelu")
def gelu(spec: NodeSpec) -> Kernel:
    approx = spec.attr("approximate", "none")
    if approx not in ("none", "tanh"):
        raise spec.refuse(f"approximate={approx}")
    return lambda x: F.gelu(x, approximate=approx)


@register("PRelu")
def prelu(spec: NodeSpec) -> Kernel:
    s = spec.shape(1)

    def generic(x: Tensor, slope: Tensor) -> Tensor:
        return torch.where(x < 0, x * slope, x)

    if s is None:
        return generic
    numel = int(np.prod(s)) if s else 1
    if numel == 1:
        return lambda x, slope: F.prelu(x, slope.reshape(1)) if x.dim() >= 1 else generic(x, slope)
    if len(s) >= 1 and all(d == 1 for d in s[1:]):
        rank = len(s) + 1  # slope [C, 1, .., 1] lines up with axis 1 of a rank-(len+1) input

        def channel(x: Tensor, slope: Tensor) -> Tensor:
            if x.dim() == rank:
                return F.prelu(x, slope.reshape(-1))
            return generic(x, slope)

        return channel
    return generic


@register("Clip")
def clip(spec: NodeSpec) -> Kernel:
    if spec.opset < 11:
        lo = spec.attr("min")
        hi = spec.attr("max")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        return _clip_static(lo, hi)
    lo_c = spec.const_scalar(1) if spec.is_const(1) else None
    hi_c = spec.const_scalar(2) if spec.is_const(2) else None
    lo_dyn = spec.has(1) and not spec.is_const(1)
    hi_dyn = spec.has(2) and not spec.is_const(2)
    if not lo_dyn and not hi_dyn:
        return _clip_static(lo_c, hi_c)

    def k(x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
        lo = lo_c if lo is None else lo
        hi = hi_c if hi is None else hi
        if isinstance(lo, Tensor) and isinstance(hi, Tensor):
            return torch.clamp(x, lo, hi)
        if lo is not None:
            x = torch.clamp_min(x, lo)
        if hi is not None:
            x = torch.clamp_max(x, hi)
        return x

    return k


def _clip_static(lo: float | None, hi: float | None) -> Kernel:
    if lo is None and hi is None:
        return lambda x, *_: x
    if lo == 0.0 and hi is None:
        return lambda x, *_: torch.relu(x)
    return lambda x, *_: torch.clamp(x, lo, hi)


# ------------------------------------------------------------------------------- elementwise binary


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # C integer division, as onnxruntime


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}

for _name, _fn in _BINARY.items():
    register(_name)(_fixed(_fn))


@register("Pow")
def pow_(spec: NodeSpec) -> Kernel:
    e = spec.peek(1)
    if e is not None and e.ndim == 0:
        spec.const(1)
        ev = e.item()
        if float(ev) == 2.0:
            return lambda a, _: a * a if a.is_floating_point() else torch.pow(a, 2)
        if float(ev) == 1.0:
            return lambda a, _: a

        def ks(a: Tensor, _: Any) -> Tensor:
            r = torch.pow(a, ev)
            return r if r.dtype == a.dtype else r.to(a.dtype)

        return ks

    def k(a: Tensor, b: Tensor) -> Tensor:
        r = torch.pow(a, b)
        return r if r.dtype == a.dtype else r.to(a.dtype)  # ONNX: output has the base's type

    return k


@register("Mod")
def mod(spec: NodeSpec) -> Kernel:
    if int(spec.attr("fmod", 0)):
        return torch.fmod
    return torch.remainder  # sign of the divisor, as ONNX fmod=0


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Kernel:
    def k(*xs: Tensor) -> Tensor:
        return reduce(fn, xs)

    return k


register("Max")(lambda spec: _variadic(torch.maximum))
register("Min")(lambda spec: _variadic(torch.minimum))
register("Sum")(lambda spec: _variadic(torch.add))


@register("Mean")
def mean_(spec: NodeSpec) -> Kernel:
    return lambda *xs: reduce(torch.add, xs) / len(xs)


@register("Where")
def where(spec: NodeSpec) -> Kernel:
    return lambda c, x, y: torch.where(c, x, y)


# --------------------------------------------------------------------------------- linear algebra


@register("MatMul")
def matmul(spec: NodeSpec) -> Kernel:
    return torch.matmul


@register("Gemm")
def gemm(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 1.0))
    beta = float(spec.attr("beta", 1.0))
    ta = int(spec.attr("transA", 0))
    tb = int(spec.attr("transB", 0))
    cshape = spec.shape(2)

    if not ta and tb and alpha == 1.0 and beta == 1.0 and (cshape is None or len(cshape) <= 2):
        # y = A Bᵀ + C: F.linear, as a native nn.Linear, when C is a row vector
        def linear(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
            if c is None:
                return F.linear(a, b)
            if c.dim() == 1 and c.shape[0] == b.shape[0]:
                return F.linear(a, b, c)
            if c.dim() == 2 and c.shape[0] == 1 and c.shape[1] == b.shape[0]:
                return F.linear(a, b, c.reshape(-1))
            return F.linear(a, b) + c

        return linear

    def k(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        if ta:
            a = a.t()
        if tb:
            b = b.t()
        y = torch.mm(a, b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None and beta != 0.0:
            y = y + (c if beta == 1.0 else c * beta)
        return y

    return k


@register("Einsum")
def einsum(spec: NodeSpec) -> Kernel:
    eq = str(spec.attr("equation", "")).replace(" ", "")
    return lambda *xs: torch.einsum(eq, *xs)


# ------------------------------------------------------------------------------------ convolution

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _same_pads(size: int, k: int, s: int, d: int, upper: bool) -> tuple[int, int]:
    out = -(-size // s)
    total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _spatial_rank(spec: NodeSpec, wi: int = 1) -> int | None:
    ks = spec.ints("kernel_shape")
    if ks:
        return len(ks)
    ws = spec.shape(wi)
    if ws is not None:
        return len(ws) - 2
    for a in ("strides", "dilations"):
        if spec.ints(a):
            return len(spec.ints(a))
    if spec.ints("pads"):
        return len(spec.ints("pads")) // 2
    return None


def _lazy_by_rank(make: Callable[[int], Kernel], rank_of: Callable[..., int]) -> Kernel:
    cache: dict[int, Kernel] = {}

    def k(*args: Any) -> Any:
        n = rank_of(*args)
        fn = cache.get(n)
        if fn is None:
            fn = cache[n] = make(n)
        return fn(*args)

    return k


@register("Conv")
def conv(spec: NodeSpec) -> Kernel:
    auto_pad = spec.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise spec.refuse(f"auto_pad={auto_pad}")
    group = int(spec.attr("group", 1))
    ks_attr = spec.ints("kernel_shape")

    def make(n: int) -> Kernel:
        if n not in _CONV:
            raise spec.refuse(f"{n}-d")
        fn = _CONV[n]
        strides = tuple(spec.ints("strides", [1] * n))
        dil = tuple(spec.ints("dilations", [1] * n))
        pads = spec.ints("pads", [0] * (2 * n))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            upper = auto_pad == "SAME_UPPER"

            def same(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
                ks = ks_attr or w.shape[2:]
                pp = [_same_pads(x.shape[2 + i], ks[i], strides[i], dil[i], upper) for i in range(n)]
                if all(p0 == p1 for p0, p1 in pp):
                    return fn(x, w, b, strides, tuple(p0 for p0, _ in pp), dil, group)
                x = F.pad(x, _torch_pad([p[0] for p in pp], [p[1] for p in pp]))
                return fn(x, w, b, strides, 0, dil, group)

            return same
        if auto_pad == "VALID":
            pads = [0] * (2 * n)
        begins, ends = pads[:n], pads[n:]
        if begins == ends:
            padding = tuple(begins)
            return lambda x, w, b=None: fn(x, w, b, strides, padding, dil, group)
        tp = _torch_pad(begins, ends)
        return lambda x, w, b=None: fn(F.pad(x, tp), w, b, strides, 0, dil, group)

    n = _spatial_rank(spec)
    if n is not None:
        return make(n)
    return _lazy_by_rank(make, lambda x, w, b=None: w.dim() - 2)


@register("ConvTranspose")
def conv_transpose(spec: NodeSpec) -> Kernel:
    auto_pad = spec.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise spec.refuse(f"auto_pad={auto_pad}")
    group = int(spec.attr("group", 1))
    ks_attr = spec.ints("kernel_shape")
    out_shape_attr = spec.ints("output_shape")

    def make(n: int) -> Kernel:
        if n not in _CONVT:
            raise spec.refuse(f"{n}-d")
        fn = _CONVT[n]
        strides = spec.ints("strides", [1] * n)
        dil = spec.ints("dilations", [1] * n)
        adj = spec.ints("output_padding", [0] * n)
        pads = spec.ints("pads", [0] * (2 * n))
        if auto_pad == "VALID":
            pads = [0] * (2 * n)
        static = not out_shape_attr and auto_pad not in ("SAME_UPPER", "SAME_LOWER")

        def pads_for(x: Tensor, w: Tensor) -> tuple[list[int], list[int]]:
            if static:
                return pads[:n], pads[n:]
            ks = ks_attr or list(w.shape[2:])
            b, e = [], []
            for i in range(n):
                size = x.shape[2 + i]
                full = (size - 1) * strides[i] + adj[i] + (ks[i] - 1) * dil[i] + 1
                if out_shape_attr:
                    target = out_shape_attr[i] if len(out_shape_attr) == n else out_shape_attr[i + 2]
                elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                    target = size * strides[i]
                else:
                    b.append(pads[i])
                    e.append(pads[n + i])
                    continue
                if out_shape_attr and target - full >= strides[i]:
                    raise ModelError(f"ConvTranspose node {spec.name!r}: output_shape {target} does not fit an "
                                     f"input of {size} (at most {full + strides[i] - 1}); fix the model's output_shape")
                if out_shape_attr and target > full:  # onnxruntime grows the output at the end: bias only there
                    b.append(0)
                    e.append(full - target)
                    continue
                total = max(0, full - target)  # SAME with a kernel shorter than the stride: the full output
                # ONNX (and onnxruntime 1.31): SAME_UPPER puts the odd element at the end, otherwise the head
                head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                b.append(head)
                e.append(total - head)
            return b, e

        def k(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
            b, e = pads_for(x, w)  # output_padding < max(stride, dilation) holds in torch and onnxruntime alike
            if b == e:
                return fn(x, w, bias, strides, b, adj, group, dil)
            grow = [max(0, -v) for v in e]
            y = fn(x, w, None if any(grow) else bias, strides, 0, adj, group, dil)
            idx = [slice(None), slice(None)]
            for i in range(n):
                L = y.shape[2 + i]
                idx.append(slice(b[i], L - max(0, e[i])))
            y = y[tuple(idx)]
            if any(grow):
                y = F.pad(y, _torch_pad([0] * n, grow))
                if bias is not None:
                    y = y + bias.reshape((1, -1) + (1,) * n)
            return y

        return k

    n = _spatial_rank(spec)
    if n is not None:
        return make(n)
    return _lazy_by_rank(make, lambda x, w, b=None: w.dim() - 2)


# --------------------------------------------------------------------------------------- pooling


def _pool_out(L: int, keff: int, s: int, pb: int, pe: int, ceil: bool) -> int:
    num = L + pb + pe - keff
    o = (-(-num // s) if ceil else num // s) + 1
    if ceil and (o - 1) * s >= L + pb:  # a window may not start in the end padding (onnxruntime, torch)
        o -= 1
    return o


class _PoolGeom:
    """Attributes of MaxPool/AveragePool and per-call padding."""

    def __init__(self, spec: NodeSpec) -> None:
        ks = spec.ints("kernel_shape")
        if not ks:
            raise ModelError(f"{spec.op_type} node {spec.name!r} has no kernel_shape")
        n = len(ks)
        self.n = n
        self.k = ks
        self.s = spec.ints("strides", [1] * n)
        self.d = spec.ints("dilations", [1] * n)
        pads = spec.ints("pads", [0] * (2 * n))
        self.auto = spec.attr("auto_pad", "NOTSET")
        if self.auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise spec.refuse(f"auto_pad={self.auto}")
        if self.auto == "VALID":
            pads = [0] * (2 * n)
        self.pb, self.pe = pads[:n], pads[n:]
        self.ceil = bool(spec.attr("ceil_mode", 0))
        self.keff = [(k - 1) * d + 1 for k, d in zip(self.k, self.d)]
        if n not in (1, 2, 3):
            raise spec.refuse(f"{n}-d")
        if self.dynamic and any(d != 1 for d in self.d):
            # onnxruntime sizes SAME pads with the undilated kernel, against the spec: no faithful answer
            raise spec.refuse(f"auto_pad={self.auto} with dilations")
        self.spec = spec

    @property
    def dynamic(self) -> bool:
        return self.auto in ("SAME_UPPER", "SAME_LOWER")

    def pads(self, x: Tensor) -> tuple[list[int], list[int], bool]:
        if not self.dynamic:
            return self.pb, self.pe, self.ceil
        b, e = [], []
        for i in range(self.n):
            L = x.shape[2 + i]
            out = -(-L // self.s[i])
            total = (out - 1) * self.s[i] + self.keff[i] - L
            if total < 0:  # onnxruntime keeps the negative pad at some opsets and refuses it at others
                raise self.spec.refuse(f"auto_pad={self.auto} with a kernel shorter than its stride")
            head = total // 2 if self.auto == "SAME_UPPER" else total - total // 2
            b.append(head)
            e.append(total - head)
        return b, e, False


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register("MaxPool")
def max_pool(spec: NodeSpec) -> Kernel:
    g = _PoolGeom(spec)
    if int(spec.attr("storage_order", 0)) and spec.n_outputs > 1:
        raise spec.refuse("storage_order=1")
    want_idx = spec.n_outputs > 1
    fn = _MAXPOOL[g.n]
    n = g.n

    def native_ok(b: list[int], e: list[int]) -> bool:
        return b == e and all(2 * p <= kk for p, kk in zip(b, g.k))  # torch's limit uses the raw kernel

    if want_idx and not g.dynamic and not native_ok(g.pb, g.pe):  # SAME pads are known only when run
        raise spec.refuse("indices with asymmetric or large pads")

    def k(x: Tensor) -> Any:
        b, e, ceil = g.pads(x)
        if native_ok(b, e):
            if not want_idx:
                return fn(x, g.k, g.s, b, g.d, ceil)
            y, idx = fn(x, g.k, g.s, b, g.d, ceil, return_indices=True)
            plane = math.prod(x.shape[2:])
            nc = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *([1] * n))
            return y, idx + nc * plane
        if want_idx:
            raise spec.refuse("indices with asymmetric or large pads")
        outs, extra = [], []
        for i in range(n):
            L = x.shape[2 + i]
            o = _pool_out(L, g.keff[i], g.s[i], b[i], e[i], ceil)
            outs.append(o)
            extra.append(max(0, (o - 1) * g.s[i] + g.keff[i] - (L + b[i] + e[i])))
        xp = F.pad(x, _torch_pad(b, [ee + xx for ee, xx in zip(e, extra)]), value=-math.inf)
        y = fn(xp, g.k, g.s, 0, g.d, False)
        return y[(slice(None), slice(None)) + tuple(slice(0, o) for o in outs)]

    return k


@register("AveragePool")
def average_pool(spec: NodeSpec) -> Kernel:
    g = _PoolGeom(spec)
    if any(d != 1 for d in g.d):
        raise spec.refuse("dilations")
    include = bool(spec.attr("count_include_pad", 0))
    n = g.n
    fn = _AVGPOOL[n]
    cache: dict[tuple, Tensor] = {}

    def divisor(shape: tuple[int, ...], b: list[int], e: list[int], outs: list[int], ref: Tensor) -> Tensor:
        key = (shape, tuple(b), tuple(e), tuple(outs), ref.device, ref.dtype)
        t = cache.get(key)
        if t is None:
            vecs = []
            for i in range(n):
                L = shape[i]
                hs = np.arange(outs[i]) * g.s[i] - b[i]
                if include:
                    cnt = np.minimum(hs + g.k[i], L + e[i]) - hs
                else:
                    cnt = np.minimum(hs + g.k[i], L) - np.maximum(hs, 0)
                vecs.append(np.maximum(cnt, 1).astype(np.float64))
            div = reduce(np.multiply.outer, vecs)
            t = cache[key] = torch.as_tensor(div, dtype=ref.dtype, device=ref.device)
        return t

    def k(x: Tensor) -> Tensor:
        b, e, ceil = g.pads(x)
        if b == e and all(2 * p <= kk for p, kk in zip(b, g.k)):
            return fn(x, g.k, g.s, b, ceil, include)
        outs, extra = [], []
        for i in range(n):
            L = x.shape[2 + i]
            o = _pool_out(L, g.k[i], g.s[i], b[i], e[i], ceil)
            outs.append(o)
            extra.append(max(0, (o - 1) * g.s[i] + g.k[i] - (L + b[i] + e[i])))
        xp = F.pad(x, _torch_pad(b, [ee + xx for ee, xx in zip(e, extra)]))
        if n == 1:
            sums = F.avg_pool2d(xp.unsqueeze(-2), (1, g.k[0]), (1, g.s[0]), 0, False, True, 1).squeeze(-2)
        else:
            sums = fn(xp, g.k, g.s, 0, False, True, 1)
        sums = sums[(slice(None), slice(None)) + tuple(slice(0, o) for o in outs)]
        return sums / divisor(tuple(x.shape[2:]), b, e, outs, sums)

    return k


@register("GlobalAveragePool")
def global_average_pool(spec: NodeSpec) -> Kernel:
    return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(spec: NodeSpec) -> Kernel:
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


# --------------------------------------------------------------------------------- normalisation


@register("BatchNormalization")
def batch_norm(spec: NodeSpec) -> Kernel:
    eps = float(spec.attr("epsilon", 1e-5))
    if int(spec.attr("training_mode", 0)):
        raise spec.refuse("training_mode=1", "batch statistics are not eval semantics")
    if spec.opset < 9 and int(spec.attr("spatial", 1)) == 0:
        raise spec.refuse("spatial=0")
    if spec.n_outputs > 1:
        raise spec.refuse("training outputs")

    def k(x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad)):
            return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        # torch's fused kernel has no gradient for the running statistics; onnxfair scores them too
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w = scale * torch.rsqrt(var + eps)
        return (x - mean.reshape(shape)) * w.reshape(shape) + bias.reshape(shape)

    return k


@register("InstanceNormalization")
def instance_norm(spec: NodeSpec) -> Kernel:
    eps = float(spec.attr("epsilon", 1e-5))
    return lambda x, scale, bias: F.instance_norm(x, None, None, scale, bias, True, 0.0, eps)


@register("LayerNormalization")
def layer_norm(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", -1))
    eps = float(spec.attr("epsilon", 1e-5))
    stash = int(spec.attr("stash_type", 1))
    if stash != 1:
        raise spec.refuse(f"stash_type={stash}")
    n_out = spec.n_outputs

    def k(x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Any:
        a = _norm_axis(axis, x.dim())
        ns = tuple(x.shape[a:])
        if n_out == 1:
            if tuple(scale.shape) == ns and (bias is None or tuple(bias.shape) == ns):
                return F.layer_norm(x, ns, scale, bias, eps)
            y = F.layer_norm(x, ns, None, None, eps) * scale
            return y if bias is None else y + bias
        dims = tuple(range(a, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xf.mean(dims, keepdim=True)
        d = xf - mean
        inv = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
        y = (d * inv).to(x.dtype) * scale
        if bias is not None:
            y = y + bias
        return y, mean, inv

    return k


# ------------------------------------------------------------------------------ softmax family


def _softmax_like(fn: Callable[[Tensor, int], Tensor]) -> Callable[[NodeSpec], Kernel]:
    def factory(spec: NodeSpec) -> Kernel:
        if spec.opset >= 13:
            axis = int(spec.attr("axis", -1))
            return lambda x: fn(x, axis)
        axis = int(spec.attr("axis", 1))

        def coerced(x: Tensor) -> Tensor:  # opset < 13: flatten to 2-D at axis
            r = x.dim()
            a = _norm_axis(axis, r)
            if a == r - 1:
                return fn(x, -1)
            s = x.shape
            return fn(x.reshape(math.prod(s[:a]), math.prod(s[a:])), 1).reshape(s)

        return coerced

    return factory


def _hardmax(x: Tensor, axis: int) -> Tensor:
    idx = x.argmax(axis, keepdim=True)
    return torch.zeros_like(x).scatter_(axis, idx, 1.0)


register("Softmax")(_softmax_like(lambda x, a: F.softmax(x, a)))
register("LogSoftmax")(_softmax_like(lambda x, a: F.log_softmax(x, a)))
register("Hardmax")(_softmax_like(_hardmax))


# ------------------------------------------------------------------------------------ reductions


def _reduce_axes(spec: NodeSpec, input_form: bool) -> tuple[list[int] | None, bool]:
    """(axes, known) for ReduceX: attribute before the op's input form, input after."""
    if not input_form:
        return spec.ints("axes"), True
    return _ints_or_runtime(spec, 1)


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


def _mean(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    if x.is_floating_point():
        return torch.mean(x, dims, keepdim=keep)
    n = math.prod(x.shape[d] for d in dims)
    return torch.div(torch.sum(x, dims, keepdim=keep), n, rounding_mode="trunc")


_REDUCE: dict[str, tuple[Callable[[Tensor, tuple[int, ...], bool], Tensor], int]] = {
    # name: (function over a non-empty tuple of dims, opset where axes became an input)
    "ReduceSum": (lambda x, d, k: torch.sum(x, d, keepdim=k), 13),
    "ReduceMean": (_mean, 18),
    "ReduceMax": (lambda x, d, k: torch.amax(x, d, keepdim=k), 18),
    "ReduceMin": (lambda x, d, k: torch.amin(x, d, keepdim=k), 18),
    "ReduceProd": (_prod, 18),
    "ReduceL1": (lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k), 18),
    "ReduceL2": (lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k), 18),
    "ReduceSumSquare": (lambda x, d, k: torch.sum(x * x, d, keepdim=k), 18),
    "ReduceLogSum": (lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)), 18),
    "ReduceLogSumExp": (lambda x, d, k: torch.logsumexp(x, d, keepdim=k), 18),
}


# noop_with_empty_axes skips the reduction, not the elementwise part around it (onnxruntime and the spec)
_REDUCE_NOOP: dict[str, Callable[[Tensor], Tensor]] = {
    "ReduceL1": torch.abs, "ReduceL2": torch.abs, "ReduceSumSquare": lambda x: x * x, "ReduceLogSum": torch.log,
}


def _reduce_factory(name: str) -> Callable[[NodeSpec], Kernel]:
    fn, since = _REDUCE[name]
    elementwise = _REDUCE_NOOP.get(name, lambda x: x)

    def factory(spec: NodeSpec) -> Kernel:
        keep = bool(int(spec.attr("keepdims", 1)))
        noop = bool(int(spec.attr("noop_with_empty_axes", 0)))
        input_form = spec.opset >= since
        axes, known = _reduce_axes(spec, input_form)

        def run(x: Tensor, ax: list[int] | None) -> Tensor:
            if not ax:
                if noop and input_form:
                    return elementwise(x)
                dims = tuple(range(x.dim()))
            else:
                r = x.dim()
                dims = tuple(sorted({_norm_axis(a, r) for a in ax}))
            if not dims:  # a scalar input
                return fn(x.reshape(1), (0,), False) if not keep else x
            return fn(x, dims, keep)

        if known:
            return lambda x, *_: run(x, axes)
        return lambda x, a=None, *_: run(x, _as_list(a))

    return factory


for _name in _REDUCE:
    register(_name)(_reduce_factory(_name))


def _arg_factory(largest: bool) -> Callable[[NodeSpec], Kernel]:
    def factory(spec: NodeSpec) -> Kernel:
        axis = int(spec.attr("axis", 0))
        keep = bool(int(spec.attr("keepdims", 1)))
        last = bool(int(spec.attr("select_last_index", 0)))
        f = torch.argmax if largest else torch.argmin

        def k(x: Tensor) -> Tensor:
            if not last:
                return f(x, axis, keepdim=keep)
            a = _norm_axis(axis, x.dim())
            return x.shape[a] - 1 - f(torch.flip(x, (a,)), a, keepdim=keep)

        return k

    return factory


register("ArgMax")(_arg_factory(True))
register("ArgMin")(_arg_factory(False))


@register("CumSum")
def cumsum(spec: NodeSpec) -> Kernel:
    exclusive = int(spec.attr("exclusive", 0))
    reverse = int(spec.attr("reverse", 0))
    axis_c = spec.const_scalar(1)

    def k(x: Tensor, axis: Tensor | None = None) -> Tensor:
        a = _norm_axis(int(axis_c if axis_c is not None else axis.item()), x.dim())
        if reverse:
            x = torch.flip(x, (a,))
        y = torch.cumsum(x, a)
        if exclusive:
            y = torch.cat([torch.zeros_like(y.narrow(a, 0, 1)), y.narrow(a, 0, y.shape[a] - 1)], a)
        if reverse:
            y = torch.flip(y, (a,))
        return y

    return k


# -------------------------------------------------------------------------------- shape and data


@register("Flatten")
def flatten(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 1))

    def k(x: Tensor) -> Tensor:
        s = x.shape
        a = _norm_axis(axis, len(s))
        return x.reshape(math.prod(s[:a]), math.prod(s[a:]))

    return k


def _reshape_target(x_shape: Sequence[int], tgt: Sequence[int], allowzero: bool) -> list[int]:
    if allowzero:
        return list(tgt)
    return [x_shape[i] if d == 0 else d for i, d in enumerate(tgt)]


@register("Reshape")
def reshape(spec: NodeSpec) -> Kernel:
    allowzero = bool(int(spec.attr("allowzero", 0)))
    if spec.opset < 5:
        tgt = spec.ints("shape")
    else:
        tgt = spec.const_list(1)
    if tgt is not None:
        if allowzero or 0 not in tgt:
            static = tuple(tgt)
            return lambda x, *_: x.reshape(static)
        return lambda x, *_: x.reshape(_reshape_target(x.shape, tgt, False))
    return lambda x, s: x.reshape(_reshape_target(x.shape, _as_list(s), allowzero))


@register("Transpose")
def transpose(spec: NodeSpec) -> Kernel:
    perm = spec.ints("perm")
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    perm_t = tuple(perm)
    return lambda x: x.permute(perm_t)


@register("Squeeze")
def squeeze(spec: NodeSpec) -> Kernel:
    if spec.opset < 13:
        axes, known = spec.ints("axes"), True
    else:
        axes, known = _ints_or_runtime(spec, 1)

    def run(x: Tensor, ax: list[int] | None) -> Tensor:
        if not ax:
            return x.squeeze()
        return torch.squeeze(x, tuple(_norm_axis(a, x.dim()) for a in ax))

    if known:
        return lambda x, *_: run(x, axes)
    return lambda x, a=None: run(x, _as_list(a))


@register("Unsqueeze")
def unsqueeze(spec: NodeSpec) -> Kernel:
    if spec.opset < 13:
        axes, known = spec.ints("axes"), True
    else:
        axes, known = _ints_or_runtime(spec, 1)

    def run(x: Tensor, ax: list[int]) -> Tensor:
        r = x.dim() + len(ax)
        for a in sorted(_norm_axis(a, r) for a in ax):
            x = x.unsqueeze(a)
        return x

    if known:
        if axes is None:
            raise ModelError(f"Unsqueeze node {spec.name!r} has no axes")
        if len(axes) == 1:
            a0 = axes[0]
            return lambda x, *_: x.unsqueeze(a0)  # torch counts a negative axis from the output rank too
        return lambda x, *_: run(x, axes)
    return lambda x, a: run(x, _as_list(a))


@register("Concat")
def concat(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))
    return lambda *xs: torch.cat(xs, axis)


@register("Split")
def split(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))
    n_parts = len(spec.node.output)
    if spec.opset < 13:
        sizes, known = spec.ints("split"), True
    else:
        sizes, known = _ints_or_runtime(spec, 1)
    num_outputs = spec.attr("num_outputs")
    single = spec.n_outputs == 1

    def run(x: Tensor, sz: list[int] | None) -> Any:
        if not sz:
            dim = x.shape[_norm_axis(axis, x.dim())]
            parts = int(num_outputs) if num_outputs is not None else n_parts
            chunk = -(-dim // parts)
            out = torch.split(x, chunk, axis)
        else:
            out = torch.split(x, sz, axis)
        return out[0] if single else out

    if known:
        return lambda x, *_: run(x, sizes)
    return lambda x, s=None: run(x, _as_list(s))


def _slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


@register("Slice")
def slice_(spec: NodeSpec) -> Kernel:
    if spec.opset < 10:
        starts, ends = spec.ints("starts"), spec.ints("ends")
        axes = spec.ints("axes")
        steps = None
        known = True
    else:
        starts, k1 = _ints_or_runtime(spec, 1)
        ends, k2 = _ints_or_runtime(spec, 2)
        axes, k3 = _ints_or_runtime(spec, 3)
        steps, k4 = _ints_or_runtime(spec, 4)
        known = k1 and k2 and k3 and k4

    def run(x: Tensor, st: list[int], en: list[int], ax: list[int] | None, sp: list[int] | None) -> Tensor:
        r = x.dim()
        ax = list(range(len(st))) if ax is None else ax
        sp = [1] * len(st) if sp is None else sp
        idx: list[Any] = [slice(None)] * r
        negative: list[tuple[int, int, int, int]] = []
        for a, s0, e0, stp in zip(ax, st, en, sp):
            a = _norm_axis(a, r)
            dim = x.shape[a]
            s1, e1 = _slice_bounds(dim, s0, e0, stp)
            if stp > 0:
                idx[a] = slice(s1, max(e1, s1), stp)
            else:
                negative.append((a, s1, e1, stp))
        y = x[tuple(idx)]
        for a, s1, e1, stp in negative:  # an empty range (start clamped below end) selects nothing
            y = y.index_select(a, torch.arange(s1, min(e1, s1), stp, device=x.device))
        return y

    if known:
        return lambda x, *_: run(x, starts, ends, axes, steps)

    def k(x: Tensor, s: Tensor | None = None, e: Tensor | None = None, a: Tensor | None = None, p: Tensor | None = None) -> Tensor:
        return run(
            x,
            starts if s is None else _as_list(s),
            ends if e is None else _as_list(e),
            axes if a is None else _as_list(a),
            steps if p is None else _as_list(p),
        )

    return k


@register("Gather")
def gather(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))
    idx = spec.peek(1)
    if idx is not None and idx.ndim == 0:
        spec.const(1)
        i0 = int(idx)
        if i0 >= 0:
            return lambda x, _: x.select(axis, i0)
        return lambda x, _: x.select(axis, i0 + x.shape[_norm_axis(axis, x.dim())])
    nonneg = idx is not None and bool((idx >= 0).all())

    def k(x: Tensor, ind: Tensor) -> Tensor:
        a = _norm_axis(axis, x.dim())
        if not nonneg:
            ind = torch.where(ind < 0, ind + x.shape[a], ind)
        out = x.index_select(a, ind.reshape(-1))
        return out.reshape(x.shape[:a] + ind.shape + x.shape[a + 1 :])

    return k


@register("GatherElements")
def gather_elements(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))

    def k(x: Tensor, ind: Tensor) -> Tensor:
        a = _norm_axis(axis, x.dim())
        ind = torch.where(ind < 0, ind + x.shape[a], ind)
        return torch.gather(x, a, ind)

    return k


@register("Shape")
def shape(spec: NodeSpec) -> Kernel:
    start = int(spec.attr("start", 0))
    end = spec.attr("end")
    end = None if end is None else int(end)
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@register("Size")
def size(spec: NodeSpec) -> Kernel:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Constant")
def constant(spec: NodeSpec) -> Kernel:
    a = spec.attrs
    if "value" in a:
        t = tensor_from_proto(a["value"])
    elif "sparse_value" in a:
        t = sparse_to_dense(a["sparse_value"])
    elif "value_float" in a:
        t = torch.tensor(float(a["value_float"]), dtype=torch.float32)
    elif "value_floats" in a:
        t = torch.tensor([float(v) for v in a["value_floats"]], dtype=torch.float32)
    elif "value_int" in a:
        t = torch.tensor(int(a["value_int"]), dtype=torch.int64)
    elif "value_ints" in a:
        t = torch.tensor([int(v) for v in a["value_ints"]], dtype=torch.int64)
    else:
        raise spec.refuse("string value")
    return lambda: t


@register("ConstantOfShape")
def constant_of_shape(spec: NodeSpec) -> Kernel:
    v = spec.attr("value")
    if v is None:
        val: Any = 0.0
        dt = torch.float32
    else:
        t = tensor_from_proto(v)
        val, dt = t.reshape(-1)[0].item(), t.dtype
    return lambda s: torch.full(tuple(_as_list(s)), val, dtype=dt, device=s.device)


@register("Cast")
def cast(spec: NodeSpec) -> Kernel:
    to = int(spec.attr("to"))
    try:
        dt = torch_dtype(to)
    except OpRefused:
        raise spec.refuse(f"to={TensorProto.DataType.Name(to)}") from None
    return lambda x: x.to(dt)


@register("CastLike")
def cast_like(spec: NodeSpec) -> Kernel:
    return lambda x, t: x.to(t.dtype)


@register("Dropout")
def dropout(spec: NodeSpec) -> Kernel:
    if spec.opset >= 12 and spec.has(2):
        tm = spec.const_scalar(2)
        if tm is None or bool(tm):
            raise spec.refuse("training_mode", "dropout is interpreted in eval mode only")
    if spec.opset < 7 and not int(spec.attr("is_test", 0)):
        raise spec.refuse("is_test=0")
    if spec.n_outputs > 1:
        # opsets 7-11 give an inference mask of zeros in onnxruntime (float before opset 10), 12 on all True
        if spec.opset < 10:
            return lambda x, *_: (x, torch.zeros_like(x))
        return lambda x, *_: (x, torch.full_like(x, spec.opset >= 12, dtype=torch.bool))
    return lambda x, *_: x


@register("Expand")
def expand(spec: NodeSpec) -> Kernel:
    tgt = spec.const_list(1)
    if tgt is not None:
        tt = tuple(tgt)
        return lambda x, *_: x.expand(torch.broadcast_shapes(x.shape, tt))
    return lambda x, s: x.expand(torch.broadcast_shapes(x.shape, tuple(_as_list(s))))


@register("Tile")
def tile(spec: NodeSpec) -> Kernel:
    reps = spec.const_list(1)
    if reps is not None:
        rt = tuple(reps)
        return lambda x, *_: x.repeat(rt)
    return lambda x, r: x.repeat(tuple(_as_list(r)))


@register("Range")
def range_(spec: NodeSpec) -> Kernel:
    def k(start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
        s, l, d = start.item(), limit.item(), delta.item()
        if start.is_floating_point():
            n = max(int(math.ceil((l - s) / d)), 0)
            return start + delta * torch.arange(n, dtype=start.dtype, device=start.device)
        n = max(-((s - l) // d), 0)
        return torch.arange(s, s + n * d, d, dtype=start.dtype, device=start.device)[:n]

    return k


@register("NonZero")
def nonzero(spec: NodeSpec) -> Kernel:
    return lambda x: torch.nonzero(x).t().contiguous()


@register("DepthToSpace")
def depth_to_space(spec: NodeSpec) -> Kernel:
    bs = int(spec.attr("blocksize"))
    mode = spec.attr("mode", "DCR")

    def k(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if mode == "CRD":
            return F.pixel_shuffle(x, bs)
        t = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        return t.reshape(b, c // (bs * bs), h * bs, w * bs)

    return k


@register("SpaceToDepth")
def space_to_depth(spec: NodeSpec) -> Kernel:
    bs = int(spec.attr("blocksize"))

    def k(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
        return t.reshape(b, c * bs * bs, h // bs, w // bs)

    return k


# ------------------------------------------------------------------------------------------- Pad


def _pad_index(n: int, pb: int, pe: int, mode: str) -> np.ndarray:
    i = np.arange(-pb, n + pe)
    if mode == "edge":
        return np.clip(i, 0, n - 1)
    if mode == "wrap":
        return np.mod(i, n)
    # reflect (no repeated edge); valid for pads < n
    period = 2 * (n - 1) if n > 1 else 1
    j = np.mod(i, period) if n > 1 else np.zeros_like(i)
    return np.where(j >= n, period - j, j)


@register("Pad")
def pad(spec: NodeSpec) -> Kernel:
    mode = spec.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise spec.refuse(f"mode={mode}")
    if spec.opset < 11:
        pads, pk = spec.ints("pads", spec.ints("paddings")), True
        cval, ck = float(spec.attr("value", 0.0)), True
        axes, ak = None, True
    else:
        pads, pk = _ints_or_runtime(spec, 1)
        cval = spec.const_scalar(2) if spec.is_const(2) else (0 if not spec.has(2) else None)
        ck = cval is not None
        axes, ak = _ints_or_runtime(spec, 3)
    cache: dict[tuple, Tensor] = {}

    def run(x: Tensor, pp: list[int], cv: Any, ax: list[int] | None) -> Tensor:
        r = x.dim()
        ax = list(range(r)) if ax is None else [_norm_axis(a, r) for a in ax]
        m = len(ax)
        begins = dict(zip(ax, pp[:m]))
        ends = dict(zip(ax, pp[m:]))
        if mode == "constant":
            first = min(ax) if ax else r
            b = [begins.get(a, 0) for a in range(first, r)]
            e = [ends.get(a, 0) for a in range(first, r)]
            if not any(b) and not any(e):
                return x
            if x.dtype == torch.bool:
                return F.pad(x.to(torch.uint8), _torch_pad(b, e), value=int(bool(cv))).to(torch.bool)
            return F.pad(x, _torch_pad(b, e), value=cv)
        for a in ax:
            pb, pe = begins[a], ends[a]
            if pb == 0 and pe == 0:
                continue
            key = (x.shape[a], pb, pe, x.device)
            ind = cache.get(key)
            if ind is None:
                ind = cache[key] = torch.as_tensor(_pad_index(x.shape[a], pb, pe, mode), device=x.device)
            x = x.index_select(a, ind)
        return x

    def k(x: Tensor, p: Tensor | None = None, c: Tensor | None = None, a: Tensor | None = None) -> Tensor:
        return run(
            x,
            pads if pk else _as_list(p),
            cval if ck else _scalar(c),
            axes if ak else _as_list(a),
        )

    return k


# ---------------------------------------------------------------------------------------- Resize

_COORD_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn",
                "half_pixel_symmetric")


def _original_coords(mode: str, out_len: int, in_len: int, scale: np.float32) -> np.ndarray:
    """Source coordinate of each output index, in float32 as onnxruntime computes it."""
    f = np.float32
    x = np.arange(out_len, dtype=f)
    half = f(0.5)
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return np.zeros_like(x) if out_len == 1 else x * f(in_len - 1) / f(out_len - 1)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    # half_pixel_symmetric
    adjustment = f(out_len) / (scale * f(in_len))
    center = f(in_len) / f(2)
    offset = center * (f(1) - adjustment)
    return offset + (x + half) / scale - half


def _nearest(xo: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        r = np.floor(xo)
    elif mode == "ceil":
        r = np.ceil(xo)
    elif mode == "round_prefer_ceil":
        r = np.floor(xo + np.float32(0.5))
    else:  # round_prefer_floor
        r = np.ceil(xo - np.float32(0.5))
    return r.astype(np.int64)


def _resized_len(L: int, j: int, scales: list | None, sizes: list[int] | None) -> int:
    return sizes[j] if sizes is not None else int(np.floor(np.float32(L) * np.float32(scales[j])))


@register("Resize")
def resize(spec: NodeSpec) -> Kernel:
    if spec.opset < 11:
        return _legacy_resample(spec, 1)
    mode = spec.attr("mode", "nearest")
    coord = spec.attr("coordinate_transformation_mode", "half_pixel")
    nmode = spec.attr("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise spec.refuse(f"mode={mode}")
    if coord not in _COORD_MODES:
        raise spec.refuse(f"coordinate_transformation_mode={coord}")
    if nmode not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        raise spec.refuse(f"nearest_mode={nmode}")
    if int(spec.attr("antialias", 0)):
        raise spec.refuse("antialias=1")
    policy = spec.attr("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        raise spec.refuse(f"keep_aspect_ratio_policy={policy}")
    axes_attr = spec.ints("axes")
    if spec.is_const(1):
        spec.const(1)  # roi only matters for tf_crop_and_resize, which is refused
    sc = spec.const(2) if spec.is_const(2) else None
    sz = spec.const(3) if spec.is_const(3) else None
    scales_c = None if sc is None or sc.size == 0 else [np.float32(v) for v in sc.reshape(-1)]
    sizes_c = None if sz is None or sz.size == 0 else [int(v) for v in sz.reshape(-1)]
    resample = _resampler(mode, coord, nmode, axes_attr)

    def k(x: Tensor, roi: Any = None, scales: Tensor | None = None, sizes: Tensor | None = None) -> Tensor:
        sl = scales_c
        zl = sizes_c
        if sl is None and zl is None:
            if sizes is not None and sizes.numel() > 0:
                zl = _as_list(sizes)
            elif scales is not None and scales.numel() > 0:
                sl = [np.float32(v) for v in scales.reshape(-1).tolist()]
            else:
                raise ModelError(f"Resize node {spec.name!r} has neither scales nor sizes")
        return resample(x, sl, zl)

    return k


def _resampler(mode: str, coord: str, nmode: str, axes_attr: list[int] | None) -> Callable[..., Tensor]:
    """Resize's index plan per input shape (cached), shared with the older Upsample."""
    cache: dict[tuple, list] = {}

    def plan(shape: tuple[int, ...], scales: list | None, sizes: list[int] | None, ref: Tensor) -> list:
        key = (shape, None if scales is None else tuple(float(s) for s in scales),
               None if sizes is None else tuple(sizes), ref.device, ref.dtype)
        p = cache.get(key)
        if p is not None:
            return p
        r = len(shape)
        axes = [_norm_axis(a, r) for a in axes_attr] if axes_attr else list(range(r))
        steps = []
        if all(_resized_len(shape[a], j, scales, sizes) == shape[a] for j, a in enumerate(axes)):
            cache[key] = steps  # onnxruntime copies the input when no size changes, whatever the scales
            return steps
        for j, a in enumerate(axes):
            L = shape[a]
            out = _resized_len(L, j, scales, sizes)
            s = np.float32(out) / np.float32(L) if sizes is not None else np.float32(scales[j])
            if out == L and s == 1.0:
                continue
            xo = _original_coords(coord, out, L, s)
            view = (-1,) + (1,) * (r - 1 - a)
            if mode == "nearest":
                idx = np.clip(_nearest(xo, nmode), 0, L - 1)
                steps.append((a, torch.as_tensor(idx, device=ref.device), None, None, None))
            else:
                xc = np.clip(xo, np.float32(0), np.float32(L - 1))
                i1 = np.minimum(xc.astype(np.int64), L - 1)
                i2 = np.minimum(i1 + 1, L - 1)
                w2 = (xc - i1.astype(np.float32)).astype(np.float64)
                w2 = np.where(i1 == i2, 0.5, w2)
                w1 = np.where(i1 == i2, 0.5, 1.0 - w2)
                steps.append((
                    a,
                    torch.as_tensor(i1, device=ref.device),
                    torch.as_tensor(i2, device=ref.device),
                    torch.as_tensor(w1, dtype=ref.dtype, device=ref.device).reshape(view),
                    torch.as_tensor(w2, dtype=ref.dtype, device=ref.device).reshape(view),
                ))
        cache[key] = steps
        return steps

    def resample(x: Tensor, scales: list | None, sizes: list[int] | None) -> Tensor:
        for a, i1, i2, w1, w2 in plan(tuple(x.shape), scales, sizes, x):
            if w1 is None:
                x = x.index_select(a, i1)
            else:
                x = x.index_select(a, i1) * w1 + x.index_select(a, i2) * w2
        return x

    return resample


def _legacy_resample(spec: NodeSpec, scales_input: int | None) -> Kernel:
    """Upsample (opsets 7-9) and Resize at opset 10: asymmetric coordinates, upsampling only.

    onnxruntime rounds nearest sources down when every scale is at least 1 (the only case Upsample allows);
    its rounding for downsampling differs and is not reproduced, so scales below 1 are refused when met.
    """
    mode = spec.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise spec.refuse(f"mode={mode}")
    attr_scales = spec.attr("scales")
    resample = _resampler(mode, "asymmetric", "floor", None)

    def checked(values: Sequence[float]) -> list:
        sl = [np.float32(v) for v in values]
        if any(v < 1 for v in sl):
            raise spec.refuse("scales<1", "the opset-10 downsampling rounding is not reproduced")
        return sl

    if scales_input is None:
        fixed = checked(attr_scales or [])
        return lambda x: resample(x, fixed, None)
    const = spec.const(scales_input) if spec.is_const(scales_input) else None
    if const is not None:
        fixed = checked(const.reshape(-1).tolist())
        return lambda x, *_: resample(x, fixed, None)
    return lambda x, scales: resample(x, checked(scales.reshape(-1).tolist()), None)


@register("Upsample")
def upsample(spec: NodeSpec) -> Kernel:
    return _legacy_resample(spec, None if spec.opset < 9 else 1)


# ------------------------------------------------------------------------- selection and scatter


@register("TopK")
def topk(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", -1))
    largest = bool(int(spec.attr("largest", 1)))
    if not int(spec.attr("sorted", 1)):
        raise spec.refuse("sorted=0", "onnxruntime leaves the order of the k values unspecified")
    k_attr = spec.attr("k") if spec.opset < 10 else None
    k_const = None if k_attr is not None else spec.const_scalar(1) if spec.is_const(1) else None

    def k(x: Tensor, kk: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a = _norm_axis(axis, x.dim())
        n = int(k_attr if k_attr is not None else k_const if k_const is not None else _scalar(kk.reshape(-1)[0]))
        if not 0 <= n <= x.shape[a]:
            raise ModelError(f"TopK node {spec.name!r}: k={n} is outside 0..{x.shape[a]} on axis {a}")
        if x.is_floating_point() and bool(torch.isnan(x).any()):
            raise ModelError(f"TopK node {spec.name!r} gets NaN values, whose order onnxruntime leaves to its sorting "
                             "routine; onnxfair cannot match it (check the inputs that lead to NaN)")
        # a stable sort puts equal values in index order, as onnxruntime does
        idx = torch.sort(x.detach(), dim=a, descending=largest, stable=True).indices.narrow(a, 0, n)
        return torch.gather(x, a, idx), idx

    return k


@register("Trilu")
def trilu(spec: NodeSpec) -> Kernel:
    upper = bool(int(spec.attr("upper", 1)))
    k_const = spec.const_scalar(1) if spec.is_const(1) else 0 if not spec.has(1) else None

    def k(x: Tensor, kk: Tensor | None = None) -> Tensor:
        d = int(k_const if k_const is not None else _scalar(kk.reshape(-1)[0]))
        rows, cols = x.shape[-2], x.shape[-1]
        i = torch.arange(rows, device=x.device).unsqueeze(1)
        j = torch.arange(cols, device=x.device).unsqueeze(0)
        keep = (j - i >= d) if upper else (j - i <= d)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    return k


def _scatter_reduction(spec: NodeSpec) -> str:
    red = spec.attr("reduction", "none")
    if red not in ("none", "add", "mul", "max", "min"):
        raise spec.refuse(f"reduction={red}")
    return red


_INDEX_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterElements", "Scatter")
def scatter_elements(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))
    red = _scatter_reduction(spec)

    def k(x: Tensor, ind: Tensor, upd: Tensor) -> Tensor:
        a = _norm_axis(axis, x.dim())
        ind = torch.where(ind < 0, ind + x.shape[a], ind).to(torch.int64)
        if red == "none":
            return x.scatter(a, ind, upd)
        if red == "add":
            return x.scatter_add(a, ind, upd)
        return x.scatter_reduce(a, ind, upd, _INDEX_REDUCE[red], include_self=True)

    return k


@register("ScatterND")
def scatter_nd(spec: NodeSpec) -> Kernel:
    red = _scatter_reduction(spec)

    def k(x: Tensor, ind: Tensor, upd: Tensor) -> Tensor:
        depth = ind.shape[-1]
        lead = x.shape[:depth]
        ind = ind.reshape(-1, depth).to(torch.int64)
        dims = torch.tensor(lead, dtype=torch.int64, device=x.device)
        ind = torch.where(ind < 0, ind + dims, ind)
        strides = torch.tensor([math.prod(lead[i + 1:]) for i in range(depth)], dtype=torch.int64, device=x.device)
        flat_idx = (ind * strides).sum(1)
        flat = x.reshape((math.prod(lead),) + tuple(x.shape[depth:]))
        src = upd.reshape((-1,) + tuple(x.shape[depth:]))
        if red == "none":
            out = flat.index_copy(0, flat_idx, src)
        elif red == "add":
            out = flat.index_add(0, flat_idx, src)
        else:
            rows = flat_idx.reshape((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
            out = flat.scatter_reduce(0, rows, src, _INDEX_REDUCE[red], include_self=True)
        return out.reshape(x.shape)

    return k


@register("GatherND")
def gather_nd(spec: NodeSpec) -> Kernel:
    b = int(spec.attr("batch_dims", 0))

    def k(x: Tensor, ind: Tensor) -> Tensor:
        depth = ind.shape[-1]
        batch = tuple(x.shape[:b])
        nb = math.prod(batch)
        xr = x.reshape((nb,) + tuple(x.shape[b:]))
        ir = ind.reshape((nb,) + tuple(ind.shape[b:])).to(torch.int64)
        dims = torch.tensor(x.shape[b:b + depth], dtype=torch.int64, device=x.device)
        ir = torch.where(ir < 0, ir + dims, ir)
        bidx = torch.arange(nb, device=x.device).reshape((nb,) + (1,) * (ir.dim() - 2))
        out = xr[(bidx,) + tuple(ir[..., j] for j in range(depth))]
        return out.reshape(batch + tuple(ind.shape[b:-1]) + tuple(x.shape[b + depth:]))

    return k


@register("OneHot")
def one_hot(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", -1))

    def k(ind: Tensor, depth: Tensor, values: Tensor) -> Tensor:
        d = int(_scalar(depth.reshape(-1)[0]))
        a = _norm_axis(axis, ind.dim() + 1)
        i = ind.to(torch.int64)
        i = torch.where(i < 0, i + d, i).unsqueeze(a)
        classes = torch.arange(d, device=ind.device).reshape((-1,) + (1,) * (ind.dim() - a))
        hot = i == classes
        if ind.is_floating_point():  # onnxruntime makes no position hot for a fractional index
            hot = hot & (ind == ind.trunc()).unsqueeze(a)
        vals = values.reshape(-1)
        return torch.where(hot, vals[1], vals[0])

    return k


@register("EyeLike")
def eye_like(spec: NodeSpec) -> Kernel:
    d = int(spec.attr("k", 0))
    dt = spec.attr("dtype")
    dtype = torch_dtype(int(dt)) if dt is not None else None

    def k(x: Tensor) -> Tensor:
        i = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        j = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return (j - i == d).to(dtype or x.dtype)

    return k


@register("Shrink")
def shrink(spec: NodeSpec) -> Kernel:
    bias = float(spec.attr("bias", 0.0))
    lambd = float(spec.attr("lambd", 0.5))

    def k(x: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)

    return k


# ------------------------------------------------------------------------------- more normalisation


@register("LRN")
def lrn(spec: NodeSpec) -> Kernel:
    size = int(spec.attr("size"))
    alpha = float(spec.attr("alpha", 1e-4))
    beta = float(spec.attr("beta", 0.75))
    bias = float(spec.attr("bias", 1.0))
    if size % 2 == 0:
        raise spec.refuse(f"size={size}", "onnxruntime runs odd sizes only")
    half = size // 2

    def k(x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ModelError(f"LRN node {spec.name!r} has a {x.dim()}-D input; onnxruntime runs LRN on 4-D inputs only")
        sq = (x * x).movedim(1, -1)
        window = F.pad(sq, (half, half)).unfold(-1, size, 1).sum(-1).movedim(-1, 1)
        return x / (bias + (alpha / size) * window) ** beta

    return k


@register("GroupNormalization")
def group_norm(spec: NodeSpec) -> Kernel:
    groups = int(spec.attr("num_groups"))
    eps = float(spec.attr("epsilon", 1e-5))
    stash = int(spec.attr("stash_type", 1))
    if stash != 1:
        raise spec.refuse(f"stash_type={stash}")
    per_group = spec.opset < 21  # opset 18 scales each group, opset 21 each channel

    def k(x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        c = x.shape[1]
        if per_group:
            scale = scale.repeat_interleave(c // groups)
            bias = bias.repeat_interleave(c // groups)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.group_norm(xf, groups, None, None, eps).to(x.dtype) * scale.reshape(
            (1, c) + (1,) * (x.dim() - 2)) + bias.reshape((1, c) + (1,) * (x.dim() - 2))

    return k


@register("LpNormalization")
def lp_normalization(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", -1))
    p = int(spec.attr("p", 2))
    if p not in (1, 2):
        raise spec.refuse(f"p={p}")

    def k(x: Tensor) -> Tensor:
        norm = (x.abs() if p == 1 else x * x).sum(axis, keepdim=True)
        zero = norm == 0  # onnxruntime gives a zero vector 0, not NaN; the gradient stays finite too
        norm = torch.where(zero, torch.ones_like(norm), norm)
        return torch.where(zero, torch.zeros_like(x), x / (norm if p == 1 else torch.sqrt(norm)))

    return k


@register("MeanVarianceNormalization")
def mean_variance_normalization(spec: NodeSpec) -> Kernel:
    axes = tuple(spec.ints("axes", [0, 2, 3]))

    def k(x: Tensor) -> Tensor:
        mean = x.mean(axes, keepdim=True)
        var = ((x * x).mean(axes, keepdim=True) - mean * mean).clamp_min(0)
        flat = var == 0  # a constant (or pruned) channel: sqrt's gradient at 0 is infinite, so it is kept out
        std = torch.where(flat, torch.zeros_like(var), torch.sqrt(torch.where(flat, torch.ones_like(var), var)))
        return (x - mean) / (std + 1e-9)

    return k


# ------------------------------------------------------------------------------ recurrent layers

_RNN_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"sigmoid": torch.sigmoid, "tanh": torch.tanh,
                                                           "relu": torch.relu}
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_RNN_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}
# torch's gate order in ONNX's terms: LSTM i,f,g,o for ONNX i,o,f,c; GRU r,z,n for z,r,h
_TORCH_GATE_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}


def _check_recurrent_shapes(spec: NodeSpec, x: Tensor, dirs: int, gates: int, hidden: int,
                            operands: dict[str, Tensor | None]) -> None:
    """The shapes onnxruntime requires of W, R, B, the initial states and the peepholes: torch's fused
    kernels read out of bounds (or crash the process) on a mismatch instead of failing."""
    steps, batch, size = x.shape
    want = {"W": (dirs, gates * hidden, size), "R": (dirs, gates * hidden, hidden), "B": (dirs, 2 * gates * hidden),
            "initial_h": (dirs, batch, hidden), "initial_c": (dirs, batch, hidden), "P": (dirs, 3 * hidden)}
    for name, t in operands.items():
        if t is not None and tuple(t.shape) != want[name]:
            raise RuntimeError(f"{spec.op_type} node {spec.name!r}: input {name} has shape {list(t.shape)}, not "
                               f"{list(want[name])} (hidden_size {hidden}, batch {batch})")


@register("LSTM", "GRU", "RNN")
def recurrent(spec: NodeSpec) -> Kernel:
    """ONNX LSTM, GRU and RNN. With the default activations and no peepholes, clip or `sequence_lens`, torch's
    fused kernels compute them (forward and bidirectional; torch's GRU is ONNX's linear_before_reset=1);
    otherwise they are stepped in time order, rows past their length keeping their state and giving zeros,
    as onnxruntime does."""
    kind = spec.op_type
    gates = _RNN_GATES[kind]
    H = int(spec.attr("hidden_size"))
    direction = spec.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise spec.refuse(f"direction={direction}")
    dirs = 2 if direction == "bidirectional" else 1
    if int(spec.attr("layout", 0)):
        raise spec.refuse("layout=1", "onnxruntime runs time-major recurrent layers only")
    if int(spec.attr("input_forget", 0)):
        raise spec.refuse("input_forget=1")
    default = _RNN_DEFAULT_ACTIVATIONS[kind]
    given = spec.attr("activations") or []
    names = [n.lower() for n in given] or default * dirs  # onnxruntime reads them in any case
    if len(names) != len(default) * dirs:
        raise spec.refuse("activations", f"needs {len(default) * dirs} names, has {len(names)}")
    unknown = sorted({n for n in given if n.lower() not in _RNN_ACTIVATIONS})
    if unknown:
        raise spec.refuse(f"activations={','.join(unknown)}")
    acts = [[_RNN_ACTIVATIONS[n] for n in names[d * len(default):(d + 1) * len(default)]] for d in range(dirs)]
    lbr = bool(int(spec.attr("linear_before_reset", 0)))
    clip = spec.attr("clip")
    bound = None if clip is None else float(clip)
    one_rnn_activation = kind == "RNN" and len(set(names)) == 1 and names[0] in ("tanh", "relu")
    fused = (direction != "reverse" and bound is None and (kind != "GRU" or lbr)
             and (names == default * dirs or one_rnn_activation))

    def pre(v: Tensor) -> Tensor:
        return v if bound is None else v.clamp(-bound, bound)

    def cell(d: int, xw: Tensor, h: Tensor, c: Tensor | None, r: Tensor, rb: Tensor | None,
             p: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One step of direction d from the input's product `xw`: the new hidden (and LSTM cell) state."""
        f = acts[d]
        if kind == "RNN":
            v = xw + h @ r.t() + (0 if rb is None else rb)
            return f[0](pre(v)), None
        if kind == "GRU":
            zr = xw[:, :2 * H] + h @ r[:2 * H].t() + (0 if rb is None else rb[:2 * H])
            z, rr = f[0](pre(zr[:, :H])), f[0](pre(zr[:, H:]))
            rbh = 0 if rb is None else rb[2 * H:]
            if lbr:
                hh = xw[:, 2 * H:] + rr * (h @ r[2 * H:].t() + rbh)
            else:
                hh = xw[:, 2 * H:] + (rr * h) @ r[2 * H:].t() + rbh
            return (1 - z) * f[1](pre(hh)) + z * h, None
        v = xw + h @ r.t() + (0 if rb is None else rb)
        vi, vo, vf, vc = v[:, :H], v[:, H:2 * H], v[:, 2 * H:3 * H], v[:, 3 * H:]
        if p is not None:
            vi, vf = vi + p[:H] * c, vf + p[2 * H:] * c
        i, fg, cc = f[0](pre(vi)), f[0](pre(vf)), f[1](pre(vc))
        c_new = fg * c + i * cc
        if p is not None:
            vo = vo + p[H:2 * H] * c_new
        return f[0](pre(vo)) * f[2](c_new), c_new

    def native(x: Tensor, w: Tensor, r: Tensor, b: Tensor | None, h0: Tensor | None, c0: Tensor | None) -> tuple:
        idx = torch.cat([torch.arange(g * H, (g + 1) * H, device=x.device) for g in _TORCH_GATE_ORDER[kind]])
        params = []
        for d in range(dirs):
            params += [w[d].index_select(0, idx), r[d].index_select(0, idx)]
            if b is not None:
                params += [b[d, :gates * H].index_select(0, idx), b[d, gates * H:].index_select(0, idx)]
        h = h0 if h0 is not None else x.new_zeros(dirs, x.shape[1], H)
        args = (params, b is not None, 1, 0.0, False, dirs == 2, False)
        if kind == "LSTM":
            c = c0 if c0 is not None else x.new_zeros(dirs, x.shape[1], H)
            y, y_h, y_c = torch.lstm(x, [h, c], *args)
        else:
            run = torch.gru if kind == "GRU" else torch.rnn_relu if names[0] == "relu" else torch.rnn_tanh
            (y, y_h), y_c = run(x, h, *args), None
        y = y.reshape(x.shape[0], x.shape[1], dirs, H).permute(0, 2, 1, 3)
        return (y, y_h, y_c) if kind == "LSTM" else (y, y_h)

    def stepped(x: Tensor, w: Tensor, r: Tensor, b: Tensor | None, lens: Tensor | None, h0: Tensor | None,
                c0: Tensor | None, p: Tensor | None) -> tuple:
        steps, batch = x.shape[0], x.shape[1]
        ys, hs, cs = [], [], []
        for d in range(dirs):
            xw = x @ w[d].t() + (0 if b is None else b[d, :gates * H])
            rb = None if b is None else b[d, gates * H:]
            h = h0[d] if h0 is not None else x.new_zeros(batch, H)
            c = (c0[d] if c0 is not None else x.new_zeros(batch, H)) if kind == "LSTM" else None
            out: list[Tensor | None] = [None] * steps
            backward = direction == "reverse" or d == 1
            for t in (range(steps - 1, -1, -1) if backward else range(steps)):
                h_new, c_new = cell(d, xw[t], h, c, r[d], rb, None if p is None else p[d])
                if lens is None:
                    h, c = h_new, c_new
                    out[t] = h
                    continue
                live = t < lens
                h = torch.where(live, h_new, h)
                c = None if c is None else torch.where(live, c_new, c)
                out[t] = torch.where(live, h_new, torch.zeros_like(h_new))
            ys.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        y, y_h = torch.stack(ys, 1), torch.stack(hs)  # [T, D, B, H], [D, B, H]
        return (y, y_h, torch.stack(cs)) if kind == "LSTM" else (y, y_h)

    def k(x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None, seq: Tensor | None = None,
          h0: Tensor | None = None, c0: Tensor | None = None, p: Tensor | None = None) -> Any:
        _check_recurrent_shapes(spec, x, dirs, gates, H, {"W": w, "R": r, "B": b, "initial_h": h0,
                                                          "initial_c": c0, "P": p})
        if fused and seq is None and p is None:
            outs = native(x, w, r, b, h0, c0)
        else:
            lens = None if seq is None else seq.to(device=x.device, dtype=torch.int64).reshape(-1, 1)
            outs = stepped(x, w, r, b, lens, h0, c0, p)
        return outs[0] if spec.n_outputs == 1 else outs

    return k


# ------------------------------------------------------------------------------------ control flow


def _branch_module(spec: NodeSpec, graph: onnx.GraphProto, refs: list[str]) -> Any:
    """An If branch as its own interpreted module, its inputs the outer values it reads."""
    from onnxfair.errors import UnsupportedError
    from onnxfair.interpret.compile import build_plan
    from onnxfair.interpret.module import OnnxModule

    g = onnx.GraphProto()
    g.CopyFrom(graph)
    del g.input[:]
    g.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in refs)  # types are not read
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=10)
    try:
        return OnnxModule(model)  # one plan per branch: nested Ifs are not rebuilt at every level
    except UnsupportedError:  # named in the parent's refusal, as the main graph's own ops are
        raise spec.refuse(f"branch with {', '.join(sorted(build_plan(model).refusals))}") from None


@register("If")
def if_(spec: NodeSpec) -> Kernel:
    """Runs the branch the condition picks, each branch interpreted as its own graph over the outer values
    it reads (which the plan passes after the condition), so gradients flow through whichever ran."""
    from onnxfair.interpret.compile import outer_references

    captured = spec.inputs[1:]
    branches = []
    for key in ("then_branch", "else_branch"):
        graph = spec.attrs.get(key)
        if graph is None or len(graph.output) < spec.n_outputs:
            raise ModelError(f"If node {spec.name!r}: its {key} gives {0 if graph is None else len(graph.output)} "
                             f"outputs for the node's {spec.n_outputs}; the graph is malformed, re-export the model")
        refs = outer_references(graph)
        branches.append((_branch_module(spec, graph, refs), [captured.index(n) for n in refs]))

    def k(cond: Tensor, *outer: Tensor) -> Any:
        mod, picks = branches[0] if bool(cond.reshape(-1)[0]) else branches[1]
        return mod(*[outer[i] for i in picks])

    k.submodules = [mod for mod, _ in branches]  # registered by the parent, so .to() and .double() reach them
    return k
