"""Whole-model behaviour of the interpreter: fixture parity with onnxruntime, gradients, write-back.

The oracle is onnxruntime (CPU) for every forward value and finite differences for gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxfair.errors import UsageError
from onnxfair.interpret import OnnxModule, verify
from onnxfair.interpret.verify import random_inputs

ort = pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FIXTURE_FILES = sorted(FIXTURES.glob("*.onnx"))
fixture_params = [pytest.param(p, id=p.name) for p in FIXTURE_FILES] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no fixtures/*.onnx yet; run fixtures/build.py"))
]


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def interp_run(mod: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = mod(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def rel_err(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    scale = max(float(np.abs(r).max()) for r in ref)
    return max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, ref)) / scale


def loss_of(out) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    # a weighted sum so that no gradient vanishes by symmetry (a plain sum kills Softmax's gradient)
    return sum((o.float() * torch.linspace(-1.0, 2.0, o.numel()).reshape(o.shape)).sum() for o in outs)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("path", fixture_params)
def test_fixture_parity_batch8(path):
    model = onnx.load(str(path))
    feeds = random_inputs(model, seed=1, batch=8)
    mod = OnnxModule(model)
    assert rel_err(interp_run(mod, feeds), ort_run(model, feeds)) <= 1e-5
    first = next(iter(feeds.values()))
    assert first.shape[0] == 8


@pytest.mark.parametrize("path", fixture_params)
def test_fixture_every_float_initializer_gets_a_gradient(path):
    model = onnx.load(str(path))
    mod = OnnxModule(model)
    floats = {i.name for i in model.graph.initializer if i.data_type in (TP.FLOAT, TP.FLOAT16, TP.DOUBLE, TP.BFLOAT16)}
    assert floats and floats <= set(mod.params)
    feeds = random_inputs(model, seed=2, batch=8)
    loss_of(mod(**{k: torch.from_numpy(v) for k, v in feeds.items()})).backward()
    missing = [n for n, p in mod.params.items() if n in floats and p.grad is None]
    assert not missing
    assert all(torch.isfinite(mod.params[n].grad).all() for n in floats)


@pytest.mark.parametrize("path", fixture_params)
def test_fixture_verify_and_symbolic_batch(path):
    model = onnx.load(str(path))
    res = verify(model, seed=3)
    assert res["max_rel_diff"] <= 1e-5 and res["max_abs_diff"] >= 0.0
    mod = OnnxModule(model)
    for b in (1, 8):  # verify ran batch 2
        feeds = random_inputs(model, seed=b, batch=b)
        out = interp_run(mod, feeds)[0]
        assert out.shape[0] == b


# ------------------------------------------------------------------------------ a Paddle/TF-style graph


def paddle_style_model(opset: int = 11, squeeze_head: bool = False, seed: int = 0) -> onnx.ModelProto:
    """What Paddle2ONNX / tf2onnx emit for a MobileNetV3 block: unfolded BatchNormalization, Clip as relu6,
    HardSigmoid (slope 0.2), hard-swish as x * HardSigmoid(x), a squeeze-excitation Mul, Gemm with a
    [in, out] weight, Softmax."""
    rng = np.random.default_rng(seed)

    def w(*s, scale=0.3):
        return (rng.standard_normal(s) * scale).astype(np.float32)

    inits = {}

    def bn(prefix, c):
        inits[f"{prefix}.scale"] = (rng.random(c) + 0.5).astype(np.float32)
        inits[f"{prefix}.bias"] = w(c, scale=0.1)
        inits[f"{prefix}.mean"] = w(c, scale=0.1)
        inits[f"{prefix}.var"] = (rng.random(c) + 0.5).astype(np.float32)
        return [f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var"]

    inits["conv1.w"] = w(8, 3, 3, 3)
    inits["dw.w"] = w(8, 1, 3, 3)
    inits["dw.b"] = w(8, scale=0.1)
    inits["se1.w"], inits["se1.b"] = w(4, 8, 1, 1), w(4, scale=0.1)
    inits["se2.w"], inits["se2.b"] = w(8, 4, 1, 1), w(8, scale=0.1)
    inits["pw.w"] = w(16, 8, 1, 1)
    inits["fc.w"], inits["fc.b"] = w(16, 10), w(10, scale=0.1)
    inits["six"], inits["zero"] = np.array(6.0, np.float32), np.array(0.0, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("BatchNormalization", ["c1"] + bn("bn1", 8), ["b1"], epsilon=1e-3),
        helper.make_node("Clip", ["b1", "zero", "six"], ["r1"]),
        helper.make_node("Conv", ["r1", "dw.w", "dw.b"], ["d1"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("BatchNormalization", ["d1"] + bn("bn2", 8), ["b2"]),
        helper.make_node("HardSigmoid", ["b2"], ["hs"], alpha=1.0 / 6, beta=0.5),
        helper.make_node("Mul", ["b2", "hs"], ["hswish"]),
        helper.make_node("GlobalAveragePool", ["hswish"], ["sq"]),
        helper.make_node("Conv", ["sq", "se1.w", "se1.b"], ["e1"]),
        helper.make_node("Relu", ["e1"], ["e2"]),
        helper.make_node("Conv", ["e2", "se2.w", "se2.b"], ["e3"]),
        helper.make_node("HardSigmoid", ["e3"], ["gate"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["hswish", "gate"], ["se"]),
        helper.make_node("Conv", ["se", "pw.w"], ["p1"]),
        helper.make_node("BatchNormalization", ["p1"] + bn("bn3", 16), ["b3"]),
        helper.make_node("Relu", ["b3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
    ]
    if squeeze_head:  # tf2onnx: Squeeze over the spatial axes
        if opset >= 13:
            inits["sq_axes"] = np.array([2, 3], np.int64)
            nodes.append(helper.make_node("Squeeze", ["g", "sq_axes"], ["flat"]))
        else:
            nodes.append(helper.make_node("Squeeze", ["g"], ["flat"], axes=[2, 3]))
    else:  # Paddle: Reshape with a 0 (copy) dim
        inits["shape"] = np.array([0, -1], np.int64)
        nodes.append(helper.make_node("Reshape", ["g", "shape"], ["flat"]))
    nodes += [
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "paddle_style",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("prob", TP.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset,squeeze", [(11, False), (11, True), (13, True), (17, False)])
def test_graph_from_another_exporter_parity(opset, squeeze):
    model = paddle_style_model(opset, squeeze)
    feeds = {"x": np.random.default_rng(5).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    assert rel_err(interp_run(OnnxModule(model), feeds), ort_run(model, feeds)) <= 1e-5


def test_graph_from_another_exporter_gradients_reach_every_initializer():
    model = paddle_style_model()
    mod = OnnxModule(model)
    # BN statistics are trainable views too, and the relu6 bounds are float initializers
    assert {"bn1.mean", "bn1.var", "six", "zero"} <= set(mod.params)
    assert "shape" not in mod.params  # integer tensors are constants
    x = torch.randn(4, 3, 16, 16) * 3
    loss_of(mod(x)).backward()
    for name, p in mod.params.items():
        assert p.grad is not None, name


def test_constant_nodes_are_buffers_not_parameters():
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((4,), 2.0, np.float32)))
    g = helper.make_graph(
        [c, helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, np.float32), "b")])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    assert list(mod.params) == ["b"]
    assert torch.allclose(mod(torch.ones(2, 4)), torch.full((2, 4), 3.0))


# -------------------------------------------------------------------------------------- gradcheck


def conv_bn_relu_gemm(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "w": rng.standard_normal((3, 2, 3, 3)), "b": rng.standard_normal(3) * 0.1,
        "s": rng.random(3) + 0.5, "t": rng.standard_normal(3) * 0.1, "m": rng.standard_normal(3) * 0.1,
        "v": rng.random(3) + 0.5, "fw": rng.standard_normal((4, 3 * 3 * 3)), "fb": rng.standard_normal(4),
    }
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
        ],
        "cbrg", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def assert_gradcheck(model: onnx.ModelProto, x: torch.Tensor) -> None:
    """Gradients of the output with respect to the input and every float initializer, in float64, match
    finite differences."""
    mod = OnnxModule(model).double()
    keys = [f"_params.{i}" for i in range(len(mod.params))]
    ps = [p.detach().clone().requires_grad_(True) for p in mod.params.values()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(keys, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *ps), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_inputs_and_parameters():
    assert_gradcheck(conv_bn_relu_gemm(), torch.randn(2, 2, 3, 3, dtype=torch.float64))


def test_gradcheck_through_lrn_group_norm_topk_and_scatter():
    """The kernels added for older and causal exports carry exact gradients (values through TopK's gather)."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((4, 2, 3, 3)), "gs": rng.random(4) + 0.5, "gb": rng.standard_normal(4),
             "u": rng.standard_normal((2, 2)), "fw": rng.standard_normal((3, 6))}
    ints = {"k": np.array([3], np.int64), "shape": np.array([0, -1], np.int64), "rows": np.array([[0], [2]], np.int64)}
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("LRN", ["c"], ["l"], size=3, alpha=0.5, beta=0.75, bias=2.0),
            helper.make_node("GroupNormalization", ["l", "gs", "gb"], ["n"], num_groups=2),
            helper.make_node("Reshape", ["n", "shape"], ["f"]),
            helper.make_node("TopK", ["f", "k"], ["v", "i"], axis=1),
            helper.make_node("Transpose", ["v"], ["vt"]),
            helper.make_node("ScatterND", ["vt", "rows", "u"], ["s"]),
            helper.make_node("Transpose", ["s"], ["st"]),
            helper.make_node("MatMul", ["st", "fw"], ["y"]),
        ],
        "newops", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(v, k) for k, v in ints.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feeds = {"x": rng.standard_normal((2, 2, 3, 3)).astype(np.float32)}
    assert rel_err(interp_run(OnnxModule(model), feeds), ort_run(model, feeds)) <= 1e-5
    assert_gradcheck(model, torch.from_numpy(feeds["x"]).double())


def test_causal_attention_from_the_legacy_exporter():
    """torch.triu and topk export as Trilu and TopK; both used to be refused."""
    class Causal(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            t = h.shape[1]
            future = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            att = (h @ h.transpose(1, 2)).masked_fill(future, -1e9).softmax(-1)
            return self.head((att @ h).topk(2, dim=1).values.mean(1))

    torch.manual_seed(0)
    from tests.test_graph_support import torch_export

    model = torch_export(Causal(), torch.randn(2, 5, 4), opset=18)
    assert {"Trilu", "TopK"} <= {n.op_type for n in model.graph.node}
    feeds = {"x": np.random.default_rng(2).standard_normal((6, 5, 4)).astype(np.float32)}
    mod = OnnxModule(model)
    assert rel_err(interp_run(mod, feeds), ort_run(model, feeds)) <= 1e-5
    loss_of(mod(torch.from_numpy(feeds["x"]))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.params.values() if p.dim() > 1)


def _text_classifier(rnn: torch.nn.Module) -> onnx.ModelProto:
    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30, 6)
            self.rnn = rnn
            self.head = torch.nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.embed(x))[0][:, -1])

    torch.manual_seed(0)
    from tests.test_graph_support import torch_export

    return torch_export(Text(), torch.randint(0, 30, (2, 5)), opset=17)


@pytest.mark.parametrize("rnn", [
    lambda: torch.nn.LSTM(6, 7, batch_first=True, bidirectional=True),
    lambda: torch.nn.GRU(6, 7, batch_first=True, num_layers=2),
    lambda: torch.nn.RNN(6, 7, batch_first=True, nonlinearity="relu"),
], ids=["lstm-bidirectional", "gru-2-layers", "rnn-relu"])
def test_recurrent_text_classifiers_from_torch(rnn):
    """nn.LSTM, nn.GRU and nn.RNN export as ONNX recurrent ops, which were refused: text models could not be
    scored at all. Now they run as onnxruntime runs them and every weight gets a gradient."""
    model = _text_classifier(rnn())
    assert {n.op_type for n in model.graph.node} & {"LSTM", "GRU", "RNN"}
    feeds = {"x": np.random.default_rng(3).integers(0, 30, (6, 5)).astype(np.int64)}
    mod = OnnxModule(model)
    assert rel_err(interp_run(mod, feeds), ort_run(model, feeds)) <= 1e-5
    loss_of(mod(torch.from_numpy(feeds["x"]))).backward()
    for name, p in mod.params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("op,lens", [("LSTM", True), ("GRU", True), ("LSTM", False), ("GRU", False)])
def test_gradcheck_recurrent_layers(op, lens):
    """Stepped (with sequence lengths: rows past their length keep their state, so no gradient flows through
    the skipped steps; with LSTM peepholes) and through torch's fused kernels (without them)."""
    rng = np.random.default_rng(4)
    gates, hidden = (4, 3) if op == "LSTM" else (3, 3)
    inits = {"W": rng.standard_normal((2, gates * hidden, 2)), "R": rng.standard_normal((2, gates * hidden, hidden)),
             "B": rng.standard_normal((2, 2 * gates * hidden))}
    ins = ["x", "W", "R", "B", "lens" if lens else ""] + (["", "", "P"] if op == "LSTM" and lens else [])
    if op == "LSTM" and lens:
        inits["P"] = rng.standard_normal((2, 3 * hidden))
    attrs = {"linear_before_reset": 1} if op == "GRU" and not lens else {}
    g = helper.make_graph(
        [helper.make_node(op, ins, ["", "y"], hidden_size=hidden, direction="bidirectional", **attrs)], "rec",
        [helper.make_tensor_value_info("x", TP.FLOAT, [4, 3, 2])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [numpy_helper.from_array((0.5 * v).astype(np.float32), k) for k, v in inits.items()]
        + ([numpy_helper.from_array(np.array([4, 1, 2], np.int32), "lens")] if lens else []))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=10)
    feeds = {"x": rng.standard_normal((4, 3, 2)).astype(np.float32)}
    assert rel_err(interp_run(OnnxModule(model), feeds), ort_run(model, feeds)) <= 1e-5
    assert_gradcheck(model, torch.from_numpy(feeds["x"]).double())


@pytest.mark.parametrize("net", ["lrn", "squeeze"])
def test_legacy_exports_that_branch_on_a_dim_run_both_ways(net):
    """torch's legacy exporter writes an If for LocalResponseNorm and for squeezing a dim marked dynamic,
    testing the size at run time: both were refused. One row takes the other branch than several."""
    from tests.test_graph_support import torch_export

    class Lrn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.head = torch.nn.Conv2d(3, 6, 3), torch.nn.LocalResponseNorm(3), torch.nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(torch.relu(self.conv(x))).mean((2, 3)))

    class Squeeze(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.squeeze(1))

    torch.manual_seed(0)
    if net == "lrn":
        model, shape = torch_export(Lrn(), torch.randn(2, 3, 8, 8), opset=13), (3, 8, 8)
    else:
        import io
        import warnings

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Squeeze().eval(), (torch.randn(2, 1, 5),), buf, dynamo=False, opset_version=13,
                              input_names=["x"], dynamic_axes={"x": {0: "N", 1: "one"}})
        model, shape = onnx.load_from_string(buf.getvalue()), (1, 5)
    assert "If" in {n.op_type for n in model.graph.node}
    mod = OnnxModule(model)
    for rows in (1, 4):
        feeds = {"x": np.random.default_rng(rows).standard_normal((rows, *shape)).astype(np.float32)}
        assert rel_err(interp_run(mod, feeds), ort_run(model, feeds)) <= 1e-5
    loss_of(mod(torch.from_numpy(feeds["x"]))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.params.values() if p.dim() > 1)


def test_masks_apply_in_forward_and_gradient():
    model = conv_bn_relu_gemm()
    mod = OnnxModule(model)
    mask = torch.ones(3, 2, 3, 3)
    mask[1] = 0
    mod.set_masks({"w": mask})
    x = torch.randn(2, 2, 3, 3)
    loss_of(mod(x)).backward()
    assert torch.all(mod.params["w"].grad[1] == 0) and torch.any(mod.params["w"].grad[0] != 0)
    # the masked module equals onnxruntime on the model with those weights zeroed
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name == "w":
            arr = numpy_helper.to_array(init).copy()
            arr[1] = 0
            init.CopyFrom(numpy_helper.from_array(arr, "w"))
    feeds = {"x": x.numpy()}
    assert rel_err(interp_run(mod, feeds), ort_run(zeroed, feeds)) <= 1e-5
    mod.set_masks(None)
    assert rel_err(interp_run(mod, feeds), ort_run(model, feeds)) <= 1e-5
    with pytest.raises(UsageError):
        mod.set_masks({"w": torch.ones(3)})
    with pytest.raises(UsageError):
        mod.set_masks({"nope": torch.ones(3)})


# ------------------------------------------------------------------------------------- write-back


def test_write_back_round_trip():
    model = paddle_style_model()
    mod = OnnxModule(model)
    with torch.no_grad():
        mod.params["conv1.w"].mul_(0.5)
        mod.params["bn2.mean"].add_(0.3)
        mod.params["fc.b"].copy_(torch.arange(10, dtype=torch.float32))
    mask = (torch.rand(16, 10) > 0.5).float()
    mod.set_masks({"fc.w": mask})
    out = mod.to_onnx(model)
    assert [i.name for i in out.graph.initializer] == [i.name for i in model.graph.initializer]
    for a, b in zip(out.graph.initializer, model.graph.initializer):
        assert a.data_type == b.data_type and list(a.dims) == list(b.dims)
    got = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert np.array_equal(got["fc.b"], np.arange(10, dtype=np.float32))
    assert np.all(got["fc.w"][mask.numpy() == 0] == 0)
    assert np.array_equal(got["shape"], np.array([0, -1]))
    # the original is untouched, and onnxruntime on the written model equals the interpreter
    orig = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not np.array_equal(orig["fc.b"], got["fc.b"]) and np.all(orig["fc.w"] != 0)
    feeds = {"x": np.random.default_rng(9).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    assert rel_err(interp_run(mod, feeds), ort_run(out, feeds)) <= 1e-5
    assert rel_err(interp_run(OnnxModule(out), feeds), ort_run(out, feeds)) <= 1e-5
    assert rel_err(ort_run(model, feeds), ort_run(out, feeds)) > 1e-3


def test_write_back_keeps_float16_dtype():
    w16 = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float16)
    g = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["w32"], to=TP.FLOAT), helper.make_node("MatMul", ["x", "w32"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [numpy_helper.from_array(w16, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    mod = OnnxModule(model)
    assert mod.params["w"].dtype == torch.float16
    with torch.no_grad():
        mod.params["w"].mul_(2)
    out = mod.to_onnx(model)
    init = out.graph.initializer[0]
    assert init.data_type == TP.FLOAT16 and init.name == "w"
    assert np.array_equal(numpy_helper.to_array(init), (w16.astype(np.float32) * 2).astype(np.float16))
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)}
    assert rel_err(interp_run(mod, feeds), ort_run(out, feeds)) <= 1e-5


# ----------------------------------------------------------------------------------------- verify


def test_verify_needs_shapes_for_symbolic_non_batch_dims():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, ["N", "L"])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(UsageError, match="--input-shape x="):
        verify(model)
    res = verify(model, input_shapes={"x": (3, 7)})
    assert res == {"max_abs_diff": 0.0, "max_rel_diff": 0.0}


def test_verify_respects_integer_inputs():
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("ReduceSum", ["e", "ax"], ["y"], keepdims=0)], "g",
        [helper.make_tensor_value_info("ids", TP.INT64, ["N", 5])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "emb"),
         numpy_helper.from_array(np.array([1], np.int64), "ax")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    res = verify(model, seed=4)
    assert res["max_rel_diff"] <= 1e-6


def test_float_initializer_used_only_as_resize_scales_is_a_constant():
    g = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"), helper.make_node("Mul", ["r", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 1, 2, 2])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"), numpy_helper.from_array(np.array(3.0, np.float32), "k")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    mod = OnnxModule(model)
    assert list(mod.params) == ["k"]
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)}
    assert rel_err(interp_run(mod, feeds), ort_run(model, feeds)) == 0.0
    with pytest.raises(UsageError, match="fixed to 2"):
        verify(model, input_shapes={"x": (2, 1, 3, 3)})


def test_generated_forward_frees_intermediates():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Exp", ["b"], ["y"]),
             helper.make_node("Sigmoid", ["x"], ["unused"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N"])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    assert "del v0" in mod.code and "del v1" in mod.code  # each intermediate dropped after its last use
    assert mod.code.count(" = f") == 3  # the dead Sigmoid is not run
    assert torch.allclose(mod(torch.tensor([-1.0, 2.0])), torch.exp(-torch.relu(torch.tensor([-1.0, 2.0]))))


def test_inputs_by_name_or_position():
    model = conv_bn_relu_gemm()
    mod = OnnxModule(model)
    x = torch.randn(3, 2, 3, 3)
    assert torch.equal(mod(x), mod(x=x))
    with pytest.raises(UsageError):
        mod(y=x)
    with pytest.raises(RuntimeError) as exc:
        mod(torch.randn(3, 5, 3, 3))
    assert "while running ONNX node Conv" in "\n".join(getattr(exc.value, "__notes__", []))


def test_second_derivatives_through_every_fixture_activation():
    """Hessian-vector products (the risk pre-check) need double backward through HardSigmoid/HardSwish."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from onnxfair.interpret import OnnxModule

    w = numpy_helper.from_array(np.full((3, 3), 0.3, np.float32), "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("HardSigmoid", ["h"], ["a"], alpha=1 / 6, beta=0.5),
             helper.make_node("HardSwish", ["a"], ["b"]), helper.make_node("Mul", ["b", "h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    x = torch.tensor([[1.0, -2.0, 3.0]])
    p = mod.params["W"]
    (grad,) = torch.autograd.grad((mod(x) ** 2).sum(), [p], create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.ones_like(p)).sum(), [p])
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
