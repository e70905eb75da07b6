"""Bi-level pruning: exact budgets through select.py, determinism, the mask-score gradient, agreement with
the graph rewrite, and keeping the small units a minority group needs where magnitude pruning removes them."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxfair.bilevel import (
    _ChannelMasker,
    bilevel_prune,
    learned_scores,
    macs_keep_fraction,
)
from onnxfair.errors import UsageError
from onnxfair.graph import analyze, channel_masks, model_cost, prune_channels, round_keep
from onnxfair.graph.groups import ChannelGroup, Member
from onnxfair.importance import Scores
from onnxfair.select import rewrite_macs, select_channels, select_weights
from tests.test_finetune import as_float16, dataset, mlp_model, module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def minority_feature_data(n: int, seed: int, minority: float = 0.1):
    """Majority: label x0 > 0 and x1 = 0. Minority: x0 = 0, label x1 > 0 with |x1| in [0.5, 1.5].
    x2, x3 are noise for everyone."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    g = (rng.random(n) < minority).astype(np.int64)
    k = int((g == 1).sum())
    x[g == 0, 1] = 0.0
    x[g == 1, 0] = 0.0
    x[g == 1, 1] = np.sign(rng.normal(size=k)) * rng.uniform(0.5, 1.5, k)
    y = np.where(g == 0, x[:, 0] > 0, x[:, 1] > 0).astype(np.int64)
    return dataset(x, y, g)


def known_mlp() -> onnx.ModelProto:
    """8 hidden units: 0, 1 read x0 (majority, large weights); 2, 3 read x1 (minority, small weights);
    4..7 read the noise features with large input weights and near-zero output weights."""
    w1, b1, w2, b2 = np.zeros((8, 4)), np.zeros(8), np.zeros((2, 8)), np.zeros(2)
    w1[0, 0], w1[1, 0] = 2.0, -2.0
    w2[:, 0], w2[:, 1] = [-1, 1], [1, -1]
    w1[2, 1], w1[3, 1] = 0.3, -0.3
    w2[:, 2], w2[:, 3] = [-0.3, 0.3], [0.3, -0.3]
    for i, (f, sgn) in enumerate([(2, 1), (2, -1), (3, 1), (3, -1)]):
        w1[4 + i, f] = 1.5 * sgn
        w2[:, 4 + i] = [0.05, -0.05] if i % 2 else [-0.05, 0.05]
    return mlp_model(w1, b1, w2, b2)


def mlp3(seed: int, h1: int = 24, h2: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["a1"], transB=1),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2", "B2"], ["a2"], transB=1),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "W3", "B3"], ["logits"], transB=1),
    ]
    shapes = {"W1": (h1, 4), "B1": (h1,), "W2": (h2, h1), "B2": (h2,), "W3": (2, h2), "B3": (2,)}
    inits = [numpy_helper.from_array((rng.normal(size=s) * 0.5).astype(np.float32), n) for n, s in shapes.items()]
    graph = helper.make_graph(
        nodes, "mlp3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def ort_group_accuracy(model: onnx.ModelProto, ds) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"x": ds.inputs["x"]})[0].argmax(1)
    ok = pred == ds.y
    return np.array([ok[ds.group_ids == k].mean() for k in range(len(ds.group_labels))])


@pytest.fixture(scope="module")
def known():
    model = known_mlp()
    an = analyze(model)
    train, val = minority_feature_data(600, 1), minority_feature_data(600, 2)
    return an, train, val


def run_known(an, train, val, alpha=1.0, seed=0, steps=100, **kw):
    mod = module(an.model)
    res = bilevel_prune(mod, an.groups, train, val, sparsity=0.5, steps=steps, alpha=alpha, seed=seed, model=an.model,
                        batch_size=64, **kw)
    return mod, res


def test_keeps_the_minority_units_magnitude_removes(known):
    an, train, val = known
    (grp,) = an.groups
    assert grp.size == 8
    # magnitude (L2 over the group's members) would keep units 0, 1 and two noise units
    inits = {i.name: numpy_helper.to_array(i) for i in an.model.graph.initializer}
    mag = np.zeros(8)
    for m in grp.members:
        mag += (np.moveaxis(inits[m.initializer], m.axis, 0).reshape(8, -1) ** 2).sum(1)
    magnitude_keep = np.sort(np.argsort(-mag, kind="stable")[:4])
    assert not ({2, 3} & set(magnitude_keep.tolist()))
    mod, res = run_known(an, train, val, steps=300)
    np.testing.assert_array_equal(res.keep[grp.id], [0, 1, 2, 3])  # they start below the noise units
    # the physically pruned graphs, in onnxruntime: bilevel keeps the minority, magnitude loses it
    acc_bilevel = ort_group_accuracy(prune_channels(an, res.keep), val)
    acc_magnitude = ort_group_accuracy(prune_channels(an, {grp.id: magnitude_keep}), val)
    assert acc_bilevel[1] >= 0.95 and acc_bilevel[0] >= 0.95
    assert acc_magnitude[1] <= 0.6
    assert res.val["groups"]["g=min"] >= 0.95


def test_fairness_penalty_raises_the_minority_units_scores(known):
    an, train, val = known
    plain = run_known(an, train, val, alpha=0.0)[1].scores[0]
    fair = run_known(an, train, val, alpha=5.0)[1].scores[0]
    # the penalty term is the spread of group losses: penalising it must favour the units the minority needs
    assert fair[2:4].mean() > plain[2:4].mean() + 0.1
    assert fair[4:].max() < fair[2:4].min()


def test_deterministic_for_a_seed(known):
    an, train, val = known
    m1, r1 = run_known(an, train, val, seed=5)
    m2, r2 = run_known(an, train, val, seed=5)
    np.testing.assert_array_equal(r1.scores[0], r2.scores[0])
    np.testing.assert_array_equal(r1.keep[0], r2.keep[0])
    for k in m1.params:
        assert torch.equal(m1.params[k], m2.params[k])
    _, r3 = run_known(an, train, val, seed=6)
    assert not np.array_equal(r1.scores[0], r3.scores[0])


def test_hard_masks_on_module_match_the_rewrite_in_onnxruntime(known):
    an, train, val = known
    mod, res = run_known(an, train, val)
    trained = mod.to_onnx(an.model)  # the lower level's weights, masked
    pruned = prune_channels(dataclasses.replace(an, model=trained), res.keep)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": val.inputs["x"]})[0]
    with torch.no_grad():
        mine = mod(x=torch.from_numpy(val.inputs["x"])).numpy()
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-5)
    # and the masks it left are the graph layer's consumer-side masks
    expected = channel_masks(an, res.keep)
    assert set(expected) == {"W2"}
    w2 = mod.masked_params()["W2"].numpy()
    assert np.all(w2[expected["W2"] == 0] == 0)


@pytest.fixture(scope="module")
def three_layer():
    """mlp3 (channel groups of 24 and 16, 40 channels; weights W1, W2, W3) and a small dataset."""
    an = analyze(mlp3(0))
    assert sorted(g.size for g in an.groups) == [16, 24]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4))
    g = (rng.random(256) < 0.3).astype(np.int64)
    return an, dataset(x, (x[:, 0] + x[:, 1] > 0), g)


SHORT = {"steps": 20, "batch_size": 64, "seed": 0}


def by_hand(channels=None, weights=None) -> Scores:
    """The learned scores as select.py's input, built here independently of bilevel.learned_scores."""
    if channels is not None:
        return Scores(criterion="bilevel", structured=True, weights={}, weight_alive={}, channels=dict(channels),
                      channel_alive={k: np.ones(v.shape, bool) for k, v in channels.items()})
    return Scores(criterion="bilevel", structured=False, weights=dict(weights),
                  weight_alive={k: np.ones(v.shape, bool) for k, v in weights.items()})


@pytest.mark.parametrize(
    "scope, round_to, kept",
    [
        ("layer", 1, {24: 10, 16: 6}),  # 24 - round(0.6 * 24) = 10, 16 - round(0.6 * 16) = 6
        ("layer", 8, {24: 8, 16: 8}),  # round_keep(10, 24, 8) = round_keep(6, 16, 8) = 8
        ("global", 1, None),  # the split is learned; the total is exactly 40 - round(0.6 * 40) = 16
        # the learned top 16 split 12 / 4 here: rounding each group alone (the old binarisation) kept
        # 16 + 8 = 24; select.py's block fix-up brings the total back to the budget
        ("global", 8, {24: 8, 16: 8}),
    ],
)
def test_channel_budget_and_selection_are_select_py(three_layer, scope, round_to, kept):
    an, ds = three_layer
    res = bilevel_prune(module(an.model), an.groups, ds, None, sparsity=0.6, scope=scope, round_to=round_to,
                        model=an.model, **SHORT)
    counts = {g.size: len(res.keep[g.id]) for g in an.groups}
    assert sum(counts.values()) == 16
    if kept is not None:
        assert counts == kept
    for g in an.groups:
        assert np.all(np.diff(res.keep[g.id]) > 0)
        assert round_to == 1 or len(res.keep[g.id]) % round_to == 0
    # the final keep-sets are exactly select.py's for the learned scores (as learned: not normalised)
    expected = select_channels(by_hand(channels=res.scores), an.groups, sparsity=0.6, scope=scope,
                               round_to=round_to, normalise=False)
    assert set(expected) == set(res.keep)
    for gid in expected:
        np.testing.assert_array_equal(res.keep[gid], expected[gid])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_weight_budget_and_masks_are_select_py(three_layer, scope):
    an, ds = three_layer
    names = ["W1", "W2", "W3"]
    sizes = {"W1": 96, "W2": 384, "W3": 32}
    mod = module(an.model)
    res = bilevel_prune(mod, names, ds, ds if scope == "global" else None, sparsity=0.7, scope=scope,
                        model=an.model, **SHORT)
    ones = {n: int(m.sum()) for n, m in res.masks.items()}
    if scope == "layer":
        assert ones == {n: size - round(0.7 * size) for n, size in sizes.items()} == {"W1": 29, "W2": 115, "W3": 10}
    else:
        assert sum(ones.values()) == 512 - round(0.7 * 512) == 154
    expected = select_weights(by_hand(weights=res.scores), 0.7, scope=scope, normalise=False)
    for n in names:
        assert res.masks[n].dtype == np.float32 and set(np.unique(res.masks[n])) <= {0.0, 1.0}
        np.testing.assert_array_equal(res.masks[n], expected[n])
        assert np.all(mod.masked_params()[n].numpy()[res.masks[n] == 0] == 0)  # the hard masks are set


def test_target_macs_is_met_on_the_real_cost(three_layer):
    an, ds = three_layer
    dense = float(an.cost.macs)
    for scope in ("layer", "global"):
        res = bilevel_prune(module(an.model), an.groups, ds, None, target_macs=0.5, scope=scope,
                            macs_fn=rewrite_macs(an), dense_macs=dense, model=an.model, **SHORT)
        macs = model_cost(prune_channels(an, res.keep)).macs
        assert macs <= 0.5 * dense
        expected = select_channels(by_hand(channels=res.scores), an.groups, target_macs=0.5, scope=scope,
                                   macs_fn=rewrite_macs(an), dense_macs=dense, normalise=False)
        for gid in expected:
            np.testing.assert_array_equal(res.keep[gid], expected[gid])


def test_macs_keep_fraction_and_budget_errors(three_layer):
    groups = [ChannelGroup(0, "a", 4, macs=30), ChannelGroup(1, "b", 8, macs=50)]
    # 20 MACs outside the groups: 20 + f * 80 = 0.6 * 100 gives f = 0.5
    assert macs_keep_fraction(groups, 0.6, dense_macs=100.0) == pytest.approx(0.5)
    assert macs_keep_fraction(groups, 1.0, dense_macs=100.0) == 1.0
    with pytest.raises(UsageError, match="cannot be met"):
        macs_keep_fraction(groups, 0.15, dense_macs=100.0)
    an, ds = three_layer
    with pytest.raises(UsageError, match="exactly one budget"):
        bilevel_prune(module(an.model), an.groups, ds, None, model=an.model, **SHORT)
    with pytest.raises(UsageError, match="exactly one budget"):
        bilevel_prune(module(an.model), an.groups, ds, None, sparsity=0.5, target_macs=0.5, **SHORT)
    with pytest.raises(UsageError, match="target_macs needs channel groups"):
        bilevel_prune(module(an.model), ["W1"], ds, None, target_macs=0.5, **SHORT)


def test_selection_by_hand():
    groups = [ChannelGroup(0, "a", 4), ChannelGroup(1, "b", 4)]
    logits = {0: np.array([4.0, 3.0, 2.0, 1.0]), 1: np.array([10.0, 9.0, 8.0, 1.0])}
    sc = learned_scores(groups, logits)
    assert sc.criterion == "bilevel" and sc.structured and not sc.per_group
    assert all(sc.channel_alive[g.id].all() for g in groups)
    # global: the top 4 learned scores are 10, 9, 8 (group 1) and 4 (group 0)
    keep = select_channels(sc, groups, sparsity=0.5, scope="global", normalise=False)
    assert {k: v.tolist() for k, v in keep.items()} == {0: [0], 1: [0, 1, 2]}
    # dividing by each group's mean (the other criteria's convention) would keep two of each instead
    keep = select_channels(sc, groups, sparsity=0.5, scope="global")
    assert {k: v.tolist() for k, v in keep.items()} == {0: [0, 1], 1: [0, 1]}
    # negative logits rank the same way: a shift of all scores changes nothing
    keep = select_channels(learned_scores(groups, {k: v - 20.0 for k, v in logits.items()}), groups,
                           sparsity=0.5, scope="global", normalise=False)
    assert {k: v.tolist() for k, v in keep.items()} == {0: [0], 1: [0, 1, 2]}
    # layer scope, ties to the lower index
    keep = select_channels(learned_scores(groups, {0: np.array([0.1, 0.9, 0.5, 0.9]), 1: np.array([3.0, -1, 0, 0])}),
                           groups, sparsity=0.5, scope="layer", normalise=False)
    assert {k: v.tolist() for k, v in keep.items()} == {0: [1, 3], 1: [0, 2]}
    # a Split part [2, 4) that lost all its channels gets its best one back, for the weakest kept one
    split = [ChannelGroup(0, "s", 4, parts=[(0, 2), (2, 4)])]
    keep = select_channels(learned_scores(split, {0: np.array([5.0, 4.0, 1.0, 2.0])}), split, sparsity=0.5,
                           normalise=False)
    np.testing.assert_array_equal(keep[0], [0, 3])
    # global round_to 8 with a 12 / 4 split of the top 16: per-group rounding alone would keep 16 + 8
    big = [ChannelGroup(0, "a", 24), ChannelGroup(1, "b", 16)]
    s24, s16 = np.zeros(24), np.zeros(16)
    s24[:12], s16[:4] = 2.0, 1.0
    keep = select_channels(learned_scores(big, {0: s24, 1: s16}), big, sparsity=0.6, scope="global", round_to=8,
                           normalise=False)
    assert [len(keep[0]), len(keep[1])] == [8, 8]
    assert round_keep(12, 24, 8) + round_keep(4, 16, 8) == 24
    # unstructured, global: the top 3 of [1, 1, 0, 2, 1.5, -3] are 2, 1.5 and the first 1
    w = {"a": np.array([[1.0, 1.0], [0.0, 2.0]]), "b": np.array([1.5, -3.0])}
    m = select_weights(learned_scores(["a", "b"], w), 0.5, scope="global", normalise=False)
    np.testing.assert_array_equal(m["a"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(m["b"], [1, 0])


def test_channel_score_gradient_is_the_straight_through_gradient_of_the_mask():
    """masker.gather(∂L/∂w_eff · w), from the interpreter's parameter gradients at the masked weights, equals
    ∂L/∂m of a plain torch forward in which the hard channel masks are leaves, removed channels included."""
    model = mlp3(1, h1=6, h2=5)
    an = analyze(model)
    mod = module(an.model)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(32, 4)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 32))
    hard = [torch.from_numpy((rng.random(g.size) < 0.5).astype(np.float32)) for g in an.groups]
    masker = _ChannelMasker(mod, an.groups)
    masks = masker.masks(hard)
    stored = {n: t.detach().clone() for n, t in mod.params.items()}
    with torch.no_grad():
        for n, m in masks.items():
            mod.params[n].copy_(stored[n] * m)
    torch.nn.functional.cross_entropy(mod(x=x), y).backward()
    got = masker.gather({n: mod.params[n].grad * stored[n] for n in masks})
    # reference: the masks as leaves of a plain torch forward
    leaves = [h.clone().requires_grad_(True) for h in hard]
    spread = masker.masks(leaves)
    eff = {n: stored[n] * spread[n] if n in spread else stored[n] for n in stored}
    h = torch.relu(x @ eff["W1"].T + eff["B1"])
    h = torch.relu(h @ eff["W2"].T + eff["B2"])
    torch.nn.functional.cross_entropy(h @ eff["W3"].T + eff["B3"], y).backward()
    for a, leaf, m in zip(got, leaves, hard):
        torch.testing.assert_close(a, leaf.grad.double(), rtol=1e-4, atol=1e-7)
        assert float(a[m == 0].abs().sum()) > 0  # a removed channel still learns what it would bring back


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_scores_start_at_magnitudes_selection(three_layer, structured, scope):
    """With one step (its scores do not move: the last step's mask is the one written) the selection is the
    magnitude method's at the same budget and scope."""
    from onnxfair.importance import compute_scores

    an, ds = three_layer
    mod = module(an.model)
    units = an.groups if structured else ["W1", "W2", "W3"]
    mag = compute_scores("magnitude", mod, groups=an.groups if structured else None,
                         weights=None if structured else units)
    res = bilevel_prune(mod, units, ds, None, sparsity=0.6, scope=scope, model=an.model, **{**SHORT, "steps": 1})
    if structured:
        expected = select_channels(mag, an.groups, sparsity=0.6, scope=scope)
        for gid in expected:
            np.testing.assert_array_equal(res.keep[gid], expected[gid])
    else:
        expected = select_weights(mag, 0.6, scope=scope)
        for n in units:
            np.testing.assert_array_equal(res.masks[n], expected[n])


def test_masker_skips_padded_positions_and_multiplies_shared_parameters():
    class P:
        params = {"W": torch.nn.Parameter(torch.ones(3, 4))}

    g0 = ChannelGroup(0, "a", 2, [Member("W", 1, np.array([[0, 1], [2, -1]]), "consumer")])
    g1 = ChannelGroup(1, "b", 3, [Member("W", 0, np.array([[0], [1], [2]]), "consumer")])
    mk = _ChannelMasker(P(), [g0, g1])
    m = mk.masks([torch.tensor([0.5, 0.25]), torch.tensor([1.0, 2.0, 0.0])])["W"]
    expected = np.outer([1.0, 2.0, 0.0], [0.5, 0.5, 0.25, 1.0])
    np.testing.assert_allclose(m.numpy(), expected)


def test_optional_finetune_keeps_the_selection_and_zeros(known):
    an, train, val = known
    mod, res = run_known(an, train, val, finetune_epochs=2, finetune_loss="ceag")
    assert res.finetune is not None and len(res.finetune.history) == 3
    assert res.finetune.history[0].multipliers is not None
    removed = np.setdiff1d(np.arange(8), res.keep[0])
    assert np.all(mod.params["W2"].detach().numpy()[:, removed] == 0.0)
    assert res.finetune.best.val_group_accuracy["g=min"] >= 0.95


def test_prune_run_with_target_macs():
    """`--method bilevel --target-macs F` goes through the same MAC-budget selection as the other methods."""
    from onnxfair.data import load_dataset
    from onnxfair.model import load_model
    from onnxfair.prune import PruneConfig, prune_model
    from tests.conftest import FIXTURES

    model = load_model(FIXTURES / "adult_mlp.onnx")
    cal = load_dataset(FIXTURES / "adult_calib.npz", model, "race")
    cfg = PruneConfig(method="bilevel", target_macs=0.5, scope="global", bilevel_steps=5, latency=False, threads=1)
    res = prune_model(model, cal, None, cfg)
    ratio = res.report["cost"]["macs_ratio"]
    assert 0.4 < ratio <= 0.5
    assert all(g["kept"] % 8 == 0 or g["kept"] == g["channels"] for g in res.report["structure"]["groups"])


@pytest.mark.parametrize("structured", [True, False])
def test_a_float16_model_trains_without_a_dtype_clash(three_layer, structured):
    """The step masks are float32: a float16 model's gradients were multiplied up to float32 and refused."""
    an, ds = three_layer
    half, ds16 = as_float16(an.model, ds)
    an16 = analyze(half)
    mod = module(half)
    units = an16.groups if structured else ["W1", "W2", "W3"]
    bilevel_prune(mod, units, ds16, None, sparsity=0.5, model=half, **SHORT)
    assert all(torch.isfinite(p).all() for p in mod.params.values())


def test_a_removed_weight_keeps_its_value_while_removed(three_layer, monkeypatch):
    """Adam's momentum moved weights after they left the mask (the gradient there is zero, the moments are not)."""
    import onnxfair.bilevel as bilevel_module

    an, ds = three_layer
    state: dict = {"moved": []}
    real_adam, real_topk = bilevel_module.adam, bilevel_module._topk_weight_masks

    def spy_adam(params, lr):
        state["stored"] = params[:3]  # W1, W2, W3's stored values, in the units' order
        return real_adam(params, lr)

    def spy_topk(scores, sparsity, scope, alive=None):  # called at the start of every step but the first
        if state.get("before"):
            for t, before, m in zip(state["stored"], state["before"], state["mask"]):
                state["moved"].append(int(((t != before) & (m == 0)).sum()))
        out = real_topk(scores, sparsity, scope, alive)
        state["before"] = [t.detach().clone() for t in state.get("stored", [])]
        state["mask"] = out
        return out

    monkeypatch.setattr(bilevel_module, "adam", spy_adam)
    monkeypatch.setattr(bilevel_module, "_topk_weight_masks", spy_topk)
    res = bilevel_prune(module(an.model), ["W1", "W2", "W3"], ds, None, sparsity=0.6, steps=40, batch_size=64,
                        seed=0, score_lr=0.2, model=an.model)
    assert res.history[-1]["moved"] > 0.01  # masks did change, so weights did leave them
    assert len(state["moved"]) > 30 * 3 and sum(state["moved"]) == 0


def test_a_non_finite_loss_stops_training_and_keeps_the_dense_weights(three_layer, monkeypatch):
    import onnxfair.bilevel as bilevel_module

    an, ds = three_layer
    real, calls = bilevel_module.batch_losses, []

    def nan_on_the_fourth(*a, **k):
        per_row, logits, g = real(*a, **k)
        calls.append(1)
        return (per_row * float("nan") if len(calls) == 4 else per_row), logits, g

    monkeypatch.setattr(bilevel_module, "batch_losses", nan_on_the_fourth)
    mod, lines = module(an.model), []
    dense = {n: p.detach().clone() for n, p in mod.params.items()}
    bilevel_prune(mod, ["W1", "W2", "W3"], ds, None, sparsity=0.5, model=an.model, progress=lines.append, **SHORT)
    assert len(calls) == 4 and any(line.startswith("warning: bilevel training diverged at step 3") for line in lines)
    for n, p in mod.params.items():  # the module holds the dense weights (the hard masks apply on top)
        assert torch.equal(p.detach(), dense[n]), n


def test_zero_weights_and_dead_channels_keep_magnitudes_first_mask_in_global_scope():
    """The prior must divide by the mean select.py divides by (over the units still alive; zeros already in the
    model count as removed), or with zeros in a layer the global ranking is not magnitude's; tiny weights
    must not tie with exact zeros."""
    from onnxfair.importance import compute_scores

    model = mlp3(4, h1=16, h2=12)
    w1 = next(i for i in model.graph.initializer if i.name == "W1")
    arr = numpy_helper.to_array(w1).copy()
    arr[:6] = 0.0  # six dead channels
    arr[6:, :2] = 0.0
    arr[7, 2] = 1e-30
    w1.CopyFrom(numpy_helper.from_array(arr, "W1"))
    an = analyze(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4))
    ds = dataset(x, (x[:, 0] + x[:, 1] > 0), (rng.random(128) < 0.3).astype(np.int64))
    for structured in (True, False):
        mod = module(an.model)
        units = an.groups if structured else ["W1", "W2", "W3"]
        mag = compute_scores("magnitude", mod, groups=an.groups if structured else None,
                             weights=None if structured else units)
        res = bilevel_prune(mod, units, ds, None, sparsity=0.5, scope="global", steps=1, model=an.model,
                            batch_size=64)
        if structured:
            expected = select_channels(mag, an.groups, sparsity=0.5, scope="global")
            assert {k: v.tolist() for k, v in res.keep.items()} == {k: v.tolist() for k, v in expected.items()}
        else:
            expected = select_weights(mag, 0.5, scope="global")
            for n in units:
                np.testing.assert_array_equal(res.masks[n], expected[n])


def test_step_weight_masks_keep_exactly_the_budget_when_scores_tie():
    from onnxfair.bilevel import _topk_weight_masks

    scores = [torch.zeros(10, dtype=torch.float64), torch.ones(6, dtype=torch.float64)]
    for scope, kept in (("global", 16 - round(0.3 * 16)), ("layer", (10 - 3) + (6 - round(0.3 * 6)))):
        masks = _topk_weight_masks(scores, 0.3, scope)
        assert int(sum(m.sum() for m in masks)) == kept
    assert _topk_weight_masks(scores, 0.3, "global")[1].sum() == 6  # the higher scores first


def test_step_weight_masks_never_keep_a_weight_the_model_already_had_at_zero():
    """The steps trained old zeros the final selection then dropped: they must train under the writable mask."""
    from onnxfair.bilevel import _topk_weight_masks

    scores = [torch.arange(10, dtype=torch.float64), torch.arange(6, dtype=torch.float64)]
    alive = [np.arange(10) < 3, np.arange(6) % 2 == 0]  # the highest scores are the dead ones
    for scope in ("global", "layer"):
        masks = _topk_weight_masks(scores, 0.3, scope, alive)
        for m, a in zip(masks, alive):
            assert not m.numpy()[~a].any()
        assert int(sum(m.sum() for m in masks)) == 6  # every live weight: fewer than the budget keeps
    masks = _topk_weight_masks(scores, 0.9, "global", alive)
    assert int(sum(m.sum() for m in masks)) == 2 and masks[0][2] == 1 and masks[1][4] == 1  # the best live ones


def test_target_macs_steps_train_at_the_written_channel_count(three_layer, monkeypatch):
    import onnxfair.bilevel as bilevel_module

    an, ds = three_layer
    counts: dict = {"steps": [], "final": []}
    real = bilevel_module.select_channels

    def spy(*a, **k):
        keep = real(*a, **k)
        if "sparsity" in k:
            counts["steps"].append(sum(len(v) for v in keep.values()))
        elif k.get("macs_fn") is not None:
            counts["final"].append(sum(len(v) for v in keep.values()))
        return keep

    monkeypatch.setattr(bilevel_module, "select_channels", spy)
    bilevel_prune(module(an.model), an.groups, ds, None, target_macs=0.3, scope="layer", macs_fn=rewrite_macs(an),
                  dense_macs=float(an.cost.macs), model=an.model, **SHORT)
    assert len(counts["steps"]) == SHORT["steps"] and len(counts["final"]) == 2  # under the prior, then the end
    assert set(counts["steps"]) == {counts["final"][0]}
