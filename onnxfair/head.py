"""What a classifier's first output holds: logits, or probabilities from a final Softmax or Sigmoid.

The losses (scoring, repair, fine-tuning, risk) need logits: cross-entropy on probabilities would apply a
second softmax and distort every gradient. A model exported with its activation still attached is read
through its logit view, the same graph with its first output moved to the activation's input; its weights
are the model's own, so what is learnt on the view is written back into the original graph, activation
included. Evaluation runs the original with onnxruntime and needs the activation only to read a single
column: a probability is class 1 above 0.5, a logit above 0.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxfair.errors import UnsupportedError

PROBABILITY_OPS = ("Softmax", "Sigmoid")


def _final_activation(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Softmax or Sigmoid that produces the first graph output (through Identity nodes), if any."""
    if not model.graph.output:
        return None
    producers = {o: n for n in model.graph.node for o in n.output if o}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in PROBABILITY_OPS or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _probability_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The final Softmax/Sigmoid when it turns class logits into probabilities; a Softmax over another axis is
    refused (its outputs are no class scores)."""
    node = _final_activation(model)
    if node is not None and node.op_type == "Softmax":
        default = -1 if _opset(model) >= 13 else 1
        axis = next((a.i for a in node.attribute if a.name == "axis"), default)
        rank = len(model.graph.output[0].type.tensor_type.shape.dim) or None
        if not (axis == 1 or (axis == -1 and rank in (None, 2))):
            raise UnsupportedError(
                f"the model's output is a Softmax over axis {axis}, not the class axis of [batch, classes]; "
                "export the model without its final Softmax (logits)")
    return node


def output_activation(model: onnx.ModelProto) -> str | None:
    """'Softmax' or 'Sigmoid' when the first output holds probabilities, None when it holds logits."""
    node = _probability_head(model)
    return None if node is None else node.op_type


def logit_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when its first output is logits; else a copy whose first output is the input of the
    final Softmax/Sigmoid (same initializers, so `OnnxModule.to_onnx(model)` writes back into the original)."""
    node = _probability_head(model)
    if node is None:
        return model
    logits = node.input[0]
    view = onnx.ModelProto()
    view.CopyFrom(model)
    first = helper.make_tensor_value_info(logits, model.graph.output[0].type.tensor_type.elem_type, None)
    rest = [o for o in model.graph.output[1:] if o.name != logits]
    del view.graph.output[:]
    view.graph.output.extend([first, *rest])
    return view
