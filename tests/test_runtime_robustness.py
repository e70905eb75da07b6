"""Graphs that the gradient paths or onnxruntime cannot run: one line naming the problem and the fix, exit 2."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli.main import app
from onnxfair.errors import ModelError, UnsupportedError
from onnxfair.interpret import OnnxModule


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _model(nodes, x_type, x_shape, out_shape, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _pinned(w, b, batch: int, declared: int | str | None = None) -> onnx.ModelProto:
    """x [declared, F] -> Reshape(x, [batch, F]) -> Gemm: the Reshape constant pins the batch (declared: the
    input's own dim 0, the pinned batch unless given; "N" declares a dynamic batch the graph does not honour)."""
    c, f = w.shape
    declared = batch if declared is None else declared
    return _model([helper.make_node("Reshape", ["x", "shape"], ["flat"]),
                   helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)],
                  TensorProto.FLOAT, [declared, f], [declared, c],
                  [numpy_helper.from_array(np.array([batch, f], np.int64), "shape"),
                   numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")])


def _hardmax(w, b) -> onnx.ModelProto:
    """A linear model whose head is Hardmax: one-hot, so no gradient reaches the weights."""
    c, f = w.shape
    return _model([helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1),
                   helper.make_node("Hardmax", ["z"], ["logits"], axis=1)],
                  TensorProto.FLOAT, ["N", f], ["N", c],
                  [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")])


def _embedding(vocab: int = 5) -> onnx.ModelProto:
    """Token ids [N, 2] -> Gather from a [vocab, 3] table -> ReduceMean: ids outside the table fail in onnxruntime."""
    table = np.arange(vocab * 3, dtype=np.float32).reshape(vocab, 3)
    return _model([helper.make_node("Gather", ["E", "x"], ["e"]),
                   helper.make_node("ReduceMean", ["e"], ["logits"], axes=[1], keepdims=0)],
                  TensorProto.INT64, ["N", 2], ["N", 3], [numpy_helper.from_array(table, "E")])


def _last_line(r) -> str:
    return r.stderr.strip().splitlines()[-1]


PINNED_4 = ("error: the model fails on a batch of {n} rows (ONNX node Reshape 'flat': shape '[4, 4]' is invalid for "
            "input of size {size}) but runs on 4 rows: a shape in the graph hard-codes the batch size; re-export the "
            "model with a dynamic batch axis")
NOT_DIFFERENTIABLE = ("error: the model's first output does not depend differentiably on the weights (ONNX node "
                      "Hardmax 'logits'); re-export the model with its class scores (logits or probabilities) as the "
                      "first output")


# -- 1. a graph that pins a batch other than 1 ----------------------------------------------------------------------


def test_the_interpreter_names_a_batch_pinned_to_4():
    """The old probe only tried one row, which a graph pinned to 4 also rejects: the raw torch error leaked."""
    w, b = np.eye(3, 4), np.zeros(3)
    mod = OnnxModule(_pinned(w, b, 4))
    assert mod(x=torch.ones(4, 4)).shape == (4, 3)
    with pytest.raises(ModelError) as err:
        mod(x=torch.ones(3, 4))
    assert "error: " + str(err.value) == PINNED_4.format(n=3, size=12)


def test_the_interpreter_names_a_batch_pinned_to_4_behind_a_symbolic_input():
    """The input says any batch, a Reshape constant says 4: the probe reads the batch from the Reshape (before:
    torch's own "shape '[4, 4]' is invalid" traceback)."""
    w, b = np.eye(3, 4), np.zeros(3)
    mod = OnnxModule(_pinned(w, b, 4, declared="N"))
    assert mod(x=torch.ones(4, 4)).shape == (4, 3)
    with pytest.raises(ModelError) as err:
        mod(x=torch.ones(3, 4))
    assert "error: " + str(err.value) == PINNED_4.format(n=3, size=12)


@pytest.mark.parametrize("declared", [4, "N"])
@pytest.mark.parametrize("command", ["prune", "risk"])
def test_gradient_commands_refuse_a_graph_pinned_to_batch_4(tiny_linear, tmp_path, command, declared):
    p = tmp_path / "pinned4.onnx"
    onnx.save(_pinned(tiny_linear["w"], tiny_linear["b"], 4, declared), p)
    args = [command, p, "--data", tiny_linear["data"], "--groups", "race", "--unstructured", "--sparsity", "0.5"]
    args += ["--method", "taylor", "-o", tmp_path / "out.onnx", "--no-latency"] if command == "prune" else ["--batch-size", "64"]
    r = run(*args)
    assert r.exit_code == 2
    assert _last_line(r) == PINNED_4.format(n=64, size=256)
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


# -- 2. a head that gradients cannot pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "risk"])
def test_gradient_commands_refuse_a_non_differentiable_head(tiny_linear, tmp_path, command):
    """Before: torch's "element 0 of tensors does not require grad" traceback and exit 1."""
    p = tmp_path / "hardmax.onnx"
    onnx.save(_hardmax(tiny_linear["w"], tiny_linear["b"]), p)
    args = [command, p, "--data", tiny_linear["data"], "--groups", "race", "--unstructured", "--sparsity", "0.5"]
    args += ["--method", "taylor", "-o", tmp_path / "out.onnx", "--no-latency"] if command == "prune" else []
    r = run(*args)
    assert r.exit_code == 2
    assert _last_line(r) == NOT_DIFFERENTIABLE
    assert "Traceback" not in r.stderr


def test_fine_tuning_refuses_a_non_differentiable_head_only_when_recording_gradients(tiny_linear):
    from onnxfair.finetune import logits_of

    mod = OnnxModule(_hardmax(tiny_linear["w"], tiny_linear["b"]))
    x = {"x": torch.from_numpy(tiny_linear["x"][:5])}
    with torch.no_grad():
        assert logits_of(mod, x).sum().item() == 5.0  # one-hot rows: evaluating it is fine
    with pytest.raises(UnsupportedError) as err:
        logits_of(mod, x)
    assert "error: " + str(err.value) == NOT_DIFFERENTIABLE


# -- 3. onnxruntime failures that are not a pinned batch ------------------------------------------------------------


def _ids_data(tmp_path, ids: np.ndarray):
    p = tmp_path / "ids.npz"
    n = len(ids)
    np.savez(p, x=ids.astype(np.int64), y=np.arange(n) % 3, race=np.array(["A", "B"])[np.arange(n) % 2])
    return p


def test_a_data_failure_is_reported_once_without_the_pinned_batch_warning_or_onnxruntime_logs(tmp_path, capfd):
    """Before: two onnxruntime log lines, a false "a shape is hard-coded" warning and an error with no fix."""
    m = tmp_path / "emb.onnx"
    onnx.save(_embedding(), m)
    ids = np.zeros((40, 2))
    ids[0, 1] = 7
    r = run("evaluate", m, "--data", _ids_data(tmp_path, ids), "--groups", "race", "--no-latency")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[1:] == [
        "error: onnxruntime failed to run the model: Gather node: indices element out of data bounds, idx=7 must be "
        "within the inclusive range [-5,4]; fix the model or the data so that onnxruntime runs it (inputs in the "
        "ranges the graph expects)"]
    assert "onnxruntime:" not in capfd.readouterr().err


def test_an_index_the_interpreter_cannot_take_is_blamed_on_the_data_not_on_shapes(tmp_path):
    """Before: a token id beyond the table failed in scoring with "check ... the shape the graph expects",
    which sent the user to the wrong place."""
    m = tmp_path / "emb.onnx"
    model = _embedding()
    model.graph.node[-1].output[0] = "pooled"
    model.graph.node.append(helper.make_node("MatMul", ["pooled", "W"], ["logits"]))
    model.graph.initializer.append(numpy_helper.from_array(np.eye(3, dtype=np.float32), "W"))
    onnx.save(model, m)
    ids = np.zeros((40, 2))
    ids[3, 0] = 9
    r = run("risk", m, "--data", _ids_data(tmp_path, ids), "--groups", "race", "--hutchinson-samples", "0",
            "--unstructured")
    assert r.exit_code == 2, r.output
    assert _last_line(r).startswith("error: the interpreter cannot run the model on the data (index out of range")
    assert _last_line(r).endswith("check that the data's integer inputs hold values the graph can index with (token "
                                  "ids below the vocabulary size, say)")


def test_a_bad_row_after_the_first_is_not_blamed_on_the_batch(tmp_path):
    """Row 0 runs alone, so "runs on one row" is not enough: the batch must fail where row 0 repeated runs."""
    from onnxfair.runtime import create_session

    sess = create_session(_embedding(), "cpu")
    ids = np.zeros((10, 2), np.int64)
    ids[6, 0] = 9
    with pytest.raises(ModelError, match=r"^onnxruntime failed to run the model: Gather node: indices element out "):
        sess.run({"x": ids})
    assert sess.batch_dynamic


@pytest.mark.parametrize("runner", ["onnxruntime", "interpreter"])
def test_a_model_without_outputs_is_refused_before_running(runner):
    """Before: onnxruntime's "At least one output should be requested" after a false pinned-batch warning, and
    a SyntaxError from the interpreter's generated code."""
    from onnxfair.runtime import create_session

    m = _embedding()
    del m.graph.output[:]
    with pytest.raises(ModelError) as err:
        create_session(m, "cpu") if runner == "onnxruntime" else OnnxModule(m)
    assert str(err.value) == "the model has no graph outputs; re-export it with the class scores as its first output"


@pytest.mark.parametrize("batch", [1, 4])
def test_a_pinned_batch_still_falls_back_quietly(tiny_linear, tmp_path, capfd, monkeypatch, batch):
    """The legitimate fallback: batch 1 warns once (batch 4 is declared, so it needs no probe) and is exact."""
    from onnxfair import runtime

    monkeypatch.setattr(runtime, "_WARNED", set())  # warnings are once per process: earlier tests may have given it
    p = tmp_path / "pinned.onnx"
    onnx.save(_pinned(tiny_linear["w"], tiny_linear["b"], batch), p)
    r = run("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert warnings == (["warning: model fails on batches other than 1 (a shape is hard-coded); running 1 row at a "
                         "time"] if batch == 1 else [])
    assert "onnxruntime:" not in capfd.readouterr().err


def test_onnxruntime_runs_a_symbolic_input_at_the_batch_a_reshape_pins(tiny_linear, tmp_path, monkeypatch):
    """Before: "onnxruntime failed to run the model" (only the declared batch, 1, was tried). The rows run 4 at a
    time, the last batch padded, and the predictions are the plain linear model's (Reshape [4, 4] is then a no-op)."""
    from onnxfair import runtime

    monkeypatch.setattr(runtime, "_WARNED", set())
    p = tmp_path / "pinned.onnx"
    w, b = tiny_linear["w"], tiny_linear["b"]
    onnx.save(_pinned(w, b, 4, declared="N"), p)
    r = run("evaluate", p, "--data", tiny_linear["data"], "--groups", "race", "--json", "-", "--no-latency",
            "--batch-size", "64")
    assert r.exit_code == 0, r.output
    assert [line for line in r.stderr.splitlines() if line.startswith("warning")] == [
        "warning: model fails on batches other than 4 (a shape is hard-coded); running 4 rows at a time"]
    report = json.loads(r.stdout)
    logits = tiny_linear["x"].astype(np.float64) @ w.T + b
    assert report["overall"]["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == tiny_linear["y"]), abs=1e-12)


# -- 4. inspect --verify on a model onnxruntime refuses --------------------------------------------------------------


def test_verify_reports_an_onnxruntime_failure_in_one_line(tmp_path):
    """Float Mod with fmod=0 passes the checker and the interpreter, but onnxruntime refuses to run it."""
    p = tmp_path / "mod.onnx"
    onnx.save(_model([helper.make_node("Mod", ["x", "d"], ["logits"], fmod=0)], TensorProto.FLOAT, ["N", 3], ["N", 3],
                     [numpy_helper.from_array(np.array(0.3, np.float32), "d")]), p)
    r = run("inspect", p, "--verify")
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        "error: --verify: onnxruntime fails on seeded random inputs (Mod node: fmod was false. fmod attribute must "
        "be true for floating point types); fix the model so that onnxruntime runs it, or inspect without --verify")


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="onnxruntime here has the CUDA provider")
def test_device_cuda_without_the_provider_names_a_fix_that_keeps_one_onnxruntime(tmp_path):
    """Before: 'install onnxfair[gpu]', which beside the CPU wheel installs two onnxruntime packages over one module."""
    from onnxfair.errors import RuntimeUnavailableError
    from onnxfair.runtime import create_session

    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "W")
    with pytest.raises(RuntimeUnavailableError) as err:
        create_session(_model([helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1)], TensorProto.FLOAT,
                              ["N", 3], ["N", 2], [w]), device="cuda")
    assert str(err.value).endswith("run pip uninstall -y onnxruntime, then pip install 'onnxfair[gpu]' (the CPU and "
                                   "GPU wheels cannot share an install)")


def test_a_model_exported_for_one_row_whose_rows_would_mix_is_run_one_row_at_a_time(tmp_path):
    """Before: a batch-1 export that standardises over the whole tensor was made batch-dynamic and run 256
    rows at a time, so each row was standardised with the others' statistics: evaluate reported 85.67 %
    where the model, run as exported, scores 100 %. Now the mixing is found and the rows run one at a time."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], keepdims=1),  # over every axis, the batch too
             helper.make_node("Sub", ["x", "mu"], ["xc"]), helper.make_node("Gemm", ["xc", "W"], ["logits"], transB=1)]
    model = _model(nodes, TensorProto.FLOAT, [1, 4], [1, 3], [w], opset=17)
    onnx.save(model, tmp_path / "b1.onnx")
    x = (rng.normal(size=(300, 4)) + rng.uniform(-3, 3, size=(300, 1))).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "b1.onnx"))
    y = np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(300)]).argmax(1)
    np.savez(tmp_path / "d.npz", x=x, y=y, g=np.arange(300) % 2)
    r = run("evaluate", tmp_path / "b1.onnx", "--data", tmp_path / "d.npz", "--groups", "g", "--no-latency", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["overall"] == {"n": 300, "accuracy": 1.0}
    assert "its rows affect one another); running 1 row at a time" in r.stderr


def test_the_gradient_paths_refuse_data_the_graph_cannot_take_in_one_line(tmp_path):
    """Before: a Reshape to [-1, 4, 3] fed 10 features per row failed inside fairgrape's scoring with torch's
    traceback and exit 1 (evaluate and magnitude already refused it in one line)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["logits"], axes=[1], keepdims=0)]
    inits = [numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([-1, 4, 3], np.int64), "shape")]
    onnx.save(_model(nodes, TensorProto.FLOAT, ["N", "k"], ["N", 4], inits), tmp_path / "r.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(100, 10)).astype(np.float32), y=rng.integers(0, 4, 100),
             g=np.arange(100) % 2)
    r = run("prune", tmp_path / "r.onnx", "--data", tmp_path / "d.npz", "--groups", "g", "--method", "fairgrape",
            "--unstructured", "--sparsity", "0.3", "--no-latency", "-o", tmp_path / "p.onnx")
    assert r.exit_code == 2 and not (tmp_path / "p.onnx").exists()
    assert r.stderr.strip().splitlines()[-1] == (
        "error: the interpreter cannot run the model on the data (shape '[-1, 4, 3]' is invalid for input of size 640, "
        "while running ONNX node Reshape 'r'); check that each input array has the shape the graph expects, rows "
        "along dim 0 (or lower --batch-size if memory ran out)")


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_a_sequence_first_output_is_refused_in_one_line(tmp_path, command):
    """Before: AttributeError 'list' object has no attribute 'ndim', exit 1 (ZipMap or SequenceConstruct first)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["lg"]), helper.make_node("SequenceConstruct", ["lg"], ["s"])],
                          "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "s.onnx")
    x = rng.normal(size=(20, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x @ w).argmax(1), g=np.arange(20) % 2)
    models = [tmp_path / "s.onnx"] * (2 if command == "compare" else 1)
    r = run(command, *models, "--data", tmp_path / "d.npz", "--groups", "g", "--no-latency")
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: the model's first output 's' is a sequence, not a tensor of class scores; re-export the model with "
        "its class scores as the first output")


def test_an_output_with_scores_per_position_is_warned_about(tmp_path):
    """Before: a per-token head [N, 4, 3] was scored as 12 classes without a word."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 12)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([-1, 4, 3], np.int64), "shape")]
    for shape, per_position in (([-1, 4, 3], True), ([-1, 12, 1], False)):
        inits[1] = numpy_helper.from_array(np.array(shape, np.int64), "shape")
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["logits"])]
        onnx.save(_model(nodes, TensorProto.FLOAT, ["N", 4], ["N", *shape[1:]], inits), tmp_path / "t.onnx")
        np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 4)).astype(np.float32), y=rng.integers(0, 3, 30),
                 g=np.arange(30) % 2)
        r = run("evaluate", tmp_path / "t.onnx", "--data", tmp_path / "d.npz", "--groups", "g", "--no-latency")
        assert r.exit_code == 0, r.output
        said = "first output has shape [4, 3] per row, scored as 12 classes (the argmax over all of them)"
        assert (said in r.stderr) == per_position, r.stderr


def _image_model(norm: onnx.NodeProto, inits: dict, opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 3, 3, 3)), "fw": rng.standard_normal((2, 4)), **inits}
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4), norm,
         helper.make_node("GlobalAveragePool", ["n"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arrays.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_opset_18_group_normalization_is_not_refused_by_the_checker(tmp_path):
    """onnx marks GroupNormalization-18 deprecated (its scale is per group), so the loader's checker refused
    every model using it, although onnxruntime runs it and so does the interpreter."""
    m = _image_model(helper.make_node("GroupNormalization", ["c", "s", "b"], ["n"], num_groups=2),
                     {"s": [0.5, 2.0], "b": [0.1, -0.3]}, 18)
    onnx.save(m, tmp_path / "gn18.onnx")
    r = run("inspect", str(tmp_path / "gn18.onnx"), "--verify", "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["verify"]["max_rel_diff"] < 1e-5 and rep["unsupported_ops"] == []
    assert rep["macs"] == 6 * 6 * 4 * 27 + 8  # the Gemm after the normalisation is counted too


def test_a_model_both_runtimes_refuse_is_explained_by_the_interpreter(tmp_path):
    """onnxruntime's message for an even LRN size names only a failed check in its source ('2 == 1 was
    false'); the interpreter's refusal names the op and its attribute."""
    m = _image_model(helper.make_node("LRN", ["c"], ["n"], size=4), {}, 13)
    onnx.save(m, tmp_path / "lrn.onnx")
    x = np.random.default_rng(1).standard_normal((10, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2, g=np.array(["a", "b"] * 5))
    r = run("evaluate", str(tmp_path / "lrn.onnx"), "--data", str(tmp_path / "d.npz"), "--groups", "g")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].endswith(
        "(onnxfair cannot interpret LRN(size=4) either; re-export the model without it)")


def test_verify_reports_a_model_that_fails_at_run_time_in_one_line(tmp_path):
    """Four groups over six channels: the interpreter's torch error used to escape as a traceback (exit 1)."""
    m = _image_model(helper.make_node("GroupNormalization", ["c", "s", "b"], ["n"], num_groups=3),
                     {"s": np.ones(4), "b": np.zeros(4)}, 21)
    onnx.save(m, tmp_path / "bad.onnx")
    r = run("inspect", str(tmp_path / "bad.onnx"), "--verify")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: --verify: onnxruntime fails on seeded random inputs (")


def test_a_dynamic_batch_model_whose_rows_interact_is_run_a_row_at_a_time(tmp_path, monkeypatch):
    """MeanVarianceNormalization with its default axes [0, 2, 3] normalises over the batch too: evaluate ran
    256 rows together and reported what no single image gives, without a word."""
    m = _image_model(helper.make_node("MeanVarianceNormalization", ["c"], ["n"]), {}, 13)
    onnx.save(m, tmp_path / "mvn.onnx")
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((60, 3, 6, 6)) * rng.uniform(0.2, 3, (60, 1, 1, 1))).astype(np.float32)
    sess = ort_session(m)
    alone = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(60)]).argmax(1)
    together = sess.run(None, {"x": x})[0].argmax(1)
    assert (alone != together).any()  # else the check proves nothing
    y = alone.copy()
    y[::3] = 1 - y[::3]
    np.savez(tmp_path / "d.npz", x=x, y=y, g=np.array(["a", "b", "c"] * 20))
    from onnxfair import runtime

    monkeypatch.setattr(runtime, "_WARNED", set())  # warnings are once per process
    r = run("evaluate", str(tmp_path / "mvn.onnx"), "--data", str(tmp_path / "d.npz"), "--groups", "g", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["overall"]["accuracy"] == pytest.approx(float(np.mean(alone == y)))
    assert ("warning: the model gives other outputs when its rows run together than when they run 1 at a time (its "
            "rows affect one another); running 1 row at a time") in r.stderr


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_model_that_runs_any_batch_but_one_is_not_probed_into_a_crash():
    """The one-row probe of the rows-interact check ran outside the error handling: a Squeeze of every unit
    axis followed by a Transpose fails at one row only, and onnxruntime's exception escaped."""
    from onnxfair.runtime import create_session

    w = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    nodes = [helper.make_node("Squeeze", ["x"], ["s"]), helper.make_node("Transpose", ["s"], ["t"], perm=[1, 0]),
             helper.make_node("MatMul", ["W", "t"], ["z"]), helper.make_node("Transpose", ["z"], ["y"], perm=[1, 0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.random.default_rng(1).normal(size=(10, 1, 4)).astype(np.float32)
    np.testing.assert_allclose(create_session(m, "cpu").run({"x": x}), x[:, 0] @ w.T, rtol=1e-5)


@pytest.mark.parametrize("shape,refused", [
    ([1, "seq"], False),  # a batch of 1 pinned in the input only: run one row at a time, not refused
    ([4, 3, "h", "w"], False),  # a fixed batch of images with symbolic sizes
    ([6, "n"], True),  # token ids [T, N] with T fixed
])
def test_a_fixed_axis_0_beside_symbolic_output_rows_is_refused_only_for_time_major_shapes(shape, refused):
    from onnxfair.model import batch_axis_error

    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[0], keepdims=0)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert (batch_axis_error(m) is not None) == refused


def test_squeezed_multi_class_heads_at_one_row_and_at_a_pinned_batch():
    """A [1, C] head squeezed to [C]: the interpreter refused a one-row batch ('hard-codes the batch size');
    a Reshape that pins batch 1 before a squeezed one-logit head could not be pinned (each probe's scalar
    counted as no rows)."""
    from onnxfair.interpret.module import checked_output
    from onnxfair.runtime import create_session

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    pin = numpy_helper.from_array(np.array([1, -1], np.int64), "pin")
    free = _model([helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Squeeze", ["z"], ["logits"])],
                  TensorProto.FLOAT, ["N", 4], ["N", 3], [w], opset=13)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "W1")
    pinned = _model([helper.make_node("Reshape", ["x", "pin"], ["r"]), helper.make_node("MatMul", ["r", "W1"], ["z"]),
                     helper.make_node("Squeeze", ["z"], ["logits"])], TensorProto.FLOAT, ["N", 4], ["N"], [w1, pin], opset=13)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    want = x @ numpy_helper.to_array(w)
    got = checked_output(OnnxModule(free), {"x": torch.from_numpy(x[:1])})
    np.testing.assert_allclose(got.detach().numpy(), want[:1], rtol=1e-5)
    np.testing.assert_allclose(create_session(pinned, "cpu").run({"x": x}), (x @ numpy_helper.to_array(w1))[:, 0], rtol=1e-5)
