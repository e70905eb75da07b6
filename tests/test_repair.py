"""Statistics repair, checked against onnxruntime: after the repair every repaired layer of the written model
has the dense model's per-channel mean and std on the calibration rows (group-balanced or plain)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli.main import app as cli
from onnxfair.data import GroupedDataset
from onnxfair.interpret import OnnxModule
from onnxfair.repair import repair_statistics, repairable_layers

from tests.conftest import FIXTURES


def _init(rng, name, *shape, scale=0.5):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def small_cnn(gemm_bias: bool = True, trans_b: int = 1, group: int = 1) -> onnx.ModelProto:
    """Conv(3->6) -> Relu -> Conv(6->6, `group` groups) -> Relu -> ReduceMean -> Gemm(transB, beta 0.5) -> logits."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "w1", 6, 3, 3, 3), _init(rng, "b1", 6, scale=0.1), _init(rng, "w2", 6, 6 // group, 3, 3),
             _init(rng, "b2", 6, scale=0.1), _init(rng, "w3", *((4, 6) if trans_b else (6, 4))),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    if gemm_bias:
        inits.append(_init(rng, "b3", 4, scale=0.1))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=group),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMean", ["r2", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "w3"] + (["b3"] if gemm_bias else []), ["logits"], name="fc",
                         transB=trans_b, beta=0.5),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def dataset(n: int = 120) -> GroupedDataset:
    rng = np.random.default_rng(1)
    groups = (rng.random(n) < 0.2).astype(np.int64)  # a minority of about a fifth
    x = (rng.standard_normal((n, 3, 8, 8)) + groups[:, None, None, None] * 0.7).astype(np.float32)
    return GroupedDataset(inputs={"x": x}, y=rng.integers(0, 4, n), group_ids=groups, group_labels=["g=a", "g=b"])


def magnitude_masks(model: onnx.ModelProto, names: list[str], sparsity: float) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in names:
        a = np.abs(inits[n]).ravel()
        m = np.ones(a.size, np.float32)
        m[np.argsort(a, kind="stable")[: int(round(sparsity * a.size))]] = 0
        out[n] = m.reshape(inits[n].shape)
    return out


def ort_channel_stats(model: onnx.ModelProto, names: list[str], ds: GroupedDataset, w: np.ndarray) -> dict:
    """Weighted per-channel mean and std of intermediate values, computed by onnxruntime (the oracle)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in set(names) - {o.name for o in probe.graph.output}:
        probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(names, ds.inputs)
    stats = {}
    for n, v in zip(names, outs):
        v = v.astype(np.float64)
        per_row = v.reshape(v.shape[0], v.shape[1], -1)
        m1, m2 = per_row.mean(2), (per_row**2).mean(2)
        mean = (w[:, None] * m1).sum(0)
        stats[n] = (mean, np.sqrt(np.maximum((w[:, None] * m2).sum(0) - mean**2, 0.0)))
    return stats


def row_weights(ds: GroupedDataset, balanced: bool) -> np.ndarray:
    if not balanced:
        return np.full(len(ds), 1.0 / len(ds))
    counts = np.bincount(ds.group_ids)
    return 1.0 / (len(counts) * counts[ds.group_ids])


@pytest.mark.parametrize("balanced, trans_b, group", [(True, 1, 1), (False, 1, 1), (True, 0, 3), (True, 1, 6)])
def test_repaired_layers_match_the_dense_statistics_in_onnxruntime(balanced, trans_b, group):
    model, ds = small_cnn(trans_b=trans_b, group=group), dataset()
    masks = magnitude_masks(model, ["w1", "w2", "w3"], 0.6)
    mod = OnnxModule(model)
    mod.set_masks(masks)
    rec = repair_statistics(mod, model, masks, ds, balanced=balanced, batch_size=32)
    assert rec["layers"] == 3 and rec["skipped"] == [] and rec["mode"] == ("balanced" if balanced else "plain")
    repaired = mod.to_onnx(model)
    w = row_weights(ds, balanced)
    names = ["c1", "c2", "logits"]
    want = ort_channel_stats(model, names, ds, w)
    got = ort_channel_stats(repaired, names, ds, w)
    unrepaired = ort_channel_stats(_masked(model, masks), names, ds, w)
    for n in names:
        np.testing.assert_allclose(got[n][0], want[n][0], rtol=1e-4, atol=1e-5)
        # a channel left constant by pruning (every weight of it removed) can be re-centred, not rescaled
        live = unrepaired[n][1] > 1e-6
        np.testing.assert_allclose(got[n][1][live], want[n][1][live], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[n][1][~live], unrepaired[n][1][~live], atol=1e-6)
        assert not np.allclose(unrepaired[n][1], want[n][1], rtol=1e-2)  # pruning had moved them
    weights = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    for n, m in masks.items():
        assert np.array_equal(weights[n] != 0, m != 0)  # removed weights stay removed, the rest rescaled


def _masked(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in masks:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * masks[t.name], t.name))
    return out


def test_balanced_and_plain_statistics_differ_when_groups_differ():
    model, ds = small_cnn(), dataset()
    masks = magnitude_masks(model, ["w1", "w2"], 0.6)
    results = {}
    for balanced in (True, False):
        mod = OnnxModule(model)
        mod.set_masks(masks)
        repair_statistics(mod, model, masks, ds, balanced=balanced)
        results[balanced] = {t.name: numpy_helper.to_array(t) for t in mod.to_onnx(model).graph.initializer}
    assert not np.allclose(results[True]["b1"], results[False]["b1"])


def test_layers_before_the_first_mask_are_untouched_and_unrepairable_ones_are_named():
    model, ds = small_cnn(gemm_bias=False), dataset()
    masks = magnitude_masks(model, ["w2"], 0.5)
    mod = OnnxModule(model)
    mod.set_masks(masks)
    rec = repair_statistics(mod, model, masks, ds)
    assert rec["layers"] == 1 and list(rec["scales"]) == ["conv2"]
    assert rec["skipped"] == [{"node": "fc", "reason": "no weight and bias initializers of its own"}]
    out = {t.name: numpy_helper.to_array(t) for t in mod.to_onnx(model).graph.initializer}
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in ("w1", "b1", "w3"):
        assert np.array_equal(out[n], dense[n])
    assert not np.array_equal(out["b2"], dense["b2"])


def test_repairable_layers_skip_shared_weights():
    model = small_cnn()
    model.graph.node[2].input[1] = "w1x"  # conv2 now reads a weight another node also reads
    model.graph.node.append(helper.make_node("Identity", ["w1x"], ["unused"]))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((6, 6, 3, 3), np.float32), "w1x"))
    model.graph.node.append(helper.make_node("MatMul", ["pooled", "w4"], ["extra"], name="mm"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((6, 2), np.float32), "w4"))
    layers, skipped = repairable_layers(model)
    assert [l.node for l in layers] == ["conv1", "fc"]
    assert skipped == [{"node": "conv2", "reason": "weight or bias shared with another node"},
                       {"node": "mm", "reason": "MatMul is not repaired (Conv and Gemm are)"}]


def test_cli_repair_on_the_adult_mlp(tmp_path):
    runner = CliRunner()
    base = ["prune", str(FIXTURES / "adult_mlp.onnx"), "--data", str(FIXTURES / "adult_calib.npz"), "--groups", "race",
            "--method", "magnitude", "--unstructured", "--sparsity", "0.9", "--no-latency", "--json", "-"]
    r = runner.invoke(cli, base + ["--repair", "balanced", "-o", str(tmp_path / "r.onnx")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["method"]["repair"] == "balanced" and rep["structure"]["repair"]["layers"] == 3
    assert rep["timing"]["repair"] > 0
    plain = runner.invoke(cli, base + ["-o", str(tmp_path / "p.onnx")])
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "r.onnx").graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "p.onnx").graph.initializer}
    assert plain.exit_code == 0 and "repair" not in json.loads(plain.stdout)["structure"]
    for n in a:
        if a[n].ndim == 2:
            assert np.array_equal(a[n] != 0, b[n] != 0) and not np.array_equal(a[n], b[n])


def test_cli_repair_needs_data(tmp_path):
    r = CliRunner().invoke(cli, ["prune", str(FIXTURES / "adult_mlp.onnx"), "--method", "magnitude", "--sparsity", "0.5",
                                 "--repair", "plain", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "--repair measures statistics on data" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("extra, steps", [(["--iterations", "3"], 3), (["--method", "bilevel", "--bilevel-steps", "5"], 1)])
def test_cli_repair_after_every_step_and_after_bilevel(tmp_path, extra, steps):
    # iterative pruning repairs each step's masks before rescoring (the paper's models re-normalise through
    # BatchNorm while retraining); bi-level's masks are repaired once
    r = CliRunner().invoke(cli, ["prune", str(FIXTURES / "adult_mlp.onnx"), "--data", str(FIXTURES / "adult_calib.npz"),
                                 "--groups", "race", "--method", "magnitude", "--unstructured", "--sparsity", "0.8",
                                 "--repair", "balanced", "--no-latency", "--json", "-", "-o", str(tmp_path / "r.onnx"),
                                 *extra])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["structure"]["repair"]
    assert rep["steps"] == steps and rep["layers"] == 3
    assert r.stderr.count("repair 1/3") == steps


def test_unreached_branches_broadcast_biases_and_flattened_rows_are_left_alone():
    # x -> conv1 (masked) -> ... ; x -> side (no mask upstream) ; a Gemm on rows flattened with their
    # positions ([N*64, 3]: not one row per data row); a Gemm whose bias broadcasts from [1]
    model, ds = small_cnn(), dataset()
    rng = np.random.default_rng(3)
    g = model.graph
    g.initializer.extend([_init(rng, "ws", 2, 3, 1, 1), _init(rng, "bs", 2), _init(rng, "wt", 2, 3), _init(rng, "bt", 2),
                          _init(rng, "wu", 2, 6), _init(rng, "bu", 1),
                          numpy_helper.from_array(np.array([-1, 3], np.int64), "flat")])
    g.node.extend([
        helper.make_node("Conv", ["x", "ws", "bs"], ["side"], name="side"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["xt", "flat"], ["tokens"]),
        helper.make_node("Gemm", ["tokens", "wt", "bt"], ["per_token"], name="per_token", transB=1),
        helper.make_node("Relu", ["c1"], ["r1b"]),
        helper.make_node("ReduceMean", ["r1b", "axes"], ["p1"], keepdims=0),
        helper.make_node("Gemm", ["p1", "wu", "bu"], ["u"], name="broadcast_bias", transB=1),
    ])
    g.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("side", "per_token", "u")])
    masks = magnitude_masks(model, ["w1", "wt"], 0.5)
    mod = OnnxModule(model)
    mod.set_masks(masks)
    rec = repair_statistics(mod, model, masks, ds, batch_size=32)
    assert sorted(rec["scales"]) == ["conv1", "conv2", "fc"]
    assert {"node": "per_token", "reason": "its output's first axis is not the data row"} in rec["skipped"]
    assert any(s["node"] == "broadcast_bias" and "broadcast" in s["reason"] for s in rec["skipped"])
    out = {t.name: numpy_helper.to_array(t) for t in mod.to_onnx(model).graph.initializer}
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in ("ws", "bs", "bt", "wu", "bu"):  # never repaired: exactly as they were
        assert np.array_equal(out[n], dense[n]), n


def test_a_masked_bias_is_not_repaired():
    model, ds = small_cnn(), dataset()
    masks = magnitude_masks(model, ["w1", "b1"], 0.5)
    mod = OnnxModule(model)
    mod.set_masks(masks)
    rec = repair_statistics(mod, model, masks, ds)
    assert {"node": "conv1", "reason": "its bias is masked"} in rec["skipped"] and "conv1" not in rec["scales"]


def test_physically_pruned_model_carries_the_repair_end_to_end(tmp_path):
    # structured, 3 steps: the written (channel-removed) MLP's logits have the dense model's group-balanced
    # per-class mean and std on --data, measured by onnxruntime on both files
    from onnxfair.data import load_dataset

    out = tmp_path / "s.onnx"
    r = CliRunner().invoke(cli, ["prune", str(FIXTURES / "adult_mlp.onnx"), "--data", str(FIXTURES / "adult_calib.npz"),
                                 "--eval-data", str(FIXTURES / "adult_eval.npz"), "--groups", "race", "--method", "taylor",
                                 "--sparsity", "0.5", "--iterations", "3", "--repair", "balanced", "--no-latency",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    dense = onnx.load(FIXTURES / "adult_mlp.onnx")
    pruned = onnx.load(out)
    assert sum(numpy_helper.to_array(t).size for t in pruned.graph.initializer) < sum(
        numpy_helper.to_array(t).size for t in dense.graph.initializer)  # channels really removed
    ds = load_dataset(FIXTURES / "adult_calib.npz", dense, "race")
    w = row_weights(ds, True)
    name = dense.graph.output[0].name
    want, got = ort_channel_stats(dense, [name], ds, w)[name], ort_channel_stats(pruned, [name], ds, w)[name]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-3, atol=1e-4)


def test_dense_statistics_are_kept_between_calls():
    # an iterative run passes one dict to every step: filled with the dense statistics on first use, and a
    # second call on already repaired weights then changes nothing
    model, ds = small_cnn(), dataset()
    masks = magnitude_masks(model, ["w1", "w2"], 0.6)
    mod = OnnxModule(model)
    mod.set_masks(masks)
    cache: dict = {}
    repair_statistics(mod, model, masks, ds, dense_stats=cache)
    assert sorted(cache) == ["c1", "c2", "logits"]
    before = {n: p.detach().clone() for n, p in mod.params.items()}
    rec = repair_statistics(mod, model, masks, ds, dense_stats=cache)
    for n, p in mod.params.items():
        torch.testing.assert_close(p.detach(), before[n], rtol=1e-4, atol=1e-5)
    assert all(abs(v["median"] - 1.0) < 1e-4 for v in rec["scales"].values())


def test_a_large_accuracy_drop_names_the_weight_updates_not_used(tmp_path):
    base = ["prune", str(FIXTURES / "adult_mlp.onnx"), "--data", str(FIXTURES / "adult_calib.npz"), "--groups", "race",
            "--method", "magnitude", "--sparsity", "0.95", "--round-to", "1", "--no-latency", "--json", "-"]
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "a.onnx")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["degradation"]["overall_delta"] < -0.10
    assert "hint: accuracy fell by" in r.stderr and "--repair balanced" in r.stderr and "--finetune-epochs" in r.stderr
    r = CliRunner().invoke(cli, base + ["--sparsity", "0.5", "-o", str(tmp_path / "b.onnx")])
    assert json.loads(r.stdout)["degradation"]["overall_delta"] > -0.10 and "hint" not in r.stderr


def test_the_repair_probe_builds_when_a_nested_if_reads_a_weight_two_levels_up():
    """The probe looked one level into subgraphs: a weight read by an If inside an If was left out, and
    `prune --repair balanced` stopped with 'reads W2, which nothing produces'."""
    from onnxfair.repair import _probe

    N, V = helper.make_node, lambda n, s=None: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
    inner_t = helper.make_graph([N("Gemm", ["h", "W2"], ["it"])], "it", [], [V("it")])
    inner_e = helper.make_graph([N("Identity", ["h"], ["ie"])], "ie", [], [V("ie")])
    then_b = helper.make_graph([N("If", ["cond"], ["to"], then_branch=inner_t, else_branch=inner_e)], "t", [], [V("to")])
    else_b = helper.make_graph([N("Neg", ["h"], ["e"])], "e", [], [V("e")])
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [N("Gemm", ["x", "W1"], ["g1"]), N("Relu", ["g1"], ["h"]), N("Shape", ["x"], ["s"]),
         N("Gather", ["s", "zero"], ["n"]), N("Greater", ["n", "one"], ["cond"]),
         N("If", ["cond"], ["logits"], then_branch=then_b, else_branch=else_b)],
        "g", [V("x", ["N", 3])], [V("logits", ["N", 4])],
        [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W2"),
         numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(_probe(m, "logits")(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5)
