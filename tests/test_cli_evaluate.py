"""`onnxfair evaluate` / `compare` as a user runs them: JSON figures against fairlearn, errors as one line."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from fairlearn.metrics import MetricFrame
from sklearn.metrics import accuracy_score

from cli.main import app
from onnxfair import runtime
from tests.conftest import linear_model


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_evaluate_json_matches_fairlearn(tiny_linear):
    r = run("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    pred = (tiny_linear["x"] @ tiny_linear["w"].T + tiny_linear["b"]).argmax(1)
    mf = MetricFrame(metrics=accuracy_score, y_true=tiny_linear["y"], y_pred=pred, sensitive_features=tiny_linear["race"])
    for g, acc in mf.by_group.items():
        assert rep["groups"][f"race={g}"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert rep["overall"] == {"n": 200, "accuracy": pytest.approx(accuracy_score(tiny_linear["y"], pred))}
    assert rep["disparity"]["accuracy_gap"] == pytest.approx(mf.difference())
    assert rep["disparity"]["equalized_odds_difference"] is None
    assert rep["onnxfair_evaluation"] == 1 and rep["groups_by"] == ["race"]


def test_evaluate_table_and_latency(tiny_linear, tmp_path):
    out = tmp_path / "r.json"
    r = run("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race,sex", "--json", out, "--latency-batch", "4")
    assert r.exit_code == 0
    assert "race=A,sex=F" in r.stdout and "accuracy gap" in r.stdout
    rep = json.loads(out.read_text())
    lat = rep["latency"]
    assert lat["provider"] == "CPUExecutionProvider" and lat["batch_size"] == 4
    assert 0 < lat["median_ms"] <= lat["p90_ms"]


def test_static_batch_model_evaluates_every_row(tiny_linear, tmp_path):
    static = linear_model(tiny_linear["w"], tiny_linear["b"], batch=1)
    p = tmp_path / "static.onnx"
    onnx.save(static, p)
    r = run("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    dyn = run("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    assert json.loads(r.stdout)["groups"] == json.loads(dyn.stdout)["groups"]


def _hard_coded_batch(w, b, batch: int, target) -> onnx.ModelProto:
    """x [batch, F] -> Reshape(x, target) -> Gemm: a graph whose Reshape constant pins the batch."""
    from onnx import TensorProto, helper, numpy_helper

    c, f = w.shape
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)],
        "pinned", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, f])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c])],
        [numpy_helper.from_array(np.asarray(target, np.int64), "shape"),
         numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_a_graph_that_pins_its_batch_is_evaluated_in_batches_of_that_size(tiny_linear, tmp_path, batch, monkeypatch):
    """200 rows in batches of 3 leave a padded last batch; every row must still be scored as the dynamic model does."""
    p = tmp_path / "pinned.onnx"
    onnx.save(_hard_coded_batch(tiny_linear["w"], tiny_linear["b"], batch, [batch, 4]), p)
    monkeypatch.setattr(runtime, "_WARNED", set())  # warnings are once per process
    r = run("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--latency-batch", "8")
    assert r.exit_code == 0, r.output
    dyn = run("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    rep = json.loads(r.stdout)
    assert rep["groups"] == json.loads(dyn.stdout)["groups"]
    assert rep["latency"]["batch_size"] == batch  # timed at the only batch the graph runs at
    assert f"--latency-batch 8 cannot be honoured: the model runs batches of {batch} rows only" in r.stderr


def test_latency_batch_without_latency_is_refused(tiny_linear):
    """Before: --latency-batch with --no-latency was accepted and ignored (prune refuses it)."""
    for command in (["evaluate", tiny_linear["path"]], ["compare", tiny_linear["path"], tiny_linear["path"]]):
        msg = _one_line_error([*command, "--data", tiny_linear["data"], "--groups", "race", "--no-latency",
                               "--latency-batch", "8"])
        assert msg == "error: --latency-batch 8 has no effect with --no-latency, which skips latency timing; drop --latency-batch"
    r = run("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race", "--no-latency",
            "--latency-batch", "1")  # spelled out at its default: accepted
    assert r.exit_code == 0, r.output


def test_data_free_prune_times_a_graph_that_pins_its_batch_at_that_batch(tiny_linear, tmp_path):
    """No data means no evaluation to discover the pinned batch first: the timing itself falls back."""
    p, out = tmp_path / "pinned.onnx", tmp_path / "pruned.onnx"
    onnx.save(_hard_coded_batch(tiny_linear["w"], tiny_linear["b"], 1, [1, 4]), p)
    r = run("prune", p, "--method", "magnitude", "--unstructured", "--sparsity", "0.5", "-o", out, "--json", "-",
            "--latency-batch", "8")
    assert r.exit_code == 0, r.output
    lat = json.loads(r.stdout)["latency"]
    assert lat["dense"]["batch_size"] == lat["pruned"]["batch_size"] == 1
    w = onnx.numpy_helper.to_array(next(i for i in onnx.load(out).graph.initializer if i.name == "W"))
    assert np.count_nonzero(w) == 6  # the weights were pruned all the same


def test_a_graph_that_folds_the_batch_at_its_output_is_evaluated_row_by_row(tiny_linear, tmp_path):
    """Gemm then Reshape(logits, [1, -1]): onnxruntime accepts any batch but returns one row for all of them."""
    from onnx import helper, numpy_helper

    m = onnx.load(tiny_linear["path"])
    m.graph.node[-1].output[0] = "scores"
    m.graph.node.append(helper.make_node("Reshape", ["scores", "fold"], ["logits"]))
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "fold"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    p = tmp_path / "fold.onnx"
    onnx.save(m, p)
    r = run("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    assert r.exit_code == 0, r.output
    dyn = run("evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    assert json.loads(r.stdout)["groups"] == json.loads(dyn.stdout)["groups"]


@pytest.mark.parametrize("target", [[1, 4], [1, -1]])
def test_gradient_methods_refuse_a_graph_that_pins_batch_1(tiny_linear, tmp_path, target):
    """[1, 4] fails on a batch of 64 rows; [1, -1] would silently fold the batch into one row: both refused."""
    p = tmp_path / "pinned.onnx"
    onnx.save(_hard_coded_batch(tiny_linear["w"], tiny_linear["b"], 1, target), p)
    r = run("prune", p, "--data", tiny_linear["data"], "--groups", "race", "--method", "taylor", "--unstructured",
            "--sparsity", "0.5", "-o", tmp_path / "out.onnx", "--no-latency")
    assert r.exit_code == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith("re-export the model with a dynamic batch axis")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_compare_degradation(tiny_linear, tmp_path):
    w2 = tiny_linear["w"].copy()
    w2[:, 0] = 0
    p = tmp_path / "b.onnx"
    onnx.save(linear_model(w2, tiny_linear["b"]), p)
    r = run("compare", tiny_linear["path"], p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    rep = json.loads(r.stdout)
    x, y, race = tiny_linear["x"], tiny_linear["y"], tiny_linear["race"]
    pa = (x @ tiny_linear["w"].T + tiny_linear["b"]).argmax(1)
    pb = (x @ w2.T + tiny_linear["b"]).argmax(1)
    deltas = {}
    for g in np.unique(race):
        rows = race == g
        deltas[f"race={g}"] = (pb[rows] == y[rows]).mean() - (pa[rows] == y[rows]).mean()
    assert rep["degradation"]["groups"] == pytest.approx(deltas)
    assert rep["degradation"]["std_delta"] == pytest.approx(np.std(list(deltas.values()), ddof=1))
    assert rep["degradation"]["overall_delta"] == pytest.approx((pb == y).mean() - (pa == y).mean())
    # a comparison names its data and grouping like the other reports (before: neither), with a format version
    assert rep["onnxfair_comparison"] == 1 and rep["data"] == str(tiny_linear["data"]) and rep["groups_by"] == ["race"]
    assert rep["speedup"] is None  # --no-latency
    r = run("compare", tiny_linear["path"], p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-")
    rep = json.loads(r.stdout)
    assert rep["speedup"] == rep["a"]["latency"]["median_ms"] / rep["b"]["latency"]["median_ms"] > 0


def _one_line_error(args):
    proc = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tiny_linear, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all \x00\x01")
    assert "not found" in _one_line_error(["evaluate", tmp_path / "nope.onnx", "--data", tiny_linear["data"], "--groups", "race"])
    assert "not an ONNX model" in _one_line_error(["evaluate", junk, "--data", tiny_linear["data"], "--groups", "race"])
    bad = linear_model(tiny_linear["w"], tiny_linear["b"])
    bad.graph.node[0].input[1] = "missing_weight"
    onnx.save(bad, tmp_path / "bad.onnx")
    msg = _one_line_error(["evaluate", tmp_path / "bad.onnx", "--data", tiny_linear["data"], "--groups", "race"])
    # the checker's text spans lines: all of it, on one line (before: cut at "of node: ")
    assert "rejected by the ONNX checker" in msg and "is not output of any previous nodes" in msg, msg
    assert msg.endswith("; re-export the model")
    np.savez(tmp_path / "wide.npz", x=np.zeros((3, 7), np.float32), y=np.zeros(3, int), race=np.array(list("abc")))
    msg = _one_line_error(["evaluate", tiny_linear["path"], "--data", tmp_path / "wide.npz", "--groups", "race"])
    assert "[N, 4] of float32" in msg
    msg = _one_line_error(["evaluate", tiny_linear["path"], "--data", tiny_linear["data"], "--groups", "age"])
    assert "'age' not found" in msg and "race, sex" in msg
    np.savez(tmp_path / "nan.npz", x=np.full((3, 4), np.nan, np.float32), y=np.zeros(3, int), race=np.array(list("abc")))
    assert "NaN" in _one_line_error(["evaluate", tiny_linear["path"], "--data", tmp_path / "nan.npz", "--groups", "race"])
    wider = linear_model(np.ones((3, 5)), tiny_linear["b"])
    onnx.save(wider, tmp_path / "wider.onnx")
    msg = _one_line_error(["compare", tiny_linear["path"], tmp_path / "wider.onnx", "--data", tiny_linear["data"], "--groups", "race"])
    assert "MODEL_B does not take MODEL_A's input" in msg
    assert "Missing option '--groups'" in _one_line_error(["evaluate", tiny_linear["path"], "--data", tiny_linear["data"]])
    assert "'onnxfair prune --help'" in _one_line_error(["prune", tiny_linear["path"], "--sparsity", "x", "-o", tmp_path / "o.onnx"])


def test_a_model_with_external_weights_is_read_and_a_missing_data_file_is_named(tiny_linear, tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    model = onnx.ModelProto()
    model.CopyFrom(tiny_linear["model"])  # saving with external data rewrites the proto it is given
    onnx.save(model, folder / "lin.onnx", save_as_external_data=True, location="lin.weights", size_threshold=0)
    args = ["--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency"]
    embedded = json.loads(CliRunner().invoke(app, ["evaluate", str(tiny_linear["path"]), *map(str, args)]).stdout)
    external = json.loads(CliRunner().invoke(app, ["evaluate", str(folder / "lin.onnx"), *map(str, args)]).stdout)
    assert external["groups"] == embedded["groups"] and external["overall"] == embedded["overall"]
    weights = folder / "lin.weights"
    weights.write_bytes(weights.read_bytes()[:10])
    msg = _one_line_error(["evaluate", folder / "lin.onnx", *args])
    assert "lin.weights, which has 10 bytes where" in msg and "truncated" in msg
    weights.unlink()
    msg = _one_line_error(["inspect", folder / "lin.onnx"])
    assert "lin.weights, which is missing" in msg and "not an ONNX model" not in msg


@pytest.mark.parametrize(
    "model, data, groups",
    [
        ("adult_mlp.onnx", "adult_eval.npz", ["race", "sex"]),
        ("adult_mlp.legacy.onnx", "adult_calib.npz", ["race"]),
        ("resnet_digits.onnx", "digits_eval.npz", ["tone", "stroke"]),
        ("mobilenet_digits.legacy.onnx", "digits_calib.npz", ["tone"]),
    ],
)
def test_evaluate_fixtures_match_fairlearn_exactly(model, data, groups):
    """Real predictions of every fixture architecture: per-group figures equal fairlearn's MetricFrame."""
    import onnxruntime as ort
    from fairlearn.metrics import equalized_odds_difference

    from tests.conftest import FIXTURES

    r = run("evaluate", FIXTURES / model, "--data", FIXTURES / data, "--groups", ",".join(groups), "--json", "-", "--no-latency")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    z = np.load(FIXTURES / data)
    sess = ort.InferenceSession(str(FIXTURES / model), providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, {"x": z["x"][i : i + 500]})[0] for i in range(0, len(z["y"]), 500)]).argmax(1)
    sf = [",".join(f"{g}={z[g][i]}" for g in groups) for i in range(len(z["y"]))]
    mf = MetricFrame(metrics=accuracy_score, y_true=z["y"], y_pred=pred, sensitive_features=sf)
    assert set(rep["groups"]) == set(mf.by_group.index)
    for label, acc in mf.by_group.items():
        assert rep["groups"][label]["accuracy"] == acc
        assert rep["groups"][label]["n"] == sf.count(label)
    assert rep["disparity"]["accuracy_gap"] == pytest.approx(mf.difference(), abs=1e-15)
    if rep["binary"]:
        eo = equalized_odds_difference(z["y"], pred, sensitive_features=sf)
        assert rep["disparity"]["equalized_odds_difference"] == pytest.approx(eo, abs=1e-15)


def test_an_output_that_folds_the_batch_into_one_row_is_refused():
    """Reshape(x, [1, -1]) as the last node runs on any batch but returns one row: scores would mix rows."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from onnxfair.errors import ModelError
    from onnxfair.finetune import logits_of
    from onnxfair.interpret import OnnxModule

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["logits"])], "fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    mod = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    assert logits_of(mod, {"x": torch.ones(1, 4)}).shape == (1, 4)
    with pytest.raises(ModelError, match=r"returned \(1, 12\) for a batch of 3 rows: a shape in the graph hard-codes"):
        logits_of(mod, {"x": torch.ones(3, 4)})


def test_a_failure_caused_by_one_rows_data_is_not_blamed_on_the_batch():
    """Row 0 is fine, row 1 indexes out of range: the graph takes any batch, so the error must stay the real one."""
    import torch
    from onnx import TensorProto, helper

    from onnxfair.errors import ModelError
    from onnxfair.interpret import OnnxModule

    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)], "gather",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])])
    mod = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    x, ok = torch.ones(2, 4), torch.tensor([[1], [2]])
    assert mod(x=x, i=ok).shape == (2, 1)
    with pytest.raises(Exception) as err:
        mod(x=x, i=torch.tensor([[1], [7]]))
    assert not isinstance(err.value, ModelError)


def time_major_lstm(batch_name: str = "batch", dynamic_time: bool = False) -> onnx.ModelProto:
    """nn.LSTM's default layout: token ids [T=6, N], the batch named `batch_name` on the input's axis 1 and
    on the output's axis 0 (when empty, torch names the two apart), T symbolic too with `dynamic_time`."""
    torch = pytest.importorskip("torch")

    class TimeMajor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.rnn, self.head = torch.nn.Embedding(20, 4), torch.nn.LSTM(4, 5), torch.nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.embed(x))[0][-1])

    import io
    import warnings

    torch.manual_seed(0)
    buf = io.BytesIO()
    axes = {"x": {1: batch_name}, "y": {0: batch_name}} if batch_name else {"x": [1], "y": [0]}  # torch names them
    if dynamic_time:
        axes["x"] = [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TimeMajor().eval(), (torch.randint(0, 20, (6, 3)),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("command", [
    ["evaluate"], ["risk", "--unstructured"], ["prune", "--method", "magnitude", "--unstructured", "--sparsity", "0.5"],
])
def test_a_model_with_its_batch_on_a_later_axis_is_refused_not_misread(tmp_path, command):
    """A time-major LSTM ([T, N] token ids, the default of nn.LSTM) was fed rows along axis 0: evaluate
    treated T as a fixed batch, ran the data's columns as rows and reported their accuracy (exit 0)."""
    model = time_major_lstm()
    onnx.save(model, tmp_path / "tm.onnx")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (40, 6)).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, 0] % 2, g=rng.choice(["a", "b"], 40))
    out = tmp_path / "p.onnx"
    args = [command[0], str(tmp_path / "tm.onnx"), "--data", str(tmp_path / "d.npz"), "--groups", "g", *command[1:]]
    r = CliRunner().invoke(app, args + (["-o", str(out)] if command[0] == "prune" else []))
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == (
        "error: model input 'x' has shape [6, 'batch']: its batch (batch, the first output's dim 0) is on axis 1, and "
        "onnxfair reads rows along axis 0; re-export the model with the batch first (batch_first=True for recurrent "
        "layers, or a Transpose inside the model)")
    assert "Traceback" not in r.output and not out.exists()


def test_inspect_refuses_a_time_major_model_after_describing_it(tmp_path):
    """Counted along axis 0, its MACs were those of one time step times the batch (1,248,000 for 49,216)."""
    onnx.save(time_major_lstm(), tmp_path / "tm.onnx")
    r = run("inspect", str(tmp_path / "tm.onnx"))
    assert r.exit_code == 2 and r.output.startswith("input  x")
    assert r.output.strip().splitlines()[-1].startswith("error: model input 'x' has shape [6, 'batch']: its batch")
    assert "MACs" not in r.output


@pytest.mark.parametrize("command", [["evaluate"], ["prune", "--method", "taylor", "--unstructured", "--sparsity", "0.5"]])
@pytest.mark.parametrize("dynamic_time,said", [
    (False, "model input 'x' has shape [6, 'x_dynamic_axes_1']: axis 0 is fixed while the first output's rows "
            "(y_dynamic_axes_1) are not, so the batch is likely on axis 1, and onnxfair reads rows along axis 0"),
    (True, "(as many as input 'x' has on axis 1: if the batch is on that axis, as in a time-major recurrent model, "
           "re-export the model with the batch first (batch_first=True for recurrent layers, or a Transpose inside "
           "the model))"),
])
def test_a_time_major_model_whose_dims_are_named_apart_is_refused(tmp_path, command, dynamic_time, said):
    """Exported with the batch named differently on input and output, nothing in the file ties them. With a
    fixed T, evaluate took T for a fixed batch and ran the data's columns as rows (exit 0); with T symbolic
    the failure said a shape hard-codes the batch size. The first is read from the shapes, the second from
    the row count."""
    m = time_major_lstm("", dynamic_time)
    onnx.save(m, tmp_path / "tm.onnx")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (40, 6)).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, 0] % 2, g=rng.choice(["a", "b"], 40))
    args = [command[0], str(tmp_path / "tm.onnx"), "--data", str(tmp_path / "d.npz"), "--groups", "g", *command[1:]]
    r = CliRunner().invoke(app, args + (["-o", str(tmp_path / "p.onnx")] if command[0] == "prune" else []))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert said in r.output.strip().splitlines()[-1]


def _paths(doc, prefix=""):
    """Every key path of a JSON document, down through objects (not into group tables, whose keys are data, nor
    into values that are null when not measured)."""
    out = set()
    for k, v in doc.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("groups", "classwise", "latency", "std_delta_interval"):
            out |= _paths(v, prefix + k + ".")
    return out


def test_json_documents_keep_their_keys_with_no_latency_and_one_group(tiny_linear, tmp_path):
    """A pipeline reads fixed keys: `latency` and std_delta's interval, noise floor and p-value were left out
    (not null) with --no-latency or a single group."""
    data = np.load(tiny_linear["data"])
    one = tmp_path / "one.npz"
    np.savez(one, **{k: data[k] for k in data.files if k != "race"}, race=np.array(["a"] * len(data["race"])))
    for command in (["evaluate", tiny_linear["path"]], ["compare", tiny_linear["path"], tiny_linear["path"]]):
        docs = {}
        for groups_data in (tiny_linear["data"], one):
            for latency in ([], ["--no-latency"]):
                r = run(*command, "--data", groups_data, "--groups", "race", "--json", "-", *latency)
                assert r.exit_code == 0, r.output
                docs[groups_data, bool(latency)] = json.loads(r.stdout)
        shapes = {k: _paths(d) for k, d in docs.items()}
        every = set().union(*shapes.values())
        assert {k: every - s for k, s in shapes.items()} == {k: set() for k in shapes}
        without = docs[one, True]
        lat = without["latency"] if command[0] == "evaluate" else without["a"]["latency"]
        assert lat is None
        if command[0] == "compare":
            assert without["degradation"]["std_delta_p_value"] is None
            assert docs[tiny_linear["data"], True]["degradation"]["std_delta_p_value"] is not None
