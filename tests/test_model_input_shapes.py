"""--input-shape values are checked in one place (model.input_dims) for sessions, analysis and verify."""

from __future__ import annotations

import pytest
from onnx import TensorProto as TP
from onnx import helper

from onnxfair.errors import UsageError
from onnxfair.graph.shapes import set_input_dims
from onnxfair.interpret.verify import random_inputs
from onnxfair.model import fix_input_shapes, input_dims


def _relu(shape):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _dims(model):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("shapes,message", [
    ({"nope": (1, 3, 4)}, "'nope', which is not a model input; inputs: x"),
    ({"x": (1, 3)}, "--input-shape x has 2 dims, the model input has 3"),
    ({"x": (1, 5, 4)}, "--input-shape x: dim 1 is fixed to 3 in the model, not 5"),
])
def test_every_entry_point_rejects_the_same_mistakes(shapes, message):
    m = _relu(["N", 3, "L"])
    for call in (lambda: fix_input_shapes(m, shapes), lambda: set_input_dims(m, shapes, batch=1, require_static=False),
                 lambda: random_inputs(m, shapes)):
        with pytest.raises(UsageError) as err:
            call()
        assert message in str(err.value)


def test_symbolic_dims_and_the_batch():
    m = _relu(["N", 3, "L"])
    assert input_dims(m, batch=4) == {"x": (4, 3, None)}
    with pytest.raises(UsageError, match="symbolic dimension L at axis 2; pass --input-shape x="):
        set_input_dims(m, None, batch=1, require_static=True)
    with pytest.raises(UsageError, match="symbolic dimension L at axis 2; pass --input-shape x="):
        random_inputs(m)
    # analysis and cost set the batch themselves; sessions and verify take the given one
    assert _dims(set_input_dims(m, {"x": (8, 3, 5)}, batch=None, require_static=True)) == ["N", 3, 5]
    assert _dims(set_input_dims(m, {"x": (8, 3, 5)}, batch=1, require_static=True)) == [1, 3, 5]
    assert _dims(fix_input_shapes(m, {"x": (8, 3, 5)})) == [8, 3, 5]
    assert random_inputs(m, {"x": (8, 3, 5)})["x"].shape == (8, 3, 5)
    assert random_inputs(m, {"x": (8, 3, 5)}, batch=2)["x"].shape == (8, 3, 5)
    assert _dims(m) == ["N", 3, "L"]  # never modified in place


def test_a_fixed_batch_may_be_changed_for_sessions_but_not_for_verify():
    m = _relu([1, 3, 4])
    assert _dims(fix_input_shapes(m, {"x": (8, 3, 4)})) == [8, 3, 4]
    assert _dims(set_input_dims(m, {"x": (8, 3, 4)}, batch=2, require_static=True)) == [1, 3, 4]
    with pytest.raises(UsageError, match="dim 0 is fixed to 1 in the model, not 8"):
        random_inputs(m, {"x": (8, 3, 4)})


def test_a_second_input_whose_dim0_is_named_apart_is_no_batch():
    """x [batch, k] @ M [k, 3]: M's dim 0 is k, not the batch; fixed to 1 it made MatMul's shapes
    inconsistent and its MACs uncounted (0). The MACs are checked against numpy's own product."""
    import numpy as np
    import onnxruntime as ort

    from onnxfair.graph import model_cost

    g = helper.make_graph([helper.make_node("MatMul", ["x", "M"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "k"]),
                           helper.make_tensor_value_info("M", TP.FLOAT, ["k", 3])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    shapes = {"x": (7, 4), "M": (4, 3)}
    assert input_dims(m, shapes, batch=1) == {"x": (1, 4), "M": (4, 3)}
    cost = model_cost(m, shapes)
    assert (cost.macs, cost.unknown, cost.batch) == (1 * 4 * 3, [], 1)
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": np.ones((1, 4), np.float32),
                                                                "M": np.ones((4, 3), np.float32)})[0]
    assert y.shape == (1, 3) and y.sum() == 12  # the counted MACs: one multiply-add per summed product
    # a second input that shares the batch name keeps following the batch
    g2 = helper.make_graph([helper.make_node("Add", ["x", "z"], ["y"])], "g",
                           [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", 4]),
                            helper.make_tensor_value_info("z", TP.FLOAT, ["batch", 4])],
                           [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert input_dims(m2, {"z": (5, 4)}, batch=2) == {"x": (2, 4), "z": (2, 4)}


def _two_inputs(mask_dims):
    g = helper.make_graph([helper.make_node("Add", ["ids", "mask"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TP.FLOAT, ["batch", "seq"]),
                           helper.make_tensor_value_info("mask", TP.FLOAT, mask_dims)],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_a_dim_given_for_one_input_sizes_the_same_named_dim_of_another():
    """--input-shape ids=1,12 left the attention mask's `seq` unsized: inspect asked for a second option."""
    m = _two_inputs(["batch", "seq"])
    assert input_dims(m, {"ids": (1, 12)}, batch=1, require_static=True) == {"ids": (1, 12), "mask": (1, 12)}
    with pytest.raises(UsageError, match="--input-shape gives dim 'seq' two sizes \\(12 and 10\\)"):
        input_dims(m, {"ids": (1, 12), "mask": (1, 10)})
    with pytest.raises(UsageError, match="input 'mask' has a symbolic dimension len at axis 1"):
        input_dims(_two_inputs(["batch", "len"]), {"ids": (1, 12)}, require_static=True)


def test_verify_gives_every_input_the_batch_given_for_one():
    """--input-shape ids=3,12 gave the mask batch 2, so onnxruntime failed and the model was blamed."""
    feeds = random_inputs(_two_inputs(["batch", "seq"]), {"ids": (3, 12)})
    assert feeds["ids"].shape == feeds["mask"].shape == (3, 12)


def test_input_shape_options_refuse_an_int64_overflow_and_a_name_given_twice():
    """Before: a dim past int64 was a ValueError traceback from onnx, and a second shape for one input silently won."""
    from onnxfair.model import parse_input_shapes

    assert parse_input_shapes(("x=1,7,4", "y=2")) == {"x": (1, 7, 4), "y": (2,)}
    with pytest.raises(UsageError, match=r"bad --input-shape 'x=1,99999999999999999999,4'; write NAME=d0,d1"):
        parse_input_shapes(("x=1,99999999999999999999,4",))
    with pytest.raises(UsageError, match=r"--input-shape names 'x' twice \(x=1,7,4 and x=1,8,4\); give each input one shape"):
        parse_input_shapes(("x=1,7,4", "x=1,8,4"))
