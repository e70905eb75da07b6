"""MACs, parameters and bytes of an ONNX model, per node and in total.

MACs count multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (the layers channel pruning
shrinks); elementwise ops, pooling and normalisation are not counted. Shapes come from one run of
onnx shape inference with the batch fixed to 1, so figures are per sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfair.graph import shapes as shp
from onnxfair.graph.fold import fold_constants
from onnxfair.model import FLOAT_TYPES


@dataclass
class Cost:
    """Totals and per-node rows ({node, op, macs, params}; macs None where shapes are unknown)."""

    macs: int
    params: int
    bytes: int
    per_node: list[dict] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    batch: int = 1  # the batch the MACs are counted at: 1, or the batch the model's inputs fix

    def to_dict(self) -> dict:
        return asdict(self)


def _static(d: shp.Dims | None) -> bool:
    return d is not None and all(isinstance(x, int) for x in d)


def node_macs(node: onnx.NodeProto, dims: dict[str, shp.Dims]) -> int | None:
    """MACs of one node from its tensor dims; 0 for ops that are not counted, None when unknown."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return 0
    ins = [dims.get(x) if x else None for x in node.input]
    outs = [dims.get(x) if x else None for x in node.output]
    if op == "Conv":
        w, y = ins[1], outs[0]
        if not (_static(w) and _static(y)):
            return None
        return prod(y) * prod(w[1:])
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        if not (_static(w) and _static(x)):
            return None
        return prod(x) * prod(w[1:])
    if op == "Gemm":
        a, b = ins[0], ins[1]
        if not (_static(a) and _static(b)):
            return None
        attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        m_, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m_ * k * n
    if op == "MatMul":
        a, y = ins[0], outs[0]
        if not (_static(a) and _static(y)) or len(a) == 0:
            return None
        return prod(y) * a[-1]
    if op in ("LSTM", "GRU", "RNN"):
        # every step multiplies the input by W [dirs, gates*H, I] and the hidden state by R [dirs, gates*H, H]
        x, w, r = ins[0], ins[1], ins[2]
        if not (_static(x) and _static(w) and _static(r)) or len(x) != 3:
            return None
        return x[0] * x[1] * w[0] * w[1] * (w[2] + r[2])
    return 0


def uncounted_note(nodes: list[str]) -> str | None:
    """One line naming the nodes whose MACs could not be counted (their shapes stay unknown), or None."""
    if not nodes:
        return None
    shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
    return (f"the MACs of {len(nodes)} node{'s' * (len(nodes) > 1)} ({shown}) could not be counted: their shapes "
            "are unknown (data-dependent, say); the MACs figures leave them out")


def model_cost(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Cost:
    """Cost at batch 1 (at the model's own batch when its inputs fix one); a symbolic non-batch input dim
    without input_shapes is a UsageError."""
    return cost_and_node_macs(model, input_shapes)[0]


def cost_and_node_macs(model: onnx.ModelProto,
                       input_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[Cost, np.ndarray]:
    """The Cost and the MACs of every main-graph node in node order (0 where not counted/unknown).

    Counted on the model with its constant-only subgraphs folded, as the rewrite writes it: a weight held in a
    Constant node counts as a parameter, and Slice bounds computed from constants give static shapes (without
    folding the dense model was counted short of its pruned rewrite). The node order is the folded model's,
    the input's own when it is already folded (as channel analysis's model is)."""
    folded = fold_constants(model)
    fixed = shp.set_input_dims(folded, input_shapes, batch=1, require_static=True)
    del fixed.graph.value_info[:]
    dims = shp.static_dims(fixed)
    pinned = _pinned_batch(folded, dims)
    if pinned > 1:  # count the whole graph at the batch it runs at, not its tail at B and its head at 1
        fixed = shp.set_input_dims(folded, input_shapes, batch=pinned, require_static=True)
        del fixed.graph.value_info[:]
        dims = shp.static_dims(fixed)
    g = folded.graph
    float_inits = {i.name: prod(i.dims) for i in g.initializer if i.data_type in FLOAT_TYPES}
    for sp in g.sparse_initializer:
        if sp.values.data_type in FLOAT_TYPES:
            float_inits[sp.values.name] = prod(sp.dims)
    counted: set[str] = set()
    rows = []
    unknown = []
    per_index = np.zeros(len(g.node), dtype=np.int64)
    for i, node in enumerate(g.node):
        macs = node_macs(node, dims)
        params = 0
        for x in node.input:
            if x in float_inits and x not in counted:
                counted.add(x)
                params += float_inits[x]
        name = node.name or f"{node.op_type}_{i}"
        if macs is None:
            unknown.append(name)
        else:
            per_index[i] = macs
        if macs != 0 or params:
            rows.append({"node": name, "op": node.op_type, "macs": macs, "params": int(params)})
    inits = {i.name for i in g.initializer} | {sp.values.name for sp in g.sparse_initializer}
    # dim 0 is a batch only on inputs of rank 2 or more: a rank-1 input is one sample (its dim 0 holds features)
    batch = next((vi.type.tensor_type.shape.dim[0].dim_value for vi in fixed.graph.input
                  if vi.name not in inits and len(vi.type.tensor_type.shape.dim) >= 2
                  and vi.type.tensor_type.shape.dim[0].HasField("dim_value")), 1)
    cost = Cost(macs=int(per_index.sum()), params=int(sum(float_inits.values())), bytes=int(model.ByteSize()),
                per_node=rows, unknown=unknown, batch=max(int(batch) or 1, pinned))
    return cost, per_index


def nonzero_params(model: onnx.ModelProto) -> int:
    """Nonzero elements of the floating-point parameters that model_cost counts (Constant-held weights and
    sparse initializers included): zeros anywhere, not only in the layers a run pruned, count as zero."""
    g = fold_constants(model).graph
    tensors = [i for i in g.initializer if i.data_type in FLOAT_TYPES]
    tensors += [sp.values for sp in g.sparse_initializer if sp.values.data_type in FLOAT_TYPES]
    return int(sum(np.count_nonzero(numpy_helper.to_array(t)) for t in tensors))


def _pinned_batch(folded: onnx.ModelProto, dims: dict[str, shp.Dims]) -> int:
    """B when the graph hard-codes its batch behind a symbolic input: counted at batch 1, a Reshape to a
    constant [B, ...] has B times its input's elements (it would fail at run time; onnxruntime runs such a
    graph B rows at a time). 1 otherwise."""
    consts = {i.name: i for i in folded.graph.initializer}
    for node in folded.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        shape = onnx.numpy_helper.to_array(consts[node.input[1]]).reshape(-1)
        a, b = dims.get(node.input[0]), dims.get(node.output[0])
        if shape.size and shape[0] > 1 and _static(a) and _static(b) and prod(b) == shape[0] * prod(a):
            return int(shape[0])
    return 1
