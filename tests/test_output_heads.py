"""What the scored output holds and how it is read: activations behind shape-only ops, class-index heads,
NaN outputs, a Softmax over the last axis of [batch, 1, classes], and models with several outputs.

Oracles: onnxruntime on the same file (a probability above 0.5, the argmax, the indices themselves), and for
the losses the same network without its activation.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli.main import app
from onnxfair import runtime
from onnxfair.errors import UnsupportedError
from onnxfair.head import logit_view, output_activation
from onnxfair.report import json_safe
from tests.conftest import FIXTURES, linear_model

MLP = FIXTURES / "adult_mlp.onnx"
CAL = FIXTURES / "adult_calib.npz"


def _then(body: onnx.ModelProto, nodes: list, out: str, shape: list, elem: int = TensorProto.FLOAT,
          inits: tuple = ()) -> onnx.ModelProto:
    """`body` with `nodes` appended after its first output; `out` (of `shape`) becomes the first output."""
    m = onnx.ModelProto()
    m.CopyFrom(body)
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, elem, shape))
    onnx.checker.check_model(m, full_check=True)
    return m


def _binary_body() -> onnx.ModelProto:
    """The Adult MLP with one logit column, z = logit_1 - logit_0."""
    diff = numpy_helper.from_array(np.array([[-1.0], [1.0]], np.float32), "diff")
    return _then(onnx.load(MLP), [helper.make_node("MatMul", ["logits", "diff"], ["z"])], "z", ["batch", 1], inits=(diff,))


def _axes(*axes: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(axes, np.int64), "axes")


HEADS = {
    "sigmoid_squeeze": lambda: _then(_binary_body(), [helper.make_node("Sigmoid", ["z"], ["p"]),
                                                      helper.make_node("Squeeze", ["p", "axes"], ["o"])],
                                     "o", ["batch"], inits=(_axes(1),)),
    "sigmoid_flatten": lambda: _then(_binary_body(), [helper.make_node("Sigmoid", ["z"], ["p"]),
                                                      helper.make_node("Flatten", ["p"], ["o"])], "o", ["batch", 1]),
    "softmax_flatten": lambda: _then(onnx.load(MLP), [helper.make_node("Softmax", ["logits"], ["p"], axis=1),
                                                      helper.make_node("Flatten", ["p"], ["o"])], "o", ["batch", 2]),
    "softmax_reshape": lambda: _then(onnx.load(MLP), [helper.make_node("Softmax", ["logits"], ["p"], axis=1),
                                                      helper.make_node("Reshape", ["p", "axes"], ["o"])],
                                     "o", ["batch", 2], inits=(_axes(-1, 2),)),
    "softmax_unsqueeze_identity": lambda: _then(onnx.load(MLP), [
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1), helper.make_node("Unsqueeze", ["p", "axes"], ["u"]),
        helper.make_node("Identity", ["u"], ["o"])], "o", ["batch", 2, 1], inits=(_axes(2),)),
    # value ops that keep every prediction (before: read as logits, so every Sigmoid row was class 1)
    "sigmoid_cast_clip": lambda: _then(_binary_body(), [
        helper.make_node("Sigmoid", ["z"], ["p"]), helper.make_node("Cast", ["p"], ["c"], to=TensorProto.DOUBLE),
        helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.array(1 - 1e-7))),
        helper.make_node("Clip", ["c", "lo", "hi"], ["o"])], "o", ["batch", 1], elem=TensorProto.DOUBLE,
        inits=(numpy_helper.from_array(np.array(1e-7), "lo"),)),
    "softmax_clip": lambda: _then(onnx.load(MLP), [
        helper.make_node("Softmax", ["logits"], ["p"], axis=1), helper.make_node("Clip", ["p", "lo"], ["o"])],
        "o", ["batch", 2], inits=(numpy_helper.from_array(np.array(1e-6, np.float32), "lo"),)),
}


def _run(*args, code: int = 0):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def _json(*args):
    return json.loads(_run(*args).stdout)


def _ort(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _one_error_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads")
    files = {}
    for name, build in {**HEADS, "binary_body": _binary_body, "body": lambda: onnx.load(MLP)}.items():
        files[name] = d / f"{name}.onnx"
        onnx.save(build(), files[name])
    return d, files


# ------------------------------------------------------------------ 1: activations behind shape-only ops


@pytest.mark.parametrize("name", sorted(HEADS))
def test_an_activation_behind_shape_ops_is_read_as_probabilities(heads, name):
    _, files = heads
    data = np.load(CAL)
    out = _ort(files[name], data["x"])
    pred = (out.reshape(-1) > 0.5) if name.startswith("sigmoid") else out.reshape(len(out), -1).argmax(1)
    rep = _json("evaluate", files[name], "--data", CAL, "--groups", "race", "--no-latency", "--json", "-")
    assert rep["overall"]["accuracy"] == pytest.approx(float(np.mean(pred == data["y"])))
    assert rep["output"]["read_as"] == ("Sigmoid" if name.startswith("sigmoid") else "Softmax") + " probabilities"
    # the logit view outputs the activation's input: the model's output is its activation, row by row
    view = logit_view(onnx.load(files[name]))
    z = runtime.create_session(view, "cpu").run({"x": data["x"]})
    z = z.reshape(len(z), -1)
    want = 1 / (1 + np.exp(-z)) if name.startswith("sigmoid") else np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(out.reshape(len(out), -1), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, body", [("softmax_flatten", "body"), ("sigmoid_squeeze", "binary_body"),
                                        ("sigmoid_cast_clip", "binary_body"), ("softmax_clip", "body")])
def test_risk_takes_the_loss_on_the_logits_behind_shape_ops(heads, name, body):
    _, files = heads
    args = ["--data", CAL, "--groups", "race", "--hutchinson-samples", "0", "--json", "-"]
    a, b = _json("risk", files[name], *args), _json("risk", files[body], *args)
    for key in ("mean_loss", "grad_norm", "uncertain_share", "accuracy", "measured_loss_change"):
        assert a["overall"][key] == pytest.approx(b["overall"][key], rel=1e-4, abs=1e-7), key


def test_pruning_a_sigmoid_squeeze_model_matches_its_logit_body_and_keeps_the_head(heads):
    d, files = heads
    args = ["--data", CAL, "--groups", "race", "--method", "fairgrape", "--unstructured", "--sparsity", "0.5",
            "--finetune-epochs", "1", "--threads", "1", "--no-latency", "--json", "-"]
    rep = _json("prune", files["sigmoid_squeeze"], *args, "-o", d / "ss.pruned.onnx")
    ref = _json("prune", files["binary_body"], *args, "-o", d / "body.pruned.onnx")
    assert rep["pruned"]["groups"] == ref["pruned"]["groups"]
    assert rep["dense"]["output"]["name"] == rep["pruned"]["output"]["name"] == "o"
    pruned = onnx.load(d / "ss.pruned.onnx")
    assert [n.op_type for n in pruned.graph.node][-2:] == ["Sigmoid", "Squeeze"]
    assert output_activation(pruned) == "Sigmoid"


@pytest.mark.parametrize("lo, hi, to", [(0.3, 1.0, None), (0.0, 0.9, None), (None, None, TensorProto.INT64)])
def test_a_clip_or_cast_that_can_change_predictions_is_not_looked_through(lo, hi, to):
    if to is None:
        inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", lo), ("hi", hi))]
        tail = [helper.make_node("Clip", ["p", "lo", "hi"], ["o"])]
    else:
        inits, tail = [], [helper.make_node("Cast", ["p"], ["o"], to=to)]
    m = _then(_binary_body(), [helper.make_node("Sigmoid", ["z"], ["p"]), *tail], "o", ["batch", 1],
              elem=to or TensorProto.FLOAT, inits=tuple(inits))
    assert output_activation(m) is None


def test_a_reshape_that_folds_rows_together_is_not_looked_through():
    body = onnx.load(MLP)
    folded = _then(body, [helper.make_node("Softmax", ["logits"], ["p"], axis=1),
                          helper.make_node("Reshape", ["p", "axes"], ["o"])], "o", [None], inits=(_axes(-1),))
    assert output_activation(folded) is None
    batch_first = _then(body, [helper.make_node("Softmax", ["logits"], ["p"], axis=1),
                               helper.make_node("Unsqueeze", ["p", "axes"], ["o"])], "o", [1, "batch", 2],
                        inits=(_axes(0),))
    assert output_activation(batch_first) is None


# -------------------------------------------------------------------------- 2: class-index (ArgMax) heads


@pytest.mark.parametrize("keepdims", [0, 1])
def test_an_argmax_head_is_scored_by_its_class_indices(tiny_linear, tmp_path, keepdims):
    m = _then(tiny_linear["model"], [helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=keepdims)],
              "cls", ["N", 1][: 1 + keepdims], elem=TensorProto.INT64)
    p = tmp_path / "argmax.onnx"
    onnx.save(m, p)
    x, y, race = tiny_linear["x"], tiny_linear["y"], tiny_linear["race"]
    pred = _ort(p, x).reshape(-1)
    rep = _json("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--no-latency", "--json", "-")
    assert rep["overall"]["accuracy"] == pytest.approx(float(np.mean(pred == y)))
    for g in np.unique(race):
        assert rep["groups"][f"race={g}"]["accuracy"] == pytest.approx(float(np.mean(pred[race == g] == y[race == g])))
    assert not rep["binary"] and rep["output"]["read_as"] == "class indices"
    np.savez(tmp_path / "self.npz", x=x, y=pred, race=race)  # its own predictions: exactly right
    rep = _json("evaluate", p, "--data", tmp_path / "self.npz", "--groups", "race", "--no-latency", "--json", "-")
    assert rep["overall"]["accuracy"] == 1.0


def test_labels_an_argmax_head_cannot_pick_are_refused(tiny_linear, tmp_path):
    """The head picks among the 3 classes of the Gemm before it; labels 5..7 were accepted (accuracy 0, exit 0)."""
    m = _then(tiny_linear["model"], [helper.make_node("ArgMax", ["logits"], ["i"], axis=1, keepdims=0),
                                     helper.make_node("Cast", ["i"], ["cls"], to=TensorProto.INT32)],
              "cls", ["N"], elem=TensorProto.INT32)
    onnx.save(m, tmp_path / "argmax.onnx")
    x, race = tiny_linear["x"], tiny_linear["race"]
    np.savez(tmp_path / "far.npz", x=x, y=np.full(len(x), 5), race=race)
    said = _one_error_line(_run("evaluate", tmp_path / "argmax.onnx", "--data", tmp_path / "far.npz", "--groups", "race",
                                "--no-latency", code=2))
    assert said == (f"error: label 'y' has values 5 in {len(x)} rows; class indices must be in 0..2 for a 3-class model "
                    "output: fix the labels or pick the right column with --label")
    np.savez(tmp_path / "ok.npz", x=x, y=np.full(len(x), 2), race=race)  # the top class itself is fine
    _run("evaluate", tmp_path / "argmax.onnx", "--data", tmp_path / "ok.npz", "--groups", "race", "--no-latency")


def test_integer_outputs_in_several_columns_are_refused_not_argmaxed(tiny_linear, tmp_path):
    """TopK's indices [N, 2]: argmax over them picked the position of the larger class index (exit 0, accuracy
    about 0.4 for a model whose top-1 accuracy is 0.8). Refused for evaluate and compare alike."""
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    m = _then(tiny_linear["model"], [helper.make_node("TopK", ["logits", "k"], ["vals", "idx"], axis=1)],
              "idx", ["N", 2], elem=TensorProto.INT64, inits=(k,))
    m.graph.output.append(helper.make_tensor_value_info("vals", TensorProto.FLOAT, ["N", 2]))
    p = tmp_path / "topk.onnx"
    onnx.save(m, p)
    idx = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["idx"], {"x": tiny_linear["x"]})[0]
    assert (idx.argmax(1) != idx[:, 0]).any()  # argmax over the indices is not the top-1 class
    data = ["--data", tiny_linear["data"], "--groups", "race", "--no-latency"]
    said = ("error: {}'s first output holds int64 values in 2 columns per row; onnxfair reads an integer output as one "
            "class index per row: re-export the model with its class scores (logits or probabilities) or one class "
            "index per row as the first output")
    assert _one_error_line(_run("evaluate", p, *data, code=2)) == said.format(p)
    assert _one_error_line(_run("compare", tiny_linear["path"], p, *data, code=2)) == said.format(p)


def test_gradient_commands_refuse_an_argmax_head_in_one_line(tiny_linear, tmp_path):
    m = _then(tiny_linear["model"], [helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0)],
              "cls", ["N"], elem=TensorProto.INT64)
    onnx.save(m, tmp_path / "argmax.onnx")
    data = ["--data", str(tiny_linear["data"]), "--groups", "race"]
    said = ("error: the model's first output holds int64 values (class indices, say), not class scores; re-export the "
            "model with its class scores (logits or probabilities) as the first output")
    r = CliRunner().invoke(app, ["risk", str(tmp_path / "argmax.onnx"), *data, "--unstructured", "--hutchinson-samples", "0"])
    assert _one_error_line(r) == said
    # magnitude needs no gradient to score, but fine-tuning does (its validation pass used to crash on the indices)
    r = CliRunner().invoke(app, ["prune", str(tmp_path / "argmax.onnx"), *data, "--method", "magnitude", "--unstructured",
                                 "--sparsity", "0.5", "--finetune-epochs", "1", "-o", str(tmp_path / "p.onnx")])
    assert _one_error_line(r) == said and not (tmp_path / "p.onnx").exists()


# ---------------------------------------------------------------------------------- 3: NaN / inf outputs


def test_nan_outputs_are_refused_saying_in_how_many_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_WARNED", set())
    m = _then(onnx.load(MLP), [helper.make_node("Log", ["logits"], ["o"])], "o", ["batch", 2])
    onnx.save(m, tmp_path / "log.onnx")
    out = _ort(tmp_path / "log.onnx", np.load(CAL)["x"])
    bad = int((~np.isfinite(out)).any(1).sum())
    assert 0 < bad < len(out)
    common = ["--data", CAL, "--groups", "race"]
    for args in (["evaluate", tmp_path / "log.onnx", *common, "--no-latency"],
                 ["compare", MLP, tmp_path / "log.onnx", *common, "--no-latency"],
                 ["risk", tmp_path / "log.onnx", *common, "--hutchinson-samples", "0", "--json", "-"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        line = _one_error_line(r)
        assert f"NaN or infinite values in {bad:,} of {len(out):,} rows" in line, line
        assert "NaN" not in r.stdout
        assert "affect one another" not in r.output  # NaN rows equal NaN rows: they do not interact


def _no_constant(token: str):
    raise AssertionError(f"the JSON holds a bare {token} token")


def test_json_safe_leaves_no_nan_or_infinity_tokens():
    doc = {"a": float("nan"), "b": [np.float32("inf"), 1.5, None], "c": np.array([1.0, -np.inf]), "d": (np.int64(3),)}
    text = json.dumps(json_safe(doc), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [None, 1.5, None], "c": [1.0, None], "d": [3]}


def test_risk_reports_an_overflowing_masked_loss_as_null(tmp_path):
    """Dense logits [log x, log 2x] are finite; the mask removes the smaller weight, so class 0's logit is
    log 0 = -inf and its rows' masked loss is infinite: null in the report, never an Infinity token."""
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["s"], transB=1), helper.make_node("Log", ["s"], ["o"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(np.array([[1.0], [2.0]], np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.uniform(1, 2, (40, 1)).astype(np.float32), y=np.arange(40) % 2,
             grp=np.array(["a", "b"] * 20))
    r = _run("risk", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--groups", "grp", "--unstructured",
             "--scope", "layer", "--sparsity", "0.5", "--hutchinson-samples", "0", "--json", "-")
    rep = json.loads(r.stdout, parse_constant=_no_constant)
    assert rep["overall"]["measured_loss_change"] is None
    assert rep["overall"]["mean_loss"] == pytest.approx(0.5 * float(np.log(3.0) + np.log(1.5)), rel=1e-5)  # dense: finite


# ------------------------------------------------------------ 4: Softmax over the last axis of [batch, 1, C]


def test_a_softmax_over_the_last_axis_of_batch_1_classes_is_read_as_probabilities(heads, tmp_path):
    _, files = heads
    m = _then(onnx.load(MLP), [helper.make_node("Unsqueeze", ["logits", "axes"], ["u"]),
                               helper.make_node("Softmax", ["u"], ["o"], axis=-1)], "o", ["batch", 1, 2],
              inits=(_axes(1),))
    onnx.save(m, tmp_path / "b1c.onnx")
    data = np.load(CAL)
    pred = _ort(tmp_path / "b1c.onnx", data["x"]).reshape(len(data["y"]), -1).argmax(1)
    rep = _json("evaluate", tmp_path / "b1c.onnx", "--data", CAL, "--groups", "race", "--no-latency", "--json", "-")
    assert rep["overall"]["accuracy"] == pytest.approx(float(np.mean(pred == data["y"])))
    args = ["--data", CAL, "--groups", "race", "--hutchinson-samples", "0", "--json", "-"]
    a, b = _json("risk", tmp_path / "b1c.onnx", *args), _json("risk", files["body"], *args)
    assert a["overall"]["mean_loss"] == pytest.approx(b["overall"]["mean_loss"], rel=1e-5)


@pytest.mark.parametrize("opset, axis, ok", [(17, 2, True), (17, -1, True), (17, 1, False), (11, 1, True), (11, -1, True)])
def test_which_softmax_axis_is_the_class_axis(opset, axis, ok):
    """[N, 1, 3]: from opset 13 Softmax normalises one axis (axis 1 has one value: every output is 1); before,
    it flattens from the axis on, so axis 1 normalises each row."""
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["o"], axis=axis)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 1, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    if ok:
        assert output_activation(m) == "Softmax"
    else:
        with pytest.raises(UnsupportedError, match="not the class axis"):
            output_activation(m)


# --------------------------------------------------------------------------------- 5: several outputs


def _aux_first(tiny_linear) -> onnx.ModelProto:
    """tiny_linear's 3-class logits second, a 5-wide auxiliary head first."""
    m = onnx.ModelProto()
    m.CopyFrom(tiny_linear["model"])
    m.graph.node.append(helper.make_node("Gemm", ["x", "A"], ["aux"], transB=1))
    m.graph.initializer.append(numpy_helper.from_array(np.ones((5, 4), np.float32), "A"))
    m.graph.output.insert(0, helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 5]))
    return m


def test_the_scored_output_is_stated_when_there_are_several(tiny_linear, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_WARNED", set())
    p = tmp_path / "aux.onnx"
    onnx.save(_aux_first(tiny_linear), p)
    r = _run("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--no-latency", "--json", "-")
    notes = [line for line in r.stderr.splitlines() if "outputs" in line]
    assert len(notes) == 1 and "'aux' float32 [N, 5]" in notes[0] and "ignoring 1 other" in notes[0], r.stderr
    assert json.loads(r.stdout)["output"]["name"] == "aux"
    rep = _json("risk", p, "--data", tiny_linear["data"], "--groups", "race", "--hutchinson-samples", "0",
                "--sparsity", "0", "--json", "-")
    assert rep["output"] == {"name": "aux", "dtype": "float32", "shape": ["N", 5], "outputs": 2}
    single = _json("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race", "--no-latency",
                   "--json", "-")
    assert single["output"]["name"] == "logits" and single["output"]["outputs"] == 1


def test_prune_states_the_scored_output_before_scoring_it(tiny_linear, tmp_path, monkeypatch):
    """Before: the line came at the evaluation step, after the scoring had already read the auxiliary head."""
    monkeypatch.setattr(runtime, "_WARNED", set())
    p = tmp_path / "aux.onnx"
    onnx.save(_aux_first(tiny_linear), p)
    r = _run("prune", p, "--data", tiny_linear["data"], "--groups", "race", "--method", "taylor", "--unstructured",
             "--sparsity", "0.5", "-o", tmp_path / "out.onnx", "--no-latency")
    lines = r.stderr.splitlines()
    notes = [i for i, line in enumerate(lines) if "has 2 outputs" in line]
    assert len(notes) == 1 and "'aux' float32 [N, 5]" in lines[notes[0]], r.stderr
    assert notes[0] < lines.index("[score+select] ...")


def test_compare_refuses_models_that_score_different_class_counts(tiny_linear, tmp_path):
    p = tmp_path / "aux.onnx"
    onnx.save(_aux_first(tiny_linear), p)
    r = CliRunner().invoke(app, ["compare", str(tiny_linear["path"]), str(p), "--data", str(tiny_linear["data"]),
                                 "--groups", "race", "--no-latency"])
    line = _one_error_line(r)
    assert "'logits' has 3 classes" in line and "'aux' 5" in line, line
    assert r.stdout == ""
    same = linear_model(tiny_linear["w"][::-1], tiny_linear["b"][::-1])  # 3 classes too: compared
    onnx.save(same, tmp_path / "same.onnx")
    rep = _json("compare", tiny_linear["path"], tmp_path / "same.onnx", "--data", tiny_linear["data"], "--groups", "race",
                "--no-latency", "--json", "-")
    assert rep["a"]["output"]["name"] == rep["b"]["output"]["name"] == "logits"


def test_a_head_that_squeezes_every_unit_axis_loses_no_row(tmp_path):
    """Squeeze without axes turns a batch of one row into a scalar: the rows-interact probe (one row at a time)
    crashed with a traceback on the first batch, and a last batch of one row was refused."""
    m = _then(_binary_body(), [helper.make_node("Squeeze", ["z"], ["o"])], "o", ["batch"])
    p = tmp_path / "squeezed.onnx"
    onnx.save(m, p)
    cal = np.load(CAL)
    rows = np.arange(257)  # 256 + 1: the last batch has one row
    np.savez(tmp_path / "d.npz", **{k: cal[k][rows] for k in cal.files})
    rep = _json("evaluate", p, "--data", tmp_path / "d.npz", "--groups", "race", "--no-latency", "--json", "-")
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    z = sess.run(None, {"x": cal["x"][rows]})[0]
    assert rep["overall"]["accuracy"] == pytest.approx(float(np.mean((z > 0) == cal["y"][rows])))


def test_a_squeezed_head_runs_a_row_at_a_time_and_with_rows_that_interact(tmp_path, monkeypatch):
    """--batch-size 1 gave every row a scalar ('returned no rows'); a squeezed head on rows that interact
    (centred over the batch) hid the interaction from the probe, so the mixed rows were reported."""
    monkeypatch.setattr(runtime, "_WARNED", set())
    squeezed = _then(_binary_body(), [helper.make_node("Squeeze", ["z"], ["o"])], "o", ["batch"])
    mean = helper.make_node("ReduceMean", ["x_in", "batch_axis"], ["mu"], keepdims=1)
    centred = onnx.ModelProto()
    centred.CopyFrom(squeezed)
    centred.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "batch_axis"))
    first = centred.graph.node[0]
    first.input[0] = "x_c"
    centred.graph.node.insert(0, mean)
    centred.graph.node.insert(1, helper.make_node("Sub", ["x_in", "mu"], ["d"]))
    centred.graph.node.insert(2, helper.make_node("Add", ["x_in", "d"], ["x_c"]))
    centred.graph.input[0].name = "x_in"
    for n in centred.graph.node[3:]:
        for i, v in enumerate(n.input):
            if v == "x":
                n.input[i] = "x_c"
    cal = np.load(CAL)
    rows = np.arange(257)
    np.savez(tmp_path / "d.npz", x_in=cal["x"][rows], x=cal["x"][rows], y=cal["y"][rows], race=cal["race"][rows])
    for m, name, extra in ((squeezed, "sq", ["--batch-size", "1"]), (centred, "centred", [])):
        onnx.save(m, tmp_path / f"{name}.onnx")
        sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        feed = m.graph.input[0].name
        z = np.array([sess.run(None, {feed: cal["x"][i:i + 1]})[0].reshape(()) for i in rows])
        r = CliRunner().invoke(app, ["evaluate", str(tmp_path / f"{name}.onnx"), "--data", str(tmp_path / "d.npz"),
                                     "--groups", "race", "--no-latency", "--json", "-", *extra])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["overall"]["accuracy"] == pytest.approx(float(np.mean((z > 0) == cal["y"][rows])))
        assert ("affect one another" in r.output) == (name == "centred")


def test_a_string_label_head_is_refused_in_one_line(tmp_path):
    m = _then(onnx.load(MLP), [helper.make_node("ArgMax", ["logits"], ["k"], axis=1, keepdims=0),
                               helper.make_node("Cast", ["k"], ["label"], to=TensorProto.STRING)],
              "label", ["batch"], elem=TensorProto.STRING)
    onnx.save(m, tmp_path / "s.onnx")
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "s.onnx"), "--data", str(CAL), "--groups", "race"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert _one_error_line(r).endswith("holds strings (class labels, say), not class scores; re-export the model with "
                                       "its class scores (or class indices) as the first output")


def _trunk_with_aux_branch(tiny_linear) -> onnx.ModelProto:
    """x -> Gemm T (8 hidden) -> Relu -> logits (Gemm H), and the same hidden units -> a 5-unit layer A1 -> Relu
    -> 1-unit aux head A2, a second output that nothing scores."""
    rng = np.random.default_rng(1)
    inits = {"T": rng.normal(size=(8, 4)), "Tb": rng.normal(size=8) * 0.1, "H": rng.normal(size=(3, 8)),
             "A1": rng.normal(size=(5, 8)), "A1b": rng.normal(size=5) * 0.1, "A2": rng.normal(size=(1, 5))}
    nodes = [helper.make_node("Gemm", ["x", "T", "Tb"], ["t"], transB=1), helper.make_node("Relu", ["t"], ["f"]),
             helper.make_node("Gemm", ["f", "H"], ["logits"], transB=1),
             helper.make_node("Gemm", ["f", "A1", "A1b"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["r", "A2"], ["aux"], transB=1)]
    graph = helper.make_graph(
        nodes, "aux_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("method", ["taylor", "fairgrape"])
@pytest.mark.parametrize("mode", [("--unstructured",), ("--round-to", "1")])
def test_layers_that_feed_only_an_unscored_output_are_left_alone(tiny_linear, tmp_path, method, mode):
    """Before: their gradients are zero, so a gradient criterion spent the whole budget on them (every aux
    weight removed, the scored layers untouched, and the report showing no accuracy lost)."""
    p, out = tmp_path / "aux.onnx", tmp_path / "out.onnx"
    onnx.save(_trunk_with_aux_branch(tiny_linear), p)
    _run("prune", p, "--data", tiny_linear["data"], "--groups", "race", "--method", method, *mode, "--sparsity",
         "0.5", "-o", out, "--no-latency", "--json", "-")
    dense = {t.name: numpy_helper.to_array(t) for t in onnx.load(p).graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_array_equal(got["A2"], dense["A2"])  # the aux head's own weights
    np.testing.assert_array_equal(got["A1b"], dense["A1b"])  # its 5 hidden units all kept
    if mode == ("--unstructured",):
        np.testing.assert_array_equal(got["A1"], dense["A1"])
        assert np.count_nonzero(got["T"] == 0) + np.count_nonzero(got["H"] == 0) == 28  # half of 32 + 24
    else:  # the trunk's 8 hidden units are the only channels: half removed, A1 loses the matching columns
        kept = [j for j in range(8) if any(np.array_equal(got["T"][i], dense["T"][j]) for i in range(got["T"].shape[0]))]
        assert got["T"].shape == (4, 4) and len(kept) == 4
        np.testing.assert_array_equal(got["A1"], dense["A1"][:, kept])


def test_an_analysis_names_the_layers_that_feed_no_scored_output(tiny_linear):
    from onnxfair.graph import analyze

    an = analyze(_trunk_with_aux_branch(tiny_linear))
    frozen = {f["space"]: (f["channels"], f["reason"]) for f in an.frozen}
    assert any(c == 5 and "does not feed the first output logits" in r for c, r in frozen.values()), frozen
    assert [g.size for g in an.groups] == [8]
