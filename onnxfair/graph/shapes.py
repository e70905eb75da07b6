"""Shape inference once per model, and the dims of every tensor as Python values.

A dim is an int, a str (symbolic, e.g. the batch) or None (unknown). Inference runs once on the whole
model (never per node), with data propagation so Shape→Gather→Concat→Reshape chains get shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfair.graph.fold import fold_constants
from onnxfair.model import input_dims, with_input_dims, with_ops_as_identity

Dims = tuple  # tuple[int | str | None, ...]


# ops whose output has their first input's shape, though onnx infers none for them: without it every
# later layer would go uncounted, so inference is shown them as Identity nodes
SHAPE_KEEPING_OPS = {"GroupNormalization", "MeanVarianceNormalization"}


def _sparse_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Sparse initializers shown to onnx as dense inputs of their shape: inference types them as sparse
    tensors, which no op's inference takes, and every shape after them went unknown (a --sparse-storage
    model's MACs read 0)."""
    g = model.graph
    if not g.sparse_initializer:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.sparse_initializer[:]
    out.graph.input.extend(helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims))
                           for sp in g.sparse_initializer)
    return out


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info filled by onnx shape inference (the input if inference fails)."""
    shown = _sparse_as_inputs(with_ops_as_identity(model, SHAPE_KEEPING_OPS))
    try:
        inferred = onnx.shape_inference.infer_shapes(shown, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return model
    if shown is model:
        return inferred
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    for o, known in zip(out.graph.output, inferred.graph.output):
        o.CopyFrom(known)
    return out


def _dims(vi_type: onnx.TypeProto) -> Dims | None:
    if not vi_type.HasField("tensor_type") or not vi_type.tensor_type.HasField("shape"):
        return None
    out = []
    for d in vi_type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param and not d.dim_param.startswith("unk__"):
            out.append(d.dim_param)  # "unk__k" symbols are inference placeholders: unknown
        else:
            out.append(None)
    return tuple(out)


def tensor_dims(model: onnx.ModelProto) -> dict[str, Dims]:
    """name -> dims for inputs, outputs, value_info and initializers of the main graph."""
    g = model.graph
    shapes: dict[str, Dims] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        d = _dims(vi.type)
        if d is not None:
            shapes[vi.name] = d
    for init in g.initializer:
        shapes[init.name] = tuple(int(x) for x in init.dims)
    for sp in g.sparse_initializer:
        shapes[sp.values.name] = tuple(int(x) for x in sp.dims)
    return shapes


def set_input_dims(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None, batch: int | None,
                   require_static: bool) -> onnx.ModelProto:
    """Copy with symbolic input dims fixed: dim 0 to `batch` (left symbolic when None), others from
    input_shapes.

    Dims already fixed in the model stay. With require_static, a symbolic non-batch dim left over is a
    UsageError that names the --input-shape option. The checks live in `model.input_dims`, shared with
    sessions and verify so every command rejects a bad --input-shape with the same words.
    """
    return with_input_dims(model, input_dims(model, input_shapes, batch, require_static))


def restore_symbolic_io(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every graph input and output dim that is symbolic in `original` made symbolic again (same
    name), and shapes re-inferred. --input-shape fixes dims for the analysis only: a pruned fully
    convolutional model must still take the image sizes its dense model takes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    before = {vi.name: vi for vi in [*original.graph.input, *original.graph.output]}
    changed = False
    for vi in [*m.graph.input, *m.graph.output]:
        old = before.get(vi.name)
        if old is None or not old.type.HasField("tensor_type") or not vi.type.HasField("tensor_type"):
            continue
        dims, old_dims = vi.type.tensor_type.shape.dim, old.type.tensor_type.shape.dim
        if len(dims) != len(old_dims):
            continue
        for d, o in zip(dims, old_dims):
            if not o.HasField("dim_value") and d.HasField("dim_value"):
                d.Clear()
                if o.dim_param:
                    d.dim_param = o.dim_param
                changed = True
    if not changed:
        return m
    del m.graph.value_info[:]
    return infer(m)


def restore_initializer_inputs(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the initializers that `original` lists as graph inputs listed again, at their new shapes
    (below IR 4, every initializer). IR < 4 requires the listing (the checker rejects a model without it,
    and shape inference ignores an initializer that is not an input); at any IR it is the model's
    interface, kept as it was."""
    inits = {i.name: i for i in model.graph.initializer}
    listed = list(inits) if model.ir_version < 4 else [vi.name for vi in original.graph.input]  # IR 3: every one
    present = {vi.name for vi in model.graph.input}
    wanted = [name for name in listed if name in inits and name not in present]
    if not wanted:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input.extend(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)) for n in wanted)
    return m


def static_dims(model: onnx.ModelProto) -> dict[str, Dims]:
    """Dims of a model whose inputs are fully static, through Shape-computed Reshapes.

    onnx inference does not always propagate values through Shape→Gather→Concat chains; with static
    inputs every Shape is a constant, so such Shape nodes are folded and inference runs again.
    """
    m = infer(model)
    for _ in range(3):
        dims = tensor_dims(m)
        changed = False
        nodes = []
        for n in m.graph.node:
            d = dims.get(n.input[0]) if n.op_type == "Shape" and n.input else None
            if d is not None and all(isinstance(x, int) for x in d):
                a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
                r = len(d)
                start, end = a.get("start", 0), a.get("end", r)
                start, end = (start + r if start < 0 else start), (end + r if end < 0 else min(end, r))
                value = np.asarray(d[start:end], dtype=np.int64)
                nodes.append(helper.make_node("Constant", [], [n.output[0]], name=n.name,
                                              value=numpy_helper.from_array(value)))
                changed = True
            else:
                nodes.append(n)
        if not changed:
            return dims
        g = m.graph
        del g.node[:]
        g.node.extend(nodes)
        m = fold_constants(m)
        del m.graph.value_info[:]
        m = infer(m)
    return tensor_dims(m)


def complete_dims(model: onnx.ModelProto, dims: dict[str, Dims]) -> dict[str, Dims]:
    """Fill dims that symbolic-batch inference left unknown, from static runs at batch 1 and 2.

    A dim equal in both runs is static; one that differs depends on the batch and stays unknown.
    Only used when some node output has no (or a partly unknown) shape, and only when the inputs are
    static apart from the batch.
    """
    outs = [o for n in model.graph.node for o in n.output if o]
    if all(o in dims and None not in dims[o] for o in outs):
        return dims
    try:
        runs = []
        for batch in (1, 2):
            fixed = set_input_dims(model, None, batch=batch, require_static=True)
            del fixed.graph.value_info[:]
            runs.append(static_dims(fixed))
    except Exception:
        return dims
    a, b = runs
    merged = dict(dims)
    for name in outs:
        da, db = a.get(name), b.get(name)
        if da is None or db is None or len(da) != len(db):
            continue
        guess = tuple(x if x == y and isinstance(x, int) else None for x, y in zip(da, db))
        cur = merged.get(name)
        if cur is None or len(cur) != len(guess):
            merged[name] = guess
        else:
            merged[name] = tuple(c if c is not None else g for c, g in zip(cur, guess))
    return merged
