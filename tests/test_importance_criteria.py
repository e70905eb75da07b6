"""Each criterion pinned on cases computed by hand, and the channel reductions on hand-made groups."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from onnxfair.data import GroupedDataset
from onnxfair.graph.groups import ChannelGroup, Member
from onnxfair.importance import compute_scores
from onnxfair.errors import UsageError
from onnxfair.importance.criteria import channel_alive, channel_sum, conflict_scores, damped, fairness_change, weight_members
from onnxfair.importance.fairgrape import greedy_order, share_targets


class TwoWeights(nn.Module):
    """One binary logit z = w1 x1 + w2 x2 (no bias): dL/dw_j = (sigmoid(z) - y) x_j per row."""

    def __init__(self, w=(0.5, -1.0)):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([list(w)], dtype=torch.float64))

    @property
    def params(self):
        return {"w": self.w}

    def forward(self, x):
        return x @ self.w.T


X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
Yb = np.array([1, 0, 1])
G = np.array([0, 0, 1])  # rows 0, 1: group A; row 2: group B
W = np.array([0.5, -1.0])


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def row_grad(i):
    z = float(X[i] @ W)
    return (sig(z) - Yb[i]) * X[i]


def row_loss(i):
    z = float(X[i] @ W)
    return -math.log(sig(z)) if Yb[i] == 1 else -math.log(1 - sig(z))


def dataset():
    return GroupedDataset({"x": X}, Yb.astype(np.int64), G.astype(np.int64), ["grp=A", "grp=B"])


def test_magnitude_by_hand():
    sc = compute_scores("magnitude", TwoWeights(), weights=["w"])
    assert sc.weights["w"].tolist() == [[0.5, 1.0]]
    sc2 = compute_scores("magnitude", TwoWeights(), weights=["w"], p=2)
    assert sc2.weights["w"].tolist() == [[0.25, 1.0]]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "fairgrape"])
def test_non_finite_scores_are_refused_with_the_fix(criterion):
    # a NaN weight makes every score of its initializer NaN; ranking NaN would prune arbitrarily
    from onnxfair.errors import ModelError

    with pytest.raises(ModelError, match="NaN or infinite for w:.*onnxfair evaluate"):
        compute_scores(criterion, TwoWeights(w=(0.5, float("nan"))), dataset(), weights=["w"])


def test_taylor_by_hand():
    sc = compute_scores("taylor", TwoWeights(), dataset(), weights=["w"], batch_size=2, accumulate_dtype=torch.float64)
    g = (row_grad(0) + row_grad(1) + row_grad(2)) / 3  # gradient of the calibration-set mean loss
    assert g[0] == pytest.approx(-1 / 3, abs=1e-12)  # (sig(.5)-1) + (sig(-.5)-1) = -1
    np.testing.assert_allclose(sc.weights["w"][0], np.abs(W * g), rtol=1e-10)


def test_fairgrape_by_hand_sums_squares_over_batches():
    # batch size 1: every batch holds one row, so I_g = sum over g's rows of (w * grad_row)^2
    sc = compute_scores("fairgrape", TwoWeights(), dataset(), weights=["w"], batch_size=1, accumulate_dtype=torch.float64)
    IA = (W * row_grad(0)) ** 2 + (W * row_grad(1)) ** 2
    IB = (W * row_grad(2)) ** 2
    np.testing.assert_allclose(sc.weights["w"][:, 0, :], np.stack([IA, IB]), rtol=1e-10)
    # batch size 3: one batch, I_g = (w * mean grad of g's rows)^2 -- not the same numbers
    sc3 = compute_scores("fairgrape", TwoWeights(), dataset(), weights=["w"], batch_size=3, accumulate_dtype=torch.float64)
    IA3 = (W * (row_grad(0) + row_grad(1)) / 2) ** 2
    np.testing.assert_allclose(sc3.weights["w"][0, 0], IA3, rtol=1e-10)
    assert sc.group_labels == ["grp=A", "grp=B"]


def test_fairgrape_damping_by_hand():
    # I_g + c * lambda_g * w^2 with lambda_g = sum_w I_g / sum_w w^2, from the row gradients directly
    c = 2.5
    sc = compute_scores("fairgrape", TwoWeights(), dataset(), weights=["w"], batch_size=1, damping=c,
                        accumulate_dtype=torch.float64)
    I = np.stack([(W * row_grad(0)) ** 2 + (W * row_grad(1)) ** 2, (W * row_grad(2)) ** 2])
    lam = I.sum(axis=1) / (W ** 2).sum()
    np.testing.assert_allclose(sc.weights["w"][:, 0, :], I + c * lam[:, None] * W ** 2, rtol=1e-10)
    assert sc.info["damping"] == c
    # each group's share of the layer's importance (FairGRAPE's targets t_g) is what it was undamped
    plain = compute_scores("fairgrape", TwoWeights(), dataset(), weights=["w"], batch_size=1, accumulate_dtype=torch.float64)
    np.testing.assert_allclose(share_targets(sc.weights["w"].reshape(2, -1)), share_targets(plain.weights["w"].reshape(2, -1)))


class MaskedTwoWeights(TwoWeights):
    """TwoWeights with the interpreter's mask convention: the forward pass multiplies w by its mask."""

    mask = None

    def set_masks(self, masks):
        self.mask = None if not masks else masks["w"]

    def forward(self, x):
        return x @ (self.w if self.mask is None else self.w * self.mask).T


def test_fairgrape_damping_leaves_masked_weights_out():
    # weight 2 masked: it scores 0 and takes no part in lambda_g (its value does not count in sum w^2)
    mod = MaskedTwoWeights()
    sc = compute_scores("fairgrape", mod, dataset(), weights=["w"], batch_size=1, damping=1.0,
                        masks={"w": torch.tensor([[1.0, 0.0]], dtype=torch.float64)}, accumulate_dtype=torch.float64)
    s = sc.weights["w"][:, 0, :]
    assert (s[:, 1] == 0).all()
    masked_grad = [(sig(X[i, 0] * W[0]) - Yb[i]) * X[i] for i in range(3)]  # the masked model's row gradients
    I0 = np.array([(W[0] * masked_grad[0][0]) ** 2 + (W[0] * masked_grad[1][0]) ** 2, (W[0] * masked_grad[2][0]) ** 2])
    np.testing.assert_allclose(s[:, 0], 2 * I0, rtol=1e-10)  # lambda_g * w0^2 = I0 when w0 is the only live weight


def test_heavy_damping_turns_fairgrape_into_magnitude():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 30))
    sq = rng.gamma(0.3, size=(3, 40, 30)) * w ** 2  # per-group importances unrelated to |w| ranking
    n_keep = 300
    top = np.sort(np.argsort(-np.abs(w).ravel(), kind="stable")[:n_keep])
    assert set(np.sort(greedy_order(sq.reshape(3, -1), n_keep))) != set(top)
    heavy = damped(sq, w ** 2, 1e9).reshape(3, -1)
    assert np.array_equal(np.sort(greedy_order(heavy, n_keep)), top)


@pytest.mark.parametrize("criterion,damping,needle", [("taylor", 1.0, "fairgrape criterion only"),
                                                     ("fairgrape", -1.0, ">= 0"), ("fairgrape", float("nan"), ">= 0")])
def test_damping_is_refused_where_it_has_no_meaning(criterion, damping, needle):
    with pytest.raises(UsageError, match=needle):
        compute_scores(criterion, TwoWeights(), dataset(), weights=["w"], damping=damping)


def test_conflict_by_hand():
    sc = compute_scores("conflict", TwoWeights(), dataset(), weights=["w"], batch_size=2, accumulate_dtype=torch.float64)
    gA = (row_grad(0) + row_grad(1)) / 2
    gB = row_grad(2)
    LA = (row_loss(0) + row_loss(1)) / 2
    LB = row_loss(2)
    eA, eB = -W * gA, -W * gB  # first-order change of L_g when the weight is removed
    Lbar = (LA + LB) / 2
    dF = (2 / 2) * ((LA - Lbar) * eA + (LB - Lbar) * eB)
    need = np.maximum(dF, 0)
    # the case is not degenerate: fairness needs one weight and not the other
    assert (need > 0).sum() == 1
    taylor = np.abs(W * (2 * gA + gB) / 3)  # the taylor score of the calibration-set mean loss
    lam = 0.1 * taylor.sum() / need.sum()
    np.testing.assert_allclose(sc.weights["w"][0], taylor + lam * need, rtol=1e-10)
    assert sc.weight_tier is None
    assert sc.info["group_loss"]["grp=A"] == pytest.approx(LA)


def test_conflict_single_group_has_no_fairness_term():
    dF = fairness_change(np.array([[0.3, -0.2]]), np.array([0.7]), np.array([10]))
    assert dF.tolist() == [0.0, 0.0]
    assert conflict_scores(np.array([0.3, 0.2]), dF).tolist() == [0.3, 0.2]


def test_conflict_ignores_groups_absent_from_the_data():
    eff = np.array([[1.0, 0.0], [2.0, 1.0], [5.0, 0.0]])
    dF = fairness_change(eff, np.array([0.2, 0.6, np.nan]), np.array([1, 1, 0]))
    # F over groups 0 and 1 only: L-bar = 0.4, dF = (2/2) * (-0.2 * e0 + 0.2 * e1)
    assert dF.tolist() == pytest.approx([0.2, 0.2])
    # lambda = 0.1 * (1 + 3) / (0.2 + 0.2) = 1: s = T + max(dF, 0)
    assert conflict_scores(np.array([1.0, 3.0]), dF).tolist() == pytest.approx([1.2, 3.2])
    assert conflict_scores(np.array([1.0, 3.0]), dF, weight=1.0).tolist() == pytest.approx([3.0, 5.0])
    assert conflict_scores(np.array([1.0, 3.0]), -dF).tolist() == pytest.approx([1.0, 3.0])


# ----------------------------------------------------------------------------------- channel reduction


def hand_group():
    # producer W1 [3 out, 2 in] axis 0; consumer W2 [2, 6] axis 1 with 2 positions per channel (a
    # Flatten-like consumer) and channel 2 absent from a split consumer W3 [2, 2] axis 1
    return ChannelGroup(id=0, name="g", size=3, members=[
        Member("W1", 0, np.array([[0], [1], [2]]), "producer"),
        Member("B1", 0, np.array([[0], [1], [2]]), "producer"),
        Member("W2", 1, np.array([[0, 1], [2, 3], [4, 5]]), "consumer"),
        Member("W3", 1, np.array([[0, -1], [1, -1], [-1, -1]]), "consumer"),
    ])


def test_channel_sum_gathers_rows_columns_and_pads():
    rng = np.random.default_rng(0)
    vals = {"W1": rng.random((3, 2)), "B1": rng.random(3), "W2": rng.random((2, 6)), "W3": rng.random((2, 2))}
    grp = hand_group()
    members = weight_members(grp, None, {k: v.shape for k, v in vals.items()})
    assert [m.initializer for m in members] == ["W1", "W2", "W3"]  # the bias is not a weight
    got = channel_sum(vals, members, 3)
    expected = [
        vals["W1"][0].sum() + vals["W2"][:, 0:2].sum() + vals["W3"][:, 0].sum(),
        vals["W1"][1].sum() + vals["W2"][:, 2:4].sum() + vals["W3"][:, 1].sum(),
        vals["W1"][2].sum() + vals["W2"][:, 4:6].sum(),
    ]
    np.testing.assert_allclose(got, expected)
    # with a leading group axis
    stacked = {k: np.stack([v, 2 * v]) for k, v in vals.items()}
    np.testing.assert_allclose(channel_sum(stacked, members, 3, lead=1), [expected, 2 * np.array(expected)])


def test_channel_alive_reads_consumer_side_masks():
    grp = hand_group()
    members = weight_members(grp, ["W1", "W2", "W3"], {})
    alive = {"W1": np.ones((3, 2), bool), "W2": np.ones((2, 6), bool), "W3": np.ones((2, 2), bool)}
    assert channel_alive(grp, members, alive).tolist() == [True, True, True]
    alive["W2"][:, 2:4] = False  # channel 1 masked in W2 only: W3 still uses it
    assert channel_alive(grp, members, alive).tolist() == [True, True, True]
    alive["W3"][:, 1] = False
    assert channel_alive(grp, members, alive).tolist() == [True, False, True]
    alive["W2"][:, 4:6] = False  # channel 2 lives in W2 only
    assert channel_alive(grp, members, alive).tolist() == [True, False, False]


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.b1 = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        self.fc2 = nn.Parameter(torch.randn(2, 4, generator=g, dtype=torch.float64))
        self.masks = {}

    @property
    def params(self):
        return {"fc1": self.fc1, "b1": self.b1, "fc2": self.fc2}

    def set_masks(self, masks):
        self.masks = {k: torch.as_tensor(np.asarray(v)) for k, v in (masks or {}).items()}

    def forward(self, x):
        p = {n: v * self.masks[n] if n in self.masks else v for n, v in self.params.items()}
        return torch.relu(x @ p["fc1"].T + p["b1"]) @ p["fc2"].T


def mlp_group():
    idx = np.arange(4).reshape(4, 1)
    return ChannelGroup(id=0, name="hidden", size=4, members=[
        Member("fc1", 0, idx, "producer"), Member("b1", 0, idx, "producer"), Member("fc2", 1, idx, "consumer")])


def mlp_data(n=40):
    rng = np.random.default_rng(3)
    return GroupedDataset({"x": rng.standard_normal((n, 3))}, rng.integers(0, 2, n).astype(np.int64),
                          rng.integers(0, 2, n).astype(np.int64), ["s=f", "s=m"])


def test_structured_channel_scores_per_criterion():
    mod, grp, ds = Mlp(), mlp_group(), mlp_data()
    fc1, fc2 = mod.fc1.detach().numpy(), mod.fc2.detach().numpy()
    mag = compute_scores("magnitude", mod, groups=[grp])
    np.testing.assert_allclose(mag.channels[0], np.abs(fc1).sum(1) + np.abs(fc2).sum(0))
    mag2 = compute_scores("magnitude", mod, groups=[grp], p=2)
    np.testing.assert_allclose(mag2.channels[0], np.sqrt((fc1**2).sum(1) + (fc2**2).sum(0)))
    tay = compute_scores("taylor", mod, ds, groups=[grp], batch_size=16, accumulate_dtype=torch.float64)
    np.testing.assert_allclose(tay.channels[0], tay.weights["fc1"].sum(1) + tay.weights["fc2"].sum(0), rtol=1e-12)
    fg = compute_scores("fairgrape", mod, ds, groups=[grp], batch_size=16, accumulate_dtype=torch.float64)
    assert fg.channels[0].shape == (2, 4)
    np.testing.assert_allclose(fg.channels[0], fg.weights["fc1"].sum(2) + fg.weights["fc2"].sum(1), rtol=1e-12)
    con = compute_scores("conflict", mod, ds, groups=[grp], batch_size=16, accumulate_dtype=torch.float64)
    # conflict channels use the consumer columns: removing hidden unit c zeroes fc2[:, c]
    x = torch.from_numpy(ds.inputs["x"])
    y = torch.from_numpy(ds.y)
    base = {}
    for g in range(2):
        rows = ds.group_ids == g
        logits = mod(x[rows])
        lg = torch.nn.functional.cross_entropy(logits, y[rows])
        (grad,) = torch.autograd.grad(lg, [mod.fc2])
        base[g] = -(mod.fc2.detach() * grad).sum(0).numpy()  # e_{g,c}
    losses = np.array([con.info["group_loss"][label] for label in con.group_labels])
    dF = (2 / 2) * ((losses[0] - losses.mean()) * base[0] + (losses[1] - losses.mean()) * base[1])
    need = np.maximum(dF, 0)
    lam = 0.1 * tay.channels[0].sum() / need.sum() if need.sum() > 0 else 0.0
    np.testing.assert_allclose(con.channels[0], tay.channels[0] + lam * need, rtol=1e-9)


def test_structured_scores_mark_removed_channels():
    mod, grp = Mlp(), mlp_group()
    mask = np.ones((2, 4))
    mask[:, [1, 3]] = 0
    sc = compute_scores("magnitude", mod, groups=[grp], masks={"fc2": mask})
    assert sc.channel_alive[0].tolist() == [True, False, True, False]
    assert sc.channels[0][1] == 0 and sc.channels[0][3] == 0


def test_structured_damping_is_per_channel_over_live_channels():
    # channels 1 and 3 removed on the consumer side only (fc2 columns): their fc1 rows keep their values and
    # must neither score nor enter lambda_g
    mod, grp, ds = Mlp(), mlp_group(), mlp_data()
    mask = np.ones((2, 4))
    mask[:, [1, 3]] = 0
    kw = dict(groups=[grp], batch_size=16, accumulate_dtype=torch.float64, masks={"fc2": mask})
    plain = compute_scores("fairgrape", mod, ds, **kw)
    c = 3.0
    damp = compute_scores("fairgrape", mod, ds, damping=c, **kw)
    fc1, fc2 = mod.fc1.detach().numpy(), mod.fc2.detach().numpy() * mask
    live = np.array([1.0, 0.0, 1.0, 0.0])
    w2 = ((fc1 ** 2).sum(1) + (fc2 ** 2).sum(0)) * live
    I = plain.channels[0]
    lam = I.sum(1) / w2.sum()
    np.testing.assert_allclose(damp.channels[0], I + c * lam[:, None] * w2, rtol=1e-12)
    assert (damp.channels[0][:, [1, 3]] == 0).all()
    np.testing.assert_allclose(share_targets(damp.channels[0]), share_targets(I))


def test_damping_reaches_the_masks_of_a_prune_run():
    import onnx

    from onnxfair.data import load_dataset
    from onnxfair.prune import PruneConfig, prune_model
    from tests.conftest import FIXTURES

    model = onnx.load(FIXTURES / "adult_mlp.onnx")
    calib = load_dataset(FIXTURES / "adult_calib.npz", model, "race")
    fit, held = calib.split(0.5, seed=0)
    masks = {}
    for damping in (0.0, 10.0):
        cfg = PruneConfig(method="fairgrape", structured=False, sparsity=0.8, scope="layer", damping=damping,
                          latency=False, device="cpu")
        result = prune_model(model, fit, held, cfg)
        assert result.report["method"]["damping"] == damping
        masks[damping] = {i.name: onnx.numpy_helper.to_array(i) != 0 for i in result.model.graph.initializer}
    assert any(not np.array_equal(masks[0.0][n], masks[10.0][n]) for n in masks[0.0])
