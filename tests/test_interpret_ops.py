"""Per-op parity of the interpreter with onnxruntime, over attribute variants and opset versions.

Each case is a one- or few-node graph built with onnx.helper; onnxruntime (CPU) is the oracle. Float
outputs must agree to 1e-5 of the largest reference magnitude, integer and boolean outputs exactly, and
output dtypes must match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxfair.errors import UnsupportedError
from onnxfair.interpret import OnnxModule, unsupported_ops

ort = pytest.importorskip("onnxruntime")

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


@dataclass
class Case:
    nodes: list
    inputs: dict[str, np.ndarray]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=lambda: {"y": TP.FLOAT})
    opset: int = 17


def N(op: str, ins: list[str], outs: list[str] | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs or ["y"], **attrs)


def build(case: Case) -> onnx.ModelProto:
    ins = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for k, v in case.inputs.items()
    ]
    outs = [helper.make_tensor_value_info(k, t, None) for k, t in case.outputs.items()]
    inits = [numpy_helper.from_array(v, k) for k, v in case.inits.items()]
    graph = helper.make_graph(case.nodes, "case", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=10)


def assert_parity(case: Case, tol: float = 1e-5) -> None:
    model = build(case)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    refs = sess.run(None, case.inputs)
    mod = OnnxModule(model)
    with torch.no_grad():
        out = mod(**{k: torch.from_numpy(v.copy()) for k, v in case.inputs.items()})
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(refs)
    for got, ref in zip(outs, refs):
        g = got.detach().numpy()
        assert g.dtype == ref.dtype, (g.dtype, ref.dtype)
        assert g.shape == ref.shape, (g.shape, ref.shape)
        if ref.dtype.kind == "f":
            scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-6)
            err = float(np.abs(g.astype(np.float64) - ref).max()) if ref.size else 0.0
            assert err <= tol * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"
        else:
            np.testing.assert_array_equal(g, ref)


def r(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def pos(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.random(shape) + 0.1).astype(np.float32)


def i64(v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def f32(v) -> np.ndarray:
    return np.array(v, dtype=np.float32)


CASES: list[tuple[str, Callable[[np.random.Generator], Case]]] = []


def case(name: str):
    def deco(fn):
        CASES.append((name, fn))
        return fn

    return deco


# ----------------------------------------------------------------------------------- elementwise

for _op in ["Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "Floor", "Ceil", "Reciprocal", "Sign",
            "Sin", "Cos", "Softsign", "Softplus", "Identity", "Atan"]:
    case(f"unary-{_op}")(lambda rng, op=_op: Case([N(op, ["x"])], {"x": r(rng, 2, 3, 4)}))
for _op in ["Sqrt", "Log"]:
    case(f"unary-{_op}")(lambda rng, op=_op: Case([N(op, ["x"])], {"x": pos(rng, 2, 3, 4)}))
for _op in ["Tan", "Sinh", "Cosh", "Asinh"]:
    case(f"unary-{_op}")(lambda rng, op=_op: Case([N(op, ["x"])], {"x": r(rng, 2, 5)}, opset=9 if op != "Tan" else 7))
for _op in ["Asin", "Acos", "Atanh"]:
    case(f"unary-{_op}")(lambda rng, op=_op: Case([N(op, ["x"])], {"x": (rng.random((2, 5)) * 1.8 - 0.9).astype(np.float32)}, opset=9))
case("unary-Acosh")(lambda rng: Case([N("Acosh", ["x"])], {"x": pos(rng, 2, 5) + 1.0}, opset=9))
_SPECIAL = np.array([1.0, np.nan, np.inf, -np.inf, -2.0], np.float32)
case("IsNaN")(lambda rng: Case([N("IsNaN", ["x"])], {"x": _SPECIAL}, outputs={"y": TP.BOOL}, opset=13))
for _p, _n in [(1, 1), (0, 1), (1, 0)]:
    case(f"IsInf-pos{_p}-neg{_n}")(lambda rng, p=_p, n=_n: Case(
        [N("IsInf", ["x"], detect_positive=p, detect_negative=n)], {"x": _SPECIAL}, outputs={"y": TP.BOOL}, opset=10))
case("Round-half-even")(lambda rng: Case([N("Round", ["x"])], {"x": f32([0.5, 1.5, 2.5, -0.5, -1.5, 1.2, -2.7])}))
case("Mish")(lambda rng: Case([N("Mish", ["x"])], {"x": r(rng, 3, 5)}, opset=18))
case("HardSwish")(lambda rng: Case([N("HardSwish", ["x"])], {"x": r(rng, 3, 5, scale=4)}, opset=14))
case("Not")(lambda rng: Case([N("Not", ["x"])], {"x": rng.random((3, 4)) < 0.5}, outputs={"y": TP.BOOL}))
case("LeakyRelu")(lambda rng: Case([N("LeakyRelu", ["x"], alpha=0.1)], {"x": r(rng, 2, 5)}))
case("Elu")(lambda rng: Case([N("Elu", ["x"], alpha=0.5)], {"x": r(rng, 2, 5)}))
case("Selu")(lambda rng: Case([N("Selu", ["x"])], {"x": r(rng, 2, 5)}))
case("Celu")(lambda rng: Case([N("Celu", ["x"], alpha=2.0)], {"x": r(rng, 2, 5)}, opset=13))
case("ThresholdedRelu")(lambda rng: Case([N("ThresholdedRelu", ["x"], alpha=0.3)], {"x": r(rng, 2, 5)}))
case("HardSigmoid-default")(lambda rng: Case([N("HardSigmoid", ["x"])], {"x": r(rng, 2, 5, scale=4)}))
case("HardSigmoid-torch")(lambda rng: Case([N("HardSigmoid", ["x"], alpha=1 / 6, beta=0.5)], {"x": r(rng, 2, 5, scale=4)}))
case("HardSigmoid-custom")(lambda rng: Case([N("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], {"x": r(rng, 2, 5, scale=4)}))
for _a in ["none", "tanh"]:
    case(f"Gelu-{_a}")(lambda rng, a=_a: Case([N("Gelu", ["x"], approximate=a)], {"x": r(rng, 2, 7)}, opset=20))
for _s in [(3, 1, 1), (1,), (5,), (3, 4, 5)]:
    case(f"PRelu-{_s}")(lambda rng, s=_s: Case([N("PRelu", ["x", "s"])], {"x": r(rng, 2, 3, 4, 5)}, {"s": r(rng, *s)}))
case("PRelu-2d")(lambda rng: Case([N("PRelu", ["x", "s"])], {"x": r(rng, 4, 3)}, {"s": r(rng, 3)}))

case("Clip-attrs-opset10")(lambda rng: Case([N("Clip", ["x"], min=-0.5, max=0.7)], {"x": r(rng, 3, 4)}, opset=10))
case("Clip-both")(lambda rng: Case([N("Clip", ["x", "lo", "hi"])], {"x": r(rng, 3, 4)}, {"lo": f32(-0.5), "hi": f32(0.7)}, opset=11))
case("Clip-relu6")(lambda rng: Case([N("Clip", ["x", "lo", "hi"])], {"x": r(rng, 3, 4, scale=8)}, {"lo": f32(0), "hi": f32(6)}, opset=13))
case("Clip-min-only")(lambda rng: Case([N("Clip", ["x", "lo"])], {"x": r(rng, 3, 4)}, {"lo": f32(0.1)}, opset=13))
case("Clip-max-only")(lambda rng: Case([N("Clip", ["x", "", "hi"])], {"x": r(rng, 3, 4)}, {"hi": f32(0.1)}, opset=13))
case("Clip-none")(lambda rng: Case([N("Clip", ["x"])], {"x": r(rng, 3, 4)}, opset=13))
case("Clip-runtime-bounds")(lambda rng: Case([N("Clip", ["x", "lo", "hi"])], {"x": r(rng, 3, 4), "lo": f32(-0.2), "hi": f32(0.3)}, opset=13))
case("Clip-int")(lambda rng: Case([N("Clip", ["x", "lo", "hi"])], {"x": i64([[-5, 0, 3, 9]])}, {"lo": i64(-2), "hi": i64(4)}, outputs={"y": TP.INT64}, opset=13))

for _op in ["Add", "Sub", "Mul", "Div"]:
    case(f"{_op}-bcast-last")(lambda rng, op=_op: Case([N(op, ["a", "b"])], {"a": r(rng, 2, 3, 4), "b": pos(rng, 4)}))
    case(f"{_op}-bcast-both")(lambda rng, op=_op: Case([N(op, ["a", "b"])], {"a": r(rng, 2, 1, 4), "b": pos(rng, 3, 1)}))
case("Div-int-trunc")(lambda rng: Case([N("Div", ["a", "b"])], {"a": i64([7, -7, 7, -7, 0, 9]), "b": i64([2, 2, -2, -2, 3, 4])}, outputs={"y": TP.INT64}))
case("Div-int32")(lambda rng: Case([N("Div", ["a", "b"])], {"a": np.array([7, -7, 5], np.int32), "b": np.array([3, 3, -2], np.int32)}, outputs={"y": TP.INT32}))
case("Pow-const-2")(lambda rng: Case([N("Pow", ["a", "e"])], {"a": r(rng, 3, 4)}, {"e": f32(2.0)}))
case("Pow-const-half")(lambda rng: Case([N("Pow", ["a", "e"])], {"a": pos(rng, 3, 4)}, {"e": f32(0.5)}))
case("Pow-tensor")(lambda rng: Case([N("Pow", ["a", "e"])], {"a": pos(rng, 3, 4), "e": r(rng, 4)}))
case("Pow-int-exponent")(lambda rng: Case([N("Pow", ["a", "e"])], {"a": r(rng, 3, 4)}, {"e": i64(3)}, opset=15))
case("Mod-int")(lambda rng: Case([N("Mod", ["a", "b"])], {"a": i64([7, -7, 7, -7]), "b": i64([3, 3, -3, -3])}, outputs={"y": TP.INT64}))
case("Mod-fmod")(lambda rng: Case([N("Mod", ["a", "b"], fmod=1)], {"a": r(rng, 6, scale=5), "b": pos(rng, 6)}))
for _op, _t in [("Equal", TP.BOOL), ("Less", TP.BOOL), ("Greater", TP.BOOL), ("LessOrEqual", TP.BOOL), ("GreaterOrEqual", TP.BOOL)]:
    case(f"{_op}")(lambda rng, op=_op: Case([N(op, ["a", "b"])], {"a": i64([[1, 2, 3], [3, 2, 1]]), "b": i64([2, 2, 2])}, outputs={"y": TP.BOOL}))
for _op in ["And", "Or", "Xor"]:
    case(f"{_op}")(lambda rng, op=_op: Case([N(op, ["a", "b"])], {"a": rng.random((3, 4)) < 0.5, "b": rng.random((4,)) < 0.5}, outputs={"y": TP.BOOL}))
for _op in ["Max", "Min", "Sum", "Mean"]:
    case(f"{_op}-variadic")(lambda rng, op=_op: Case([N(op, ["a", "b", "c"])], {"a": r(rng, 2, 3, 4), "b": r(rng, 4), "c": r(rng, 3, 1)}))
case("Max-single")(lambda rng: Case([N("Max", ["a"])], {"a": r(rng, 2, 3)}))
case("Where")(lambda rng: Case([N("Where", ["c", "a", "b"])], {"c": rng.random((3, 1)) < 0.5, "a": r(rng, 3, 4), "b": r(rng, 4)}))

# ------------------------------------------------------------------------------------- linear algebra

for _sa, _sb in [((2, 3, 4), (4, 5)), ((4,), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((3, 4), (4,)), ((1, 3, 4), (2, 4, 5))]:
    case(f"MatMul-{_sa}x{_sb}")(lambda rng, sa=_sa, sb=_sb: Case([N("MatMul", ["a", "b"])], {"a": r(rng, *sa)}, {"b": r(rng, *sb)}))

for _ta, _tb, _alpha, _beta, _c in [
    (0, 1, 1.0, 1.0, (5,)), (0, 1, 1.0, 1.0, (1, 5)), (0, 1, 1.0, 1.0, (3, 5)), (0, 1, 1.0, 1.0, None),
    (0, 0, 1.0, 1.0, (5,)), (1, 0, 0.5, 2.0, (3, 1)), (1, 1, 1.5, 0.5, ()), (0, 1, 1.0, 0.0, (5,)),
]:
    def _gemm(rng, ta=_ta, tb=_tb, alpha=_alpha, beta=_beta, c=_c):
        a = r(rng, 4, 3) if ta else r(rng, 3, 4)
        b = r(rng, 5, 4) if tb else r(rng, 4, 5)
        inits = {"b": b}
        ins = ["a", "b"]
        if c is not None:
            inits["c"] = r(rng, *c)
            ins.append("c")
        return Case([N("Gemm", ins, transA=ta, transB=tb, alpha=alpha, beta=beta)], {"a": a}, inits, opset=13)

    case(f"Gemm-tA{_ta}-tB{_tb}-a{_alpha}-b{_beta}-C{_c}")(_gemm)

for _eq, _shapes in [("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]), ("ij->ji", [(3, 4)]), ("i,i->", [(5,), (5,)]), ("bhwc, c k -> bhwk", [(2, 3, 3, 4), (4, 6)])]:
    case(f"Einsum-{_eq}")(lambda rng, eq=_eq, sh=_shapes: Case(
        [N("Einsum", [f"x{i}" for i in range(len(sh))], equation=eq)], {f"x{i}": r(rng, *s) for i, s in enumerate(sh)}, opset=12))

# ----------------------------------------------------------------------------------------- conv


def _conv(rng, x_shape, w_shape, bias=True, opset=17, **attrs):
    ins = ["x", "w"] + (["b"] if bias else [])
    inits = {"w": r(rng, *w_shape)}
    if bias:
        inits["b"] = r(rng, w_shape[0])
    return Case([N("Conv", ins, **attrs)], {"x": r(rng, *x_shape)}, inits, opset=opset)


case("Conv-pads")(lambda rng: _conv(rng, (2, 3, 8, 8), (4, 3, 3, 3), pads=[1, 1, 1, 1]))
case("Conv-asym-pads")(lambda rng: _conv(rng, (2, 3, 8, 7), (4, 3, 3, 3), pads=[0, 1, 2, 1]))
case("Conv-stride-dilation")(lambda rng: _conv(rng, (2, 3, 9, 9), (4, 3, 3, 3), strides=[2, 2], dilations=[2, 1], pads=[1, 1, 1, 1]))
case("Conv-group2")(lambda rng: _conv(rng, (2, 4, 6, 6), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]))
case("Conv-depthwise")(lambda rng: _conv(rng, (2, 4, 6, 6), (4, 1, 3, 3), group=4, strides=[2, 2], pads=[1, 1, 1, 1]))
case("Conv-nobias-kernel-attr")(lambda rng: _conv(rng, (2, 3, 6, 6), (4, 3, 1, 1), bias=False, kernel_shape=[1, 1]))
for _ap in ["SAME_UPPER", "SAME_LOWER", "VALID"]:
    case(f"Conv-auto-{_ap}")(lambda rng, ap=_ap: _conv(rng, (1, 2, 7, 8), (3, 2, 4, 3), strides=[2, 2], auto_pad=ap))
case("Conv-1d")(lambda rng: _conv(rng, (2, 3, 10), (4, 3, 3), pads=[2, 1], strides=[2]))
case("Conv-3d")(lambda rng: _conv(rng, (1, 2, 4, 5, 5), (3, 2, 3, 3, 3), pads=[1, 1, 1, 1, 1, 1]))
case("Conv-opset11")(lambda rng: _conv(rng, (2, 3, 8, 8), (4, 3, 3, 3), pads=[1, 1, 1, 1], opset=11))


def _convt(rng, x_shape, w_shape, bias=True, **attrs):
    ins = ["x", "w"] + (["b"] if bias else [])
    group = attrs.get("group", 1)
    inits = {"w": r(rng, *w_shape)}
    if bias:
        inits["b"] = r(rng, w_shape[1] * group)
    return Case([N("ConvTranspose", ins, **attrs)], {"x": r(rng, *x_shape)}, inits)


case("ConvT-stride-pad-outpad")(lambda rng: _convt(rng, (2, 3, 5, 5), (3, 4, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]))
case("ConvT-group")(lambda rng: _convt(rng, (2, 4, 4, 4), (4, 3, 3, 3), group=2, strides=[2, 2]))
case("ConvT-asym-pads")(lambda rng: _convt(rng, (1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], pads=[0, 1, 2, 1]))
case("ConvT-dilation")(lambda rng: _convt(rng, (1, 2, 4, 4), (2, 3, 3, 3), dilations=[2, 2], bias=False))
case("ConvT-output-shape")(lambda rng: _convt(rng, (1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], output_shape=[9, 8]))
for _ap in ["SAME_UPPER", "SAME_LOWER"]:
    case(f"ConvT-auto-{_ap}")(lambda rng, ap=_ap: _convt(rng, (1, 2, 4, 5), (2, 3, 4, 3), strides=[2, 2], auto_pad=ap))
case("ConvT-1d")(lambda rng: _convt(rng, (2, 3, 6), (3, 2, 3), strides=[3], pads=[1, 0]))
case("ConvT-big-output-padding")(lambda rng: _convt(rng, (1, 2, 3, 3), (2, 2, 2, 2), strides=[3, 3], output_padding=[2, 2]))
case("ConvT-output-shape-beyond-full")(lambda rng: _convt(rng, (1, 2, 5, 5), (2, 3, 3, 3), strides=[2, 2], output_shape=[12, 12]))
case("ConvT-output-shape-beyond-full-nobias")(lambda rng: _convt(rng, (1, 2, 5, 5), (2, 3, 3, 3), bias=False, strides=[2, 2], output_shape=[12, 11]))
for _ap in ["SAME_UPPER", "SAME_LOWER"]:  # a kernel shorter than the stride: the full output, not size * stride
    case(f"ConvT-{_ap}-kernel-below-stride")(lambda rng, ap=_ap: _convt(rng, (1, 2, 5), (2, 3, 1), strides=[3], auto_pad=ap))

# -------------------------------------------------------------------------------------- pooling


def _pool(rng, op, shape, opset=17, n_out=1, **attrs):
    outs = {"y": TP.FLOAT}
    if n_out == 2:
        outs["idx"] = TP.INT64
    return Case([N(op, ["x"], list(outs), **attrs)], {"x": r(rng, *shape)}, outputs=outs, opset=opset)


case("MaxPool-k3s2p1")(lambda rng: _pool(rng, "MaxPool", (2, 3, 9, 9), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
case("MaxPool-ceil")(lambda rng: _pool(rng, "MaxPool", (2, 3, 8, 8), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1))
case("MaxPool-ceil-pad")(lambda rng: _pool(rng, "MaxPool", (1, 2, 6, 7), kernel_shape=[2, 2], strides=[4, 2], pads=[1, 1, 1, 1], ceil_mode=1))
case("MaxPool-asym")(lambda rng: _pool(rng, "MaxPool", (2, 3, 7, 7), kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 2, 1]))
case("MaxPool-asym-ceil")(lambda rng: _pool(rng, "MaxPool", (1, 2, 5, 4), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1))
case("MaxPool-dilation")(lambda rng: _pool(rng, "MaxPool", (1, 2, 9, 9), kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]))
for _ap in ["SAME_UPPER", "SAME_LOWER", "VALID"]:
    case(f"MaxPool-auto-{_ap}")(lambda rng, ap=_ap: _pool(rng, "MaxPool", (1, 2, 7, 8), kernel_shape=[3, 2], strides=[2, 2], auto_pad=ap))
case("MaxPool-1d")(lambda rng: _pool(rng, "MaxPool", (2, 3, 11), kernel_shape=[3], strides=[2], pads=[1, 1]))
case("MaxPool-indices")(lambda rng: _pool(rng, "MaxPool", (2, 3, 6, 6), n_out=2, kernel_shape=[2, 2], strides=[2, 2]))
case("MaxPool-indices-same-symmetric")(lambda rng: _pool(rng, "MaxPool", (2, 3, 5, 5), n_out=2, kernel_shape=[3, 3], auto_pad="SAME_UPPER"))
case("MaxPool-opset11")(lambda rng: _pool(rng, "MaxPool", (2, 3, 8, 8), opset=11, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
for _inc in [0, 1]:
    for _ceil in [0, 1]:
        case(f"AvgPool-sym-inc{_inc}-ceil{_ceil}")(lambda rng, inc=_inc, c=_ceil: _pool(
            rng, "AveragePool", (2, 3, 8, 9), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=inc, ceil_mode=c))
        case(f"AvgPool-asym-inc{_inc}-ceil{_ceil}")(lambda rng, inc=_inc, c=_ceil: _pool(
            rng, "AveragePool", (2, 3, 8, 9), kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0], count_include_pad=inc, ceil_mode=c))
    case(f"AvgPool-SAME_UPPER-inc{_inc}")(lambda rng, inc=_inc: _pool(
        rng, "AveragePool", (1, 2, 7, 8), kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=inc))
    case(f"AvgPool-1d-inc{_inc}")(lambda rng, inc=_inc: _pool(
        rng, "AveragePool", (2, 3, 10), kernel_shape=[3], strides=[2], pads=[1, 0], count_include_pad=inc, ceil_mode=1))
case("AvgPool-3d")(lambda rng: _pool(rng, "AveragePool", (1, 2, 5, 6, 6), kernel_shape=[2, 2, 2], strides=[2, 2, 2]))
case("AvgPool-opset19")(lambda rng: _pool(rng, "AveragePool", (2, 3, 8, 8), opset=19, kernel_shape=[2, 2], strides=[2, 2]))
case("GlobalAveragePool")(lambda rng: Case([N("GlobalAveragePool", ["x"])], {"x": r(rng, 2, 3, 5, 4)}))
case("GlobalMaxPool")(lambda rng: Case([N("GlobalMaxPool", ["x"])], {"x": r(rng, 2, 3, 5, 4)}))
case("GlobalAveragePool-1d")(lambda rng: Case([N("GlobalAveragePool", ["x"])], {"x": r(rng, 2, 3, 5)}))

# -------------------------------------------------------------------------------- normalisation


def _bn(rng, shape, opset):
    c = shape[1]
    inits = {"s": r(rng, c), "b": r(rng, c), "m": r(rng, c), "v": pos(rng, c)}
    return Case([N("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)], {"x": r(rng, *shape)}, inits, opset=opset)


for _op in [9, 14, 15]:
    case(f"BatchNorm-opset{_op}")(lambda rng, o=_op: _bn(rng, (2, 3, 4, 5), o))
case("BatchNorm-2d-input")(lambda rng: _bn(rng, (4, 3), 15))
case("InstanceNorm")(lambda rng: Case([N("InstanceNormalization", ["x", "s", "b"], epsilon=1e-4)], {"x": r(rng, 2, 3, 4, 5)}, {"s": r(rng, 3), "b": r(rng, 3)}))
case("LayerNorm-last")(lambda rng: Case([N("LayerNormalization", ["x", "s", "b"])], {"x": r(rng, 2, 3, 8)}, {"s": r(rng, 8), "b": r(rng, 8)}))
case("LayerNorm-axis1")(lambda rng: Case([N("LayerNormalization", ["x", "s", "b"], axis=1, epsilon=1e-3)], {"x": r(rng, 2, 3, 4)}, {"s": r(rng, 3, 4), "b": r(rng, 3, 4)}))
case("LayerNorm-bcast-scale-nobias")(lambda rng: Case([N("LayerNormalization", ["x", "s"], axis=-2)], {"x": r(rng, 2, 3, 4)}, {"s": r(rng, 1, 4)}))
case("LayerNorm-3-outputs")(lambda rng: Case(
    [N("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=1)], {"x": r(rng, 2, 3, 4)}, {"s": r(rng, 3, 4), "b": r(rng, 3, 4)},
    outputs={"y": TP.FLOAT, "mean": TP.FLOAT, "inv": TP.FLOAT}))

for _op in ["Softmax", "LogSoftmax", "Hardmax"]:
    for _opset, _axis in [(11, 1), (11, -1), (11, 0), (13, 1), (13, -1)]:
        case(f"{_op}-opset{_opset}-axis{_axis}")(lambda rng, op=_op, o=_opset, a=_axis: Case(
            [N(op, ["x"], axis=a)], {"x": r(rng, 2, 3, 4)}, opset=o))
    case(f"{_op}-opset11-default")(lambda rng, op=_op: Case([N(op, ["x"])], {"x": r(rng, 2, 3, 4)}, opset=11))

# ----------------------------------------------------------------------------------- reductions

for _op in ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum"]:
    since = 13 if _op == "ReduceSum" else 18
    for _opset in sorted({11, since - 1 if since == 13 else 17, since, 21}):
        for _keep in [0, 1]:
            def _red(rng, op=_op, o=_opset, k=_keep, since=since):
                x = pos(rng, 2, 3, 4) if op in ("ReduceProd", "ReduceLogSum") else r(rng, 2, 3, 4)
                if o >= since:
                    return Case([N(op, ["x", "axes"], keepdims=k)], {"x": x}, {"axes": i64([0, -1])}, opset=o)
                return Case([N(op, ["x"], axes=[0, -1], keepdims=k)], {"x": x}, opset=o)

            case(f"{_op}-opset{_opset}-keep{_keep}")(_red)
    case(f"{_op}-all-axes")(lambda rng, op=_op: Case([N(op, ["x"], keepdims=1)], {"x": pos(rng, 2, 3, 4)}, opset=11))
    case(f"{_op}-no-axes-opset18")(lambda rng, op=_op: Case([N(op, ["x"], keepdims=0)], {"x": pos(rng, 2, 3, 4)}, opset=18))
case("ReduceSum-noop-empty")(lambda rng: Case([N("ReduceSum", ["x"], noop_with_empty_axes=1)], {"x": r(rng, 2, 3)}, opset=13))
case("ReduceMean-noop-empty")(lambda rng: Case([N("ReduceMean", ["x"], noop_with_empty_axes=1)], {"x": r(rng, 2, 3)}, opset=18))
for _op in ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"]:  # the elementwise part stays
    case(f"{_op}-noop-empty")(lambda rng, op=_op: Case([N(op, ["x"], noop_with_empty_axes=1)], {"x": pos(rng, 2, 3) - (op != "ReduceLogSum") * 0.6}, opset=18))
case("ReduceMean-runtime-axes")(lambda rng: Case([N("ReduceMean", ["x", "axes"], keepdims=0)], {"x": r(rng, 2, 3, 4), "axes": i64([1])}, opset=18))
for _op in ["ArgMax", "ArgMin"]:
    for _keep, _last, _axis in [(1, 0, 1), (0, 0, -1), (1, 1, 1), (0, 1, 0)]:
        case(f"{_op}-keep{_keep}-last{_last}-axis{_axis}")(lambda rng, op=_op, k=_keep, la=_last, a=_axis: Case(
            [N(op, ["x"], axis=a, keepdims=k, select_last_index=la)],
            {"x": rng.integers(0, 3, (3, 4, 5)).astype(np.float32)}, outputs={"y": TP.INT64}, opset=13))
for _ex, _rev in [(0, 0), (1, 0), (0, 1), (1, 1)]:
    case(f"CumSum-ex{_ex}-rev{_rev}")(lambda rng, ex=_ex, rv=_rev: Case(
        [N("CumSum", ["x", "axis"], exclusive=ex, reverse=rv)], {"x": r(rng, 3, 4)}, {"axis": i64(1)}, opset=14))

# ------------------------------------------------------------------------------------ shape ops

for _axis in [0, 1, 2, -1]:
    case(f"Flatten-axis{_axis}")(lambda rng, a=_axis: Case([N("Flatten", ["x"], axis=a)], {"x": r(rng, 2, 3, 4)}, opset=13))
case("Reshape-zero-minus1")(lambda rng: Case([N("Reshape", ["x", "s"])], {"x": r(rng, 2, 3, 4)}, {"s": i64([0, -1])}))
case("Reshape-static")(lambda rng: Case([N("Reshape", ["x", "s"])], {"x": r(rng, 2, 3, 4)}, {"s": i64([4, 3, 2])}))
case("Reshape-allowzero")(lambda rng: Case([N("Reshape", ["x", "s"], allowzero=1)], {"x": r(rng, 2, 3, 4)}, {"s": i64([6, -1])}, opset=14))
case("Reshape-dynamic-shape")(lambda rng: Case(
    [N("Shape", ["z"], ["s"]), N("Reshape", ["x", "s"])], {"x": r(rng, 2, 12), "z": r(rng, 2, 3, 4)}))
case("Transpose-default")(lambda rng: Case([N("Transpose", ["x"])], {"x": r(rng, 2, 3, 4)}))
case("Transpose-perm")(lambda rng: Case([N("Transpose", ["x"], perm=[0, 2, 3, 1])], {"x": r(rng, 2, 3, 4, 5)}))
case("Squeeze-attr-opset11")(lambda rng: Case([N("Squeeze", ["x"], axes=[1, -1])], {"x": r(rng, 2, 1, 3, 1)}, opset=11))
case("Squeeze-input-opset13")(lambda rng: Case([N("Squeeze", ["x", "a"])], {"x": r(rng, 2, 1, 3, 1)}, {"a": i64([-1])}, opset=13))
case("Squeeze-all")(lambda rng: Case([N("Squeeze", ["x"])], {"x": r(rng, 2, 1, 3, 1)}, opset=13))
case("Unsqueeze-attr-opset11")(lambda rng: Case([N("Unsqueeze", ["x"], axes=[0, 3])], {"x": r(rng, 2, 3)}, opset=11))
case("Unsqueeze-input-opset13")(lambda rng: Case([N("Unsqueeze", ["x", "a"])], {"x": r(rng, 2, 3)}, {"a": i64([-1, 1])}, opset=13))
case("Unsqueeze-neg-single")(lambda rng: Case([N("Unsqueeze", ["x", "a"])], {"x": r(rng, 2, 3)}, {"a": i64([-2])}, opset=13))
case("Concat")(lambda rng: Case([N("Concat", ["a", "b", "c"], axis=-1)], {"a": r(rng, 2, 3), "b": r(rng, 2, 1), "c": r(rng, 2, 4)}))


def _split(rng, opset, attrs=None, sizes=None, n=3, dim=7):
    ins = ["x"] + (["s"] if sizes is not None else [])
    outs = [f"y{i}" for i in range(n)]
    inits = {"s": i64(sizes)} if sizes is not None else {}
    return Case([N("Split", ins, outs, axis=1, **(attrs or {}))], {"x": r(rng, 2, dim)}, inits,
                outputs={o: TP.FLOAT for o in outs}, opset=opset)


case("Split-attr-opset11")(lambda rng: _split(rng, 11, {"split": [2, 3, 2]}))
case("Split-input-opset13")(lambda rng: _split(rng, 13, sizes=[1, 4, 2]))
case("Split-equal-opset13")(lambda rng: _split(rng, 13, dim=6))
case("Split-num-outputs-opset18")(lambda rng: _split(rng, 18, {"num_outputs": 3}))
case("Split-num-outputs-even")(lambda rng: _split(rng, 18, {"num_outputs": 2}, n=2, dim=8))


def _slice(rng, starts, ends, axes=None, steps=None, shape=(5, 6, 7)):
    ins = ["x", "st", "en"]
    inits = {"st": i64(starts), "en": i64(ends)}
    if axes is not None:
        ins.append("ax")
        inits["ax"] = i64(axes)
    if steps is not None:
        if axes is None:
            ins.append("")
        ins.append("sp")
        inits["sp"] = i64(steps)
    return Case([N("Slice", ins)], {"x": r(rng, *shape)}, inits, opset=13)


case("Slice-basic")(lambda rng: _slice(rng, [1, 0], [4, 3], [0, 2]))
case("Slice-negative")(lambda rng: _slice(rng, [-3], [-1], [1]))
case("Slice-clamp")(lambda rng: _slice(rng, [-100, 2], [100, INT64_MAX], [0, -1]))
case("Slice-steps")(lambda rng: _slice(rng, [0, 1], [7, 6], [2, 1], [2, 3]))
case("Slice-negative-step")(lambda rng: _slice(rng, [-1, 4], [INT64_MIN, 0], [2, 0], [-1, -2]))
case("Slice-negative-step-partial")(lambda rng: _slice(rng, [10], [-100], [1], [-3]))
case("Slice-no-axes")(lambda rng: _slice(rng, [1, 1, 1], [-1, -1, -1]))
case("Slice-empty")(lambda rng: _slice(rng, [3], [1], [0]))
case("Slice-empty-negative-step")(lambda rng: _slice(rng, [2], [5], [1], [-1]))
case("Slice-attrs-opset9")(lambda rng: Case([N("Slice", ["x"], starts=[1, -3], ends=[3, 100], axes=[0, 2])], {"x": r(rng, 4, 5, 6)}, opset=9))
case("Slice-runtime-starts")(lambda rng: Case([N("Slice", ["x", "st", "en"])], {"x": r(rng, 4, 5), "st": i64([1, 2])}, {"en": i64([3, 5])}, opset=13))

case("Gather-neg-2d")(lambda rng: Case([N("Gather", ["x", "i"], axis=0)], {"x": r(rng, 5, 3)}, {"i": i64([[0, -1], [2, -5]])}))
case("Gather-axis1-scalar")(lambda rng: Case([N("Gather", ["x", "i"], axis=1)], {"x": r(rng, 2, 5, 3)}, {"i": i64(3)}))
case("Gather-scalar-negative")(lambda rng: Case([N("Gather", ["x", "i"], axis=-1)], {"x": r(rng, 2, 5)}, {"i": i64(-2)}))
case("Gather-runtime-indices")(lambda rng: Case([N("Gather", ["x", "i"], axis=1)], {"x": r(rng, 2, 5), "i": i64([4, -1, 0])}))
case("GatherElements")(lambda rng: Case([N("GatherElements", ["x", "i"], axis=1)], {"x": r(rng, 3, 4)}, {"i": i64([[0, -1], [2, 1], [3, 3]])}))
case("Shape")(lambda rng: Case([N("Shape", ["x"])], {"x": r(rng, 2, 3, 4)}, outputs={"y": TP.INT64}, opset=13))
case("Shape-start-end")(lambda rng: Case([N("Shape", ["x"], start=1, end=-1)], {"x": r(rng, 2, 3, 4, 5)}, outputs={"y": TP.INT64}, opset=15))
case("Size")(lambda rng: Case([N("Size", ["x"])], {"x": r(rng, 2, 3, 4)}, outputs={"y": TP.INT64}))
case("Shape-Gather-Concat-Reshape")(lambda rng: Case(
    [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["n"], axis=0), N("Unsqueeze", ["n", "ax"], ["n1"]),
     N("Concat", ["n1", "minus1"], ["shape"], axis=0), N("Reshape", ["x", "shape"])],
    {"x": r(rng, 3, 4, 5)}, {"zero": i64(0), "ax": i64([0]), "minus1": i64([-1])}, opset=13))

case("Constant-value")(lambda rng: Case(
    [N("Constant", [], ["c"], value=numpy_helper.from_array(f32([1.0, 2.0, 3.0]))), N("Add", ["x", "c"])], {"x": r(rng, 2, 3)}))
case("Constant-value-float")(lambda rng: Case([N("Constant", [], ["c"], value_float=2.5), N("Mul", ["x", "c"])], {"x": r(rng, 2, 3)}))
case("Constant-value-floats")(lambda rng: Case([N("Constant", [], ["c"], value_floats=[1.0, -2.0, 0.5]), N("Mul", ["x", "c"])], {"x": r(rng, 2, 3)}))
case("Constant-value-int")(lambda rng: Case([N("Constant", [], ["c"], value_int=3), N("Add", ["x", "c"])], {"x": i64([1, 2])}, outputs={"y": TP.INT64}))
case("Constant-value-ints")(lambda rng: Case([N("Constant", [], ["c"], value_ints=[2, -1]), N("Reshape", ["x", "c"])], {"x": r(rng, 2, 3, 2)}))
case("Constant-output")(lambda rng: Case([N("Constant", [], ["c"], value_ints=[2, -1]), N("Identity", ["x"])], {"x": r(rng, 2)},
                                         outputs={"y": TP.FLOAT, "c": TP.INT64}))
case("ConstantOfShape-dynamic")(lambda rng: Case(
    [N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["y"], value=numpy_helper.from_array(i64([7])))],
    {"x": r(rng, 2, 3)}, outputs={"y": TP.INT64}))
case("ConstantOfShape-default")(lambda rng: Case([N("ConstantOfShape", ["s"], ["c"]), N("Add", ["x", "c"])], {"x": r(rng, 2, 3)}, {"s": i64([2, 3])}))
for _to, _np in [(TP.INT32, None), (TP.INT64, None), (TP.FLOAT16, None), (TP.BOOL, None), (TP.DOUBLE, None), (TP.UINT8, None)]:
    case(f"Cast-float-to-{TP.DataType.Name(_to)}")(lambda rng, to=_to: Case(
        [N("Cast", ["x"], to=to)], {"x": (np.abs(r(rng, 3, 4, scale=5)) if to == TP.UINT8 else r(rng, 3, 4, scale=5))}, outputs={"y": to}, opset=13))
case("Cast-int-to-float")(lambda rng: Case([N("Cast", ["x"], to=TP.FLOAT)], {"x": i64([1, -2, 3])}, opset=13))
case("Cast-bool-to-float")(lambda rng: Case([N("Cast", ["x"], to=TP.FLOAT)], {"x": np.array([True, False])}, opset=13))
case("CastLike")(lambda rng: Case([N("CastLike", ["x", "t"])], {"x": r(rng, 3, scale=4), "t": i64([1])}, outputs={"y": TP.INT64}, opset=15))
case("Dropout-opset11")(lambda rng: Case([N("Dropout", ["x"], ratio=0.3)], {"x": r(rng, 3, 4)}, opset=11))
for _v in [7, 10, 12]:  # onnxruntime's inference mask: float zeros, then bool False, then bool True
    case(f"Dropout-opset{_v}-mask")(lambda rng, v=_v: Case(
        [N("Dropout", ["x"], ["y", "m"])], {"x": r(rng, 3, 4)}, outputs={"y": TP.FLOAT, "m": TP.FLOAT if v < 10 else TP.BOOL}, opset=v))
case("Dropout-opset13-mask")(lambda rng: Case(
    [N("Dropout", ["x", "ratio"], ["y", "m"])], {"x": r(rng, 3, 4)}, {"ratio": f32(0.5)}, outputs={"y": TP.FLOAT, "m": TP.BOOL}, opset=13))
case("Expand")(lambda rng: Case([N("Expand", ["x", "s"])], {"x": r(rng, 3, 1)}, {"s": i64([2, 1, 6])}))
case("Expand-smaller-shape")(lambda rng: Case([N("Expand", ["x", "s"])], {"x": r(rng, 2, 3, 1)}, {"s": i64([1, 4])}))
case("Tile")(lambda rng: Case([N("Tile", ["x", "t"])], {"x": r(rng, 2, 3)}, {"t": i64([2, 3])}))
case("Range-int")(lambda rng: Case([N("Range", ["a", "b", "c"])], {"a": i64(1), "b": i64(10), "c": i64(3)}, outputs={"y": TP.INT64}))
case("Range-int-negative")(lambda rng: Case([N("Range", ["a", "b", "c"])], {"a": i64(10), "b": i64(-3), "c": i64(-4)}, outputs={"y": TP.INT64}))
case("Range-float")(lambda rng: Case([N("Range", ["a", "b", "c"])], {"a": f32(0.5), "b": f32(3.0), "c": f32(0.75)}))
case("NonZero")(lambda rng: Case([N("NonZero", ["x"])], {"x": f32([[0, 1, 0], [2, 0, 3]])}, outputs={"y": TP.INT64}, opset=13))
for _m in ["DCR", "CRD"]:
    case(f"DepthToSpace-{_m}")(lambda rng, m=_m: Case([N("DepthToSpace", ["x"], blocksize=2, mode=m)], {"x": r(rng, 2, 8, 3, 3)}, opset=13))
case("SpaceToDepth")(lambda rng: Case([N("SpaceToDepth", ["x"], blocksize=2)], {"x": r(rng, 2, 3, 4, 6)}, opset=13))


def _pad(rng, mode, pads, opset=13, value=None, axes=None, shape=(2, 3, 5, 6)):
    ins = ["x", "p"]
    inits = {"p": i64(pads)}
    if value is not None or axes is not None:
        ins.append("v" if value is not None else "")
        if value is not None:
            inits["v"] = f32(value)
    if axes is not None:
        ins.append("a")
        inits["a"] = i64(axes)
    return Case([N("Pad", ins, mode=mode)], {"x": r(rng, *shape)}, inits, opset=opset)


case("Pad-constant")(lambda rng: _pad(rng, "constant", [0, 0, 1, 2, 0, 0, 2, 1], value=0.5))
case("Pad-constant-negative")(lambda rng: _pad(rng, "constant", [0, 1, -1, 2, 0, -1, 1, -2]))
case("Pad-reflect")(lambda rng: _pad(rng, "reflect", [0, 0, 2, 3, 0, 0, 1, 4]))
case("Pad-edge")(lambda rng: _pad(rng, "edge", [0, 1, 2, 3, 0, 2, 1, 4]))
case("Pad-wrap-opset19")(lambda rng: _pad(rng, "wrap", [0, 0, 2, 3, 0, 0, 1, 4], opset=19))
case("Pad-axes-opset18")(lambda rng: _pad(rng, "constant", [1, 2, 3, 0], opset=18, value=-1.0, axes=[1, -1]))
case("Pad-reflect-axes-opset18")(lambda rng: _pad(rng, "reflect", [1, 2, 3, 1], opset=18, axes=[-2, -1]))
case("Pad-attrs-opset10")(lambda rng: Case([N("Pad", ["x"], pads=[0, 1, 2, 0, 2, 1], mode="constant", value=1.5)], {"x": r(rng, 2, 3, 4)}, opset=10))
case("Pad-edge-opset10")(lambda rng: Case([N("Pad", ["x"], pads=[0, 1, 2, 0, 2, 1], mode="edge")], {"x": r(rng, 2, 3, 4)}, opset=10))


def _resize(rng, opset=13, scales=None, sizes=None, shape=(1, 2, 4, 5), **attrs):
    ins = ["x", "", "", ""]
    inits = {}
    if scales is not None:
        ins[2] = "scales"
        inits["scales"] = f32(scales)
    if sizes is not None:
        ins[3] = "sizes"
        inits["sizes"] = i64(sizes)
    while ins[-1] == "":
        ins.pop()
    if opset < 13 and ins[1] == "":
        ins[1] = "roi"
        inits["roi"] = f32([])
        if ins[2] == "":
            ins[2] = "scales"
            inits["scales"] = f32([])
    return Case([N("Resize", ins, **attrs)], {"x": r(rng, *shape)}, inits, opset=opset)


_NEAREST = [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"), ("align_corners", "round_prefer_ceil"),
            ("tf_half_pixel_for_nn", "ceil"), ("pytorch_half_pixel", "round_prefer_floor"), ("half_pixel", "ceil")]
for _ct, _nm in _NEAREST:
    for _sc in [[1, 1, 2, 2], [1, 1, 0.5, 0.6], [1, 1, 1.5, 3]]:
        case(f"Resize-nearest-{_ct}-{_nm}-{_sc[2]}x{_sc[3]}")(lambda rng, ct=_ct, nm=_nm, sc=_sc: _resize(
            rng, scales=sc, mode="nearest", coordinate_transformation_mode=ct, nearest_mode=nm))
for _ct in ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]:
    for _sc in [[1, 1, 2, 2], [1, 1, 0.5, 0.6], [1, 1, 1.5, 1.75]]:
        case(f"Resize-linear-{_ct}-{_sc[2]}x{_sc[3]}")(lambda rng, ct=_ct, sc=_sc: _resize(
            rng, scales=sc, mode="linear", coordinate_transformation_mode=ct))
case("Resize-sizes-linear")(lambda rng: _resize(rng, sizes=[1, 2, 7, 3], mode="linear"))
case("Resize-sizes-nearest")(lambda rng: _resize(rng, sizes=[1, 2, 9, 11], mode="nearest"))
for _m in ["nearest", "linear"]:  # scales that change no size: onnxruntime copies the input
    case(f"Resize-same-size-{_m}")(lambda rng, m=_m: _resize(rng, scales=[1, 1, 1.1, 1.1], shape=(1, 2, 7, 8), mode=m))
case("Resize-opset11-scales")(lambda rng: _resize(rng, opset=11, scales=[1, 1, 2, 3], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
case("Resize-opset11-sizes")(lambda rng: _resize(rng, opset=11, sizes=[1, 2, 3, 8], mode="linear"))
case("Resize-axes-opset18")(lambda rng: _resize(rng, opset=18, scales=[2.0, 1.5], mode="linear", axes=[2, 3]))
case("Resize-half-pixel-symmetric-opset19")(lambda rng: _resize(rng, opset=19, scales=[1, 1, 1.7, 0.6], mode="linear", coordinate_transformation_mode="half_pixel_symmetric"))
case("Resize-nearest-half-pixel-symmetric-opset19")(lambda rng: _resize(rng, opset=19, sizes=[1, 2, 7, 9], mode="nearest", coordinate_transformation_mode="half_pixel_symmetric"))

# ------------------------------------------------------------- Upsample and opset-10 Resize

case("Upsample-opset7-nearest")(lambda rng: Case([N("Upsample", ["x"], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0])],
                                                 {"x": r(rng, 1, 2, 3, 4)}, opset=7))
case("Upsample-opset7-linear")(lambda rng: Case([N("Upsample", ["x"], mode="linear", scales=[1.0, 1.0, 2.0, 1.5])],
                                                {"x": r(rng, 1, 2, 3, 4)}, opset=7))
case("Upsample-opset9-nearest")(lambda rng: Case([N("Upsample", ["x", "s"], mode="nearest")], {"x": r(rng, 2, 3, 4, 5)},
                                                 {"s": f32([1, 1, 2.5, 2])}, opset=9))
case("Upsample-opset9-linear")(lambda rng: Case([N("Upsample", ["x", "s"], mode="linear")], {"x": r(rng, 2, 3, 4, 5)},
                                                {"s": f32([1, 1, 2, 1.7])}, opset=9))
case("Upsample-opset9-runtime-scales")(lambda rng: Case([N("Upsample", ["x", "s"])],
                                                        {"x": r(rng, 1, 2, 3, 3), "s": f32([1, 1, 3, 2])}, opset=9))
case("Resize-opset10-nearest")(lambda rng: Case([N("Resize", ["x", "s"], mode="nearest")], {"x": r(rng, 1, 2, 3, 4)},
                                                {"s": f32([1, 1, 2, 2])}, opset=10))
case("Resize-opset10-linear")(lambda rng: Case([N("Resize", ["x", "s"], mode="linear")], {"x": r(rng, 1, 2, 3, 4)},
                                               {"s": f32([1, 1, 1.5, 2.5])}, opset=10))

# ------------------------------------------------------------------ selection, scatter and gather

for _largest, _axis in [(1, -1), (0, 1), (1, 0)]:
    case(f"TopK-largest{_largest}-axis{_axis}")(lambda rng, lg=_largest, ax=_axis: Case(
        [N("TopK", ["x", "k"], ["v", "i"], axis=ax, largest=lg)], {"x": r(rng, 4, 6, 5)}, {"k": i64([3])},
        outputs={"v": TP.FLOAT, "i": TP.INT64}, opset=11))
case("TopK-ties-in-index-order")(lambda rng: Case(
    [N("TopK", ["x", "k"], ["v", "i"])], {"x": f32([[1, 3, 3, 2, 3, 1], [0, 0, 0, 0, 0, 0]])}, {"k": i64([4])},
    outputs={"v": TP.FLOAT, "i": TP.INT64}, opset=11))
case("TopK-smallest-ties")(lambda rng: Case(
    [N("TopK", ["x", "k"], ["v", "i"], largest=0)], {"x": f32([[2, 1, 1, 2, 1]])}, {"k": i64([3])},
    outputs={"v": TP.FLOAT, "i": TP.INT64}, opset=11))
case("TopK-opset9-attribute")(lambda rng: Case(
    [N("TopK", ["x"], ["v", "i"], k=2)], {"x": r(rng, 3, 7)}, outputs={"v": TP.FLOAT, "i": TP.INT64}, opset=9))
case("TopK-runtime-k-int64")(lambda rng: Case(
    [N("TopK", ["x", "k"], ["v", "i"], axis=1)], {"x": np.arange(24, dtype=np.int64).reshape(2, 12) % 7, "k": i64([5])},
    outputs={"v": TP.INT64, "i": TP.INT64}, opset=11))
for _upper in (0, 1):
    for _k in (-1, 0, 2):
        case(f"Trilu-upper{_upper}-k{_k}")(lambda rng, up=_upper, kk=_k: Case(
            [N("Trilu", ["x", "k"], upper=up)], {"x": r(rng, 2, 4, 5)}, {"k": i64(kk)}, opset=14))
case("Trilu-default-k")(lambda rng: Case([N("Trilu", ["x"], upper=0)], {"x": r(rng, 5, 3)}, opset=14))
case("Trilu-bool-causal-mask")(lambda rng: Case(
    [N("Trilu", ["x"], upper=0)], {"x": np.ones((4, 4), dtype=bool)}, outputs={"y": TP.BOOL}, opset=14))
case("ScatterElements-axis1")(lambda rng: Case(
    [N("ScatterElements", ["x", "i", "u"], axis=1)], {"x": r(rng, 3, 5), "u": r(rng, 3, 2)},
    {"i": i64([[0, 4], [-1, 2], [1, 3]])}, opset=13))
for _red in ("add", "mul", "max", "min"):
    case(f"ScatterElements-{_red}")(lambda rng, red=_red: Case(
        [N("ScatterElements", ["x", "i", "u"], axis=0, reduction=red)], {"x": r(rng, 4, 3), "u": r(rng, 3, 3)},
        {"i": i64([[0, 1, 3], [0, 1, 2], [3, 3, 3]])}, opset=18))
case("Scatter-opset9")(lambda rng: Case(
    [N("Scatter", ["x", "i", "u"], axis=0)], {"x": r(rng, 3, 3), "u": r(rng, 2, 3)}, {"i": i64([[1, 0, 2], [0, 2, 1]])},
    opset=9))
case("ScatterND-elements")(lambda rng: Case(
    [N("ScatterND", ["x", "i", "u"])], {"x": r(rng, 3, 4), "u": r(rng, 3)}, {"i": i64([[0, 1], [2, 3], [-1, 0]])}, opset=13))
case("ScatterND-slices")(lambda rng: Case(
    [N("ScatterND", ["x", "i", "u"])], {"x": r(rng, 4, 3, 2), "u": r(rng, 2, 3, 2)}, {"i": i64([[3], [0]])}, opset=13))
for _red in ("add", "mul", "max", "min"):
    case(f"ScatterND-{_red}")(lambda rng, red=_red: Case(
        [N("ScatterND", ["x", "i", "u"], reduction=red)], {"x": r(rng, 4, 3), "u": r(rng, 3, 3)},
        {"i": i64([[1], [1], [2]])}, opset=18))
case("GatherND")(lambda rng: Case(
    [N("GatherND", ["x", "i"])], {"x": r(rng, 3, 4, 5)}, {"i": i64([[[0, 1], [2, -1]], [[1, 1], [0, 3]]])}, opset=13))
case("GatherND-batch-dims")(lambda rng: Case(
    [N("GatherND", ["x", "i"], batch_dims=1)], {"x": r(rng, 2, 4, 5)}, {"i": i64([[[1], [3]], [[0], [2]]])}, opset=13))
case("GatherND-full-index")(lambda rng: Case(
    [N("GatherND", ["x", "i"])], {"x": r(rng, 3, 4)}, {"i": i64([[0, 0], [2, 3], [1, 2]])}, opset=13))
case("OneHot")(lambda rng: Case(
    [N("OneHot", ["i", "d", "v"])], {"i": i64([[0, 3], [-1, 5]])}, {"d": i64(4), "v": f32([-1, 2])}, opset=11))
case("OneHot-axis0-float-indices")(lambda rng: Case(
    [N("OneHot", ["i", "d", "v"], axis=0)], {"i": f32([1.7, 0, 2, -1, -0.5])}, {"d": i64([3]), "v": i64([0, 1])},
    outputs={"y": TP.INT64}, opset=11))
case("EyeLike")(lambda rng: Case([N("EyeLike", ["x"], k=1)], {"x": r(rng, 3, 5)}, opset=9))
case("EyeLike-dtype")(lambda rng: Case([N("EyeLike", ["x"], k=-2, dtype=TP.INT64)], {"x": r(rng, 5, 4)},
                                       outputs={"y": TP.INT64}, opset=9))
case("Shrink")(lambda rng: Case([N("Shrink", ["x"], bias=0.3, lambd=0.7)], {"x": r(rng, 3, 6)}, opset=9))

# ------------------------------------------------------------------------------ more normalisation

for _size in (1, 3, 5):
    case(f"LRN-size{_size}")(lambda rng, sz=_size: Case(
        [N("LRN", ["x"], size=sz, alpha=0.01, beta=0.6, bias=1.5)], {"x": r(rng, 2, 6, 3, 4, scale=2)}, opset=13))
case("LRN-defaults")(lambda rng: Case([N("LRN", ["x"], size=3)], {"x": r(rng, 2, 5, 7, 1)}, opset=13))
case("GroupNormalization-opset18")(lambda rng: Case(
    [N("GroupNormalization", ["x", "s", "b"], num_groups=2, epsilon=1e-3)], {"x": r(rng, 2, 6, 3, 4, scale=3)},
    {"s": r(rng, 2), "b": r(rng, 2)}, opset=18))
case("GroupNormalization-opset21")(lambda rng: Case(
    [N("GroupNormalization", ["x", "s", "b"], num_groups=3)], {"x": r(rng, 2, 6, 5)},
    {"s": r(rng, 6), "b": r(rng, 6)}, opset=21))
case("LpNormalization-p2")(lambda rng: Case([N("LpNormalization", ["x"], axis=1)], {"x": r(rng, 3, 4, 2)}))
for _p in (1, 2):
    case(f"LpNormalization-p{_p}-zero-row")(lambda rng, pp=_p: Case(
        [N("LpNormalization", ["x"], p=pp)], {"x": np.concatenate([np.zeros((1, 4), np.float32), r(rng, 2, 4)])}))
case("LpNormalization-p1")(lambda rng: Case([N("LpNormalization", ["x"], p=1)], {"x": r(rng, 3, 4)}))
case("MeanVarianceNormalization")(lambda rng: Case([N("MeanVarianceNormalization", ["x"])], {"x": r(rng, 2, 3, 4, 5)},
                                                   opset=13))
case("MeanVarianceNormalization-axes")(lambda rng: Case(
    [N("MeanVarianceNormalization", ["x"], axes=[1])], {"x": r(rng, 2, 6, 3, scale=5) + 2}, opset=13))

# ------------------------------------------------------------------------------ recurrent layers


def _rnn(rng, op, direction="forward", bias=True, lens=None, init=False, peep=False,
         outs=("Y", "Y_h", "Y_c"), opset=14, T=5, B=3, I=4, H=6, **attrs):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    D = 2 if direction == "bidirectional" else 1
    inits = {"W": r(rng, D, gates * H, I, scale=0.5), "R": r(rng, D, gates * H, H, scale=0.5)}
    names = ["x", "W", "R", "", "", "", "", ""]
    if bias:
        inits["B"] = r(rng, D, 2 * gates * H, scale=0.5)
        names[3] = "B"
    inputs = {"x": r(rng, T, B, I)}
    if lens is not None:
        inputs["lens"] = np.array(lens, np.int32)
        names[4] = "lens"
    if init:
        names[5] = "h0"
        inputs["h0"] = r(rng, D, B, H)
        if op == "LSTM":
            names[6] = "c0"
            inputs["c0"] = r(rng, D, B, H)
    if peep:
        names[7] = "P"
        inits["P"] = r(rng, D, 3 * H, scale=0.5)
    while names[-1] == "":
        names.pop()
    outs = [o for o in outs if op == "LSTM" or o != "Y_c"]
    node = N(op, names, [o if o else "" for o in outs], hidden_size=H, direction=direction, **attrs)
    return Case([node], inputs, inits, outputs={o: TP.FLOAT for o in outs if o}, opset=opset)


case("LSTM-forward")(lambda rng: _rnn(rng, "LSTM"))
case("LSTM-reverse-no-bias")(lambda rng: _rnn(rng, "LSTM", direction="reverse", bias=False))
case("LSTM-bidirectional-init-peepholes")(lambda rng: _rnn(rng, "LSTM", direction="bidirectional", init=True, peep=True))
case("LSTM-sequence-lens")(lambda rng: _rnn(rng, "LSTM", direction="bidirectional", lens=[5, 2, 3], init=True))
case("LSTM-clip")(lambda rng: _rnn(rng, "LSTM", clip=0.4))
case("LSTM-only-last-state")(lambda rng: _rnn(rng, "LSTM", outs=("", "Y_h")))
case("LSTM-only-Y")(lambda rng: _rnn(rng, "LSTM", outs=("Y",)))
case("LSTM-activations")(lambda rng: _rnn(rng, "LSTM", activations=["Sigmoid", "Relu", "Tanh"]))
case("GRU-forward")(lambda rng: _rnn(rng, "GRU"))
case("GRU-linear-before-reset")(lambda rng: _rnn(rng, "GRU", direction="bidirectional", linear_before_reset=1, init=True))
case("GRU-reverse-lens")(lambda rng: _rnn(rng, "GRU", direction="reverse", lens=[1, 5, 4]))
case("RNN-forward")(lambda rng: _rnn(rng, "RNN", init=True))
case("LSTM-bidirectional-init")(lambda rng: _rnn(rng, "LSTM", direction="bidirectional", init=True))
case("GRU-linear-before-reset-no-bias")(lambda rng: _rnn(rng, "GRU", bias=False, linear_before_reset=1))
case("RNN-relu")(lambda rng: _rnn(rng, "RNN", direction="bidirectional", activations=["Relu", "Relu"]))
case("RNN-relu-bidirectional")(lambda rng: _rnn(rng, "RNN", direction="bidirectional", activations=["Relu", "Tanh"]))

# ---------------------------------------------------------------------------------- parametrised


@pytest.mark.parametrize("builder", [pytest.param(b, id=n) for n, b in CASES])
def test_op_parity(builder):
    assert_parity(builder(np.random.default_rng(0)))


def test_case_ids_unique():
    names = [n for n, _ in CASES]
    assert len(names) == len(set(names))


# ----------------------------------------------------------------------------------- refusals


def _model(nodes, inits=(), opset=17, extra_opsets=()):
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)], list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(g, opset_imports=ops, ir_version=10)


def test_unsupported_ops_reported_together():
    body = helper.make_graph([N("Identity", ["c_in"], ["c_out"])], "body",
                             [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("c_in", TP.BOOL, [])],
                             [helper.make_tensor_value_info("c_out", TP.BOOL, [])])
    nodes = [
        N("Relu", ["x"], ["a"]),
        helper.make_node("FusedConv", ["a"], ["b"], domain="com.microsoft"),
        helper.make_node("FusedConv", ["b"], ["c"], domain="com.microsoft"),
        helper.make_node("FusedConv", ["c"], ["d"], domain="com.microsoft"),
        N("Loop", ["", ""], ["e"], body=body),
        N("Unique", ["d"], ["f"]),
        N("Resize", ["d", "", "s"], ["h"], mode="cubic"),
        N("Add", ["d", "d"], ["y"]),
    ]
    model = _model(nodes, [numpy_helper.from_array(i64([1]), "k"), numpy_helper.from_array(f32([1, 2]), "s")],
                   extra_opsets=["com.microsoft"])
    found = unsupported_ops(model)
    assert found == {"com.microsoft.FusedConv": 3, "Loop": 1, "Unique": 1, "Resize(mode=cubic)": 1}
    with pytest.raises(UnsupportedError) as exc:
        OnnxModule(model)
    msg = str(exc.value)
    assert msg.startswith("unsupported ops: com.microsoft.FusedConv x3")
    for part in ("Loop x1", "Unique x1", "Resize(mode=cubic) x1", "cannot interpret these faithfully"):
        assert part in msg


def test_supported_graph_reports_nothing():
    assert unsupported_ops(_model([N("Relu", ["x"])])) == {}


def test_opsets_before_7_are_refused():
    assert unsupported_ops(_model([N("Relu", ["x"])], opset=6)) == {"opset 6 (below 7)": 1}


@pytest.mark.parametrize("node,key", [
    (N("BatchNormalization", ["x", "s", "s", "s", "s"], training_mode=1), "BatchNormalization(training_mode=1)"),
    (N("Resize", ["x", "", "sc"], mode="linear", coordinate_transformation_mode="tf_crop_and_resize"),
     "Resize(coordinate_transformation_mode=tf_crop_and_resize)"),
    (N("Resize", ["x", "", "sc"], mode="linear", antialias=1), "Resize(antialias=1)"),
    (N("Pad", ["x", "p"], mode="mirror"), "Pad(mode=mirror)"),
    (N("Cast", ["x"], to=TP.STRING), "Cast(to=STRING)"),
    (N("MaxPool", ["x"], kernel_shape=[3], dilations=[2], auto_pad="SAME_UPPER"), "MaxPool(auto_pad=SAME_UPPER with dilations)"),
    (N("MaxPool", ["x"], ["y", "i"], kernel_shape=[3], pads=[0, 1]), "MaxPool(indices with asymmetric or large pads)"),
    (N("LRN", ["x"], size=4), "LRN(size=4)"),
    (N("TopK", ["x", "k"], ["y", "i"], sorted=0), "TopK(sorted=0)"),
    (N("LSTM", ["x", "s", "s"], hidden_size=1, layout=1), "LSTM(layout=1)"),
    (N("GRU", ["x", "s", "s"], hidden_size=1, activations=["Sigmoid", "Softsign"]), "GRU(activations=Softsign)"),
    (N("LSTM", ["x", "s", "s"], hidden_size=1, input_forget=1), "LSTM(input_forget=1)"),
    (N("Loop", ["", "cond"], body=helper.make_graph([], "b", [], [])), "Loop"),
])
def test_refused_attribute_variants(node, key):
    inits = [numpy_helper.from_array(f32([1, 1, 1, 1]), "s"), numpy_helper.from_array(f32([1, 2]), "sc"),
             numpy_helper.from_array(i64([0, 1, 0, 1]), "p"), numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(i64([1]), "k")]
    node.output[0] = "y"
    assert unsupported_ops(_model([node], inits, opset=19)) == {key: 1}


def test_same_pooling_with_a_kernel_shorter_than_its_stride_is_refused_when_run():
    """The SAME pad is then negative: onnxruntime keeps it at opset 19 and refuses it at 13, so no answer is
    faithful. Whether it is negative depends on the input length, so the refusal comes at run time."""
    node = N("AveragePool", ["x"], kernel_shape=[1], strides=[3], auto_pad="SAME_UPPER")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 2, "L"])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=10))
    np.testing.assert_array_equal(mod(x=torch.arange(14.0).reshape(1, 2, 7)).numpy()[0, 0], [0, 3, 6])
    with pytest.raises(Exception, match="kernel shorter than its stride"):
        mod(x=torch.zeros(1, 2, 9))


def test_lp_normalization_of_a_zero_vector_has_a_finite_gradient():
    """A ReLU before an embedding's normalisation zeroes whole rows: the norm's gradient at 0 was NaN and
    made every importance score NaN."""
    g = helper.make_graph([N("Relu", ["x"], ["h"]), N("LpNormalization", ["h"], p=2)], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    x = torch.tensor([[-1.0, -2.0, -0.5], [3.0, 4.0, -1.0]], requires_grad=True)
    y = mod(x=x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(y[0], torch.zeros(3)) and torch.isfinite(x.grad).all()
    np.testing.assert_allclose(y[1].detach().numpy(), [0.6, 0.8, 0.0], rtol=1e-6)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bad", ["initial_h", "hidden_size"])
def test_recurrent_operands_of_the_wrong_shape_are_refused_not_read_out_of_bounds(op, bad):
    """torch's fused kernels skip the checks onnxruntime makes: an initial state of another batch crashed the
    process (LSTM) or read out of bounds (GRU), and a hidden_size below W's rows ran on the wrong rows."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r(rng, 1, gates * 6, 4), "W"), numpy_helper.from_array(r(rng, 1, gates * 6, 6), "R"),
             numpy_helper.from_array(r(rng, 1, 1, 6), "h0")]
    ins = ["x", "W", "R", "", "", "h0"] if bad == "initial_h" else ["x", "W", "R"]
    node = N(op, ins, ["", "y"], hidden_size=6 if bad == "initial_h" else 4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TP.FLOAT, [5, 3, 4])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=10))
    with pytest.raises(RuntimeError, match="has shape"):
        mod(x=torch.zeros(5, 3, 4))


def test_mean_variance_normalization_of_a_constant_channel_has_a_finite_gradient():
    """A pruned channel is constant: sqrt's gradient at a zero variance made every importance score NaN."""
    g = helper.make_graph([N("MeanVarianceNormalization", ["x"], axes=[0, 2])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 4])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=10))
    x = torch.randn(2, 3, 4)
    x[:, 1] = 0.5
    x.requires_grad_(True)
    y = mod(x=x)
    (y * torch.randn(2, 3, 4)).sum().backward()
    assert torch.equal(y[:, 1], torch.zeros(2, 4)) and torch.isfinite(x.grad).all()


def test_topk_refuses_nan_inputs_whose_order_onnxruntime_does_not_define():
    g = helper.make_graph([N("TopK", ["x", "k"], ["v", "i"])], "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 6])],
                          [helper.make_tensor_value_info("v", TP.FLOAT, None)], [numpy_helper.from_array(i64([3]), "k")])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=10))
    with pytest.raises(Exception, match="TopK node .* gets NaN values"):
        mod(x=torch.tensor([[1.0, float("nan"), 3.0, 2.0, float("nan"), 0.0]]))


# ------------------------------------------------------------------------------------------- If


def _if_model(cond_from: str, opset: int = 13) -> onnx.ModelProto:
    """y = If(cond) then (x * w + a, x) else (x - a, Squeeze of x's unit axis when there is one): the branches
    read the outer input, a parent initializer (w), a value computed outside (a) and their own constants."""
    then_b = helper.make_graph(
        [N("Mul", ["x", "w"], ["t1"]), N("Add", ["t1", "a"], ["then_y"]), N("Identity", ["x"], ["then_z"])], "then", [],
        [helper.make_tensor_value_info("then_y", TP.FLOAT, None), helper.make_tensor_value_info("then_z", TP.FLOAT, None)])
    else_b = helper.make_graph(
        [N("Sub", ["x", "a"], ["else_y"]), N("Mul", ["x", "two"], ["else_z"])], "else", [],
        [helper.make_tensor_value_info("else_y", TP.FLOAT, None), helper.make_tensor_value_info("else_z", TP.FLOAT, None)],
        [numpy_helper.from_array(f32([2.0]), "two")])
    nodes = [N("Relu", ["x"], ["a"])]
    if cond_from == "input":
        cond = "c"
    else:  # the batch size, as legacy exports test a dim before squeezing it
        nodes += [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["n"]), N("Equal", ["n", "one"], ["cond"])]
        cond = "cond"
    nodes.append(N("If", [cond], ["y", "z"], then_branch=then_b, else_branch=else_b))
    ins = [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3])]
    if cond_from == "input":
        ins.append(helper.make_tensor_value_info("c", TP.BOOL, []))
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TP.FLOAT, None),
                                            helper.make_tensor_value_info("z", TP.FLOAT, None)],
                          [numpy_helper.from_array(f32([0.5, -1.0, 2.0]), "w"), numpy_helper.from_array(i64(0), "zero"),
                           numpy_helper.from_array(i64(1), "one")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("cond_from,feeds", [
    ("input", {"c": np.array(True)}), ("input", {"c": np.array(False)}), ("shape", {"rows": 1}), ("shape", {"rows": 4}),
])
def test_if_runs_the_branch_onnxruntime_runs_with_gradients_through_it(cond_from, feeds):
    """Legacy exports test a dim before squeezing it (x.squeeze(1) on a dynamic dim, LocalResponseNorm):
    If was refused, so were those models."""
    m = _if_model(cond_from)
    rows = feeds.pop("rows", 2)
    feeds["x"] = np.random.default_rng(rows).standard_normal((rows, 3)).astype(np.float32)
    refs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    mod = OnnxModule(m)
    got = mod(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
    for g, r in zip(got, refs):
        np.testing.assert_allclose(g.detach().numpy(), r, rtol=1e-6)
    sum((o * torch.arange(o.numel()).reshape(o.shape)).sum() for o in got).backward()
    took_then = bool(feeds["c"]) if cond_from == "input" else rows == 1
    assert (mod.params["w"].grad is not None and bool(mod.params["w"].grad.abs().sum() > 0)) == took_then


def test_if_with_an_unsupported_op_in_a_branch_names_it():
    body = helper.make_graph([N("Unique", ["x"], ["u"])], "b", [], [helper.make_tensor_value_info("u", TP.FLOAT, None)])
    g = helper.make_graph([N("If", ["c"], ["y"], then_branch=body, else_branch=body)], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, ["N"]), helper.make_tensor_value_info("c", TP.BOOL, [])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    assert unsupported_ops(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)) == {
        "If(branch with Unique)": 1}


def test_if_branches_reading_a_value_twice_and_following_the_parent_to_float64():
    """Mul(x, x) in a branch listed x twice as a branch input (a SyntaxError in the generated code); branch
    modules were not children of the parent, so .double() left a branch's own weight in float32."""
    then_b = helper.make_graph([N("Mul", ["x", "x"], ["sq"]), N("Mul", ["sq", "k"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TP.FLOAT, None)], [numpy_helper.from_array(f32([3.0]), "k")])
    else_b = helper.make_graph([N("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TP.FLOAT, None)])
    g = helper.make_graph([N("If", ["c"], ["y"], then_branch=then_b, else_branch=else_b)], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, ["N"]), helper.make_tensor_value_info("c", TP.BOOL, [])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = f32([1.0, -2.0, 0.5])
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "c": np.array(True)})
    mod = OnnxModule(m)
    np.testing.assert_allclose(mod(x=torch.from_numpy(x), c=torch.tensor(True)).detach().numpy(), ref[0], rtol=1e-6)
    out = mod.double()(x=torch.from_numpy(x).double(), c=torch.tensor(True))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("refusals, fix", [
    ({"BatchNormalization(training_mode=1)": 2}, "export the model in eval mode (model.eval() before"),
    ({"RMSNormalization": 2, "Attention": 1},
     "export at opset 22 or lower (torch.onnx.export(..., opset_version=18), say), which writes Attention and "
     "RMSNormalization as basic ops (`onnxfair inspect"),
    ({"Loop": 1}, "refuses the model: re-export it with them expressed through supported ops (`onnxfair"),
    ({"Attention": 1, "Loop": 1}, "as basic ops; re-export the rest with them expressed through supported ops"),
])
def test_a_refusal_an_export_setting_avoids_names_that_setting(refusals, fix):
    """Before: every refusal said "re-export it with them expressed through supported ops", where eval mode
    or a lower opset is the whole fix."""
    from collections import Counter

    from onnxfair.interpret.compile import refusal_message

    assert fix in refusal_message(Counter(refusals))
