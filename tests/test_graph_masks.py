"""Unstructured masks, consumer-side channel masks, sparse storage and round_keep."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxfair.errors import UsageError
from onnxfair.graph import analyze, channel_masks, mask_weights, model_cost, round_keep, to_dense_storage, to_sparse_storage
from onnxfair.model import FLOAT_TYPES, initializer_arrays
from tests.test_graph_support import GraphBuilder, ort_run, random_feeds


def _mlp():
    b = GraphBuilder(seed=3)
    h = b.op("Relu", [b.op("Gemm", ["x", b.rand(40, 64), b.rand(64)])])
    y = b.op("Gemm", [h, b.rand(64, 3), b.rand(3)])
    return b.model([("x", ["N", 40])], [y], opset=13)


def test_mask_weights_writes_zeros_and_matches_numpy():
    m = _mlp()
    w = m.graph.node[0].input[1]
    arr = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == w))
    mask = (np.random.default_rng(0).random(arr.shape) > 0.7).astype(np.float32)
    out = mask_weights(m, {w: mask})
    got = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == w))
    np.testing.assert_array_equal(got, arr * mask)
    assert (got[mask == 0] == 0).all()
    # the input model is not modified
    assert np.array_equal(numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == w)), arr)
    x = random_feeds(m)["x"]
    expect = np.maximum(x @ (arr * mask) + numpy_helper.to_array(m.graph.initializer[1]), 0)
    expect = expect @ numpy_helper.to_array(m.graph.initializer[2]) + numpy_helper.to_array(m.graph.initializer[3])
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError, match="shape"):
        mask_weights(m, {w: np.ones((2, 2))})
    with pytest.raises(UsageError, match="does not have"):
        mask_weights(m, {"missing": np.ones(3)})


def test_channel_masks_zero_only_consumer_columns():
    m = _mlp()
    an = analyze(m)
    (g,) = an.groups
    masks = channel_masks(an, {g.id: np.arange(0, 64, 4)})
    consumer = g.consumers()[0]
    assert set(masks) == {consumer.initializer}
    mk = masks[consumer.initializer]
    removed = np.setdiff1d(np.arange(64), np.arange(0, 64, 4))
    assert (mk[removed] == 0).all() and (mk[np.arange(0, 64, 4)] == 1).all()


def test_sparse_storage_loads_and_is_smaller():
    m = _mlp()
    rng = np.random.default_rng(1)
    masks = {i.name: (rng.random(tuple(i.dims)) > 0.9).astype(np.float32)
             for i in m.graph.initializer if len(i.dims) == 2}
    sparse_model = mask_weights(m, masks)
    stored = to_sparse_storage(sparse_model)
    assert len(stored.graph.sparse_initializer) == 2
    assert stored.ByteSize() < 0.5 * sparse_model.ByteSize()
    onnx.checker.check_model(stored)
    feeds = random_feeds(m)
    np.testing.assert_allclose(ort_run(stored, feeds)[0], ort_run(sparse_model, feeds)[0], rtol=1e-6)
    back = to_dense_storage(stored)
    np.testing.assert_allclose(ort_run(back, feeds)[0], ort_run(sparse_model, feeds)[0], rtol=1e-6)
    # dense weights stay dense: sparse form would be larger
    assert len(to_sparse_storage(m).graph.sparse_initializer) == 0


def test_sparse_storage_keeps_no_dense_type_for_a_moved_weight():
    """Before: value_info still declared the moved weights dense, so onnx shape inference (which optimisers and
    converters run) failed with a type case mismatch."""
    m = onnx.shape_inference.infer_shapes(_mlp())
    weights = [i.name for i in m.graph.initializer if len(i.dims) == 2]
    m.graph.value_info.extend(helper.make_tensor_value_info(w, TP.FLOAT, None) for w in weights)
    rng = np.random.default_rng(1)
    stored = to_sparse_storage(mask_weights(m, {i.name: (rng.random(tuple(i.dims)) > 0.9).astype(np.float32)
                                                 for i in m.graph.initializer if len(i.dims) == 2}))
    assert {sp.values.name for sp in stored.graph.sparse_initializer} == set(weights)
    assert not {vi.name for vi in stored.graph.value_info} & set(weights)
    onnx.shape_inference.infer_shapes(stored, strict_mode=True)


def test_prune_reads_a_sparse_stored_model(tmp_path):
    """Before: re-pruning a --sparse-storage output unstructured said "nothing prunable" (its weights were sparse
    initializers); they are read densified, exactly."""
    from click.testing import CliRunner

    from cli.main import app
    from tests.conftest import FIXTURES

    mlp, cal = FIXTURES / "adult_mlp.onnx", FIXTURES / "adult_calib.npz"
    args = ["--data", cal, "--groups", "race", "--method", "magnitude", "--unstructured", "--scope", "layer", "--no-latency"]
    first, second = tmp_path / "s.onnx", tmp_path / "t.onnx"
    r = CliRunner().invoke(app, [str(a) for a in ["prune", mlp, *args, "--sparsity", "0.8", "--sparse-storage", "-o", first]])
    assert r.exit_code == 0 and onnx.load(first).graph.sparse_initializer, r.output
    assert "stored no weight sparse" not in r.stderr
    half = tmp_path / "half.onnx"  # under 2/3 zeros nothing is smaller sparse, and the run says so
    r = CliRunner().invoke(app, [str(a) for a in ["prune", mlp, *args, "--sparsity", "0.5", "--sparse-storage", "-o", half]])
    assert r.exit_code == 0 and not onnx.load(half).graph.sparse_initializer
    assert ("note: --sparse-storage stored no weight sparse: a weight's values plus int64 indices take less room "
            "than the dense tensor only above 67% zeros for 4-byte values") in r.stderr
    # float16 values need 80 % zeros (the note said 2/3 whatever the dtype); 0.75 stores nothing sparse
    from onnxfair.data import load_dataset
    from tests.test_finetune import as_float16

    m16, ds16 = as_float16(onnx.load(mlp), load_dataset(cal, onnx.load(mlp), "race"))
    onnx.save(m16, tmp_path / "m16.onnx")
    np.savez(tmp_path / "c16.npz", x=ds16.inputs["x"], y=ds16.y, race=np.array(ds16.group_labels)[ds16.group_ids])
    r = CliRunner().invoke(app, [str(a) for a in ["prune", tmp_path / "m16.onnx", *args[:1], tmp_path / "c16.npz", *args[2:],
                                                  "--sparsity", "0.75", "--sparse-storage", "-o", tmp_path / "h16.onnx"]])
    assert r.exit_code == 0 and not onnx.load(tmp_path / "h16.onnx").graph.sparse_initializer, r.output
    assert "only above 80% zeros for 2-byte values" in r.stderr
    r = CliRunner().invoke(app, [str(a) for a in ["prune", first, *args, "--sparsity", "0.9", "-o", second,
                                                  "--json", "-"]])
    assert r.exit_code == 0, r.output
    zero_before = json.loads(r.stdout)["structure"]["weights"]["zero_before"]  # the sparse-stored zeros count
    assert zero_before == sum(int((v == 0).sum()) for k, v in initializer_arrays(to_dense_storage(onnx.load(first))).items()
                              if k in ("fc1.weight", "fc2.weight", "head.weight")) > 0
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(second).graph.initializer}
    dense = to_dense_storage(onnx.load(first))
    before = {i.name: numpy_helper.to_array(i) for i in dense.graph.initializer}
    assert set(w) == set(before) and np.count_nonzero(w["fc1.weight"]) == round(0.1 * w["fc1.weight"].size)
    kept = w["fc1.weight"] != 0
    np.testing.assert_array_equal(w["fc1.weight"][kept], before["fc1.weight"][kept])  # nested in the first zeros
    assert not (kept & (before["fc1.weight"] == 0)).any()


@pytest.mark.parametrize("n_keep,size,round_to,expected", [
    (32, 64, 8, 32), (30, 64, 8, 32), (27, 64, 8, 24), (28, 64, 8, 32), (3, 64, 8, 8), (0, 64, 8, 8),
    (63, 64, 8, 64), (70, 64, 8, 64), (3, 6, 8, 3), (0, 6, 8, 1), (5, 10, 1, 5), (9, 10, 8, 8), (10, 10, 8, 10),
])
def test_round_keep(n_keep, size, round_to, expected):
    assert round_keep(n_keep, size, round_to) == expected


def test_member_power_sums_and_take():
    from onnxfair.graph import Member

    arr = np.arange(24, dtype=np.float32).reshape(2, 12) - 5
    m = Member("w", axis=1, indices=np.array([[0, 1, 2], [6, 7, 8], [-1, -1, -1]]), role="consumer")
    np.testing.assert_allclose(m.power_sums(arr, 1.0), [np.abs(arr[:, :3]).sum(), np.abs(arr[:, 6:9]).sum(), 0])
    np.testing.assert_allclose(m.power_sums(arr, 2.0)[1], (arr[:, 6:9] ** 2).sum())
    assert m.take(arr, 2).shape == (2, 0) and m.present().tolist() == [True, True, False]


def test_analyze_densifies_sparse_storage():
    b = GraphBuilder()
    y = b.op("Relu", [b.op("Gemm", ["x", b.rand(40, 64), b.rand(64)])])
    m = b.model([("x", ["N", 40])], [b.op("Gemm", [y, b.rand(64, 3)])], opset=13)
    w = m.graph.node[0].input[1]
    arr = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == w))
    stored = to_sparse_storage(mask_weights(m, {w: (np.abs(arr) > 1.2).astype(np.float32)}))
    assert stored.graph.sparse_initializer
    an = analyze(stored)
    assert [g.size for g in an.groups] == [64] and not an.model.graph.sparse_initializer


def _cast_model(weight: onnx.TensorProto) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Cast", [weight.name], ["y"], to=TP.FLOAT)], "g", [],
                          [helper.make_tensor_value_info("y", TP.FLOAT, list(weight.dims))], [weight])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_float_types_and_sparse_storage_agree_on_bfloat16():
    """bf16 weights are float weights everywhere, but sparse storage refuses them rather than skip them:
    before onnx 1.19 numpy_helper cannot round-trip bfloat16, so the stored tensor would change type."""
    assert FLOAT_TYPES == {TP.FLOAT, TP.FLOAT16, TP.BFLOAT16, TP.DOUBLE}
    bits = np.zeros(128, np.uint16)
    bits[::16] = 0x3FC0  # 1.5
    m = _cast_model(helper.make_tensor("w", TP.BFLOAT16, [8, 16], bits.tobytes(), raw=True))
    assert model_cost(m).params == 128
    with pytest.raises(UsageError, match="initializer w is bfloat16.*without --sparse-storage"):
        to_sparse_storage(m)
    assert not to_sparse_storage(m, min_elements=129).graph.sparse_initializer  # too small to be considered
    # float16 goes through the same path as float32
    w16 = np.zeros((8, 16), np.float16)
    w16[:, 0] = 1.5
    m16 = _cast_model(numpy_helper.from_array(w16, "w"))
    stored = to_sparse_storage(m16)
    assert [sp.values.data_type for sp in stored.graph.sparse_initializer] == [TP.FLOAT16]
    np.testing.assert_array_equal(ort_run(stored, {})[0], w16.astype(np.float32))
