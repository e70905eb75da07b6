"""Hand-built graphs in the layouts of other exporters: each rule is checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxfair.errors import ModelError, UsageError
from onnxfair.graph import analyze, mask_channels, prune_channels
from tests.test_graph_support import (
    GraphBuilder,
    assert_close,
    check_prune_equals_mask,
    ort_run,
    random_feeds,
    random_keep,
)


def _check_random(model, seeds=(0, 1, 2), shapes=None, **kw):
    an = analyze(model, **kw)
    feeds = random_feeds(an.model, batch=2, seed=11, shapes=shapes)
    for s in seeds:
        check_prune_equals_mask(an, random_keep(an, np.random.default_rng(s)), feeds)
    return an


def _reasons(an) -> str:
    return " | ".join(f["reason"] for f in an.frozen)


def _head(b: GraphBuilder, x: str, c: int, classes: int = 3) -> str:
    """GlobalAveragePool → Flatten → Gemm(transB=1): the usual classifier head."""
    f = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    return b.op("Gemm", [f, b.rand(classes, c), b.rand(classes)], transB=1)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_unfused_batchnorm_residual(opset):
    b = GraphBuilder()
    x = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8)])
    y = b.bn(b.conv(b.op("Relu", [b.bn(b.conv(x, 8, 8, bias=False), 8)]), 8, 8), 8)
    z = b.op("Relu", [b.op("Add", [x, y])])
    m = b.model([("x", ["N", 3, 6, 6])], [_head(b, z, 8)], opset=opset)
    an = _check_random(m)
    assert len(an.groups) == 2
    bn_inits = {n.input[k] for n in an.model.graph.node if n.op_type == "BatchNormalization" for k in range(1, 5)}
    members = {mb.initializer for g in an.groups for mb in g.members if mb.role == "param"}
    assert bn_inits <= members


def test_se_block_with_constant_expressions():
    """Per-channel scale/bias written as Unsqueeze/Reshape of vectors (folded), SE gating Mul."""
    b = GraphBuilder()
    c = 8
    x = b.conv("x", 3, c)
    scale = b.op("Unsqueeze", [b.rand(c), b.const(np.array([0, 2, 3], dtype=np.int64))])
    bias = b.op("Reshape", [b.rand(c), b.const(np.array([1, c, 1, 1], dtype=np.int64))])
    x = b.op("Add", [b.op("Mul", [x, scale]), bias])
    x = b.op("HardSwish", [x])
    s = b.op("ReduceMean", [x], axes=[2, 3], keepdims=1)
    g = b.op("HardSigmoid", [b.conv(b.op("Relu", [b.conv(s, c, 4, k=1)]), 4, c, k=1)])
    y = b.op("Mul", [x, g])
    y = b.op("Relu", [b.conv(y, c, 6, k=1)])
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, y, 6)], opset=14)
    an = _check_random(m)
    ops = {n.op_type for n in an.model.graph.node}
    assert "Unsqueeze" not in ops and "Reshape" not in ops  # constant expressions were folded
    big = next(g for g in an.groups if g.size == c)
    assert sum(mb.role == "producer" for mb in big.members) >= 4  # first conv + SE expand conv (W, B)
    assert sum(mb.role == "param" for mb in big.members) == 2  # the folded scale and bias


def test_decomposed_layernorm_over_channels_is_frozen():
    b = GraphBuilder()
    x = b.conv("x", 3, 8)
    mu = b.op("ReduceMean", [x], axes=[1], keepdims=1)
    d = b.op("Sub", [x, mu])
    var = b.op("ReduceMean", [b.op("Pow", [d, b.const(np.float32(2.0))])], axes=[1], keepdims=1)
    y = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-5))])])])
    y = b.op("Relu", [b.conv(y, 8, 6)])
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, y, 6)], opset=13)
    an = _check_random(m)
    assert [g.size for g in an.groups] == [6]
    assert "reduces over the channel axis" in _reasons(an)


@pytest.mark.parametrize("allow", [False, True])
def test_layernormalization_over_channels(allow):
    b = GraphBuilder()
    h = b.op("MatMul", ["x", b.rand(5, 8)])
    h = b.op("LayerNormalization", [h, b.rand(8), b.rand(8)], axis=-1)
    y = b.op("MatMul", [b.op("Relu", [h]), b.rand(8, 2)])
    m = b.model([("x", ["N", 5])], [y], opset=17)
    an = analyze(m, allow_inexact=allow)
    if not allow:
        assert an.groups == [] and "statistics" in _reasons(an)
        return
    (g,) = an.groups
    assert g.exact is False and len(g.members) == 4  # W1 cols, LN scale, LN bias, W2 rows
    pruned = prune_channels(an, {0: np.arange(6)})
    onnx.checker.check_model(pruned, full_check=True)
    assert ort_run(pruned, random_feeds(m))[0].shape == (2, 2)


def test_silu_and_gelu_patterns_pass_through():
    b = GraphBuilder()
    x = b.conv("x", 3, 8)
    x = b.op("Mul", [x, b.op("Sigmoid", [x])])  # SiLU
    y = b.conv(x, 8, 8)
    half, one, rsqrt2 = b.const(np.float32(0.5)), b.const(np.float32(1.0)), b.const(np.float32(2 ** -0.5))
    erf = b.op("Erf", [b.op("Mul", [y, rsqrt2])])
    y = b.op("Mul", [b.op("Mul", [y, half]), b.op("Add", [erf, one])])  # GELU
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, y, 8)], opset=13)
    an = _check_random(m)
    assert [g.size for g in an.groups] == [8, 8]


@pytest.mark.parametrize("mode", ["attr11", "input13", "equal13", "num_outputs18"])
def test_concat_and_split_on_channels(mode):
    opset = {"attr11": 11, "input13": 13, "equal13": 13, "num_outputs18": 18}[mode]
    b = GraphBuilder()
    a = b.op("Relu", [b.conv("x", 3, 6)])
    c = b.op("Relu", [b.conv("x", 3, 6, k=1)])
    z = b.op("Concat", [a, c], axis=1)  # 12 channels: two independent groups
    if mode == "attr11":
        parts = b.op("Split", [z], n_out=2, axis=1, split=[5, 7])
        widths = [5, 7]
    elif mode == "input13":
        parts = b.op("Split", [z, b.const(np.array([4, 8], dtype=np.int64))], n_out=2, axis=1)
        widths = [4, 8]
    elif mode == "equal13":
        parts = b.op("Split", [z], n_out=2, axis=1)
        widths = [6, 6]
    else:
        parts = b.op("Split", [z], n_out=2, axis=1, num_outputs=2)
        widths = [6, 6]
    u = b.conv(parts[0], widths[0], 4, k=1)
    v = b.conv(parts[1], widths[1], 4, k=1)
    w = b.conv(z, 12, 4, k=1)
    y = b.op("Add", [b.op("Add", [u, v]), w])
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, y, 4)], opset=opset)
    an = _check_random(m, seeds=range(5))
    sizes = sorted(g.size for g in an.groups)
    assert sizes == [4, 6, 6]
    assert any(g.parts for g in an.groups)
    # a keep-set that empties one split part is refused before anything is written
    g6 = next(g for g in an.groups if g.size == 6 and g.parts)
    lo, hi = g6.parts[0]
    bad = np.array([c for c in range(6) if not lo <= c < hi])
    if len(bad):
        with pytest.raises(UsageError, match="Split/Slice"):
            prune_channels(an, {g6.id: bad})


@pytest.mark.parametrize("opset", [9, 13])
def test_slice_on_channels(opset):
    b = GraphBuilder()
    a = b.op("Relu", [b.conv("x", 3, 10)])
    if opset < 10:
        s = b.op("Slice", [a], starts=[2], ends=[8], axes=[1])
    else:
        s = b.op("Slice", [a, b.const(np.array([2], dtype=np.int64)), b.const(np.array([-2], dtype=np.int64)),
                           b.const(np.array([1], dtype=np.int64))])
    y = b.op("Add", [b.conv(s, 6, 4, k=1), b.conv(a, 10, 4, k=1)])
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, y, 4)], opset=opset)
    an = _check_random(m, seeds=range(5))
    assert sorted(g.size for g in an.groups) == [4, 10]


def test_flatten_reshape_heads():
    """Reshape to [N, C*H*W] with a constant target, and via Shape→Gather→Concat (batch from Shape)."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 6)])
    r1 = b.op("Reshape", [x, b.const(np.array([-1, 6 * 4 * 4], dtype=np.int64))])
    n = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [x]), b.const(np.array(0, dtype=np.int64))], axis=0)],
             axes=[0])
    target = b.op("Concat", [n, b.const(np.array([6, -1], dtype=np.int64))], axis=0)
    r2 = b.op("ReduceMean", [b.op("Reshape", [x, target])], axes=[2], keepdims=0)  # [N, 6] channel means
    h = b.op("Gemm", [r1, b.rand(5, 96), b.rand(5)], transB=1)
    y = b.op("Add", [h, b.op("Gemm", [r2, b.rand(6, 5)])])
    m = b.model([("x", ["N", 3, 4, 4])], [y], opset=11)
    an = _check_random(m)
    assert [g.size for g in an.groups] == [6]
    g = an.groups[0]
    flat = next(mb for mb in g.members if mb.indices.shape[1] == 16)
    assert flat.role == "consumer"
    pruned = prune_channels(an, {0: np.array([1, 4])})
    consts = [onnx.numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer if i.data_type == TensorProto.INT64]
    assert [-1, 32] in consts and [2, -1] in consts


def test_shape_arithmetic_on_channels_freezes():
    b = GraphBuilder()
    x = b.conv("x", 3, 8)
    c = b.op("Gather", [b.op("Shape", [x]), b.const(np.array([1], dtype=np.int64))], axis=0)
    half = b.op("Div", [c, b.const(np.array([2], dtype=np.int64))])
    target = b.op("Concat", [b.const(np.array([-1], dtype=np.int64)), half,
                             b.const(np.array([2, 5, 5], dtype=np.int64))], axis=0)
    y = b.op("ReduceMax", [b.op("Reshape", [x, target])], axes=[2], keepdims=0)
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, b.conv(y, 4, 4), 4)], opset=13)
    an = _check_random(m)
    assert all(g.size != 8 for g in an.groups)
    assert "channel count" in _reasons(an)


def test_transpose_to_channels_last_matmul():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    t = b.op("Transpose", [x], perm=[0, 2, 3, 1])  # NHWC
    h = b.op("Add", [b.op("MatMul", [t, b.rand(8, 5)]), b.rand(5)])
    y = b.op("ReduceMean", [h], axes=[1, 2], keepdims=0)
    m = b.model([("x", ["N", 3, 4, 4])], [y], opset=13)
    an = _check_random(m)
    assert [g.size for g in an.groups] == [8]
    assert any(mb.axis == 0 and mb.role == "consumer" for mb in an.groups[0].members)


@pytest.mark.parametrize("trans", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_transposes(trans):
    ta, tb = trans
    b = GraphBuilder()
    a = b.op("Relu", [b.op("Gemm", ["x", b.rand(6, 7), b.rand(7)])])  # produces 7 features
    if ta:
        a = b.op("Transpose", [a], perm=[1, 0])
    wshape = (9, 7) if tb else (7, 9)
    h = b.op("Gemm", [a, b.rand(*wshape), b.rand(9)], transA=ta, transB=tb)
    y = b.op("Gemm", [b.op("Tanh", [h]), b.rand(9, 2)])
    m = b.model([("x", ["N", 6])], [y], opset=13)
    an = _check_random(m, shapes={"x": (4, 6)} if ta else None)
    assert sorted(g.size for g in an.groups) == [7, 9]  # Transpose moves the channel axis to Gemm's A rows


def test_shared_weight_couples_layers():
    b = GraphBuilder()
    w, bias = b.rand(8, 3, 3, 3), b.rand(8)
    p = b.op("Conv", ["x", w, bias], pads=[1, 1, 1, 1])
    q = b.op("Conv", [b.op("Neg", ["x"]), w, bias], pads=[1, 1, 1, 1])
    y = b.op("Concat", [b.op("Relu", [p]), b.op("Sigmoid", [q])], axis=1)
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, b.conv(y, 16, 4), 4)], opset=13)
    an = _check_random(m)
    g = next(g for g in an.groups if g.size == 8)
    consumer = next(mb for mb in g.consumers())
    assert consumer.indices.shape == (8, 2)  # each channel appears twice in the Concat


def test_weight_shared_with_unsliceable_use_is_frozen():
    b = GraphBuilder()
    bias = b.rand(8)
    x = b.op("Conv", ["x", b.rand(8, 3, 3, 3), bias], pads=[1, 1, 1, 1])
    z = b.op("Add", [b.op("ReduceSum", ["y", b.const(np.array([1], dtype=np.int64))], keepdims=0), bias])
    m = b.model([("x", ["N", 3, 5, 5]), ("y", ["N", 4, 8])], [_head(b, b.conv(x, 8, 4), 4), z], opset=13)
    an = analyze(m)
    assert all(g.size != 8 for g in an.groups)
    assert "shared" in _reasons(an)


def test_nothing_prunable():
    b = GraphBuilder()
    y = b.op("Softmax", [b.op("Gemm", ["x", b.rand(4, 3)])], axis=1)
    m = b.model([("x", ["N", 4])], [y], opset=13)
    an = analyze(m)
    assert an.groups == [] and an.to_dict()["groups"] == []
    feeds = random_feeds(m)
    np.testing.assert_allclose(ort_run(prune_channels(an, {}), feeds)[0], ort_run(m, feeds)[0], rtol=1e-6)
    with pytest.raises(UsageError):
        prune_channels(an, {0: np.array([0])})


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_a_grouped_convs_output_is_listed_frozen_and_what_follows_still_prunes(op):
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    if op == "Conv":
        y = b.conv(x, 8, 8, group=4)
    else:
        y = b.op("ConvTranspose", [x, b.rand(8, 4, 3, 3), b.rand(8)], group=2, pads=[1, 1, 1, 1])
    z = b.op("Relu", [b.conv(b.op("Relu", [y]), 8, 6, k=1)])
    m = b.model([("x", ["N", 3, 6, 6])], [_head(b, z, 6)], opset=13)
    an = _check_random(m)
    frozen = {f["space"]: f["reason"] for f in an.frozen}
    grouped = next(n.name for n in an.model.graph.node if n.op_type == op
                   and any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert frozen[grouped].startswith(f"output of grouped {op} {grouped}"), frozen
    assert [g.size for g in an.groups] == [6]  # the 1x1 conv after it keeps its own prunable group


@pytest.mark.parametrize("kind", ["softmax", "gather", "custom", "argmax", "grouped", "maxpool_indices"])
def test_frozen_uses(kind):
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    other = b.op("Relu", [b.conv("x", 3, 8)])
    if kind == "softmax":
        y = b.op("Softmax", [x], axis=1)
    elif kind == "gather":
        y = b.op("Gather", [x, b.const(np.array([0, 2, 3], dtype=np.int64))], axis=1)
        y = b.op("Pad", [y, b.const(np.zeros(8, dtype=np.int64))])
        y = b.op("Concat", [y, b.op("Slice", [x, b.const(np.array([0], dtype=np.int64)),
                                              b.const(np.array([5], dtype=np.int64)),
                                              b.const(np.array([1], dtype=np.int64))])], axis=1)
    elif kind == "custom":
        b.nodes.append(helper.make_node("Mystery", [x], ["mystery_out"], domain="com.example", name="myst"))
        y = b.op("Identity", [x])
    elif kind == "argmax":
        y = b.op("Cast", [b.op("ArgMax", [x], axis=1, keepdims=1)], to=TensorProto.FLOAT)
        y = b.op("Expand", [y, b.const(np.array([1, 8, 1, 1], dtype=np.int64))])
    elif kind == "grouped":
        y = b.conv(x, 8, 8, group=2)
    else:
        y = b.op("MaxPool", [x], n_out=2, kernel_shape=[2, 2])
        y = b.op("Add", [y[0], b.op("Cast", [b.op("Slice", [y[1], b.const(np.array([0], dtype=np.int64)),
                                                             b.const(np.array([1], dtype=np.int64)),
                                                             b.const(np.array([1], dtype=np.int64))])],
                                             to=TensorProto.FLOAT)])
        y = b.op("Resize", [y, "", b.const(np.array([1, 1, 2, 2], dtype=np.float32))])
        y = b.op("Pad", [y, b.const(np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=np.int64))])
    y = b.op("Add", [b.op("ReduceMean", [y], axes=[2, 3], keepdims=1),
                     b.op("ReduceMean", [other], axes=[2, 3], keepdims=1)])
    outputs = [b.op("Flatten", [y])]
    if kind == "custom":
        model_outputs = outputs + ["mystery_out"]
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in model_outputs]
        g = helper.make_graph(b.nodes, "g", ins, outs, initializer=b.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)],
                              ir_version=8)
        an = analyze(m)
        assert "custom op" in _reasons(an)
        assert an.groups == []
        return
    m = b.model([("x", ["N", 3, 6, 6])], outputs, opset=13)
    an = analyze(m)
    # the first conv's channels reach a use that must freeze them; the second conv reaches the output
    assert an.groups == [], [g.name for g in an.groups]
    assert len(an.frozen) >= 1


def test_control_flow_is_left_untouched():
    """An If whose branches read a conv output from the outer scope, and a Loop: no crash, frozen."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    side = b.op("Relu", [b.conv("x", 3, 4)])
    then_g = helper.make_graph([helper.make_node("Identity", [x], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", [x], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    cond = b.op("Greater", [b.op("ReduceSum", ["x"], keepdims=0), b.const(np.float32(0))])
    b.nodes.append(helper.make_node("If", [cond], ["if_out"], then_branch=then_g, else_branch=else_g, name="if"))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    b.nodes.append(helper.make_node("Loop", [b.const(np.array(2, dtype=np.int64)), "", side], ["loop_out"],
                                    body=body, name="loop"))
    y1 = b.op("ReduceMean", ["if_out"], axes=[2, 3], keepdims=0)
    y2 = b.op("ReduceMean", ["loop_out"], axes=[2, 3], keepdims=0)
    inner = b.op("Relu", [b.conv("x", 3, 5)])
    y3 = b.op("ReduceMean", [b.conv(inner, 5, 2)], axes=[2, 3], keepdims=0)
    m = b.model([("x", ["N", 3, 4, 4])], [y3, y1, y2], opset=13)  # the pruned path feeds the scored output
    an = analyze(m)
    assert [g.size for g in an.groups] == [5]
    assert "control flow" in _reasons(an)
    feeds = random_feeds(m)
    keep = {0: np.array([0, 3])}
    pruned = prune_channels(an, keep)
    onnx.checker.check_model(pruned, full_check=True)
    for a, c in zip(ort_run(pruned, feeds), ort_run(mask_channels(an, keep), feeds)):
        assert_close(a, c)


def test_prelu_resize_pad_pass_through():
    b = GraphBuilder()
    x = b.op("PRelu", [b.conv("x", 3, 8), b.rand(8, 1, 1)])
    x = b.op("Resize", [x, "", b.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    x = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))], mode="reflect")
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("InstanceNormalization", [x, b.rand(8), b.rand(8)])
    m = b.model([("x", ["N", 3, 4, 4])], [_head(b, b.op("Clip", [x, b.const(np.float32(0)),
                                                              b.const(np.float32(6))]), 8)], opset=13)
    an = _check_random(m)
    assert [g.size for g in an.groups] == [8]


@pytest.mark.parametrize("op,opset", [("Upsample", 9), ("Resize", 10)])
def test_upsample_with_computed_scales_is_frozen_for_that_reason(op, opset):
    """interpolate(size=...) exports scales computed from shapes; the freeze said the channel axis was scaled."""
    b = GraphBuilder()
    x = b.conv("x", 3, 8)
    shape = b.op("Cast", [b.op("Shape", [x])], to=1)
    scales = b.op("Mul", [b.op("Div", [shape, shape]), b.const(np.array([1, 1, 2, 2], dtype=np.float32))])
    up = b.op(op, [x, scales], mode="nearest")
    m = b.model([("x", ["N", 3, 4, 4])], [_head(b, up, 8)], opset=opset)
    name = next(n.name for n in m.graph.node if n.op_type == op)
    reasons = [f["reason"] for f in analyze(m).frozen]
    assert f"{op} {name} has computed scales" in " ".join(reasons)
    assert not any("scales the channel axis" in r for r in reasons)


def test_depthwise_multiplier_and_convtranspose():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 4)])
    x = b.conv(x, 4, 8, group=4)  # depthwise, multiplier 2
    ct = b.op("ConvTranspose", [x, b.rand(8, 6, 2, 2), b.rand(6)], strides=[2, 2])
    dwt = b.op("ConvTranspose", [ct, b.rand(6, 1, 3, 3)], group=6, pads=[1, 1, 1, 1])
    m = b.model([("x", ["N", 3, 4, 4])], [_head(b, b.op("Relu", [dwt]), 6)], opset=13)
    an = _check_random(m, seeds=range(4))
    assert sorted(g.size for g in an.groups) == [4, 6]


def test_ignore_patterns():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    y = b.op("Relu", [b.conv(x, 8, 6)])
    m = b.model([("x", ["N", 3, 4, 4])], [_head(b, y, 6)], opset=13)
    assert len(analyze(m).groups) == 2
    conv_names = [n.name for n in m.graph.node if n.op_type == "Conv"]
    an = analyze(m, ignore=[conv_names[0]])
    assert [g.size for g in an.groups] == [6] and "ignore pattern" in _reasons(an)
    w2 = m.graph.node[2].input[1]
    an = analyze(m, ignore=["nomatch*", w2])
    assert an.groups == []  # w2 is a consumer of the first group and the producer of the second


def test_initializers_listed_as_inputs_and_bad_keep():
    b = GraphBuilder()
    y = b.op("Relu", [b.conv(b.op("Relu", [b.conv("x", 3, 8)]), 8, 4)])
    m = b.model([("x", ["N", 3, 4, 4])], [_head(b, y, 4)], opset=11)
    for init in m.graph.initializer:  # IR 3 style
        m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    an = _check_random(m)
    assert len(an.groups) == 2
    assert {i.name for i in an.model.graph.input} == {"x"}
    with pytest.raises(UsageError, match="0 channels"):
        prune_channels(an, {0: np.array([], dtype=np.int64)})
    with pytest.raises(UsageError, match="outside"):
        prune_channels(an, {0: np.array([8])})
    with pytest.raises(UsageError, match="does not exist"):
        prune_channels(an, {7: np.array([0])})


def test_unsorted_graph_is_refused():
    b = GraphBuilder()
    y = b.op("Relu", [b.conv("x", 3, 4)])
    m = b.model([("x", ["N", 3, 4, 4])], [y], opset=13)
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    with pytest.raises(ModelError, match="topologically"):
        analyze(m)


def test_resize_sizes_expand_and_reshape_copy_dims_are_rewritten():
    """Constants that spell the channel count (Resize sizes, Expand shape) and Reshape 0/-1 targets."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    x = b.op("Resize", [x, "", "", b.const(np.array([2, 8, 8, 8], dtype=np.int64))], mode="nearest")
    gate = b.op("Sigmoid", [b.op("ReduceMean", [x], axes=[2, 3], keepdims=1)])
    gate = b.op("Expand", [gate, b.const(np.array([1, 8, 8, 8], dtype=np.int64))])
    x = b.op("Mul", [x, gate])
    r = b.op("Reshape", [x, b.const(np.array([0, 0, -1], dtype=np.int64))])  # [N, C, H*W]
    y = b.op("Gemm", [b.op("ReduceMax", [r], axes=[2], keepdims=0), b.rand(8, 3)])
    m = b.model([("x", [2, 3, 4, 4])], [y], opset=13)
    an = _check_random(m, shapes={"x": (2, 3, 4, 4)})
    assert [g.size for g in an.groups] == [8]
    pruned = prune_channels(an, {0: np.array([0, 5, 6])})
    ints = [onnx.numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer if i.data_type == TensorProto.INT64]
    assert [2, 3, 8, 8] in ints and [1, 3, 8, 8] in ints and [0, 0, -1] in ints


def test_folding_keeps_semantics():
    """Constant nodes, a transposed weight and a Cast chain are folded into initializers."""
    b = GraphBuilder()
    wt = b.rand(8, 3, 3, 3)
    w = b.op("Cast", [b.op("Transpose", [b.op("Transpose", [wt], perm=[1, 0, 2, 3])], perm=[1, 0, 2, 3])],
             to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("Constant", [], ["two"], value_float=2.0, name="cst"))
    x = b.op("Mul", [b.op("Conv", ["x", w], pads=[1, 1, 1, 1]), "two"])
    m = b.model([("x", ["N", 3, 4, 4])], [_head(b, b.op("Relu", [x]), 8)], opset=13)
    an = _check_random(m)
    assert [n.op_type for n in an.model.graph.node] == ["Conv", "Mul", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    feeds = random_feeds(m)
    np.testing.assert_allclose(ort_run(an.model, feeds)[0], ort_run(m, feeds)[0], rtol=1e-6)


def test_keras_style_se_with_squeeze_gemm_unsqueeze():
    """GAP → Squeeze → Gemm → Relu → Gemm → Sigmoid → Unsqueeze → Mul (tf2onnx-style SE block)."""
    b = GraphBuilder()
    c = 8
    x = b.op("Relu", [b.conv("x", 3, c)])
    s = b.op("Squeeze", [b.op("GlobalAveragePool", [x]), b.const(np.array([2, 3], dtype=np.int64))])
    s = b.op("Relu", [b.op("Gemm", [s, b.rand(4, c), b.rand(4)], transB=1)])
    s = b.op("Sigmoid", [b.op("Gemm", [s, b.rand(c, 4), b.rand(c)], transB=1)])
    gate = b.op("Unsqueeze", [s, b.const(np.array([2, 3], dtype=np.int64))])
    y = b.op("Mul", [x, gate])
    m = b.model([("x", ["N", 3, 5, 5])], [_head(b, b.conv(y, c, 6), 6)], opset=13)
    an = _check_random(m)
    assert sorted(g.size for g in an.groups) == [4, 6, 8]
    g8 = next(g for g in an.groups if g.size == 8)
    assert len(g8.producers()) == 4  # conv W/B and the expanding Gemm's W/B


def test_recurrent_layer_freezes_its_input():
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Gemm", ["x", b.rand(6, 5)])])  # [N, 5]
    seq = b.op("Unsqueeze", [h, b.const(np.array([0], dtype=np.int64))])  # [1, N, 5]
    w, r = b.rand(1, 12, 5), b.rand(1, 12, 3)
    y = b.op("LSTM", [seq, w, r], n_out=3, hidden_size=3)[0]
    m = b.model([("x", ["N", 6])], [y], opset=13)
    an = analyze(m)
    assert an.groups == [] and "op LSTM" in _reasons(an)


def test_a_flatten_that_interleaves_channels_is_declined_for_that_reason():
    """Conv -> Reshape [N, 16, 64] -> MatMul [64, 4]: the MatMul's 4 channels are the innermost axis, so Flatten
    interleaves them with the 16 before them. All shapes are static: the reason used to ask for --input-shape."""
    b = GraphBuilder()
    c = b.op("Relu", [b.conv("x", 3, 16)])
    r = b.op("Reshape", [c, b.const(np.array([0, 16, 64], np.int64))])
    m = b.op("Relu", [b.op("MatMul", [r, b.rand(64, 4)])])
    y = b.op("Gemm", [b.op("Flatten", [m], axis=1), b.rand(3, 64)], transB=1)
    an = analyze(b.model([("x", ["N", 3, 8, 8])], [y]))
    assert ("interleaves the channels with the axes flattened before them (channels are not the first flattened "
            "axis)") in _reasons(an)
    assert "--input-shape" not in _reasons(an)


@pytest.mark.parametrize("opset", [11, 17])
def test_a_squeeze_without_axes_keeps_a_channel_axis_pruned_to_one(opset):
    """GAP -> Squeeze() -> MatMul at batch 1: with one channel kept, an axis-less Squeeze also dropped the
    channel axis and the MatMul failed in onnxruntime. The rewrite now writes the dense model's axes."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 4)])
    s = b.op("Squeeze", [b.op("GlobalAveragePool", [x])])
    y = b.op("MatMul", [s, b.rand(4, 3)])
    m = b.model([("x", [1, 3, 5, 5])], [y], opset=opset)
    an = analyze(m)
    (g,) = an.groups
    feeds = random_feeds(an.model, batch=1, seed=3)
    for kept in ([2], [0, 3], [0, 1, 2, 3]):
        pruned = check_prune_equals_mask(an, {g.id: np.array(kept)}, feeds)
        assert ort_run(pruned, feeds)[0].shape == (3,)


def test_a_weight_shared_along_two_axes_counts_its_macs_and_params_once():
    """conv0 -> two convs sharing W (16 -> 16) -> GAP -> Gemm: one group couples conv0's outputs with both
    axes of W. It showed 54 % of the MACs (W's MACs credited to its first node only) and 181 % of the
    parameters (W counted once per axis); both are checked against a count from the initializers."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 16)])
    w, bias = b.rand(16, 16, 3, 3), b.rand(16)
    a = b.op("Relu", [b.op("Conv", [x, w, bias], pads=[1, 1, 1, 1])])
    y = b.op("Relu", [b.op("Conv", [a, w, bias], pads=[1, 1, 1, 1])])
    m = b.model([("x", [1, 3, 6, 6])], [_head(b, y, 16)])
    an = _check_random(m)
    (g,) = an.groups
    convs = [n for n in an.model.graph.node if n.op_type == "Conv"]
    conv_macs = [36 * 3 * 9 * 16, 36 * 16 * 9 * 16, 36 * 16 * 9 * 16]
    gemm_macs = 16 * 3
    assert an.cost.macs == sum(conv_macs) + gemm_macs and len(convs) == 3
    assert g.macs == an.cost.macs  # every layer reads the group's channels
    assert g.macs_share == pytest.approx(1.0)
    inits = {i.name: int(np.prod(i.dims)) for i in an.model.graph.initializer}
    gemm_bias = next(n.input[2] for n in an.model.graph.node if n.op_type == "Gemm")
    assert g.params == sum(inits.values()) - inits[gemm_bias]  # all but the classifier's bias
    assert 0 < g.params_share < 1


def test_a_view_after_a_chunk_keeps_the_layer_before_it_prunable():
    """torch.chunk slices with computed bounds, so shape inference loses the batch dim below it; the
    flatten ``x.view(x.size(0), -1)`` copies that unknown dim, which cancels when the -1 is solved."""
    torch = pytest.importorskip("torch")
    from tests.test_graph_support import torch_export

    class ChunkNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.ca, self.cb = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(4, 6, 1)
            self.ct = torch.nn.ConvTranspose2d(12, 8, 2, stride=2)
            self.fc = torch.nn.Linear(8 * 4 * 4, 3)

        def forward(self, x):
            a, b = torch.relu(self.c0(x)).chunk(2, dim=1)
            x = torch.nn.functional.max_pool2d(torch.cat([self.ca(a), self.cb(b)], 1), 4)
            x = torch.relu(self.ct(x))
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    an = _check_random(torch_export(ChunkNet(), torch.randn(2, 3, 8, 8), opset=17), seeds=range(4))
    ct = [g for g in an.groups if any(m.initializer == "ct.weight" and m.role == "producer" for m in g.members)]
    assert [g.size for g in ct] == [8], _reasons(an)
    assert "mixes the channel axis" not in _reasons(an)


def test_a_conv_with_a_computed_bias_is_listed_frozen_with_the_export_fix():
    """An export without graph optimisation writes a zero bias as Expand(CastLike(0, x), Shape(W)). Before:
    that conv's channels were neither a group nor listed frozen, and the refusal named an unrelated node."""
    b = GraphBuilder()
    wname = b.rand(8, 3, 3, 3)
    zero = b.op("CastLike", [b.const(np.array(0.0, np.float32)), "x"])
    bias = b.op("Expand", [zero, b.op("Shape", [wname], start=0, end=1)])
    h = b.op("Relu", [b.op("Conv", ["x", wname, bias], pads=[1, 1, 1, 1])])
    y = _head(b, h, 8)
    an = analyze(b.model([("x", ["N", 3, 6, 6])], [y], opset=15))
    assert an.groups == []
    frozen = [f for f in an.frozen if f["channels"] == 8]
    assert len(frozen) == 1 and "has a computed bias" in frozen[0]["reason"], an.frozen
    assert "optimize=True" in frozen[0]["reason"]
    assert frozen[0]["reason"].count("computed bias") == 1  # each reason once, however many uses freeze it
