"""Fine-tuning under fixed pruning masks: recovery, exact zeros through write-back, equalized loss, ceag duals,
determinism and early stopping, on small synthetic two-group problems with a known structure."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxfair.data import GroupedDataset
from onnxfair.errors import UsageError
from onnxfair.finetune import (
    GroupReplayBuffer,
    ceag_dual_step,
    distill_loss,
    equalized_dual_step,
    excess_gaps,
    finetune,
    logits_of,
    to_tensors,
    validation_stats,
)

# --------------------------------------------------------------------------------------------- builders


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def mlp_model(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """x [N, F] -> Gemm(W1, B1) -> Relu -> Gemm(W2, B2) -> logits [N, C]."""
    h, f = w1.shape
    c = w2.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
        [
            numpy_helper.from_array(np.asarray(w1, np.float32), "W1"),
            numpy_helper.from_array(np.asarray(b1, np.float32), "B1"),
            numpy_helper.from_array(np.asarray(w2, np.float32), "W2"),
            numpy_helper.from_array(np.asarray(b2, np.float32), "B2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def module(model: onnx.ModelProto):
    from onnxfair.interpret import OnnxModule

    return OnnxModule(model)


def dataset(x: np.ndarray, y: np.ndarray, g: np.ndarray, labels=("g=maj", "g=min")) -> GroupedDataset:
    return GroupedDataset({"x": x.astype(np.float32)}, y.astype(np.int64), g.astype(np.int64), list(labels), ["g"])


def conflict_data(n: int, seed: int, minority: float = 0.15) -> GroupedDataset:
    """Both groups see the same feature distribution; the majority's label is x0 > 0, the minority's x1 > 0.

    No feature reveals the group, so any model trades one group against the other: plain CE favours the
    majority, an equal-loss constraint must move the boundary towards the minority.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    g = (rng.random(n) < minority).astype(np.int64)
    y = np.where(g == 0, x[:, 0] > 0, x[:, 1] > 0).astype(np.int64)
    return dataset(x, y, g)


def trained_mlp(ds: GroupedDataset, hidden: int = 16, seed: int = 0, steps: int = 300) -> onnx.ModelProto:
    """A small MLP fitted with plain torch (seeded), exported by hand."""
    torch.manual_seed(seed)
    f = ds.inputs["x"].shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(f, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    x = torch.from_numpy(ds.inputs["x"])
    y = torch.from_numpy(ds.y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    p = [t.detach().numpy() for t in net.parameters()]
    return mlp_model(p[0], p[1], p[2], p[3])


def accuracy(mod, ds: GroupedDataset) -> tuple[float, np.ndarray]:
    with torch.no_grad():
        pred = logits_of(mod, to_tensors(ds.inputs, torch.device("cpu"))).argmax(1).numpy()
    ok = pred == ds.y
    per = np.array([ok[ds.group_ids == k].mean() for k in range(len(ds.group_labels))])
    return float(ok.mean()), per


def group_losses(mod, ds: GroupedDataset) -> np.ndarray:
    with torch.no_grad():
        lg = logits_of(mod, to_tensors(ds.inputs, torch.device("cpu")))
        ce = torch.nn.functional.cross_entropy(lg, torch.from_numpy(ds.y), reduction="none").numpy()
    return np.array([ce[ds.group_ids == k].mean() for k in range(len(ds.group_labels))])


def as_float16(model: onnx.ModelProto, ds: GroupedDataset) -> tuple[onnx.ModelProto, GroupedDataset]:
    """The model with float16 weights, input and output, and the data's `x` in float16."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in list(half.graph.input) + list(half.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    return half, GroupedDataset({"x": ds.inputs["x"].astype(np.float16)}, ds.y, ds.group_ids, ds.group_labels)


def magnitude_mask(w: np.ndarray, keep: float) -> np.ndarray:
    flat = np.abs(w).reshape(-1)
    k = int(round(keep * flat.size))
    m = np.zeros(flat.size, np.float32)
    m[np.argsort(-flat, kind="stable")[:k]] = 1.0
    return m.reshape(w.shape)


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# ------------------------------------------------------------------------------------------------ data


def learnable_data(n: int, seed: int) -> GroupedDataset:
    """A learnable two-group task: labels from a nonlinear function of the features, minority 20%."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    g = (rng.random(n) < 0.2).astype(np.int64)
    y = ((x[:, 0] + x[:, 1] * x[:, 2] + 0.5 * x[:, 3]) > 0).astype(np.int64)
    return dataset(x, y, g)


@pytest.fixture(scope="module")
def learnable():
    train = learnable_data(800, 1)
    val = learnable_data(400, 2)
    model = trained_mlp(train, hidden=16, steps=300)
    w1 = inits(model)["W1"]
    masks = {"W1": magnitude_mask(w1, 0.25)}
    return model, train, val, masks


# ----------------------------------------------------------------------------------------------- tests


def test_validation_stats_per_group_figures_by_hand(learnable):
    model, _, val, _ = learnable
    mod = module(model)
    stats = validation_stats(mod, val, 3, batch_size=64)  # a third group without rows: NaN, not 0
    acc, per = accuracy(mod, val)
    assert stats.accuracy == pytest.approx(acc, abs=1e-12)
    np.testing.assert_allclose(stats.group_accuracy[:2], per, atol=1e-12)
    np.testing.assert_allclose(stats.group_loss[:2], group_losses(mod, val), rtol=1e-6)
    assert np.isnan(stats.group_accuracy[2]) and np.isnan(stats.group_loss[2])


def test_ce_recovers_accuracy_and_keeps_exact_zeros_through_onnxruntime(learnable):
    import onnxruntime as ort

    model, train, val, masks = learnable
    mod = module(model)
    dense_acc, _ = accuracy(mod, val)
    mod.set_masks({k: torch.from_numpy(v) for k, v in masks.items()})
    before, _ = accuracy(mod, val)
    res = finetune(mod, train, val, masks=masks, epochs=6, loss="ce", lr=1e-2, batch_size=64, seed=0)
    after, _ = accuracy(mod, val)
    assert before < dense_acc - 0.03  # the masking did cost accuracy
    assert after > before + 0.03
    assert res.history[res.best_epoch].val_accuracy == pytest.approx(after)
    zero = masks["W1"] == 0
    w1 = mod.params["W1"].detach().numpy()
    assert np.all(w1[zero] == 0.0)
    assert np.any(w1[~zero] != inits(model)["W1"][~zero])  # kept weights did train
    out = mod.to_onnx(model)
    written = inits(out)["W1"]
    assert np.all(written[zero] == 0.0)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": val.inputs["x"]})[0]
    with torch.no_grad():
        mine = logits_of(mod, to_tensors(val.inputs, torch.device("cpu"))).numpy()
    np.testing.assert_allclose(ref, mine, rtol=1e-4, atol=1e-5)
    # a fresh interpreter of the written model without masks agrees too: the zeros are in the weights
    fresh = logits_of(module(out), to_tensors(val.inputs, torch.device("cpu"))).detach().numpy()
    np.testing.assert_allclose(fresh, ref, rtol=1e-4, atol=1e-5)


def test_same_seed_same_weights_other_seed_other_weights(learnable):
    model, train, val, masks = learnable
    runs = []
    for seed in (3, 3, 4):
        mod = module(model)
        finetune(mod, train, val, masks=masks, epochs=2, loss="ce", lr=1e-2, batch_size=32, seed=seed, patience=None)
        runs.append({k: v.detach().clone() for k, v in mod.params.items()})
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_pw_loss_trains_and_uses_dense_reference(learnable):
    model, train, val, masks = learnable
    mod = module(model)
    before = accuracy(module(model), val)[0]
    res = finetune(mod, train, val, masks=masks, epochs=4, loss="pw", lr=1e-2, batch_size=64, seed=0)
    assert res.history[-1].train_loss is not None and np.isfinite(res.history[-1].train_loss)
    assert res.best.val_accuracy >= res.history[0].val_accuracy
    assert np.all(mod.params["W1"].detach().numpy()[masks["W1"] == 0] == 0)
    assert before > 0.8


@pytest.fixture(scope="module")
def conflict():
    train = conflict_data(1200, 11)
    val = conflict_data(800, 12)
    model = trained_mlp(train, hidden=8, steps=200)
    # keep only x0 and x1 as inputs of the hidden layer: a masked model that must trade groups off
    m = np.zeros((8, 4), np.float32)
    m[:, :2] = 1.0
    return model, train, val, {"W1": m}


def test_equalized_loss_narrows_group_loss_gap_vs_ce(conflict):
    model, train, val, masks = conflict
    gaps, accs = {}, {}
    for loss in ("ce", "equalized"):
        mod = module(model)
        finetune(mod, train, val, masks=masks, epochs=6, loss=loss, lr=1e-2, batch_size=64, seed=0, dual_lr=0.05)
        jl = group_losses(mod, val)
        gaps[loss] = abs(jl[1] - jl[0])
        accs[loss] = accuracy(mod, val)[1]
    assert gaps["ce"] > 0.3
    assert gaps["equalized"] < 0.5 * gaps["ce"]
    # and the minority's accuracy rises under the equal-loss constraint
    assert accs["equalized"][1] > accs["ce"][1] + 0.05


def test_balanced_loss_equals_ce_on_data_with_the_minority_repeated():
    """Full batches of 60 majority and 20 minority rows: mean_g J_g = (Σ_maj + 3 Σ_min) / 120, which is plain
    CE on the data with each minority row three times. Validation on majority rows only makes both runs'
    early-stopping keys the same accuracy, so the weights must agree."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 4))
    g = np.r_[np.zeros(60), np.ones(20)].astype(np.int64)
    y = ((x[:, 0] > 0) ^ (g == 1) & (x[:, 1] > 0)).astype(np.int64)
    train = dataset(x, y, g)
    rep = np.r_[np.arange(60), np.repeat(np.arange(60, 80), 3)]
    tripled = dataset(x[rep], y[rep], g[rep])
    xv = rng.normal(size=(100, 4))
    val = dataset(xv, xv[:, 0] > 0, np.zeros(100))
    model = trained_mlp(train, hidden=8, steps=1)  # near its random start: training must help
    params = {}
    for loss, data in (("balanced", train), ("ce", tripled)):
        mod = module(model)
        res = finetune(mod, data, val, masks={"W1": magnitude_mask(inits(model)["W1"], 0.5)}, epochs=3, loss=loss,
                       lr=0.2, batch_size=1000, seed=0, optimizer="sgd")
        params[loss] = {k: v.detach().clone() for k, v in mod.params.items()}
        assert res.best_epoch > 0  # something was trained and kept
    for k in params["ce"]:
        torch.testing.assert_close(params["balanced"][k], params["ce"][k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(params["ce"]["W2"], torch.from_numpy(inits(model)["W2"].copy()))


def test_balanced_loss_lifts_the_minority_and_keeps_the_best_mean_group_accuracy(conflict):
    model, train, val, masks = conflict
    accs, results = {}, {}
    for loss in ("ce", "balanced"):
        mod = module(model)
        results[loss] = finetune(mod, train, val, masks=masks, epochs=6, loss=loss, lr=1e-2, batch_size=64, seed=0)
        accs[loss] = accuracy(mod, val)[1]
    assert accs["balanced"][1] > accs["ce"][1] + 0.05  # the 15 % minority gains
    assert abs(accs["balanced"][1] - accs["balanced"][0]) < abs(accs["ce"][1] - accs["ce"][0])
    hist = results["balanced"].history
    means = [np.mean(list(r.val_group_accuracy.values())) for r in hist]
    assert results["balanced"].best_epoch == int(np.argmax(means))
    assert np.mean(accs["balanced"]) == pytest.approx(max(means))


def test_distill_loss_is_the_kl_from_the_dense_distribution():
    """Against torch.distributions' own KL between categoricals; zero where the logits are the dense log-probs."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    dense = torch.softmax(3 * torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=1)
    dense[0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # a confident row: 0·log 0 = 0
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=dense),
                                             torch.distributions.Categorical(logits=logits))
    torch.testing.assert_close(distill_loss(logits, dense), want)
    assert distill_loss(torch.log(dense[1:]), dense[1:]).abs().max() < 1e-12
    with pytest.raises(UsageError, match="shape"):
        distill_loss(logits, dense[:, :4])


def test_distill_follows_the_group_balanced_kl_written_by_hand():
    """Full batches, SGD with momentum 0.9: each step must equal one by hand on ½(mean KL over the majority's rows + mean KL over
    the minority's) between the dense teacher's softmax and the masked student's."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(80, 4))
    g = np.r_[np.zeros(64), np.ones(16)].astype(np.int64)
    y = ((x[:, 0] + x[:, 1] * x[:, 2]) > 0).astype(np.int64)
    train = dataset(x, y, g)
    model = trained_mlp(train, hidden=8, steps=150)
    mask = magnitude_mask(inits(model)["W1"], 0.3)
    mod = module(model)
    res = finetune(mod, train, train, masks={"W1": mask}, epochs=3, loss="distill", lr=0.5, batch_size=1000, seed=0,
                   optimizer="sgd", patience=None)
    assert res.best_epoch >= 1  # training helped the mean group accuracy: the weights after best_epoch steps are kept

    p = {k: torch.from_numpy(v.copy()).double() for k, v in inits(model).items()}
    xt = torch.from_numpy(x).double()

    def forward(q):
        return torch.relu(xt @ q["W1"].T + q["B1"]) @ q["W2"].T + q["B2"]

    with torch.no_grad():
        teacher = torch.softmax(forward(p), dim=1)
    m = torch.from_numpy(mask).double()
    p["W1"] = p["W1"] * m
    velocity = {}
    for _ in range(res.best_epoch):
        q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        logq = torch.log_softmax(forward(q), dim=1)
        kl = (teacher * (torch.log(teacher) - logq)).sum(1)
        loss = 0.5 * (kl[:64].mean() + kl[64:].mean())
        grads = dict(zip(q, torch.autograd.grad(loss, list(q.values()))))
        grads["W1"] = grads["W1"] * m
        velocity = {k: 0.9 * velocity[k] + grads[k] for k in p} if velocity else grads  # torch's SGD momentum
        p = {k: (v - 0.5 * velocity[k]).detach() for k, v in p.items()}
    for k in p:
        torch.testing.assert_close(mod.params[k].detach().double(), p[k], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(p["W2"], torch.from_numpy(inits(model)["W2"].copy()).double())


def test_distill_is_still_on_the_unmasked_dense_model():
    """The dense model is its own teacher: KL 0, zero gradient, so SGD leaves every weight where it was."""
    model, train, val, _ = learnable_data_model()
    mod = module(model)
    res = finetune(mod, train, val, masks=None, epochs=2, loss="distill", lr=0.5, batch_size=64, seed=0,
                   optimizer="sgd", patience=None)
    assert res.history[1].train_loss < 1e-6
    for k, v in inits(model).items():
        np.testing.assert_allclose(mod.params[k].detach().numpy(), v, atol=1e-5)


def learnable_data_model():
    train, val = learnable_data(300, 1), learnable_data(100, 2)
    return trained_mlp(train, hidden=8, steps=100), train, val, None


def test_distill_brings_both_groups_back_towards_the_dense_predictions(learnable):
    model, train, val, masks = learnable

    def agreement(mod):
        dense_pred = accuracy_pred(module(model), val)
        pred = accuracy_pred(mod, val)
        return np.array([(pred == dense_pred)[val.group_ids == k].mean() for k in range(2)])

    mod = module(model)
    mod.set_masks({"W1": torch.from_numpy(masks["W1"])})
    before = agreement(mod)
    finetune(mod, train, val, masks=masks, epochs=4, loss="distill", lr=1e-2, batch_size=64, seed=0)
    after = agreement(mod)
    assert before.max() < 0.95
    assert np.all(after > before + 0.02), (before, after)


def accuracy_pred(mod, ds: GroupedDataset) -> np.ndarray:
    with torch.no_grad():
        return logits_of(mod, to_tensors(ds.inputs, torch.device("cpu"))).argmax(1).numpy()


def test_a_run_where_no_epoch_is_feasible_says_so(conflict):
    model, train, val, masks = conflict
    lines = []
    res = finetune(module(model), train, val, masks=masks, epochs=2, loss="ceag", eps=0.0, lr=1e-2, batch_size=64,
                   seed=0, progress=lines.append)
    assert not any(r.feasible for r in res.history)
    smallest = min(res.history, key=lambda r: (r.val_violation, r.epoch))
    assert res.best_epoch == smallest.epoch
    # a warning, so the report's `warnings` and its Markdown carry it (before: a progress line only)
    assert lines[-1].startswith(f"warning: fine-tuning met the ceag constraint in no epoch on validation (tolerance "
                                f"0.0); kept epoch {res.best_epoch}, the smallest violation "
                                f"({smallest.val_violation:.3f}): raise --eps")
    assert not any("best on validation" in line for line in lines)
    assert res.to_dict()["constraint_met"] is False


def test_equalized_dual_step_by_hand():
    lam = equalized_dual_step(np.array([0.0, 0.2, 0.5]), np.array([-0.3, 0.1, 9.0]), np.array([True, True, False]), 0.5)
    np.testing.assert_allclose(lam, [0.15, 0.25, 0.5])


def test_ceag_dual_step_on_a_constructed_replay_buffer():
    buf = GroupReplayBuffer(n_groups=3, memory=4, group_sizes=[100, 100, 2])
    # group 0: the last 4 of 6 flags are kept (1,1,1,1); group 1: 1,0,0,1; group 2: only 1 of its 2 rows seen
    buf.update(np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]))
    np.testing.assert_array_equal(buf.ready(), [True, True, False])
    np.testing.assert_allclose(buf.accuracies(), [1.0, 0.5, 1.0])
    dense = np.array([0.9, 0.8, 0.9])
    shares = np.array([0.6, 0.3, 0.1])
    psi = excess_gaps(buf.accuracies(), dense, shares, buf.ready())
    # ready groups 0, 1 with weights 2/3, 1/3: Acc = 2/3*1 + 1/3*0.5 = 5/6; Acc(dense) = 2/3*0.9 + 1/3*0.8 = 26/30
    overall = 26 / 30 - 5 / 6
    np.testing.assert_allclose(psi[:2], [(0.9 - 1.0) - overall, (0.8 - 0.5) - overall])
    assert np.isnan(psi[2])
    lam = ceag_dual_step(np.array([0.0, 0.0, 0.3]), psi, eps=0.05, lr=2.0)
    assert lam[0] == 0.0  # ψ_0 = -0.133 < ε: stays at 0
    assert lam[1] == pytest.approx(2.0 * ((0.3 - overall) - 0.05))  # ψ_1 = 0.267 > ε: grows
    assert lam[2] == 0.3  # not measured: unchanged
    lam2 = ceag_dual_step(np.array([0.1, 0.0, 0.0]), psi, eps=0.05, lr=2.0)
    assert lam2[0] == 0.0  # clipped at 0, never negative


def indicator_data(n: int, seed: int, minority: float = 0.2) -> GroupedDataset:
    """x3 tells the groups apart: majority label x0 > 0, minority label x1 > 0; a model that reads x3 fits both."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    g = (rng.random(n) < minority).astype(np.int64)
    x[:, 3] = 2.0 * g  # zero for the majority: removing it changes nothing for them
    y = np.where(g == 0, x[:, 0] > 0, x[:, 1] > 0).astype(np.int64)
    return dataset(x, y, g)


def test_ceag_raises_only_the_hurt_groups_multiplier():
    train, val = indicator_data(1000, 21), indicator_data(500, 22)
    model = trained_mlp(train, hidden=16, steps=300)
    dense_acc = accuracy(module(model), val)[1]
    masks = {"W1": np.array([[1, 1, 1, 0]] * 16, np.float32)}  # the group indicator is pruned away
    mod = module(model)
    mod.set_masks({"W1": torch.from_numpy(masks["W1"])})
    pruned_acc = accuracy(mod, val)[1]
    assert dense_acc.min() > 0.85 and pruned_acc[1] < dense_acc[1] - 0.1 and pruned_acc[0] == dense_acc[0]
    res = finetune(mod, train, val, masks=masks, epochs=2, loss="ceag", lr=1e-2, batch_size=64, seed=0,
                   eps=0.02, dual_lr=0.05, buffer_size=64)
    last = res.history[-1].multipliers
    assert last["g=min"] > 0.0
    assert last["g=maj"] == 0.0
    assert res.tolerance == 0.02
    assert res.history[0].multipliers == {"g=maj": 0.0, "g=min": 0.0}


def test_early_stopping_restores_the_best_epoch():
    """Val labels are x > 0, train labels x > 1, start boundary x = -2: val accuracy peaks on the way."""
    rng = np.random.default_rng(0)
    xt = rng.uniform(-3, 3, size=(600, 1))
    xv = rng.uniform(-3, 3, size=(600, 1))
    train = dataset(xt, (xt[:, 0] > 1.0), np.zeros(600), labels=("g=a",))
    val = dataset(xv, (xv[:, 0] > 0.0), np.zeros(600), labels=("g=a",))
    model = mlp_model(np.array([[1.0]]), np.array([3.0]), np.array([[-1.0], [1.0]]), np.array([1.0, -1.0]))
    # logit gap = 2 * relu(x + 3) - 2 > 0  <=>  x > -2
    mod = module(model)
    res = finetune(mod, train, val, masks=None, epochs=40, loss="ce", lr=0.05, batch_size=50, seed=0, patience=3)
    accs = [r.val_accuracy for r in res.history]
    best = int(np.argmax(accs))
    assert res.best_epoch == best
    assert 0 < best < len(accs) - 1
    assert max(accs) > accs[-1] + 0.02
    assert res.stopped_early and len(accs) - 1 == best + 3
    assert accuracy(mod, val)[0] == pytest.approx(accs[best])


def test_batchnorm_statistics_stay_frozen_when_the_model_is_given():
    """Gemm -> BatchNormalization -> Gemm: scale/bias train, running mean/var never move."""
    rng = np.random.default_rng(0)
    base = mlp_model(rng.normal(size=(6, 4)), np.zeros(6), rng.normal(size=(2, 6)), np.zeros(2))
    g = base.graph
    nodes = list(g.node)
    nodes.insert(1, helper.make_node("BatchNormalization", ["h", "s", "b", "mu", "var"], ["hn"]))
    nodes[2].input[0] = "hn"
    extra = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
             [("s", np.ones(6)), ("b", np.zeros(6)), ("mu", rng.normal(size=6)), ("var", rng.uniform(0.5, 2, 6))]]
    graph = helper.make_graph(nodes, "bn", list(g.input), list(g.output), list(g.initializer) + extra)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    ds = learnable_data(256, 5)
    mod = module(model)
    finetune(mod, ds, ds, masks=None, epochs=2, loss="ce", lr=1e-2, batch_size=64, seed=0, model=model)
    before = inits(model)
    after = {k: v.detach().numpy() for k, v in mod.params.items()}
    np.testing.assert_array_equal(after["mu"], before["mu"])
    np.testing.assert_array_equal(after["var"], before["var"])
    assert not np.array_equal(after["s"], before["s"])
    assert all(p.requires_grad for p in mod.params.values())  # flags restored


def _record(epoch: int, acc: float, violation: float, feasible: bool):
    from onnxfair.finetune import EpochRecord

    return EpochRecord(epoch=epoch, train_loss=None, val_accuracy=acc, val_group_accuracy={}, val_group_loss={},
                       val_violation=violation, feasible=feasible)


def test_constraint_cost_names_the_most_accurate_infeasible_epoch():
    from onnxfair.finetune import FinetuneResult

    # the near-chance start is feasible; training recovers accuracy only by breaking the constraint
    res = FinetuneResult(loss="ceag", tolerance=0.02, best_epoch=1, history=[
        _record(0, 0.11, 0.013, True), _record(1, 0.14, 0.010, True), _record(2, 0.47, 0.438, False),
        _record(3, 0.47, 0.244, False), _record(4, 0.12, 0.300, False)])
    assert res.constraint_cost() == {"epoch": 2, "val_accuracy": 0.47, "val_violation": 0.438}
    assert res.to_dict()["best_infeasible"]["epoch"] == 2
    # nothing to report when the kept epoch is the most accurate, or when no epoch was feasible
    res.history[1] = _record(1, 0.50, 0.010, True)
    assert res.constraint_cost() is None
    res.history = [_record(0, 0.3, 0.1, False), _record(1, 0.6, 0.2, False)]
    res.best_epoch = 0
    assert res.constraint_cost() is None


def test_a_diverging_run_never_keeps_a_nan_epoch(learnable):
    """A NaN model predicts one class and has no group-loss gaps: accuracy and the constraint used to pick it."""
    model, train, val, masks = learnable
    mod = module(model)
    lines = []
    res = finetune(mod, train, val, masks=masks, epochs=3, loss="equalized", lr=1e30, batch_size=64, seed=0,
                   progress=lines.append)
    assert res.best_epoch == 0
    assert len(res.history) == 2 and not np.isfinite(res.history[1].train_loss) and not res.history[1].feasible
    assert all(torch.isfinite(p).all() for p in mod.params.values())
    assert any(line.startswith("warning: fine-tuning diverged at epoch 1") for line in lines)


def test_float16_weights_train_without_nan(learnable):
    """Adam's default epsilon (1e-8) is 0 in float16: a masked weight's zero gradient stepped by 0/0."""
    model, train, val, masks = learnable
    half, train16 = as_float16(model, train)
    mod = module(half)
    res = finetune(mod, train16, as_float16(model, val)[1], masks=masks, epochs=2, loss="ce", lr=1e-2, batch_size=64, seed=0,
                   patience=None)
    assert all(np.isfinite(r.train_loss) for r in res.history[1:])
    w1 = mod.params["W1"].detach().numpy()
    assert np.isfinite(w1).all() and np.all(w1[masks["W1"] == 0] == 0)


def test_float16_parameters_step_like_float32_ones():
    """In float16 Adam's second moment underflows for small gradients: the steps came out up to 50x too large."""
    from onnxfair.finetune import adam

    results = []
    for dtype in (torch.float32, torch.float16):
        p = torch.full((3,), 0.05, dtype=dtype, requires_grad=True)
        opt = adam([p], 1e-3)
        for _ in range(3):
            opt.zero_grad()
            p.grad = torch.tensor([5e-3, 1e-3, 0.0], dtype=dtype)
            opt.step()
        results.append(p.detach().double())
    assert p.dtype == torch.float16
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)  # float16's own rounding at 0.05


def test_a_scalar_bias_and_a_single_prelu_slope_are_trained_not_taken_for_constants():
    """Before: any one-element initializer that no weight op reads was frozen, so a one-logit head's bias
    on its own Add (tf2onnx's Dense(1)) and torch's default one-slope PReLU never trained. The constants
    that define a function (a GELU's 0.5, a Pow exponent, Clip bounds) stay frozen."""
    from onnxfair.finetune import untrainable_names

    inits = {"W1": np.ones((4, 3)), "slope": np.array([0.25]), "half": np.array(0.5), "two": np.array(2.0),
             "W2": np.ones((3, 1)), "b2": np.array([0.1]), "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("PRelu", ["h", "slope"], ["p"]),
             helper.make_node("Pow", ["p", "two"], ["q"]), helper.make_node("Mul", ["q", "half"], ["r"]),
             helper.make_node("Clip", ["r", "lo", "hi"], ["c"]), helper.make_node("MatMul", ["c", "W2"], ["z"]),
             helper.make_node("Add", ["z", "b2"], ["logit"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    assert untrainable_names(helper.make_model(graph)) == {"half", "two", "lo", "hi"}
