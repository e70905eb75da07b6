"""Bias-risk pre-check on softmax regression, where gradient and Hessian of cross-entropy are known exactly.

For logits z = W x + b and mean cross-entropy over n rows, with p_i = softmax(z_i):
  grad_W = mean_i (p_i - e_{y_i}) x_i^T,  H = mean_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T  (W row-major),
  tr H = mean_i sum_c p_ic (1 - p_ic) |x_i|^2.  The bias behaves as a feature fixed at 1.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnxfair.data import GroupedDataset
from onnxfair.risk import RiskConfig, _rademacher, assess_risk, format_risk, rank_groups, risk_report, uncertain_share
from tests.conftest import linear_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # thousands of tiny double-backward calls


# ------------------------------------------------------------------------------------------- oracle


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _oracle(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """Float64 mean CE, gradient and Hessian over the augmented weight [W | b] (row-major)."""
    x = x.astype(np.float64)
    c, f = w.shape
    xa = np.hstack([x, np.ones((len(x), 1))])
    p = _softmax(xa @ np.hstack([w, b[:, None]]).T)
    onehot = np.eye(c)[y]
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    grad = ((p - onehot)[:, :, None] * xa[:, None, :]).mean(axis=0)  # [C, F+1]
    hess = np.zeros((c * (f + 1), c * (f + 1)))
    for pi, xi in zip(p, xa):
        hess += np.kron(np.diag(pi) - np.outer(pi, pi), np.outer(xi, xi))
    hess /= len(x)
    return {"loss": loss, "grad": grad, "hess": hess, "p": p}


def _w_block(c: int, f: int) -> np.ndarray:
    """Indices of W's entries inside the augmented [W | b] flattening."""
    return np.array([ci * (f + 1) + fi for ci in range(c) for fi in range(f)])


def _dataset(x: np.ndarray, y: np.ndarray, groups: np.ndarray, labels: list[str]) -> GroupedDataset:
    return GroupedDataset({"x": x.astype(np.float32)}, y.astype(np.int64), groups.astype(np.int64), labels, ["g"])


@pytest.fixture(scope="module")
def softmax_case():
    rng = np.random.default_rng(7)
    c, f, n = 3, 4, 90
    w = rng.normal(size=(c, f)).astype(np.float32)
    b = (0.3 * rng.normal(size=c)).astype(np.float32)
    x = rng.normal(size=(n, f)).astype(np.float32)
    groups = (rng.random(n) < 0.3).astype(np.int64)  # group 1 is the minority
    x[groups == 1] *= 1.8  # the minority lives where the loss is more curved
    y = rng.integers(0, c, n)
    return {"w": w, "b": b, "x": x, "y": y, "groups": groups, "labels": ["g=a", "g=b"], "model": linear_model(w, b)}


def _rows(case, g):
    sel = case["groups"] == g
    return case["x"][sel].astype(np.float64), case["y"][sel]


# -------------------------------------------------------------------------------------------- tests


def test_gradient_norm_and_exact_quadratic_form(softmax_case):
    case = softmax_case
    w, b = case["w"], case["b"]
    mask_w = (np.abs(w) > np.median(np.abs(w))).astype(np.float32)  # remove the smaller half
    mask_b = np.array([1, 0, 1], dtype=np.float32)
    ds = _dataset(case["x"], case["y"], case["groups"], case["labels"])
    for params, masks in (("weights", {"W": mask_w}), ("all", {"W": mask_w, "B": mask_b})):
        rep = assess_risk(case["model"], ds, masks, RiskConfig(params=params, hutchinson_samples=2, batch_size=16))
        delta = -np.hstack([w * (1 - mask_w), (b * (1 - masks.get("B", np.ones(3))))[:, None]]).ravel()
        for g, label in enumerate(case["labels"]):
            x, y = _rows(case, g)
            o = _oracle(w, b, x, y)
            r = rep["groups"][label]
            gvec = o["grad"].ravel()
            if params == "weights":
                gvec = gvec[_w_block(3, 4)]
            assert r["n"] == len(y)
            assert r["mean_loss"] == pytest.approx(o["loss"], rel=1e-5)
            assert r["accuracy"] == pytest.approx(float((o["p"].argmax(1) == y).mean()))
            assert r["grad_norm"] == pytest.approx(np.linalg.norm(gvec), rel=1e-5)
            assert r["gradient_term"] == pytest.approx(o["grad"].ravel() @ delta, rel=1e-4, abs=1e-7)
            assert r["curvature_term"] == pytest.approx(0.5 * delta @ o["hess"] @ delta, rel=1e-4)
            assert r["predicted_loss_change"] == pytest.approx(r["gradient_term"] + r["curvature_term"])
            # measured: float64 loss of the masked weights minus the dense loss
            om = _oracle(w * mask_w, b * masks.get("B", np.ones(3, np.float32)), x, y)
            assert r["measured_loss_change"] == pytest.approx(om["loss"] - o["loss"], abs=2e-6)
    assert rep["settings"]["removed_weights"] == int((mask_w == 0).sum()) + 1


def test_every_seed_draws_its_own_vectors():
    """A modulo by 2**63-1 made seed 2**63-1 draw seed 0's vectors."""
    from onnxfair.settings import MAX_SEED

    draws = {s: tuple(_rademacher([torch.zeros(64)], s, 0)[0].tolist()) for s in (0, 1, MAX_SEED, MAX_SEED - 1)}
    assert len(set(draws.values())) == 4
    assert tuple(_rademacher([torch.zeros(64)], MAX_SEED, 0)[0].tolist()) == draws[MAX_SEED]  # and seeded


def test_hutchinson_uses_seeded_vectors_and_converges_to_trace(softmax_case):
    case = softmax_case
    k = 300
    ds = _dataset(case["x"], case["y"], case["groups"], case["labels"])
    rep = assess_risk(case["model"], ds, {}, RiskConfig(params="weights", hutchinson_samples=k, seed=3, batch_size=64))
    idx = _w_block(3, 4)
    vs = [_rademacher([torch.zeros(3, 4)], 3, i)[0].numpy().ravel() for i in range(k)]
    for g, label in enumerate(case["labels"]):
        x, y = _rows(case, g)
        h = _oracle(case["w"], case["b"], x, y)["hess"][np.ix_(idx, idx)]
        p = _oracle(case["w"], case["b"], x, y)["p"]
        trace = float((p * (1 - p)).sum(1) @ (x**2).sum(1) / len(y))
        assert np.trace(h) == pytest.approx(trace)  # the closed form
        r = rep["groups"][label]
        # exactly the mean of v^T H v over the seeded vectors (implementation check) ...
        assert r["hessian_trace"] == pytest.approx(np.mean([v @ h @ v for v in vs]), rel=1e-4)
        # ... which converges to the trace: Var(v^T H v) = 2 sum_{i != j} H_ij^2; 4 sigma tolerance
        sigma = math.sqrt(2 * ((h**2).sum() - (np.diag(h) ** 2).sum()) / k)
        assert abs(r["hessian_trace"] - trace) < 4 * sigma
        assert r["hessian_trace_stderr"] == pytest.approx(sigma, rel=0.35)
    # no mask: nothing predicted, nothing measured
    assert all(g["predicted_loss_change"] == 0 and g["measured_loss_change"] == 0 for g in rep["groups"].values())


def test_prediction_is_second_order_accurate(softmax_case):
    """Removing weights of size eps: first order misses O(eps^2), the quadratic prediction only O(eps^3)."""
    case = softmax_case
    ds = _dataset(case["x"], case["y"], case["groups"], case["labels"])
    small = np.zeros((3, 4), dtype=bool)
    small[[0, 1, 2], [1, 3, 0]] = True
    direction = np.where(small, np.array([[1.0, -1.0, 0.5, 1.0], [0.7, 1.0, -1.0, -0.6], [-0.8, 1.0, 1.0, 0.4]]), 0)
    errors = {}
    for eps in (0.2, 0.1):
        w = np.where(small, eps * direction, case["w"]).astype(np.float32)
        rep = assess_risk(linear_model(w, case["b"]), ds, {"W": (~small).astype(np.float32)}, RiskConfig(hutchinson_samples=1))
        for label, r in rep["groups"].items():
            first = abs(r["measured_loss_change"] - r["gradient_term"])
            second = abs(r["measured_loss_change"] - r["predicted_loss_change"])
            assert second < 0.1 * first
            errors[(label, eps)] = second
    for label in case["labels"]:
        ratio = errors[(label, 0.2)] / errors[(label, 0.1)]
        assert 4.0 < ratio < 16.0  # third-order remainder: about 8 when eps halves


def test_pw_loss_keeps_the_dense_targets(softmax_case):
    """pw: weights and soft targets come from the dense model, also for the masked forward."""
    case = softmax_case
    w, b = case["w"].astype(np.float64), case["b"].astype(np.float64)
    mask = (np.abs(case["w"]) > 0.5).astype(np.float32)
    ds = _dataset(case["x"], case["y"], case["groups"], case["labels"])
    rep = assess_risk(case["model"], ds, {"W": mask}, RiskConfig(loss="pw", hutchinson_samples=1))
    for g, label in enumerate(case["labels"]):
        x, y = _rows(case, g)
        p = _softmax(x @ w.T + b)
        weight = 0.75 + 0.25 * (1 - p[np.arange(len(y)), y]) ** 5
        target = np.where((p.argmax(1) == y)[:, None], p, np.eye(3)[y])

        def pw(wm):
            return float((weight * -(target * np.log(_softmax(x @ wm.T + b))).sum(1)).mean())

        grad = ((weight[:, None] * (p - target))[:, :, None] * x[:, None, :]).mean(0)
        r = rep["groups"][label]
        assert r["mean_loss"] == pytest.approx(pw(w), rel=1e-5)
        assert r["gradient_term"] == pytest.approx(float((grad * -(w * (1 - mask))).sum()), rel=1e-4)
        assert r["measured_loss_change"] == pytest.approx(pw(w * mask) - pw(w), abs=2e-6)


def test_uncertain_share_open_interval():
    probs = np.array(
        [[0.95, 0.05], [0.5, 0.5], [0.9, 0.1], [0.89, 0.11], [0.1, 0.9], [1.0, 0.0]], dtype=np.float64
    )
    assert uncertain_share(probs) == pytest.approx(2 / 6)  # only 0.5 and 0.89; 0.9 is outside the open interval
    assert uncertain_share(np.array([[0.34, 0.33, 0.33], [0.05, 0.05, 0.9]])) == pytest.approx(0.5)
    assert uncertain_share(np.zeros((0, 3))) is None


def test_uncertain_share_through_the_model():
    # W = I, b = 0: the logits are the inputs; top-class probability of each row known by hand
    logits = np.array([[4.0, 0.0], [0.3, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 0.0], [-5.0, 5.0]], dtype=np.float32)
    top = 1 / (1 + np.exp(-np.abs(logits[:, 0] - logits[:, 1])))  # 0.982, 0.574, 0.731, 0.953, 0.881, 1.0
    groups = np.array([0, 0, 0, 1, 1, 1])
    ds = _dataset(logits, np.zeros(6, dtype=np.int64), groups, ["g=a", "g=b"])
    rep = assess_risk(linear_model(np.eye(2), np.zeros(2)), ds, {}, RiskConfig(hutchinson_samples=1))
    for g, label in enumerate(["g=a", "g=b"]):
        want = float(((top > 0.1) & (top < 0.9))[groups == g].mean())
        assert rep["groups"][label]["uncertain_share"] == pytest.approx(want)
    assert rep["groups"]["g=a"]["uncertain_share"] == pytest.approx(2 / 3)
    assert rep["groups"]["g=b"]["uncertain_share"] == pytest.approx(1 / 3)


def test_rank_groups_order_and_ties():
    groups = {
        "a": {"n": 5, "predicted_loss_change": 0.1, "grad_norm": 1.0},
        "b": {"n": 5, "predicted_loss_change": 0.3, "grad_norm": 0.1},
        "c": {"n": 5, "predicted_loss_change": 0.1, "grad_norm": 2.0},  # tie with a: larger gradient first
        "d": {"n": 5, "predicted_loss_change": 0.1, "grad_norm": 1.0},  # tie with a on both: label order
        "e": {"n": 0, "predicted_loss_change": None, "grad_norm": None},  # no rows: not ranked
        "f": {"n": 5, "predicted_loss_change": -0.2, "grad_norm": 0.5},
    }
    assert rank_groups(groups) == ["b", "c", "a", "d", "f"]


def test_ranking_on_a_group_that_relies_on_the_removed_weights():
    """Group a never uses feature 1 (it is 0 there); group b needs it. Removing feature 1's weights harms only b."""
    rng = np.random.default_rng(1)
    n = 80
    x = rng.normal(size=(n, 2)).astype(np.float32)
    groups = np.arange(n) % 2
    x[groups == 0, 1] = 0.0
    y = np.where(groups == 0, x[:, 0] > 0, x[:, 1] > 0).astype(np.int64)
    w = np.array([[-2.0, -1.5], [2.0, 1.5]], dtype=np.float32)
    mask = np.array([[1, 0], [1, 0]], dtype=np.float32)
    ds = _dataset(x, y, groups, ["g=a", "g=b", "g=c"])  # g=c has no rows here
    rep = assess_risk(linear_model(w, np.zeros(2)), ds, {"W": mask}, RiskConfig(hutchinson_samples=4))
    a, b = rep["groups"]["g=a"], rep["groups"]["g=b"]
    assert a["predicted_loss_change"] == pytest.approx(0.0, abs=1e-9)
    assert a["measured_loss_change"] == pytest.approx(0.0, abs=1e-6)
    assert b["predicted_loss_change"] > 0.1 and b["measured_loss_change"] > 0.1
    assert rep["ranking"] == ["g=b", "g=a"]
    assert rep["groups"]["g=c"]["n"] == 0 and rep["groups"]["g=c"]["predicted_loss_change"] is None
    o = rep["overall"]
    assert o["predicted_loss_change"] == pytest.approx((a["predicted_loss_change"] * a["n"] + b["predicted_loss_change"] * b["n"]) / n)
    assert "g=b" in format_risk(rep).splitlines()[3]  # first table row is rank 1


def test_the_table_keeps_its_columns_apart_for_huge_values():
    """A diverging model (logits near 1e37) once printed its losses as 40-digit numbers run together; every
    cell now stays within its column, and the numbers read back to within their shown digits."""
    big = {"n": 12, "accuracy": 0.5, "mean_loss": 3.4e37, "grad_norm": 123456.789, "hessian_trace": -2.5e40,
           "uncertain_share": 0.25, "predicted_loss_change": -9.9e38, "measured_loss_change": 1234.5678}
    rep = {"settings": {"structured": False}, "sparsity": 0.5, "ranking": ["g=a"], "groups": {"g=a": big},
           "overall": None}
    lines = format_risk(rep).splitlines()
    header, row = lines[1], lines[3]
    assert len(row) == len(header)
    cells = row.split()
    assert cells[:4] == ["1", "g=a", "12", "50.00"]
    shown = [float(c) for c in cells[4:]]
    for got, want in zip(shown, [3.4e37, 123456.789, -2.5e40, 25.0, -9.9e38, 1234.5678]):
        assert got == pytest.approx(want, rel=0.05)


def test_the_table_prints_whole_group_labels():
    """Before: labels were cut at 29 characters, so race=Asian-Pac-Islander,sex=M,y=0 and ...,y=1 printed
    alike, and sex=Female read sex=F."""
    g = {"n": 5, "accuracy": 0.5, "mean_loss": 0.7, "grad_norm": 0.1, "hessian_trace": 1.0, "uncertain_share": 0.2,
         "predicted_loss_change": 0.01, "measured_loss_change": 0.02}
    labels = ["race=Asian-Pac-Islander,sex=Female,y=0", "race=Asian-Pac-Islander,sex=Female,y=1"]
    rep = {"settings": {"structured": True}, "sparsity": 0.5, "ranking": labels, "groups": dict.fromkeys(labels, g),
           "overall": g}
    lines = format_risk(rep).splitlines()
    assert [line.split()[1] for line in lines[3:5]] == labels
    assert len({len(line) for line in lines[1:2] + lines[3:6]}) == 1  # the columns stay aligned


def test_unstructured_magnitude_mask_removes_smallest_weights(softmax_case):
    case = softmax_case
    ds = _dataset(case["x"], case["y"], case["groups"], case["labels"])
    rep = risk_report(case["model"], ds, RiskConfig(sparsity=0.5, structured=False, hutchinson_samples=2))
    absw = np.abs(case["w"]).ravel()
    removed = np.argsort(absw)[:6]
    mask = np.ones(12, dtype=np.float32)
    mask[removed] = 0
    ref = assess_risk(case["model"], ds, {"W": mask.reshape(3, 4)}, RiskConfig(hutchinson_samples=2))
    assert rep["settings"]["removed_weights"] == 6
    for label in case["labels"]:
        assert rep["groups"][label]["predicted_loss_change"] == pytest.approx(ref["groups"][label]["predicted_loss_change"])
        assert rep["groups"][label]["measured_loss_change"] == pytest.approx(ref["groups"][label]["measured_loss_change"])


def _mlp(rng, f=5, h=16, c=3):
    from onnx import TensorProto, helper, numpy_helper

    w1, b1 = rng.normal(size=(h, f)).astype(np.float32), rng.normal(size=h).astype(np.float32) * 0.1
    w2, b2 = rng.normal(size=(c, h)).astype(np.float32) / 4, np.zeros(c, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"], transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_structured_measured_change_matches_onnxruntime():
    """The structured mask's measured loss change equals the CE change of the masked model in onnxruntime."""
    import onnxruntime as ort

    from onnxfair.graph import mask_weights
    from onnxfair.risk import magnitude_masks

    rng = np.random.default_rng(2)
    model = _mlp(rng)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    groups = (np.arange(60) % 3 == 0).astype(np.int64)
    ds = _dataset(x, y, groups, ["g=a", "g=b"])
    cfg = RiskConfig(sparsity=0.5, structured=True, round_to=4, hutchinson_samples=2)
    dense, masks = magnitude_masks(model, cfg)
    assert masks and all(m.min() == 0 for m in masks.values())
    rep = assess_risk(dense, ds, masks, cfg)

    def ce(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        z = sess.run(None, {"x": x})[0].astype(np.float64)
        return -np.log(_softmax(z)[np.arange(len(y)), y])

    diff = ce(mask_weights(dense, masks)) - ce(dense)
    for g, label in enumerate(["g=a", "g=b"]):
        assert rep["groups"][label]["measured_loss_change"] == pytest.approx(diff[groups == g].mean(), abs=1e-5)


def test_cli_json_and_table(tiny_linear, tmp_path):
    from cli.risk import risk

    args = [str(tiny_linear["path"]), "--data", str(tiny_linear["data"]), "--groups", "race", "--unstructured",
            "--sparsity", "0.5", "--hutchinson-samples", "3", "--seed", "1"]
    r = CliRunner().invoke(risk, args + ["--json", "-"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["groups"]) == {"race=A", "race=B", "race=C"}
    keys = {"n", "accuracy", "mean_loss", "grad_norm", "hessian_trace", "uncertain_share", "predicted_loss_change", "measured_loss_change"}
    assert all(keys <= set(g) for g in rep["groups"].values())
    assert sorted(rep["ranking"]) == sorted(rep["groups"]) and rep["sparsity"] == 0.5
    preds = [rep["groups"][lab]["predicted_loss_change"] for lab in rep["ranking"]]
    assert preds == sorted(preds, reverse=True)
    assert rep["settings"]["hutchinson_samples"] == 3 and rep["settings"]["seed"] == 1
    out = tmp_path / "risk.json"
    t = CliRunner().invoke(risk, args + ["--json", str(out)], catch_exceptions=False)
    assert t.exit_code == 0 and "pred dL" in t.stdout and "race=C" in t.stdout
    assert json.loads(out.read_text())["groups"] == rep["groups"]  # seeded: the same figures again
    bad = CliRunner().invoke(risk, args[:-6] + ["--sparsity", "1.0"])
    assert bad.exit_code == 2 and "sparsity" in bad.output


@pytest.mark.parametrize("extra, said", [
    (["--loss", "pw", "--gamma", "nan"], "--gamma nan must be a finite number >= 0, e.g. 5"),
    (["--loss", "pw", "--gamma", "inf"], "--gamma inf must be a finite number >= 0, e.g. 5"),
    (["--loss", "pw", "--beta", "nan"], "--beta nan is outside [0, 1]; it is the pw loss's weight floor, e.g. 0.75"),
    (["--hutchinson-samples", "100000000000"], "--hutchinson-samples 100000000000 is outside 0..10,000"),
])
def test_settings_that_would_spoil_every_figure_are_refused_before_any_work(tiny_linear, extra, said):
    """Before: --gamma nan gave exit 0 with every loss figure null, --beta nan failed after the progress lines
    with an internal message, and 10^11 Hutchinson samples a MemoryError traceback."""
    from cli.main import app

    r = CliRunner().invoke(app, ["risk", str(tiny_linear["path"]), "--data", str(tiny_linear["data"]), "--groups", "race",
                                  *extra])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().startswith(f"error: {said}"), r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_risk_takes_symbolic_image_dims_from_the_data():
    """Before: a model with symbolic H and W was refused ('pass --input-shape') although the data fixes the
    size; now the report equals the one that --input-shape at the data's size gives."""
    from tests.test_graph_support import GraphBuilder, ort_run

    b = GraphBuilder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    f = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.conv(x, 8, 8)])])], axis=1)
    m = b.model([("x", ["N", 3, "H", "W"])], [b.op("Gemm", [f, b.rand(3, 8), b.rand(3)], transB=1)])
    xs = np.random.default_rng(0).normal(size=(40, 3, 8, 6)).astype(np.float32)
    y = ort_run(m, {"x": xs})[0].argmax(1)
    y[::4] = (y[::4] + 1) % 3
    ds = GroupedDataset({"x": xs}, y.astype(np.int64), np.arange(40) % 2, ["g=a", "g=b"], ["g"])
    cfg = RiskConfig(sparsity=0.5, hutchinson_samples=2)
    said = []
    implicit = risk_report(m, ds, cfg, progress=said.append)
    explicit = risk_report(m, ds, cfg, input_shapes={"x": (1, 3, 8, 6)})
    assert "input 'x': symbolic dims set from the data's rows: 1,3,8,6 (--input-shape sets them)" in said
    assert json.dumps(implicit, sort_keys=True) == json.dumps(explicit, sort_keys=True)
    assert implicit["groups"]


def test_risk_warns_as_prune_does_when_its_mask_misses_the_sparsity_or_round_to_covers_a_group():
    """Before: --sparsity 0.99 assessed a mask removing 0.875 of the channels, and --round-to 100 acted as 1,
    both without a word."""
    from onnxfair.data import load_dataset
    from onnxfair.model import load_model
    from tests.conftest import FIXTURES

    m = load_model(FIXTURES / "adult_mlp.onnx")
    ds = load_dataset(FIXTURES / "adult_calib.npz", m, "race").subset(np.arange(300))
    for extra, note in (({"sparsity": 0.99}, "0.875 of the channels removed, not 0.99: every group keeps "
                                              "at least one block of --round-to 8 (2 at it)"),
                        ({"sparsity": 0.5, "round_to": 100}, "--round-to 100 is not below the size of 2 of "
                                                             "the 2 channel groups (64 channels)")):
        said = []
        rep = risk_report(m, ds, RiskConfig(hutchinson_samples=0, **extra), progress=said.append)
        assert any(line.startswith("warning: " + note) for line in said), said
        assert len(rep["warnings"]) == 1 and rep["warnings"][0].startswith(note)  # the JSON carries it too
    said = []
    rep = risk_report(m, ds, RiskConfig(hutchinson_samples=0, sparsity=0.5), progress=said.append)
    assert not any(line.startswith("warning") for line in said) and rep["warnings"] == []
