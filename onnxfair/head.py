"""What a classifier's first output holds: logits, or probabilities from a final Softmax or Sigmoid.

The losses (scoring, repair, fine-tuning, risk) need logits: cross-entropy on probabilities would apply a
second softmax and distort every gradient. A model exported with its activation still attached is read
through its logit view, the same graph with its first output moved to the activation's input; its weights
are the model's own, so what is learnt on the view is written back into the original graph, activation
included. Evaluation runs the original with onnxruntime and needs the activation only to read a single
column: a probability is class 1 above 0.5, a logit above 0. Exports often reshape after the activation
(Squeeze, Flatten, Reshape to [batch]); such ops move values without changing them, so the activation is
found through them as long as each row stays under the batch axis. So it is through a Cast to another float
type and a Clip to [eps, 1 - eps] (eps < 0.01), which keep every prediction: the largest probability and the
side of 0.5 a single one is on.

An integer first output (class indices from an ArgMax, say) is read as predictions by evaluation; it has
no gradient, so the commands that need one refuse it (`interpret.module.checked_output`).
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from onnxfair.errors import UnsupportedError

PROBABILITY_OPS = ("Softmax", "Sigmoid")
SHAPE_OPS = ("Identity", "Squeeze", "Unsqueeze", "Flatten", "Reshape")  # move values, never change one


def _op(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else ""


def _keeps_rows(node: onnx.NodeProto, dims: dict) -> bool:
    """Whether a shape-only op leaves each row's values, in order, under the batch axis: the values per row
    agree (so dim 0 is the batch on both sides) or, where they are unknown, dim 0 is the same dim."""
    if node.op_type == "Identity":
        return True
    a, b = dims.get(node.input[0]), dims.get(node.output[0])
    if not a or not b:
        return False
    if all(isinstance(d, int) for d in a[1:] + b[1:]):
        return math.prod(a[1:]) == math.prod(b[1:])
    return a[0] is not None and a[0] == b[0]


def _constant(name: str, model: onnx.ModelProto, producers: dict) -> float | None:
    """The scalar an initializer or a Constant node holds, else None."""
    from onnx import numpy_helper

    from onnxfair.graph.fold import constant_value

    init = next((t for t in model.graph.initializer if t.name == name), None)
    node = producers.get(name)
    if init is not None:
        arr = numpy_helper.to_array(init)
    elif node is not None and _op(node) == "Constant":
        arr = constant_value(node)
    else:
        return None
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _keeps_predictions(node: onnx.NodeProto, model: onnx.ModelProto, producers: dict) -> bool:
    """A Cast to a float type, or a Clip to [lo, hi] with lo < 0.01 and hi > 0.99: after a Softmax or Sigmoid
    neither changes which class is predicted."""
    if _op(node) == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return to in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    if _op(node) != "Clip":
        return False
    attrs = {a.name: a.f for a in node.attribute}
    lo, hi = attrs.get("min", -math.inf), attrs.get("max", math.inf)
    for i, name in ((1, "min"), (2, "max")):
        if len(node.input) > i and node.input[i]:
            value = _constant(node.input[i], model, producers)
            if value is None:
                return False
            lo, hi = (value, hi) if name == "min" else (lo, value)
    return lo < 0.01 and hi > 0.99


def _final_activation(model: onnx.ModelProto) -> tuple[onnx.NodeProto | None, onnx.ModelProto]:
    """The Softmax or Sigmoid whose values the first graph output holds (through shape-only ops that keep the
    rows and value ops that keep the predictions), if any, with the model shape inference filled in."""
    if not model.graph.output:
        return None, model
    from onnxfair.graph.shapes import infer, tensor_dims  # late: the graph package is heavy to import

    inferred = infer(model)
    dims = tensor_dims(inferred)
    producers = {o: n for n in model.graph.node for o in n.output if o}
    node = producers.get(model.graph.output[0].name)
    while node is not None and ((_op(node) in SHAPE_OPS and _keeps_rows(node, dims))
                                or _keeps_predictions(node, model, producers)):
        node = producers.get(node.input[0])
    return (node if node is not None and _op(node) in PROBABILITY_OPS else None), inferred


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _class_axis(axis: int, shape: tuple | None, flattens: bool) -> bool:
    """Whether a Softmax over `axis` makes one distribution per row: the axis lies past the batch and every
    other dim of the row is 1 (unknown dims pass). Before opset 13 Softmax flattens from `axis` on, so only
    the dims between the batch and it count."""
    if shape is None:
        return axis in (1, -1)
    a = axis + len(shape) if axis < 0 else axis
    if not 1 <= a < len(shape):
        return False
    others = range(1, a) if flattens else [i for i in range(1, len(shape)) if i != a]
    return all(not isinstance(shape[i], int) or shape[i] == 1 for i in others)


def _probability_head(model: onnx.ModelProto) -> tuple[onnx.NodeProto | None, onnx.ModelProto]:
    """The final Softmax/Sigmoid when it turns class logits into probabilities (with the inferred model); a
    Softmax over another axis is refused (its outputs are no class scores)."""
    from onnxfair.graph.shapes import tensor_dims

    node, inferred = _final_activation(model)
    if node is not None and node.op_type == "Softmax":
        flattens = _opset(model) < 13
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1 if flattens else -1)
        shape = tensor_dims(inferred).get(node.input[0])
        if not _class_axis(axis, shape, flattens):
            shown = "" if shape is None else f" of {list(shape)}"
            raise UnsupportedError(
                f"the model's output is a Softmax over axis {axis}{shown}, not the class axis of [batch, classes]; "
                "export the model without its final Softmax (logits)")
    return node, inferred


def output_activation(model: onnx.ModelProto) -> str | None:
    """'Softmax' or 'Sigmoid' when the first output holds probabilities, None when it holds logits."""
    node, _ = _probability_head(model)
    return None if node is None else node.op_type


def logit_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when its first output is logits; else a copy whose first output is the input of the
    final Softmax/Sigmoid (same initializers, so `OnnxModule.to_onnx(model)` writes back into the original)."""
    node, inferred = _probability_head(model)
    if node is None:
        return model
    logits = node.input[0]
    view = onnx.ModelProto()
    view.CopyFrom(model)
    first = helper.make_tensor_value_info(logits, _elem_type(inferred, logits), None)
    rest = [o for o in model.graph.output[1:] if o.name != logits]
    del view.graph.output[:]
    view.graph.output.extend([first, *rest])
    return view


def _elem_type(inferred: onnx.ModelProto, name: str) -> int:
    """The element type of tensor `name` in a model with shape inference filled in (a Cast after it may give
    the output another one)."""
    g = inferred.graph
    for vi in [*g.value_info, *g.input, *g.output]:
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    return g.output[0].type.tensor_type.elem_type


def _dtype(elem_type: int) -> str | None:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else None


def scored_output(model: onnx.ModelProto) -> dict | None:
    """The output every command reads (the first), for the reports: name, type, declared shape, and how many
    outputs the model has. None when it has none."""
    if not model.graph.output:
        return None
    out = model.graph.output[0]
    t = out.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": out.name, "dtype": _dtype(t.elem_type),
            "shape": shape if t.HasField("shape") else None, "outputs": len(model.graph.output)}


def several_outputs_note(model: onnx.ModelProto, name: str = "the model") -> str | None:
    """One line saying which output is scored when there is a choice (an auxiliary head exported first
    would otherwise be scored silently); None for a single output."""
    out = scored_output(model)
    if out is None or out["outputs"] < 2:
        return None
    shape = "[" + ", ".join("?" if d is None else str(d) for d in out["shape"] or []) + "]"
    return (f"{name} has {out['outputs']} outputs; scoring the first, {out['name']!r} {out['dtype']} {shape}, and "
            f"ignoring {out['outputs'] - 1} other{'s' * (out['outputs'] > 2)}; if that is not the class scores, re-export "
            "the model with them as its first output")
