"""The per-group gradient engine against separate per-group forward/backward passes."""

import numpy as np
import pytest
import torch
from torch import nn

from onnxfair.data import GroupedDataset
from onnxfair.errors import UsageError
from onnxfair.importance import accumulate_gradients, compute_scores
from onnxfair.losses import loss_fn


class StandIn(nn.Module):
    """A tiny MLP with ONNX-style `.params` and `set_masks`, counting forward passes."""

    def __init__(self, seed=0, d_in=4, hidden=5, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, d_in, generator=g, dtype=torch.float64))
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(classes, hidden, generator=g, dtype=torch.float64))
        self.masks = {}
        self.forwards = 0

    @property
    def params(self):
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2}

    def set_masks(self, masks):
        self.masks = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in (masks or {}).items()}

    def forward(self, x):
        self.forwards += 1
        p = {n: (v * self.masks[n] if n in self.masks else v) for n, v in self.params.items()}
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T


def make_data(n=23, seed=1, groups=3, d_in=4, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in))
    y = rng.integers(0, classes, n)
    gid = rng.integers(0, groups, n)
    return GroupedDataset({"x": x}, y.astype(np.int64), gid.astype(np.int64), [f"g={i}" for i in range(groups)])


def separate_oracle(mod, ds, batch_size, loss="ce", dense=None):
    """Per batch and group: a fresh forward + backward on that group's rows only."""
    names = ["w1", "b1", "w2"]
    K = len(ds.group_labels)
    sq = {n: np.zeros((K, *mod.params[n].shape)) for n in names}
    first = {n: np.zeros((K, *mod.params[n].shape)) for n in names}
    counts = np.zeros(K)
    for start in range(0, len(ds), batch_size):
        sl = slice(start, start + batch_size)
        for g in range(K):
            rows = np.flatnonzero(ds.group_ids[sl] == g) + start
            if rows.size == 0:
                continue
            x = torch.from_numpy(ds.inputs["x"][rows])
            y = torch.from_numpy(ds.y[rows])
            dp = torch.from_numpy(dense[rows]) if dense is not None else None
            lg = loss_fn(mod(x), y, dense_probs=dp, kind=loss, reduction="mean")
            grads = torch.autograd.grad(lg, [mod.params[n] for n in names])
            for n, gr in zip(names, grads):
                w = mod.params[n].detach().numpy()
                sq[n][g] += (w * gr.numpy()) ** 2
                first[n][g] += rows.size * gr.numpy()
            counts[g] += rows.size
    for n in names:
        w = mod.params[n].detach().numpy()
        first[n] = first[n] / counts.reshape(-1, *([1] * w.ndim)) * w
    # the group-blind term from one full-data forward/backward
    x = torch.from_numpy(ds.inputs["x"])
    full = loss_fn(mod(x), torch.from_numpy(ds.y), dense_probs=None if dense is None else torch.from_numpy(dense),
                   kind=loss, reduction="mean")
    grads = torch.autograd.grad(full, [mod.params[n] for n in names])
    plain = {n: mod.params[n].detach().numpy() * g.numpy() for n, g in zip(names, grads)}
    return sq, first, plain, counts


@pytest.mark.parametrize("loss", ["ce", "pw"])
def test_engine_matches_separate_per_group_passes(loss):
    mod = StandIn()
    ds = make_data()
    dense = None
    if loss == "pw":
        with torch.no_grad():
            dense = torch.softmax(mod(torch.from_numpy(ds.inputs["x"])), 1).numpy()
    sq_o, first_o, plain_o, counts = separate_oracle(mod, ds, batch_size=7, loss=loss, dense=dense)
    mod.forwards = 0
    st = accumulate_gradients(mod, ds, ["w1", "b1", "w2"], sq=True, first=True, plain=True, loss=loss,
                              dense_probs=dense, batch_size=7, accumulate_dtype=torch.float64)
    for n in ["w1", "b1", "w2"]:
        np.testing.assert_allclose(st.sq[n], sq_o[n], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(st.first[n], first_o[n], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(st.plain[n], plain_o[n], rtol=1e-10, atol=1e-14)
    assert st.n_rows.tolist() == counts.tolist()
    # one forward per batch, one backward per (batch, group present)
    n_batches = -(-len(ds) // 7)
    assert mod.forwards == n_batches == st.n_batches
    present = sum(len(np.unique(ds.group_ids[s:s + 7])) for s in range(0, len(ds), 7))
    assert st.backward_passes == present


def test_plain_only_uses_one_backward_per_batch_and_agrees():
    mod = StandIn(seed=3)
    ds = make_data(seed=4)
    a = accumulate_gradients(mod, ds, ["w1", "w2"], plain=True, batch_size=5, accumulate_dtype=torch.float64)
    b = accumulate_gradients(mod, ds, ["w1", "w2"], plain=True, first=True, batch_size=5, accumulate_dtype=torch.float64)
    assert a.backward_passes == a.n_batches
    for n in ["w1", "w2"]:
        np.testing.assert_allclose(a.plain[n], b.plain[n], rtol=1e-10, atol=1e-15)


def test_group_losses_and_intersectional_labels():
    mod = StandIn(seed=5)
    ds = make_data(n=30, groups=4, seed=6)
    ds.group_labels = ["a=0,b=0", "a=0,b=1", "a=1,b=0", "a=1,b=1"]
    st = accumulate_gradients(mod, ds, ["w2"], sq=True, batch_size=8)
    with torch.no_grad():
        per_row = loss_fn(mod(torch.from_numpy(ds.inputs["x"])), torch.from_numpy(ds.y), reduction="none").numpy()
    for g in range(4):
        assert st.group_loss[g] == pytest.approx(per_row[ds.group_ids == g].mean(), rel=1e-9)
    assert st.loss == pytest.approx(per_row.mean(), rel=1e-9)
    assert st.group_labels == ds.group_labels
    assert st.sq["w2"].shape == (4, 3, 5)


def test_scoring_never_modifies_weights_and_restores_state():
    mod = StandIn(seed=7)
    mod.train()
    mod.b1.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in mod.params.items()}
    ds = make_data(seed=8)
    for criterion in ["taylor", "fairgrape", "conflict"]:
        compute_scores(criterion, mod, ds, weights=["w1", "w2"], batch_size=6)
    for n, p in mod.params.items():
        assert torch.equal(p.detach(), before[n])
        assert p.grad is None
    assert mod.training
    assert mod.w1.requires_grad and not mod.b1.requires_grad


def test_masked_weights_score_zero_and_are_not_alive():
    mod = StandIn(seed=9)
    ds = make_data(seed=10)
    mask = np.ones((5, 4))
    mask[1, :] = 0
    mask[3, 2] = 0
    for criterion in ["magnitude", "taylor", "fairgrape", "conflict"]:
        sc = compute_scores(criterion, mod, ds, weights=["w1", "w2"], masks={"w1": mask}, batch_size=8)
        w1 = sc.weights["w1"] if not sc.per_group else sc.weights["w1"].sum(0)
        assert (w1[mask == 0] == 0).all()
        assert (w1[mask == 1] > 0).all()
        assert (sc.weight_alive["w1"] == (mask == 1)).all()
        assert sc.weight_alive["w2"].all()


def test_engine_input_errors():
    mod = StandIn()
    ds = make_data()
    with pytest.raises(UsageError, match="not float initializers"):
        accumulate_gradients(mod, ds, ["nope"], sq=True)
    with pytest.raises(UsageError, match="dense"):
        accumulate_gradients(mod, ds, ["w1"], sq=True, loss="pw")
    with pytest.raises(UsageError, match="needs calibration data"):
        compute_scores("taylor", mod, None, weights=["w1"])
    with pytest.raises(UsageError, match="unknown criterion"):
        compute_scores("random", mod, ds)


@pytest.mark.parametrize("call", ["torch_device", "resolve_device"])
def test_a_cuda_device_asks_for_reproducible_kernels(monkeypatch, call):
    """Identical inputs must give identical masks; on CUDA the default kernels add in a varying order.
    (No GPU here: torch is told it has one, and nothing is moved to it.)"""
    import os

    import torch

    from onnxfair.importance.engine import resolve_device
    from onnxfair.interpret.device import torch_device

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch.use_deterministic_algorithms(False)
    try:
        dev = torch_device("auto") if call == "torch_device" else resolve_device("cuda", None)
        assert dev.type == "cuda"
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    assert torch_device("cpu").type == "cpu"
