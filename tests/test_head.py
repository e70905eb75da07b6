"""Models that end in Softmax or Sigmoid: the losses see their logits, evaluation reads the probabilities.

The oracle is the same network without its final activation: pruning, fine-tuning and risk must give the
same weights and figures on both, and the written model must keep its activation.
"""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli.main import app
from onnxfair.errors import UnsupportedError
from onnxfair.head import logit_view, output_activation
from onnxfair.model import initializer_arrays
from onnxfair.runtime import create_session
from tests.conftest import FIXTURES

MLP = FIXTURES / "adult_mlp.onnx"
CAL = FIXTURES / "adult_calib.npz"


def _ending(body: onnx.ModelProto, op: str, **attrs) -> onnx.ModelProto:
    """`body` with `op` applied to its first output, which the activation's output replaces."""
    m = onnx.ModelProto()
    m.CopyFrom(body)
    logits = m.graph.output[0]
    m.graph.node.append(helper.make_node(op, [logits.name], ["scores"], **attrs))
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim])
    m.graph.output[0].CopyFrom(out)
    return m


def _binary_body() -> onnx.ModelProto:
    """The Adult MLP with one logit column, z = logit_1 − logit_0 (a MatMul with a fixed [2, 1] matrix)."""
    m = onnx.load(MLP)
    first = m.graph.output[0].name
    m.graph.node.append(helper.make_node("MatMul", [first, "diff"], ["z"]))
    m.graph.initializer.append(numpy_helper.from_array(np.array([[-1.0], [1.0]], np.float32), "diff"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 1]))
    return m


def _run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("head")
    files = {}
    for name, model in (("softmax_body", onnx.load(MLP)), ("softmax", _ending(onnx.load(MLP), "Softmax", axis=-1)),
                        ("sigmoid_body", _binary_body()), ("sigmoid", _ending(_binary_body(), "Sigmoid"))):
        files[name] = d / f"{name}.onnx"
        onnx.save(model, files[name])
    return d, files


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_pruning_and_fine_tuning_a_probability_model_match_its_logit_body(pairs, kind):
    d, files = pairs
    args = ["--data", CAL, "--groups", "race", "--method", "fairgrape", "--unstructured", "--sparsity", "0.5",
            "--finetune-epochs", "2", "--threads", "1", "--no-latency", "--json", "-"]
    rep = _run("prune", files[kind], *args, "-o", d / f"{kind}.pruned.onnx")
    ref = _run("prune", files[f"{kind}_body"], *args, "-o", d / f"{kind}_body.pruned.onnx")
    pruned = onnx.load(d / f"{kind}.pruned.onnx")
    got, want = initializer_arrays(pruned), initializer_arrays(onnx.load(d / f"{kind}_body.pruned.onnx"))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert rep["pruned"]["groups"] == ref["pruned"]["groups"]  # 0.5 on probabilities = 0 on logits; argmax alike
    assert rep["dense"]["overall"] == ref["dense"]["overall"]
    assert output_activation(pruned) == kind.capitalize()  # the written model keeps its activation


def test_risk_reads_a_softmax_model_through_its_logits(pairs):
    _, files = pairs
    args = ["--data", CAL, "--groups", "race", "--hutchinson-samples", "0", "--json", "-"]
    a, b = _run("risk", files["softmax"], *args), _run("risk", files["softmax_body"], *args)
    for label, g in b["groups"].items():
        for key in ("mean_loss", "grad_norm", "measured_loss_change", "accuracy"):
            assert a["groups"][label][key] == pytest.approx(g[key], rel=1e-4, abs=1e-7)
        assert a["groups"][label]["uncertain_share"] == pytest.approx(g["uncertain_share"])


def test_a_logit_column_inside_0_1_is_still_read_at_0(tmp_path):
    """The graph decides the threshold: a logit model whose outputs all fall in [0, 1] is not a probability."""
    x = np.linspace(0.05, 0.95, 40, dtype=np.float32)[:, None]
    y = (x[:, 0] > 0.5).astype(np.int64)  # read at 0.5 this would be 100 % right; at 0 every row is class 1
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y, grp=np.array(["a", "b"] * 20))
    rep = _run("evaluate", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--groups", "grp", "--no-latency", "--json", "-")
    assert rep["overall"]["accuracy"] == pytest.approx(float(np.mean(y == 1)))


def test_the_logit_view_outputs_the_activation_input_and_shares_the_weights():
    m = _ending(onnx.load(MLP), "Softmax", axis=1)
    view = logit_view(m)
    assert view.graph.output[0].name == onnx.load(MLP).graph.output[0].name
    assert logit_view(onnx.load(MLP)) is not None and output_activation(onnx.load(MLP)) is None
    x = np.load(CAL)["x"][:50]
    logits = create_session(view, "cpu").run({"x": x})
    probs = create_session(m, "cpu").run({"x": x})
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_a_softmax_over_another_axis_is_refused():
    m = _ending(onnx.load(MLP), "Softmax", axis=0)
    with pytest.raises(UnsupportedError, match="not the class axis"):
        output_activation(m)
