"""Constant folding: turn constant-only subgraphs into initializers so rules can slice them.

Non-torch exporters write per-channel constants as expressions (a vector Reshape'd or Unsqueeze'd to
[1, C, 1, 1], a Transpose of a weight, Constant nodes). Channel rewriting slices initializers, so such
expressions are evaluated once, with onnx's reference evaluator, and replaced by their values.
Subgraphs (If/Loop/Scan bodies) are left untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops never folded: random, stateful, quantized storage (folding would inflate the file), sequences.
_NO_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear",
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceAt", "SplitToSequence",
    "ConcatFromSequence", "SequenceErase", "SequenceLength", "SequenceMap", "Optional", "OptionalGetElement",
    "OptionalHasElement", "If", "Loop", "Scan",
}
# A folded value may grow (ConstantOfShape, Expand, Tile) but not past this many bytes over its sources.
_MAX_GROWTH_BYTES = 1 << 20


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a Constant node holds (None for sparse or string values)."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None  # sparse_value / strings: leave the node alone


def _subgraphs(node: onnx.NodeProto):
    """The node's subgraph attributes (If branches, Loop/Scan bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _reads(g: onnx.GraphProto) -> set[str]:
    """Every name read by the nodes of `g` and of the subgraphs within it."""
    names: set[str] = set()
    for n in g.node:
        names.update(x for x in n.input if x)
        for sg in _subgraphs(n):
            names |= _reads(sg)
    return names


def subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names read inside subgraphs of the graph's nodes (outer-scope captures included)."""
    return {x for n in graph.node for sg in _subgraphs(n) for x in _reads(sg)}


def upstream_nodes(graph: onnx.GraphProto, outputs: list[str]) -> list[int]:
    """Indices, in graph order, of the nodes that `outputs` depend on, subgraphs' reads of outer values
    included: what must run to compute them, and so the only nodes whose weights change them."""
    needed, picked = set(outputs), []
    for i in range(len(graph.node) - 1, -1, -1):
        n = graph.node[i]
        if any(o in needed for o in n.output):
            picked.append(i)
            needed.update(x for x in n.input if x)
            for sg in _subgraphs(n):
                needed |= _reads(sg)
    return picked[::-1]


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run constant nodes with the reference evaluator; nodes that fail are skipped (not folded)."""
    from onnx.reference import ReferenceEvaluator

    opsets = {o.domain or "": o.version for o in model.opset_import}
    out: dict[str, np.ndarray] = {}

    def run(batch: list[onnx.NodeProto], known: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        needed = {x for n in batch for x in n.input if x}
        produced = {y for n in batch for y in n.output if y}
        inits = [numpy_helper.from_array(np.asarray(known[x]), x) for x in sorted(needed - produced)]
        outputs = [helper.make_tensor_value_info(y, onnx.TensorProto.UNDEFINED, None) for n in batch for y in n.output if y]
        g = helper.make_graph(batch, "fold", [], outputs, initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=model.ir_version)
        ev = ReferenceEvaluator(m)
        names = [o.name for o in outputs]
        res = ev.run(names, {})
        return {k: np.asarray(v) for k, v in zip(names, res)}

    try:
        out = run(nodes, values)
        return out
    except Exception:
        pass
    known = dict(values)
    for n in nodes:
        if not all(x in known for x in n.input if x):
            continue
        try:
            res = run([n], known)
        except Exception:
            continue
        known.update(res)
        out.update(res)
    return out


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """New model whose constant-only nodes (main graph) are replaced by initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    const: dict[str, np.ndarray | None] = {i.name: None for i in g.initializer}  # None: not yet loaded
    init_protos = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    for name in graph_inputs:  # an initializer listed as input may be overridden: not a constant
        const.pop(name, None)

    candidates: list[int] = []
    new_consts: dict[str, np.ndarray] = {}
    for idx, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            v = constant_value(node)
            if v is not None and not any(o in graph_outputs for o in node.output):
                new_consts[node.output[0]] = v
                const[node.output[0]] = v
                candidates.append(idx)
            continue
        if node.op_type in _NO_FOLD or _has_subgraph(node) or not node.input:
            continue
        if any(o in graph_outputs for o in node.output):
            continue
        if all((not x) or x in const for x in node.input):
            candidates.append(idx)
            for o in node.output:
                if o:
                    const[o] = None
    if not candidates:
        return m

    fold_nodes = [g.node[i] for i in candidates if g.node[i].op_type != "Constant"]
    values: dict[str, np.ndarray] = dict(new_consts)
    if fold_nodes:
        needed = {x for n in fold_nodes for x in n.input if x}
        for x in needed:
            if x in init_protos:
                values[x] = numpy_helper.to_array(init_protos[x])
        evaluated = _evaluate(m, fold_nodes, values)
        values.update(evaluated)

    def source_bytes(node: onnx.NodeProto) -> int:
        return sum(int(np.asarray(values[x]).nbytes) for x in node.input if x and x in values)

    folded: set[int] = set()
    for i in candidates:
        node = g.node[i]
        outs = [o for o in node.output if o]
        if not all(o in values for o in outs):
            continue
        if not all((not x) or x in values for x in node.input):
            continue
        grown = sum(int(np.asarray(values[o]).nbytes) for o in outs) - source_bytes(node)
        if node.op_type != "Constant" and grown > _MAX_GROWTH_BYTES:
            continue
        folded.add(i)
    if not folded:
        return m

    # Values still read by a kept node, a subgraph or a graph output become initializers.
    kept_nodes = [n for i, n in enumerate(g.node) if i not in folded]
    read = {x for n in kept_nodes for x in n.input if x} | subgraph_references(g) | graph_outputs
    produced = {o for i in folded for o in g.node[i].output if o}
    new_inits = []
    for name in sorted(produced & read):
        arr = np.asarray(values[name])
        if arr.dtype == object:
            return m  # strings or sequences: leave the model as it was
        new_inits.append(numpy_helper.from_array(arr, name))
    del g.node[:]
    g.node.extend(kept_nodes)
    g.initializer.extend(new_inits)
    remove_unused_initializers(m)
    return m


RECURRENT_OPS = ("LSTM", "GRU", "RNN")


def weight_operands(node: onnx.NodeProto, is_weight) -> list[str]:
    """The inputs of a Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN node that hold its weights: input 1, or
    for Gemm and MatMul input 0 when only that one is a weight (`W @ x`), so a weight on either side is
    pruned; a recurrent layer's input (W) and hidden-state (R) weights. `is_weight` says whether a value
    name is a candidate weight."""
    if node.op_type in RECURRENT_OPS:
        return [x for x in node.input[1:3] if x and is_weight(x)]
    if len(node.input) > 1 and is_weight(node.input[1]):
        return [node.input[1]]
    if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[0] and is_weight(node.input[0]):
        return [node.input[0]]
    return []


def constant_weights_to_initializers(model: onnx.ModelProto, ops: tuple[str, ...]) -> onnx.ModelProto:
    """Copy in which the float weights (see `weight_operands`, 2-D or more) of `ops` nodes that a Constant
    node holds are initializers of the same name, so unstructured pruning can zero them as it zeros any
    initializer; the copy computes the same. The model itself when there are none."""
    g = model.graph
    producers = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
    decoded: dict[str, np.ndarray | None] = {}  # only the Constants a weight op reads are decoded

    def float_weight(name: str) -> bool:
        if name in producers and name not in decoded:
            v = constant_value(producers[name])
            decoded[name] = v if v is not None and v.dtype.kind == "f" and v.ndim >= 2 else None
        return decoded.get(name) is not None

    moved: dict[str, np.ndarray] = {}
    for node in g.node:
        if node.op_type in ops:
            for name in weight_operands(node, float_weight):
                moved[name] = decoded[name]
    if not moved:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kept = [n for n in m.graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in moved)]
    del m.graph.node[:]
    m.graph.node.extend(kept)
    m.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in moved.items())
    return m


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers nothing reads (after folding or pruning), in place."""
    g = model.graph
    read = {x for n in g.node for x in n.input if x} | subgraph_references(g) | {o.name for o in g.output}
    read |= {i.name for i in g.input}
    keep = [i for i in g.initializer if i.name in read]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    keep_sparse = [s for s in g.sparse_initializer if s.values.name in read]
    if len(keep_sparse) != len(g.sparse_initializer):
        del g.sparse_initializer[:]
        g.sparse_initializer.extend(keep_sparse)
