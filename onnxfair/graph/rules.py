"""Per-op channel rules: one walk over the graph in topological order.

Each rule reads the channel layouts of its inputs and either (a) produces a new channel space (Conv,
Gemm, MatMul, ConvTranspose), (b) passes layouts through, moving the channel axis if needed, and
registers the per-channel initializers to slice, (c) couples layouts (residual Add, gating Mul), or
(d) freezes the spaces it cannot handle, with a reason. Ops not listed here freeze every space that
reaches them: the walk declines rather than guesses.

Shape values (outputs of Shape and of Gather/Slice/Concat/Unsqueeze/Squeeze/Cast over them) are traced
element by element, so a Reshape whose target is computed from the batch size keeps its channels
prunable, while any use of a channel dimension's value that cannot be rewritten freezes that space.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction
from math import prod
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfair.graph.channels import (
    Layout,
    Seg,
    Spaces,
    TensorChan,
    layout_size,
    merge_fixed,
    same_layout,
    scale_layout,
    sub_layout,
    union_layouts,
)
from onnxfair.graph.fold import subgraph_references, upstream_nodes


@dataclass(frozen=True)
class RawMember:
    """An initializer axis whose positions follow `segs` (before groups are formed)."""

    init: str
    axis: int
    role: str
    node: int
    input: int
    segs: Layout


UNARY = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Cast", "CastLike", "Clip",
    "Abs", "Neg", "Reciprocal", "Sqrt", "Exp", "Log", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan",
    "Not", "IsNaN", "IsInf", "Shrink", "BitwiseNot", "Swish", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Asinh",
    "Acosh", "Atanh",
}
BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Where", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "BitwiseAnd", "BitwiseOr",
    "BitwiseXor",
}
POOLS = {
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
}
REDUCE = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
}
TRACE = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity"}
CONTROL = {"If", "Loop", "Scan"}

Elem = tuple  # ("c", value, src) | ("d", tensor, axis) | ("u",)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class Walker:
    """State of one analysis walk: layouts per tensor, spaces, members to slice, rewrite fixes."""

    def __init__(self, model: onnx.ModelProto, dims: dict[str, tuple], allow_inexact: bool = False,
                 ignore: tuple[str, ...] = ()) -> None:
        self.model = model
        self.g = model.graph
        self.nodes = list(self.g.node)
        self.dims = dims
        self.allow_inexact = allow_inexact
        self.ignore = tuple(ignore)
        self.inits = {i.name: i for i in self.g.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self.spaces = Spaces()
        self.lay: dict[str, TensorChan] = {}
        self.elems: dict[str, list[Elem]] = {}
        self.raw: list[RawMember] = []
        self.fixes: list[tuple] = []
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

    # ---- helpers -------------------------------------------------------------------------------
    def label(self, idx: int) -> str:
        n = self.nodes[idx]
        return n.name or (n.output[0] if n.output else f"{n.op_type}_{idx}")

    def const(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.inits[name])
        return self.arrays[name]

    def const_dims(self, name: str) -> tuple[int, ...] | None:
        init = self.inits.get(name)
        return tuple(int(d) for d in init.dims) if init is not None else None

    def int_list(self, name: str) -> list[int] | None:
        """A small constant integer tensor as a list (None if not constant)."""
        if not name:
            return None
        init = self.inits.get(name)
        if init is None or prod(init.dims) > 4096:
            return None
        v = self.const(name)
        if v.dtype.kind not in "iu":
            return None
        return [int(x) for x in v.reshape(-1)]

    def rank(self, name: str) -> int | None:
        if name in self.lay:
            return self.lay[name].rank
        d = self.dims.get(name)
        if d is not None:
            return len(d)
        cd = self.const_dims(name)
        return len(cd) if cd is not None else None

    def dim(self, name: str, axis: int):
        d = self.dims.get(name)
        if d is None or axis >= len(d):
            return None
        return d[axis]

    def freeze_tc(self, tc: TensorChan | None, reason: str) -> None:
        if tc is None:
            return
        for s in tc.segs:
            if s.space is not None:
                self.spaces.freeze(s.space, reason)

    def freeze_inputs(self, idx: int, reason: str, skip: tuple[int, ...] = ()) -> None:
        for j, x in enumerate(self.nodes[idx].input):
            if j not in skip and x in self.lay:
                self.freeze_tc(self.lay[x], reason)

    def member(self, init: str, axis: int, role: str, idx: int, j: int, segs: Layout) -> bool:
        dims = self.const_dims(init)
        if dims is None or axis >= len(dims) or dims[axis] != layout_size(segs):
            return False
        self.raw.append(RawMember(init, axis, role, idx, j, segs))
        return True

    def new_space(self, size: int, idx: int) -> Layout:
        return (Seg(self.spaces.new(size, self.label(idx)), 0, int(size), 1),)

    def set_out(self, name: str, tc: TensorChan | None) -> None:
        if name and tc is not None:
            self.lay[name] = tc

    # ---- shape values ----------------------------------------------------------------------------
    def elems_of(self, name: str, idx: int, j: int) -> list[Elem] | None:
        if name in self.elems:
            return self.elems[name]
        vals = self.int_list(name)
        if vals is None or len(self.const_dims(name) or ()) > 1:
            return None
        return [("c", v, (idx, j, k)) for k, v in enumerate(vals)]

    def is_channel_dim(self, e: Elem) -> bool:
        return e[0] == "d" and e[1] in self.lay and self.lay[e[1]].axis == e[2]

    def freeze_channel_elems(self, elems: list[Elem] | None, reason: str) -> None:
        for e in elems or ():
            if self.is_channel_dim(e):
                self.freeze_tc(self.lay[e[1]], reason)

    def trace(self, idx: int, node: onnx.NodeProto) -> bool:
        """Element-wise shape value of the node's output; False when it cannot be traced."""
        op, out = node.op_type, node.output[0] if node.output else ""
        a = _attrs(node)
        if op == "Shape":
            r = self.rank(node.input[0])
            if r is None:
                return False
            start, end = _norm(a.get("start", 0), r), a.get("end", r)
            end = min(_norm(end, r), r)
            self.elems[out] = [("d", node.input[0], d) for d in range(max(start, 0), end)]
            return True
        if not any(x in self.elems for x in node.input):
            return True  # not a shape value: nothing to trace
        src = self.elems_of(node.input[0], idx, 0)
        if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
            if src is None:
                return False
            self.elems[out] = list(src)
            return True
        if op == "Gather":
            ind = self.int_list(node.input[1])
            if src is None or ind is None or a.get("axis", 0) != 0:
                return False
            try:
                self.elems[out] = [src[i] for i in ind]
            except IndexError:
                return False
            return True
        if op == "Slice":
            if src is None:
                return False
            if self.opset < 10:
                starts, ends, axes, steps = a.get("starts"), a.get("ends"), a.get("axes", [0]), [1]
            else:
                starts, ends = self.int_list(node.input[1]), self.int_list(node.input[2])
                axes = self.int_list(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
                steps = self.int_list(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
            if starts is None or ends is None or axes != [0] or steps is None:
                return False
            self.elems[out] = src[slice(starts[0], ends[0], steps[0])]
            return True
        if op == "Concat":
            if a.get("axis", 0) not in (0, -1):
                return False
            res: list[Elem] = []
            for j, x in enumerate(node.input):
                e = self.elems_of(x, idx, j)
                if e is None:
                    d = self.dims.get(x)
                    if d is None or len(d) != 1 or not isinstance(d[0], int):
                        return False
                    e = [("u",)] * d[0]
                res.extend(e)
            self.elems[out] = res
            return True
        return False

    # ---- the walk ----------------------------------------------------------------------------------
    def run(self) -> None:
        first = self.g.output[0].name if self.g.output else ""
        scored = set(upstream_nodes(self.g, [first]))
        for idx, node in enumerate(self.nodes):
            op = node.op_type
            default = node.domain in ("", "ai.onnx")
            traced = default and op in TRACE and self.trace(idx, node)
            for j, x in enumerate(node.input):
                if x in self.elems and not traced and not (op == "Reshape" and j == 1):
                    self.freeze_channel_elems(
                        self.elems[x], f"{op} {self.label(idx)} computes with a channel count read by Shape")
            rule = RULES.get(op) if default else None
            if rule is None:
                what = f"custom op {node.domain}::{op}" if not default else f"op {op}"
                self.freeze_inputs(idx, f"{what} ({self.label(idx)}) is not supported by channel analysis")
            else:
                rule(self, idx, node)
            if self.ignore:
                self._apply_ignore(idx, node)
            if idx not in scored:  # its channels change only what nothing scores: gradients there are zero
                for o in node.output:
                    self.freeze_tc(self.lay.get(o), f"{self.label(idx)} does not feed the first output {first}, "
                                                    "the one scored and judged")
        for o in self.g.output:
            if o.name in self.lay:
                self.freeze_tc(self.lay[o.name], f"reaches graph output {o.name}")
            self.freeze_channel_elems(self.elems.get(o.name), f"channel count is a graph output ({o.name})")

    def _apply_ignore(self, idx: int, node: onnx.NodeProto) -> None:
        for pat in self.ignore:
            if node.name and fnmatchcase(node.name, pat):
                reason = f"node {node.name} matches ignore pattern {pat!r}"
                self.freeze_inputs(idx, reason)
                for o in node.output:
                    self.freeze_tc(self.lay.get(o), reason)
                return


# ---- rules ---------------------------------------------------------------------------------------------
Rule = Callable[[Walker, int, onnx.NodeProto], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def _pass(w: Walker, idx: int, node: onnx.NodeProto, tc: TensorChan | None, extra_ok: tuple[int, ...] = ()) -> None:
    """Give every output the layout tc; any other input carrying channels is frozen."""
    skip = (0,) + extra_ok
    w.freeze_inputs(idx, f"{node.op_type} {w.label(idx)} mixes channels from a second input", skip=skip)
    if tc is None:
        return
    for o in node.output:
        w.set_out(o, tc)


@rule(*UNARY)
def r_unary(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0]) if node.input else None
    _pass(w, idx, node, tc)  # every output (Dropout's mask too) has the input's shape


@rule("Constant")
def r_constant(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    return None


@rule("Shape")
def r_shape(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    return None  # the value is traced; uses of a channel dim are checked where consumed


def _conv_inputs(w: Walker, idx: int, node: onnx.NodeProto):
    """(input, weight, bias or "", weight dims, input channel layout or None) of a Conv/ConvTranspose, or
    None when its weight or bias is computed (then its inputs are frozen). A layout on another axis than
    1 is frozen and dropped."""
    x, wn = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    wd = w.const_dims(wn)
    tc = w.lay.get(x)
    if wd is None or (b and w.const_dims(b) is None):
        reason = (f"{node.op_type} {w.label(idx)} has a computed {'weight' if wd is None else 'bias'} (export "
                  "with graph optimisation on, as torch.onnx.export(optimize=True) does, to make it an initializer)")
        w.freeze_inputs(idx, reason)
        if wd is not None:  # its output channels are known: listed frozen, with the reason, not left unnamed
            cout = wd[0] if node.op_type == "Conv" else wd[1] * int(_attrs(node).get("group", 1))
            _frozen_output(w, idx, node.output[0], cout, w.rank(x) or len(wd), reason)
        return None
    if tc is not None and tc.axis != 1:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} reads channels on axis {tc.axis}")
        tc = None
    return x, wn, b, wd, tc


@rule("Conv")
def r_conv(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    inputs = _conv_inputs(w, idx, node)
    if inputs is None:
        return
    x, wn, b, wd, tc = inputs
    g = int(_attrs(node).get("group", 1))
    cout, cin = wd[0], wd[1] * g
    rank = w.rank(x) or len(wd)
    out = node.output[0]
    if g == 1:
        if tc is not None and not w.member(wn, 1, "consumer", idx, 1, tc.segs):
            w.freeze_tc(tc, f"Conv {w.label(idx)} input width does not match its weight")
        segs = w.new_space(cout, idx)
        w.member(wn, 0, "producer", idx, 1, segs)
        if b:
            w.member(b, 0, "producer", idx, 2, segs)
        w.set_out(out, TensorChan(1, segs, rank))
        return
    if g == cin and cout % cin == 0:  # depthwise, channel multiplier cout // cin
        if tc is None:
            return
        segs = scale_layout(tc.segs, Fraction(cout // cin))
        if segs is None or not w.member(wn, 0, "param", idx, 1, segs):
            w.freeze_tc(tc, f"depthwise Conv {w.label(idx)} does not match its input layout")
            return
        if b:
            w.member(b, 0, "param", idx, 2, segs)
        w.fixes.append(("group", idx, tc.segs))
        w.set_out(out, TensorChan(1, segs, rank))
        return
    w.freeze_tc(tc, f"grouped Conv {w.label(idx)} (group={g}) would need the same channels removed in every group")
    _frozen_output(w, idx, out, cout, rank, f"output of grouped Conv {w.label(idx)} (group={g}): every group must "
                   "keep the same number of channels")


@rule("ConvTranspose")
def r_convt(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    inputs = _conv_inputs(w, idx, node)
    if inputs is None:
        return
    x, wn, b, wd, tc = inputs
    g = int(_attrs(node).get("group", 1))
    cin, cout = wd[0], wd[1] * g
    rank = w.rank(x) or len(wd)
    if g == 1:
        if tc is not None and not w.member(wn, 0, "consumer", idx, 1, tc.segs):
            w.freeze_tc(tc, f"ConvTranspose {w.label(idx)} input width does not match its weight")
        segs = w.new_space(cout, idx)
        w.member(wn, 1, "producer", idx, 1, segs)
        if b:
            w.member(b, 0, "producer", idx, 2, segs)
        w.set_out(node.output[0], TensorChan(1, segs, rank))
        return
    if g == cin == cout and wd[1] == 1:
        if tc is None:
            return
        w.member(wn, 0, "param", idx, 1, tc.segs)
        if b:
            w.member(b, 0, "param", idx, 2, tc.segs)
        w.fixes.append(("group", idx, tc.segs))
        w.set_out(node.output[0], tc)
        return
    w.freeze_tc(tc, f"grouped ConvTranspose {w.label(idx)} (group={g})")
    _frozen_output(w, idx, node.output[0], cout, rank, f"output of grouped ConvTranspose {w.label(idx)} (group={g})")


def _frozen_output(w: Walker, idx: int, out: str, size: int, rank: int, reason: str) -> None:
    """Give an output whose channels cannot be removed a space of its own, frozen: `inspect --groups` then
    lists it with the reason, and whatever reads it is frozen with it."""
    tc = TensorChan(1, w.new_space(size, idx), rank)
    w.freeze_tc(tc, reason)
    w.set_out(out, tc)


@rule("Gemm")
def r_gemm(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    a_name, b_name = node.input[0], node.input[1]
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    at = _attrs(node)
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    bd = w.const_dims(b_name)
    tc = w.lay.get(a_name)
    if bd is None or len(bd) != 2:
        w.freeze_inputs(idx, f"Gemm {w.label(idx)} has a computed B operand")
        return
    if tc is not None:
        if tc.axis != (0 if ta else 1) or not w.member(b_name, 1 if tb else 0, "consumer", idx, 1, tc.segs):
            w.freeze_tc(tc, f"Gemm {w.label(idx)} reads channels on its row axis")
    n = bd[0] if tb else bd[1]
    if c_name and w.const_dims(c_name) is None:
        w.freeze_inputs(idx, f"Gemm {w.label(idx)} adds a computed C", skip=(0,))
        return
    segs = w.new_space(n, idx)
    w.member(b_name, 0 if tb else 1, "producer", idx, 1, segs)
    if c_name:
        cd = w.const_dims(c_name)
        if cd and cd[-1] == n and n > 1:
            w.member(c_name, len(cd) - 1, "producer", idx, 2, segs)
    w.set_out(node.output[0], TensorChan(1, segs, 2))


@rule("MatMul")
def r_matmul(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    a_name, b_name = node.input[0], node.input[1]
    bd = w.const_dims(b_name)
    tc = w.lay.get(a_name)
    ra = w.rank(a_name)
    if bd is None or len(bd) != 2 or w.const_dims(a_name) is not None or ra is None:
        w.freeze_inputs(idx, f"MatMul {w.label(idx)} multiplies two computed tensors or a rank>2 weight")
        return
    if tc is not None:
        if tc.axis != ra - 1 or not w.member(b_name, 0, "consumer", idx, 1, tc.segs):
            w.freeze_tc(tc, f"MatMul {w.label(idx)} reads channels on a batch axis")
    segs = w.new_space(bd[1], idx)
    w.member(b_name, 1, "producer", idx, 1, segs)
    rout = max(ra, 2) if ra >= 2 else 1
    w.set_out(node.output[0], TensorChan(rout - 1, segs, rout))


@rule(*BINARY)
def r_binary(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    names = [x for x in node.input]
    with_lay = [(j, w.lay[x]) for j, x in enumerate(names) if x and x in w.lay]
    if not with_lay:
        return
    ranks = [w.rank(x) if x else 0 for x in names]
    out_dims = w.dims.get(node.output[0])
    if any(r is None for r in ranks):
        w.freeze_inputs(idx, f"{node.op_type} {w.label(idx)}: operand rank unknown")
        return
    rout = len(out_dims) if out_dims is not None else max(ranks)
    axes = {tc.axis + rout - tc.rank for _, tc in with_lay}
    if len(axes) != 1:
        w.freeze_inputs(idx, f"{node.op_type} {w.label(idx)} combines channels on different axes")
        return
    oa = axes.pop()
    segs = with_lay[0][1].segs
    for _, tc in with_lay[1:]:
        if not union_layouts(w.spaces, segs, tc.segs):
            w.freeze_inputs(idx, f"{node.op_type} {w.label(idx)} combines differently split channel layouts")
            return
    size = layout_size(segs)
    lay_idx = {j for j, _ in with_lay}
    for j, x in enumerate(names):
        if not x or j in lay_idx:
            continue
        ax = oa - (rout - ranks[j])
        if ax < 0:
            continue
        cd = w.const_dims(x)
        d = cd[ax] if cd is not None else w.dim(x, ax)
        if d == 1:
            continue
        if cd is not None and d == size:
            w.member(x, ax, "param", idx, j, segs)
            continue
        w.freeze_inputs(idx, f"{node.op_type} {w.label(idx)}: operand {x} has fixed channels")
        return
    for o in node.output:
        w.set_out(o, TensorChan(oa, segs, rout))


def _per_channel_params(w: Walker, idx: int, node: onnx.NodeProto, tc: TensorChan, inputs: range) -> bool:
    for j in inputs:
        if j >= len(node.input) or not node.input[j]:
            continue
        x = node.input[j]
        cd = w.const_dims(x)
        if cd is None:
            w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} has computed per-channel inputs")
            return False
        ax = len(cd) - 1 if node.op_type in ("LayerNormalization", "RMSNormalization") else 0
        if cd and cd[ax] == 1 and tc.size != 1:
            continue
        if not w.member(x, ax, "param", idx, j, tc.segs):
            w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} per-channel input {x} does not match")
            return False
    return True


@rule("BatchNormalization", "InstanceNormalization")
def r_norm(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    if tc.axis != 1:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} normalises axis 1, channels are on axis {tc.axis}")
        return
    if any(o for o in node.output[1:]):
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} is in training mode")
        return
    if _per_channel_params(w, idx, node, tc, range(1, len(node.input))):
        w.set_out(node.output[0], tc)


@rule("LayerNormalization", "RMSNormalization")
def r_layernorm(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    start = _norm(int(_attrs(node).get("axis", -1)), tc.rank)
    if any(o for o in node.output[1:]):
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} exposes its statistics")
        return
    if tc.axis < start:
        w.freeze_inputs(idx, f"{node.op_type} {w.label(idx)} has computed scale", skip=(0,))
        w.set_out(node.output[0], tc)
        return
    if not w.allow_inexact:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} normalises over the channel axis: removing channels "
                        "changes its statistics")
        return
    if tc.axis != tc.rank - 1:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} normalises channels that are not the last axis")
        return
    if _per_channel_params(w, idx, node, tc, range(1, len(node.input))):
        for s in tc.segs:
            if s.space is not None:
                w.spaces.mark_inexact(s.space, f"{node.op_type} {w.label(idx)} statistics change")
        w.set_out(node.output[0], tc)


@rule("LpNormalization", "MeanVarianceNormalization")
def r_other_norm(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    a = _attrs(node)
    axes = [a.get("axis", -1)] if node.op_type == "LpNormalization" else a.get("axes", [0, 2, 3])
    if tc.axis in {_norm(x, tc.rank) for x in axes}:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} normalises over the channel axis")
        return
    w.set_out(node.output[0], tc)


@rule(*POOLS)
def r_pool(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    if tc.axis != 1:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} pools with channels on axis {tc.axis}")
        return
    if len(node.output) > 1 and node.output[1]:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} returns flat indices that depend on the channel count")
        return
    w.set_out(node.output[0], tc)


def _reduce_axes(w: Walker, node: onnx.NodeProto, rank: int) -> list[int] | None:
    a = _attrs(node)
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        axes = w.int_list(node.input[1])
        if axes is None:
            return None
    else:
        axes = []
    if not axes:
        return [] if a.get("noop_with_empty_axes", 0) else list(range(rank))
    return sorted({_norm(x, rank) for x in axes})


@rule(*REDUCE)
def r_reduce(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    axes = _reduce_axes(w, node, tc.rank)
    if axes is None or tc.axis in axes:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} reduces over the channel axis")
        return
    keep = int(_attrs(node).get("keepdims", 1))
    if keep:
        w.set_out(node.output[0], tc)
    else:
        w.set_out(node.output[0], TensorChan(tc.axis - sum(a < tc.axis for a in axes), tc.segs, tc.rank - len(axes)))


@rule("ArgMax", "ArgMin")
def r_arg(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    a = _attrs(node)
    ax = _norm(int(a.get("axis", 0)), tc.rank)
    if ax == tc.axis:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} picks along the channel axis")
        return
    if int(a.get("keepdims", 1)):
        w.set_out(node.output[0], tc)
    else:
        w.set_out(node.output[0], TensorChan(tc.axis - (ax < tc.axis), tc.segs, tc.rank - 1))


@rule("Softmax", "LogSoftmax", "Hardmax")
def r_softmax(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    a = _attrs(node)
    if w.opset < 13:
        ax = _norm(int(a.get("axis", 1)), tc.rank)
        mixes = tc.axis >= ax
    else:
        ax = _norm(int(a.get("axis", -1)), tc.rank)
        mixes = tc.axis == ax
    if mixes:
        w.freeze_tc(tc, f"{node.op_type} {w.label(idx)} normalises over the channel axis")
        return
    w.set_out(node.output[0], tc)


@rule("Transpose")
def r_transpose(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    perm = _attrs(node).get("perm") or list(range(tc.rank))[::-1]
    w.set_out(node.output[0], tc.moved(list(perm).index(tc.axis)))


def _axes_input(w: Walker, node: onnx.NodeProto) -> list[int] | None:
    a = _attrs(node)
    if "axes" in a:
        return list(a["axes"])
    if len(node.input) > 1 and node.input[1]:
        return w.int_list(node.input[1])
    return []


@rule("Unsqueeze")
def r_unsqueeze(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    axes = _axes_input(w, node)
    if not axes:
        w.freeze_tc(tc, f"Unsqueeze {w.label(idx)} has computed axes")
        return
    r2 = tc.rank + len(axes)
    ax = {_norm(x, r2) for x in axes}
    kept = [p for p in range(r2) if p not in ax]
    w.set_out(node.output[0], TensorChan(kept[tc.axis], tc.segs, r2))


@rule("Squeeze")
def r_squeeze(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    axes = _axes_input(w, node)
    if axes is None:
        w.freeze_tc(tc, f"Squeeze {w.label(idx)} has computed axes")
        return
    if not axes:
        d = w.dims.get(node.input[0])
        if d is None or any(x is None or isinstance(x, str) for x in d):
            w.freeze_tc(tc, f"Squeeze {w.label(idx)} without axes on a tensor of unknown shape")
            return
        axes = [i for i, x in enumerate(d) if x == 1]
        # written out in the rewrite: a group pruned to one channel would otherwise lose its channel axis too
        w.fixes.append(("squeeze_axes", idx, tuple(axes), "input" if w.opset >= 13 else "attr"))
    ax = {_norm(x, tc.rank) for x in axes}
    if tc.axis in ax:
        w.freeze_tc(tc, f"Squeeze {w.label(idx)} removes the channel axis")
        return
    w.set_out(node.output[0], TensorChan(tc.axis - sum(a < tc.axis for a in ax), tc.segs, tc.rank - len(ax)))


def _reshape_map(w: Walker, tc: TensorChan, din, dout) -> tuple[int, Layout] | None:
    """Where the channel axis lands in a reshape, and the layout there (blocks scaled)."""
    if din is None or dout is None or len(din) != tc.rank:
        return None
    if isinstance(din[tc.axis], int) and din[tc.axis] != tc.size:
        return None
    tail = din[tc.axis + 1:]
    if not all(isinstance(x, int) for x in tail):
        return None
    total = tc.size * prod(tail)
    p, b = 1, None
    for k in range(len(dout) - 1, -1, -1):
        if not isinstance(dout[k], int):
            break
        p *= dout[k]
        if p == total:
            b = k
            break
        if p > total:
            break
    if b is None:
        return None
    segs = scale_layout(tc.segs, Fraction(prod(tail), prod(dout[b + 1:])))
    return None if segs is None else (b, segs)


def _reshape_dims(w: Walker, din, elems: list[Elem], allowzero: int, src: str | None = None) -> tuple | None:
    """Reshape output dims from a traced target when shape inference left them unknown.

    A target element that copies a dim of the reshaped tensor itself (`src`; the batch in
    ``x.view(x.size(0), -1)``) cancels that dim when the -1 is solved, even when its size is unknown."""
    out: list = []
    minus = None
    copied: dict[int, int] = {}  # output position -> the input axis it copies
    for k, e in enumerate(elems):
        if e[0] == "c":
            if e[1] == -1:
                minus = k
                out.append(None)
            elif e[1] == 0 and not allowzero:
                out.append(din[k] if k < len(din) else None)
                if k < len(din) and k not in copied.values():
                    copied[k] = k
            else:
                out.append(int(e[1]))
        elif e[0] == "d":
            out.append(w.dim(e[1], e[2]))
            if e[1] == src and e[2] < len(din) and e[2] not in copied.values():
                copied[k] = e[2]
        else:
            out.append(None)
    if minus is None:
        return tuple(out)
    din_rest = [d for j, d in enumerate(din) if j not in copied.values()]
    others = [d for k, d in enumerate(out) if k != minus and k not in copied]
    if any(d is None for d in others) or any(d is None for d in din_rest):
        return tuple(out)
    syms_in = sorted(d for d in din_rest if isinstance(d, str))
    syms_out = sorted(d for d in others if isinstance(d, str))
    for sym in syms_out:
        if sym not in syms_in:
            return tuple(out)
        syms_in.remove(sym)
    num = prod(d for d in din_rest if isinstance(d, int))
    den = prod(d for d in others if isinstance(d, int))
    if den == 0 or num % den:
        return tuple(out)
    rest = num // den
    if not syms_in:
        out[minus] = rest
    elif len(syms_in) == 1 and rest == 1:
        out[minus] = syms_in[0]
    return tuple(out)


def _reshape_why(tc: TensorChan, din, dout, elems) -> str:
    if din is None or dout is None or not all(isinstance(x, int) for x in din[tc.axis + 1:]):
        return "has unknown shapes (pass --input-shape)"
    if elems is None:
        return "has a target shape that cannot be traced"
    return "mixes the channel axis with other axes"


@rule("Flatten")
def r_flatten(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    din = w.dims.get(node.input[0])
    k = _norm(int(_attrs(node).get("axis", 1)), tc.rank)
    dout = w.dims.get(node.output[0])
    if dout is None and din is not None and all(isinstance(x, int) for x in din[k:]):
        dout = (None, prod(din[k:]))
    m = _reshape_map(w, tc, din, dout) if tc.axis >= k else None
    if m is None or m[0] != 1:
        w.freeze_tc(tc, f"Flatten {w.label(idx)} {_flatten_why(tc, din, k)}")
        return
    w.set_out(node.output[0], TensorChan(1, m[1], 2))


def _flatten_why(tc: TensorChan, din, k: int) -> str:
    if din is None or not all(isinstance(x, int) for x in din[tc.axis + 1:]):
        return "needs static sizes after the channel axis (pass --input-shape)"
    if tc.axis < k:
        return "merges the channel axis into the batch axis"
    return "interleaves the channels with the axes flattened before them (channels are not the first flattened axis)"


@rule("Reshape")
def r_reshape(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    elems = w.elems_of(node.input[1], idx, 1)
    label = f"Reshape {w.label(idx)}"
    if tc is None:
        w.freeze_channel_elems(elems, f"{label} target uses a channel count")
        return
    din = w.dims.get(node.input[0])
    dout = w.dims.get(node.output[0])
    allowzero = int(_attrs(node).get("allowzero", 0))
    if (dout is None or None in dout) and elems is not None and din is not None:
        traced = _reshape_dims(w, din, elems, allowzero, node.input[0])
        if dout is not None and len(dout) == len(traced):  # keep what shape inference knew
            traced = tuple(t if t is not None else d for t, d in zip(traced, dout))
        dout = traced
    m = _reshape_map(w, tc, din, dout)
    if m is None or elems is None or len(elems) != len(dout):
        w.freeze_tc(tc, f"{label} {_reshape_why(tc, din, dout, elems)}")
        w.freeze_channel_elems(elems, f"{label} target uses a channel count")
        return
    b, segs = m
    ok = True
    fix = None
    for k, e in enumerate(elems):
        if k == b:
            if e[0] == "c" and e[1] == -1:
                continue
            if e[0] == "c" and e[1] == 0 and not allowzero:
                ok = ok and b == tc.axis and same_layout(w.spaces, segs, tc.segs)
            elif e[0] == "c" and e[2] is not None:
                fix = ("reshape", e[2], segs)
            elif e[0] == "d" and e[1] in w.lay and w.lay[e[1]].axis == e[2]:
                ok = ok and same_layout(w.spaces, w.lay[e[1]].segs, segs)
            else:
                ok = False
        else:
            if w.is_channel_dim(e):
                w.freeze_tc(w.lay[e[1]], f"{label} target uses a channel count at a non-channel axis")
            if e[0] == "c" and e[1] == 0 and not allowzero and k == tc.axis:
                ok = False
    if not ok:
        w.freeze_tc(tc, f"{label} target hard-codes the channel count in a way that cannot be rewritten")
        return
    if fix is not None:
        w.fixes.append(fix)
    w.set_out(node.output[0], TensorChan(b, segs, len(dout)))


@rule("Concat")
def r_concat(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    with_lay = [w.lay[x] for x in node.input if x in w.lay]
    if not with_lay:
        return
    rank = with_lay[0].rank
    ax = _norm(int(_attrs(node).get("axis", 0)), rank)
    if all(tc.axis == ax for tc in with_lay):
        segs: list[Seg] = []
        for x in node.input:
            if x in w.lay:
                segs.extend(w.lay[x].segs)
                continue
            cd = w.const_dims(x)
            d = cd[ax] if cd is not None else w.dim(x, ax)
            if not isinstance(d, int):
                w.freeze_inputs(idx, f"Concat {w.label(idx)}: input {x} has an unknown channel count")
                return
            segs.append(Seg(None, 0, d, 1))
        w.set_out(node.output[0], TensorChan(ax, merge_fixed(segs), rank))
        return
    # Concat along another axis: every input must carry the same channels.
    if len(with_lay) != len([x for x in node.input if x]) or len({tc.axis for tc in with_lay}) != 1:
        w.freeze_inputs(idx, f"Concat {w.label(idx)} joins tensors with and without prunable channels")
        return
    segs0 = with_lay[0].segs
    for tc in with_lay[1:]:
        if not union_layouts(w.spaces, segs0, tc.segs):
            w.freeze_inputs(idx, f"Concat {w.label(idx)} joins differently split channel layouts")
            return
    w.set_out(node.output[0], with_lay[0])


@rule("Split")
def r_split(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    a = _attrs(node)
    ax = _norm(int(a.get("axis", 0)), tc.rank)
    if ax != tc.axis:
        w.freeze_inputs(idx, f"Split {w.label(idx)} mixes channels with a second input", skip=(0,))
        for o in node.output:
            w.set_out(o, tc)
        return
    n = len(node.output)
    if "split" in a:
        sizes, how = list(a["split"]), "attr"
    elif len(node.input) > 1 and node.input[1]:
        sizes, how = w.int_list(node.input[1]), "input"
    else:
        size = tc.size
        chunk = -(-size // int(a.get("num_outputs", n)))
        sizes = [min(chunk, size - i * chunk) for i in range(n)]
        how = "input" if w.opset >= 13 else "attr"
    if sizes is None or len(sizes) != n or sum(sizes) != tc.size:
        w.freeze_tc(tc, f"Split {w.label(idx)} has computed or inconsistent split sizes")
        return
    subs = []
    lo = 0
    for s in sizes:
        sub = sub_layout(tc.segs, lo, lo + s)
        if sub is None:
            w.freeze_tc(tc, f"Split {w.label(idx)} cuts through one flattened channel")
            return
        subs.append(sub)
        lo += s
    for sub in subs:
        for s in sub:
            if s.space is not None:
                w.spaces.add_part(s.space, s.start, s.start + s.length)
    w.fixes.append(("split", idx, tuple(subs), how))
    for o, sub in zip(node.output, subs):
        w.set_out(o, TensorChan(ax, sub, tc.rank))


@rule("Slice")
def r_slice(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    label = f"Slice {w.label(idx)}"
    if w.opset < 10:
        a = _attrs(node)
        starts, ends = list(a.get("starts", [])), list(a.get("ends", []))
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
        how = "attr"
    else:
        starts, ends = w.int_list(node.input[1]), w.int_list(node.input[2])
        axes = w.int_list(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = w.int_list(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if axes is None and not (len(node.input) > 3 and node.input[3]):
            axes = list(range(len(starts))) if starts is not None else None
        if steps is None and not (len(node.input) > 4 and node.input[4]):
            steps = [1] * len(starts) if starts is not None else None
        how = "input"
    w.freeze_inputs(idx, f"{label} mixes channels with a second input", skip=(0,))
    if axes is None:
        w.freeze_tc(tc, f"{label} has computed axes")
        return
    axes = [_norm(x, tc.rank) for x in axes]
    if tc.axis not in axes:
        w.set_out(node.output[0], tc)
        return
    k = axes.index(tc.axis)
    if starts is None or ends is None or steps is None:
        w.freeze_tc(tc, f"{label} slices channels with computed bounds")
        return
    if steps[k] != 1:
        w.freeze_tc(tc, f"{label} slices channels with step {steps[k]}")
        return
    size = tc.size
    lo, hi = starts[k], ends[k]
    lo = min(max(lo + size if lo < 0 else lo, 0), size)
    hi = min(max(hi + size if hi < 0 else hi, 0), size)
    hi = max(hi, lo)
    sub = sub_layout(tc.segs, lo, hi)
    if sub is None or hi == lo:
        w.freeze_tc(tc, f"{label} cuts through one flattened channel")
        return
    for s in sub:
        if s.space is not None:
            w.spaces.add_part(s.space, s.start, s.start + s.length)
    w.fixes.append(("slice", idx, k, tc.segs, lo, hi, how))
    w.set_out(node.output[0], TensorChan(tc.axis, sub, tc.rank))


@rule("Gather")
def r_gather(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if node.input[1] in w.lay:
        w.freeze_tc(w.lay[node.input[1]], f"Gather {w.label(idx)} uses channel values as indices")
    if tc is None:
        return
    ax = _norm(int(_attrs(node).get("axis", 0)), tc.rank)
    if ax == tc.axis:
        w.freeze_tc(tc, f"Gather {w.label(idx)} picks along the channel axis")
        return
    ri = w.rank(node.input[1])
    if ri is None:
        w.freeze_tc(tc, f"Gather {w.label(idx)} indices of unknown rank")
        return
    if ax < tc.axis:
        w.set_out(node.output[0], TensorChan(tc.axis - 1 + ri, tc.segs, tc.rank - 1 + ri))
    else:
        w.set_out(node.output[0], TensorChan(tc.axis, tc.segs, tc.rank - 1 + ri))


@rule("Resize", "Upsample")
def r_resize(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    label = f"{node.op_type} {w.label(idx)}"
    w.freeze_inputs(idx, f"{label} mixes channels with a second input", skip=(0,))
    if "axes" in _attrs(node):
        w.freeze_tc(tc, f"{label} with axes is not supported")
        return
    if node.op_type == "Upsample" or w.opset < 11:
        src = node.input[1] if len(node.input) > 1 else ""
        scales = w.const(src) if src else np.asarray(_attrs(node).get("scales", []), dtype=np.float32)
        if scales is None:
            w.freeze_tc(tc, f"{label} has computed scales")
            return
        if len(scales) <= tc.axis or float(scales[tc.axis]) != 1.0:
            w.freeze_tc(tc, f"{label} scales the channel axis")
            return
        w.set_out(node.output[0], tc)
        return
    scales_name = node.input[2] if len(node.input) > 2 else ""
    sizes_name = node.input[3] if len(node.input) > 3 else ""
    if scales_name and w.const_dims(scales_name) and prod(w.const_dims(scales_name)) > 0:
        scales = w.const(scales_name)
        if len(scales) <= tc.axis or float(scales[tc.axis]) != 1.0:
            w.freeze_tc(tc, f"{label} scales the channel axis")
            return
    elif sizes_name:
        sizes = w.int_list(sizes_name)
        if sizes is None or len(sizes) <= tc.axis or sizes[tc.axis] != tc.size:
            w.freeze_tc(tc, f"{label} has computed output sizes")
            return
        w.fixes.append(("reshape", (idx, 3, tc.axis), tc.segs))
    else:
        w.freeze_tc(tc, f"{label} has computed scales")
        return
    w.set_out(node.output[0], tc)


@rule("Pad")
def r_pad(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    label = f"Pad {w.label(idx)}"
    w.freeze_inputs(idx, f"{label} mixes channels with a second input", skip=(0,))
    a = _attrs(node)
    pads = list(a["pads"]) if "pads" in a else (w.int_list(node.input[1]) if len(node.input) > 1 else None)
    axes = w.int_list(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(tc.rank))
    if pads is None or axes is None:
        w.freeze_tc(tc, f"{label} has computed pads")
        return
    axes = [_norm(x, tc.rank) for x in axes]
    n = len(axes)
    if tc.axis in axes:
        k = axes.index(tc.axis)
        if pads[k] != 0 or pads[k + n] != 0:
            w.freeze_tc(tc, f"{label} pads the channel axis")
            return
    w.set_out(node.output[0], tc)


@rule("Expand", "Tile")
def r_expand(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    tc = w.lay.get(node.input[0])
    if tc is None:
        return
    label = f"{node.op_type} {w.label(idx)}"
    vals = w.int_list(node.input[1])
    if vals is None:
        w.freeze_tc(tc, f"{label} has a computed shape")
        return
    if node.op_type == "Tile":
        if vals[tc.axis] != 1:
            w.freeze_tc(tc, f"{label} repeats the channel axis")
            return
        w.set_out(node.output[0], tc)
        return
    rout = max(tc.rank, len(vals))
    oa = tc.axis + rout - tc.rank
    k = oa - (rout - len(vals))
    if k >= 0 and vals[k] not in (1, tc.size):
        w.freeze_tc(tc, f"{label} broadcasts the channel axis")
        return
    if k >= 0 and vals[k] == tc.size and tc.size != 1:
        w.fixes.append(("reshape", (idx, 1, k), tc.segs))
    w.set_out(node.output[0], TensorChan(oa, tc.segs, rout))


@rule(*CONTROL)
def r_control(w: Walker, idx: int, node: onnx.NodeProto) -> None:
    reason = f"{node.op_type} {w.label(idx)} (control flow) is left untouched"
    w.freeze_inputs(idx, reason)
    holder = onnx.GraphProto()
    holder.node.add().CopyFrom(node)
    for x in subgraph_references(holder):
        w.freeze_tc(w.lay.get(x), reason)
        w.freeze_channel_elems(w.elems.get(x), reason)
